"""What every attention layer of the runtime shares: rotated query/key heads and one KV-cache step.

Standard attention (``modeling_slimformer.SlimformerAttention``) and shaped attention
(``sas.ShapedAttention``) differ in their values, their output map and how they mix; their queries and
keys (GQA, RoPE, optional q/k bias and per-head q/k RMSNorm) and their dealings with the cache are the
same, so they live here once. Tensor names are the base family's (``q_proj``, ``k_proj``, ``q_norm``,
``k_norm``), so a converted layer keeps its trained queries and keys.

Shipped inside converted checkpoints: imports only torch, transformers and the sibling runtime files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from .kv_cache import past_key_validity, written_in_place
from .masks import additive_mask, attention_bias, visible_keys


@dataclass
class CacheStep:
    """Keys and values to attend over after this step, and which positions are real tokens.

    ``new_valid`` ``[B, q]`` marks this step's non-padding tokens; ``past_valid`` is the cache's record of
    its stored positions (``None`` without a cache) and ``past_len`` their number. ``written_valid`` is set
    when an evicting cache wrote a one-token step into a free storage slot instead of appending it: the
    token then sees exactly those valid slots (itself included), wherever they lie.
    """

    key: torch.Tensor
    value: torch.Tensor
    new_valid: torch.Tensor | None
    past_valid: torch.Tensor | None
    past_len: int
    written_valid: torch.Tensor | None = None

    def visible(self, q_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor | None:
        """Which keys each query sees (``masks.visible_keys``; ``None`` = plain causal)."""
        if self.written_valid is not None:
            return self.written_valid[:, :, None, :]
        return visible_keys(
            self.new_valid,
            self.past_valid,
            q_len,
            self.past_len,
            sliding_window=sliding_window,
            device=device,
        )

    def bias(
        self,
        q_len: int,
        dtype: torch.dtype,
        device: torch.device,
        sliding_window: int | None,
        implicit_causal: bool,
    ) -> torch.Tensor | None:
        """The additive mask of :meth:`visible` (``masks.attention_bias``; ``None`` where no mask is exact)."""
        if self.written_valid is not None:
            return additive_mask(self.written_valid[:, :, None, :], dtype)
        return attention_bias(
            self.past_valid,
            self.new_valid,
            q_len,
            self.past_len,
            dtype,
            device,
            sliding_window,
            implicit_causal=implicit_causal,
        )


class QueryKeyHeads(nn.Module):
    """Query/key projections of one attention layer, and the cache step both attention kinds take."""

    def __init__(self, config: Any, layer_idx: int, cache_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.cache_idx = cache_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        if config.qk_norm:
            self.q_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = LlamaRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def queries_keys(
        self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated queries ``[B, H, q, D]`` and keys ``[B, H_kv, q, D]``."""
        batch, q_len, _ = hidden_states.shape
        shape = (batch, q_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape)
        key = self.k_proj(hidden_states).view(shape)
        if self.config.qk_norm:  # Qwen3 normalises each head before RoPE
            query, key = self.q_norm(query), self.k_norm(key)
        cos, sin = position_embeddings
        return apply_rotary_pos_emb(query.transpose(1, 2), key.transpose(1, 2), cos, sin)

    def cache_step(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> CacheStep:
        """Store this step's keys/values in the layer's cache slot (if any) and return what to attend over.

        The validity record is read *before* the update: an evicting cache keeps different tokens per KV
        head, so the mask must come from the cache, not from the caller's 2-D attention mask.
        """
        batch, q_len = key.shape[0], key.shape[-2]
        new_valid = attention_mask[:, -q_len:].bool() if attention_mask is not None else None
        if past_key_values is None:
            return CacheStep(key, value, new_valid, None, 0)
        past_valid, past_len = past_key_validity(past_key_values, self.cache_idx, attention_mask, batch)
        key, value = past_key_values.update(key, value, self.cache_idx, {"new_valid": new_valid})
        written = written_in_place(past_key_values, self.cache_idx)
        if written is True:  # the token went into the free slot and every stored slot is real: no mask at all
            return CacheStep(key, value, new_valid, None, key.shape[-2] - 1)
        return CacheStep(key, value, new_valid, past_valid, past_len, written)
