"""Rotary position embeddings of the runtime, independent of the installed transformers release.

transformers 4.57 describes RoPE as ``rope_theta`` + ``rope_scaling`` (``{"type"|"rope_type": ...}``);
transformers 5 folds both into ``rope_parameters`` (``{"rope_type": ..., "rope_theta": ..., ...}``) and its
``LlamaRotaryEmbedding`` reads only that. A converted checkpoint must load under either release, so the
runtime stores one normalised ``rope_parameters`` dict (:func:`normalise_rope`) and computes the inverse
frequencies itself for the RoPE types Llama-family checkpoints use: ``default``, ``linear`` and ``llama3``.
Anything else is refused when the checkpoint is read, not silently approximated.

Shipped inside converted checkpoints: imports only torch and the standard library.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_THETA = 10000.0


def normalise_rope(
    rope_parameters: dict[str, Any] | None,
    rope_theta: float | None = None,
    rope_scaling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One ``rope_parameters`` dict from either release's fields (``rope_parameters`` wins when given).

    Raises ``ValueError`` naming the type for RoPE variants the runtime does not implement.
    """
    if rope_parameters:
        params = dict(rope_parameters)
    else:
        params = dict(rope_scaling or {})
        if "type" in params and "rope_type" not in params:  # the pre-4.45 spelling
            params["rope_type"] = params.pop("type")
    params.pop("type", None)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", float(rope_theta) if rope_theta is not None else DEFAULT_THETA)
    if params["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"RoPE type {params['rope_type']!r} is not supported by the slimformer runtime; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return params


def inverse_frequencies(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Inverse frequencies ``[head_dim / 2]`` (float32) of a normalised ``rope_parameters`` dict."""
    base = float(params["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = params["rope_type"]
    if kind == "linear":
        return inv_freq / float(params["factor"])
    if kind == "llama3":
        return _llama3(inv_freq, params)
    return inv_freq


def _llama3(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths divided by ``factor``, short ones kept,
    a smooth blend in between (Meta's published formula)."""
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context = float(params["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """``forward(x, position_ids) -> (cos, sin)``, each ``[B, q, head_dim]`` in ``x``'s dtype."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.params = normalise_rope(getattr(config, "rope_parameters", None))
        self.head_dim = config.head_dim
        self.register_buffer("inv_freq", inverse_frequencies(self.params, self.head_dim), persistent=False)

    def reset_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute ``inv_freq``: a non-persistent buffer is not in the weights, so a model built on the meta
        device (slimformer's loader, transformers 5's ``from_pretrained``) must fill it in."""
        if device is None and self.inv_freq.is_meta:
            return  # still being built on meta; the loader calls again with a device
        fresh = inverse_frequencies(self.params, self.head_dim)
        if device is not None:
            self.inv_freq = fresh.to(device)
        else:
            with torch.no_grad():
                self.inv_freq.copy_(fresh)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float32)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)
