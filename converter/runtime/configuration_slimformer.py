"""Configuration of a slimformer checkpoint.

The config is the base family's own config (Llama, Mistral, Qwen2, Qwen3 or BERT fields, flattened at
the top level as in the source checkpoint) plus three slimformer fields:

* ``base_model_type`` -- the family the weights come from (``llama``, ``mistral``, ``qwen2``, ``qwen3``,
  ``bert``).
* ``block_configs`` -- one entry per layer, in the vocabulary of NVIDIA's Nemotron-NAS checkpoints:
  ``{"attention": {"no_op": bool, ...}, "ffn": {"no_op": bool}}``. A ``no_op`` sub-block has no
  weights and contributes nothing (its residual branch is absent).
* ``kv_cache`` -- the default KV-cache policy used by ``generate()`` (``None`` = plain dynamic cache).

This file is copied into every converted checkpoint next to ``modeling_slimformer.py`` so the directory
loads with plain ``transformers`` and ``trust_remote_code=True``. It must import nothing but
``transformers`` and the standard library.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .rotary import normalise_rope

ENCODER_FAMILIES = ("bert",)


def default_block_config() -> dict[str, Any]:
    return {"attention": {"no_op": False}, "ffn": {"no_op": False}}


class SlimformerConfig(PretrainedConfig):
    model_type = "slimformer"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        base_model_type: str = "llama",
        block_configs: list[dict[str, Any]] | None = None,
        kv_cache: dict[str, Any] | None = None,
        vocab_size: int = 32000,
        hidden_size: int = 256,
        intermediate_size: int = 688,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 8,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict[str, Any] | None = None,
        rope_theta: float | None = None,
        rope_scaling: dict[str, Any] | None = None,
        attention_bias: bool = False,
        attention_output_bias: bool = False,
        mlp_bias: bool = False,
        qk_norm: bool = False,
        sliding_window: int | None = None,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.base_model_type = base_model_type
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        # One RoPE description under either transformers release (see rotary.py): never assign
        # ``rope_scaling``, which transformers 5 turns into a deprecated alias of ``rope_parameters``.
        self.rope_parameters = normalise_rope(rope_parameters, rope_theta, rope_scaling)
        self.attention_bias = attention_bias
        self.attention_output_bias = attention_output_bias
        self.mlp_bias = mlp_bias
        self.qk_norm = qk_norm
        self.sliding_window = sliding_window
        self.block_configs = block_configs or [default_block_config() for _ in range(num_hidden_layers)]
        if len(self.block_configs) != num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(self.block_configs)} entries but num_hidden_layers is {num_hidden_layers}"
            )
        self.kv_cache = kv_cache
        self.use_cache = use_cache
        if base_model_type in ENCODER_FAMILIES:
            kwargs.setdefault("is_decoder", False)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        # Set after the base class: transformers 4.57 would reset these to its defaults, and transformers 5
        # no longer gives every config special-token ids at all (the runtime and generate() read them).
        self.tie_word_embeddings = tie_word_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @property
    def is_encoder(self) -> bool:
        return self.base_model_type in ENCODER_FAMILIES

    def attention_kept(self, layer: int) -> bool:
        return not self.block_configs[layer]["attention"].get("no_op", False)

    def ffn_kept(self, layer: int) -> bool:
        return not self.block_configs[layer]["ffn"].get("no_op", False)

    @property
    def cache_layer_indices(self) -> list[int]:
        """Layers that keep attention, in order; layer ``cache_layer_indices[j]`` owns cache slot ``j``."""
        return [i for i in range(self.num_hidden_layers) if self.attention_kept(i)]
