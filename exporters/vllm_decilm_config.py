"""Configuration of a Nemotron-NAS / DeciLM checkpoint written by ``slimformer export vllm``.

vLLM runs Nemotron-NAS as ``DeciLMForCausalLM`` (``vllm/model_executor/models/nemotron_nas.py``), but neither
vLLM nor transformers ships a config class for ``model_type: "nemotron-nas"``: NVIDIA's checkpoints carry
their own. This file is that config class for slimformer's exports; it is copied into every export as
``configuration_decilm.py`` and named in ``auto_map``, so the directory loads with
``trust_remote_code=True``. It must import nothing but ``transformers`` and the standard library, and it
must work under transformers 4.57 (slimformer's own environment) and 5.x (what vLLM brings).

vLLM reads each layer's block config by attribute (``config.block_configs[i].attention.no_op``) and tells
the FFN width fields apart with ``hasattr`` (``ffn_mult`` wins over ``intermediate_size`` when present), so
the sections are dicts that also answer attribute reads and have exactly the keys of ``config.json``:

* ``attention``: ``no_op``, ``replace_with_linear`` (always false), ``n_heads_in_group`` (query heads per
  KV head; ``null`` when ``no_op``);
* ``ffn``: ``no_op``, ``replace_with_linear`` (always false), ``intermediate_size`` (``null`` when
  ``no_op``). There is deliberately no ``ffn_mult``: vLLM rounds ``ffn_mult`` widths up to a multiple of 256,
  which cannot reproduce most real widths; ``intermediate_size`` is exact.

Attention biases follow vLLM's reading: ``qkv_bias`` says whether q/k/v projections have a bias,
``attention_bias`` whether the output projection has one (vLLM uses ``attention_bias`` for both unless
``qkv_bias`` is present, so exports always write ``qkv_bias``).
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

DEFAULT_ROPE_THETA = 10000.0


class BlockSection(dict):
    """A block-config section: a plain dict (JSON, pickle) whose keys can also be read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def block_section(value: dict[str, Any]) -> BlockSection:
    return BlockSection(
        {key: block_section(item) if isinstance(item, dict) else item for key, item in value.items()}
    )


def rope_parameters_of(
    rope_parameters: dict[str, Any] | None, rope_theta: float | None, rope_scaling: dict[str, Any] | None
) -> dict[str, Any]:
    """One transformers-5 style ``rope_parameters`` dict from either release's fields."""
    params = dict(rope_parameters or rope_scaling or {})
    if "type" in params:  # the pre-4.45 spelling of rope_type
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", float(rope_theta) if rope_theta is not None else DEFAULT_ROPE_THETA)
    return params


class DeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        block_configs: list[dict[str, Any]] | None = None,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_hidden_layers: int = 32,
        num_attention_heads: int = 32,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict[str, Any] | None = None,
        rope_theta: float | None = None,
        rope_scaling: dict[str, Any] | None = None,
        attention_bias: bool = False,
        qkv_bias: bool = False,
        mlp_bias: bool = False,
        attention_dropout: float = 0.0,
        sliding_window: int | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        # Both spellings: transformers 5 and vLLM read rope_parameters, 4.57-era tools read rope_theta.
        self.rope_parameters = rope_parameters_of(rope_parameters, rope_theta, rope_scaling)
        self.rope_theta = self.rope_parameters["rope_theta"]
        self.attention_bias = attention_bias
        self.qkv_bias = qkv_bias
        self.mlp_bias = mlp_bias
        self.attention_dropout = attention_dropout
        self.sliding_window = sliding_window
        self.use_cache = use_cache
        if block_configs is None:
            block_configs = [
                {
                    "attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": 1},
                    "ffn": {
                        "no_op": False,
                        "replace_with_linear": False,
                        "intermediate_size": 4 * hidden_size,
                    },
                }
                for _ in range(num_hidden_layers)
            ]
        if len(block_configs) != num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(block_configs)} entries but num_hidden_layers is {num_hidden_layers}"
            )
        self.block_configs = [block_section(dict(block)) for block in block_configs]
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            **kwargs,
        )
        # Set again after the base class: some transformers releases reset these to their own defaults.
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def attention_kept(self, layer: int) -> bool:
        return not self.block_configs[layer]["attention"]["no_op"]

    def ffn_kept(self, layer: int) -> bool:
        return not self.block_configs[layer]["ffn"]["no_op"]
