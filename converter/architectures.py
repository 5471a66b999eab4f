"""Architecture adapters: where each supported family keeps its modules, and how its config maps onto
the slimformer runtime.

An adapter does three things for the checkpoint graph:

* ``runtime_config(config)`` -- the base config, flattened, plus the slimformer fields that tell the
  runtime which optional pieces the family has (q/k/v biases, q/k norms, sliding window);
* ``classify(name)`` -- which graph node a tensor of the source checkpoint belongs to, under which
  canonical name (``None`` for buffers and task heads that are not part of the model);
* ``expected_shape(name, config)`` -- the shape a canonical tensor must have, to reject mismatched files.

Decoders (Llama, Mistral, Qwen2, Qwen3) share Llama's tensor names; BERT keeps its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import SlimformerError

#: Sections of the graph a tensor can belong to.
EMBEDDINGS, ATTENTION, MLP, FINAL_NORM, HEAD = "embeddings", "attention", "mlp", "final_norm", "head"

_DROP_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


@dataclass(frozen=True)
class TensorSlot:
    section: str
    layer: int | None
    name: str  # canonical name in converted checkpoints


class Architecture:
    family: str = ""
    model_types: tuple[str, ...] = ()
    kind: str = "decoder"

    def runtime_config(self, config: dict[str, Any]) -> dict[str, Any]:
        base = {k: v for k, v in config.items() if k not in _DROP_CONFIG_KEYS}
        base["base_model_type"] = self.family
        return base

    def classify(self, name: str) -> TensorSlot | None:
        raise NotImplementedError

    def expected_shape(self, name: str, config: Any) -> tuple[int, ...] | None:
        raise NotImplementedError


class LlamaFamily(Architecture):
    """Llama and the families that share its layout: Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norm)."""

    family = "llama"
    model_types = ("llama",)
    _layer = re.compile(r"^(?:model\.)?layers\.(\d+)\.(.+)$")
    # Simplified (SAS) layers add per-head shaped-attention gains, reparameterised value/projection maps and the
    # MLP branch gain (converter/runtime/sas.py).
    _attention = re.compile(
        r"^(input_layernorm\.weight|self_attn\.[qkvo]_proj\.(?:weight|bias)|self_attn\.[qk]_norm\.weight"
        r"|self_attn\.shaped_(?:alpha|beta|gamma)|self_attn\.(?:value|proj)\.(?:alpha|beta|delta))$"
    )
    _mlp = re.compile(
        r"^(post_attention_layernorm\.weight|mlp\.(?:gate|up|down)_proj\.(?:weight|bias)|mlp_gain)$"
    )

    def runtime_config(self, config: dict[str, Any]) -> dict[str, Any]:
        base = super().runtime_config(config)
        heads = base["num_attention_heads"]
        base["head_dim"] = base.get("head_dim") or base["hidden_size"] // heads
        base.setdefault("num_key_value_heads", heads)
        base.setdefault("hidden_act", "silu")
        base.update(self.optional_parts(config))
        return base

    def optional_parts(self, config: dict[str, Any]) -> dict[str, Any]:
        bias = bool(config.get("attention_bias", False))
        return {
            "attention_bias": bias,
            "attention_output_bias": bias,
            "mlp_bias": bool(config.get("mlp_bias", False)),
            "qk_norm": False,
            "sliding_window": None,
        }

    def classify(self, name: str) -> TensorSlot | None:
        if name in ("model.embed_tokens.weight", "embed_tokens.weight"):
            return TensorSlot(EMBEDDINGS, None, "model.embed_tokens.weight")
        if name in ("model.norm.weight", "norm.weight"):
            return TensorSlot(FINAL_NORM, None, "model.norm.weight")
        if name == "lm_head.weight":
            return TensorSlot(HEAD, None, "lm_head.weight")
        match = self._layer.match(name)
        if not match:
            raise _unknown_tensor(name, self.family)
        layer, rest = int(match.group(1)), match.group(2)
        canonical = f"model.layers.{layer}.{rest}"
        if rest.endswith("rotary_emb.inv_freq"):
            return None  # a derived buffer some old exports saved
        if self._attention.match(rest):
            return TensorSlot(ATTENTION, layer, canonical)
        if self._mlp.match(rest):
            return TensorSlot(MLP, layer, canonical)
        raise _unknown_tensor(name, self.family)

    def expected_shape(self, name: str, config: Any) -> tuple[int, ...] | None:
        hidden, inner = config.hidden_size, config.intermediate_size
        q_out = config.num_attention_heads * config.head_dim
        kv_out = config.num_key_value_heads * config.head_dim
        shapes = {
            "embed_tokens.weight": (config.vocab_size, hidden),
            "lm_head.weight": (config.vocab_size, hidden),
            "norm.weight": (hidden,),
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "q_proj.weight": (q_out, hidden),
            "q_proj.bias": (q_out,),
            "k_proj.weight": (kv_out, hidden),
            "k_proj.bias": (kv_out,),
            "v_proj.weight": (kv_out, hidden),
            "v_proj.bias": (kv_out,),
            "o_proj.weight": (hidden, q_out),
            "o_proj.bias": (hidden,),
            "q_norm.weight": (config.head_dim,),
            "k_norm.weight": (config.head_dim,),
            "gate_proj.weight": (inner, hidden),
            "gate_proj.bias": (inner,),
            "up_proj.weight": (inner, hidden),
            "up_proj.bias": (inner,),
            "down_proj.weight": (hidden, inner),
            "down_proj.bias": (hidden,),
        }
        return shapes.get(".".join(name.split(".")[-2:]))


class MistralFamily(LlamaFamily):
    family = "mistral"
    model_types = ("mistral",)

    def optional_parts(self, config: dict[str, Any]) -> dict[str, Any]:
        return {
            **super().optional_parts(config),
            "attention_bias": False,
            "attention_output_bias": False,
            "sliding_window": config.get("sliding_window"),
        }


class Qwen2Family(LlamaFamily):
    family = "qwen2"
    model_types = ("qwen2",)

    def optional_parts(self, config: dict[str, Any]) -> dict[str, Any]:
        _refuse_sliding(config, self.family)
        return {
            **super().optional_parts(config),
            "attention_bias": True,
            "attention_output_bias": False,
            "mlp_bias": False,
        }


class Qwen3Family(LlamaFamily):
    family = "qwen3"
    model_types = ("qwen3",)

    def optional_parts(self, config: dict[str, Any]) -> dict[str, Any]:
        _refuse_sliding(config, self.family)
        return {**super().optional_parts(config), "qk_norm": True, "mlp_bias": False}


class BertFamily(Architecture):
    """BERT encoders (post-norm). Task heads (``cls.*``) are not part of the converted encoder."""

    family = "bert"
    model_types = ("bert",)
    kind = "encoder"
    _embeddings = re.compile(
        r"^embeddings\.(?:(?:word|position|token_type)_embeddings\.weight|LayerNorm\.(?:weight|bias))$"
    )
    _layer = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
    _attention = re.compile(
        r"^attention\.(?:self\.(?:query|key|value)|output\.dense|output\.LayerNorm)\.(?:weight|bias)$"
    )
    _mlp = re.compile(r"^(?:intermediate\.dense|output\.dense|output\.LayerNorm)\.(?:weight|bias)$")

    def runtime_config(self, config: dict[str, Any]) -> dict[str, Any]:
        embedding_type = config.get("position_embedding_type", "absolute")
        if embedding_type != "absolute":
            raise SlimformerError(
                f"BERT with position_embedding_type={embedding_type!r} is not supported",
                fix="use a BERT checkpoint with absolute position embeddings",
            )
        base = super().runtime_config(config)
        base.setdefault("hidden_act", "gelu")
        base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
        return base

    def classify(self, name: str) -> TensorSlot | None:
        if name.startswith("bert."):
            name = name[len("bert.") :]
        if name.startswith("cls.") or name == "embeddings.position_ids":
            return None
        if self._embeddings.match(name):
            return TensorSlot(EMBEDDINGS, None, name)
        if name.startswith("pooler.dense."):
            return TensorSlot(HEAD, None, name)
        match = self._layer.match(name)
        if not match:
            raise _unknown_tensor(name, self.family)
        layer, rest = int(match.group(1)), match.group(2)
        if self._attention.match(rest):
            return TensorSlot(ATTENTION, layer, name)
        if self._mlp.match(rest):
            return TensorSlot(MLP, layer, name)
        raise _unknown_tensor(name, self.family)

    def expected_shape(self, name: str, config: Any) -> tuple[int, ...] | None:
        hidden, inner = config.hidden_size, config.intermediate_size
        if name.endswith("word_embeddings.weight"):
            return (config.vocab_size, hidden)
        if name.endswith("position_embeddings.weight"):
            return (config.max_position_embeddings, hidden)
        if name.endswith("token_type_embeddings.weight"):
            return (config.type_vocab_size, hidden)
        if name.endswith("intermediate.dense.weight"):
            return (inner, hidden)
        if name.endswith("intermediate.dense.bias"):
            return (inner,)
        if ".output.dense.weight" in name and ".attention." not in name:
            return (hidden, inner)
        if name.endswith(".weight") and "LayerNorm" not in name:
            return (hidden, hidden)
        return (hidden,)


FAMILIES: dict[str, Architecture] = {
    arch.family: arch for arch in (LlamaFamily(), MistralFamily(), Qwen2Family(), Qwen3Family(), BertFamily())
}
SUPPORTED = ", ".join(sorted(FAMILIES))


def architecture_for(model_type: str) -> Architecture:
    """The adapter for a ``model_type``; a clear error naming the supported families otherwise."""
    for arch in FAMILIES.values():
        if model_type in arch.model_types:
            return arch
    raise SlimformerError(
        f"model family {model_type!r} is not supported",
        fix=f"slimformer converts these families: {SUPPORTED}",
    )


def _refuse_sliding(config: dict[str, Any], family: str) -> None:
    if config.get("use_sliding_window"):
        raise SlimformerError(
            f"{family} checkpoints with use_sliding_window=true are not supported (per-layer windows)",
            fix="use a checkpoint with full attention",
        )


def _unknown_tensor(name: str, family: str) -> SlimformerError:
    return SlimformerError(
        f"tensor {name!r} is not part of the {family} layout",
        fix="check that config.json's model_type matches the weights",
    )
