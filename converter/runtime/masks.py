"""Attention masks of the runtime, and the softmax probabilities a scoring cache reads, written once for
standard and shaped (SAS) attention and for the ONNX trace.

A query sees the cache's stored keys that hold real tokens (the cache's own validity record, which is
right after eviction and under left padding, unlike the caller's logical 2-D mask) and, causally, the
non-padding tokens of its own step. :func:`visible_keys` gives that as booleans; :func:`attention_bias`
as the additive bias the attention kernels take -- or ``None`` where plain causal attention is exact,
which lets SDPA take its fast path.

Shipped inside converted checkpoints: imports only torch.
"""

from __future__ import annotations

import torch


def visible_keys(
    new_valid: torch.Tensor | None,
    past_valid: torch.Tensor | None,
    query_len: int,
    past_len: int,
    *,
    causal: bool = True,
    sliding_window: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """Which keys each query may see: bool ``[B | 1, 1 | H_kv, q, past + q]``.

    ``new_valid`` is ``[B, q]`` (False = padding), ``past_valid`` ``[B, 1 | H_kv, past]`` as the cache reports
    it (``None``: every stored key is real). Returns ``None`` for plain causal attention with no past and no
    padding.
    """
    no_padding = new_valid is None or bool(new_valid.all())
    if causal and past_len == 0 and no_padding and sliding_window is None:
        return None
    visible = torch.ones(query_len, query_len, dtype=torch.bool, device=device)
    visible = (visible.tril() if causal else visible)[None, None]
    if new_valid is not None:
        visible = visible & new_valid[:, None, None, :].bool()
    if past_len > 0:
        if past_valid is None:
            past = torch.ones(1, 1, query_len, past_len, dtype=torch.bool, device=device)
        else:
            past = past_valid[:, :, None, :].expand(-1, -1, query_len, -1)
        batch, heads = max(past.shape[0], visible.shape[0]), max(past.shape[1], visible.shape[1])
        visible = torch.cat([past.expand(batch, heads, -1, -1), visible.expand(batch, heads, -1, -1)], dim=-1)
    if sliding_window is not None:
        # Only exact for a cache whose physical and logical positions agree (no eviction).
        q_pos = torch.arange(past_len, past_len + query_len, device=device)[:, None]
        k_pos = torch.arange(past_len + query_len, device=device)[None, :]
        visible = visible & (k_pos > q_pos - sliding_window)
    return visible


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Booleans as an additive bias; a finite minimum instead of -inf keeps fully padded rows finite."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(
        ~visible, torch.finfo(dtype).min
    )


def attention_bias(
    past_valid: torch.Tensor | None,
    new_valid: torch.Tensor | None,
    query_len: int,
    past_len: int,
    dtype: torch.dtype,
    device: torch.device,
    sliding_window: int | None = None,
    implicit_causal: bool = True,
) -> torch.Tensor | None:
    """Additive mask ``[B, 1 or H_kv, q, past + q]`` of :func:`visible_keys`, or ``None`` when no mask is exact.

    ``None`` is returned for a prompt without padding only if ``implicit_causal`` (the kernel treats a
    missing mask as causal, as SDPA and flash do; eager does not), and for a one-token step whose whole
    past is real (nothing to hide from it).
    """
    no_padding = new_valid is None or bool(new_valid.all())
    if sliding_window is None and no_padding:
        if past_len == 0 and (implicit_causal or query_len == 1):
            return None
        if past_len > 0 and query_len == 1 and (past_valid is None or bool(past_valid.all())):
            return None
    visible = visible_keys(
        new_valid, past_valid, query_len, past_len, sliding_window=sliding_window, device=device
    )
    if visible is None:  # causal, no past, no padding, but the kernel needs the mask spelled out
        visible = torch.ones(query_len, query_len, dtype=torch.bool, device=device).tril()[None, None]
    return additive_mask(visible, dtype)


def grouped_probabilities(
    query: torch.Tensor,
    keys: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scaling + bias)`` in float32 for query rows ``[start, stop)``, ``[B, H_kv, G, c, P]``.

    What a scoring cache needs when the attention did not hand over its probabilities (long prompts,
    scored in chunks; the ONNX trace). ``query`` ``[B, H, q, D]``, ``keys`` ``[B, H_kv, P, D]`` (this step's
    keys included); query head ``j * G + g`` belongs to KV head ``j`` (transformers' ``repeat_kv`` order).
    ``bias`` is the attention's own ``[B, 1 | H_kv | H, q, P]``; ``None`` means plain causal attention, where
    query row ``t`` sees the stored slots up to ``P - q + t``.
    """
    batch, n_heads, q_len, dim = query.shape
    kv_heads, phys = keys.shape[1], keys.shape[2]
    groups = n_heads // kv_heads
    stop = q_len if stop is None else stop
    rows = stop - start
    queries = query[:, :, start:stop].float().reshape(batch, kv_heads, groups, rows, dim)
    logits = queries @ keys.float()[:, :, None].transpose(-1, -2) * scaling  # [B, H_kv, G, c, P]
    if bias is None:
        last_visible = torch.arange(start, stop, device=query.device)[:, None] + (phys - q_len)
        future = torch.arange(phys, device=query.device)[None, :] > last_visible
        logits = logits.masked_fill(future, float("-inf"))
    else:
        heads = bias.shape[1]
        outer = (
            heads // groups if heads == n_heads else heads
        )  # [.., 1 | H_kv | H, ..] -> [.., 1 | H_kv, 1 | G, ..]
        logits = logits + bias[:, :, start:stop].float().reshape(bias.shape[0], outer, -1, rows, phys)
    return logits.softmax(dim=-1)


def attend_with_probabilities(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that also returns its probabilities, for a scoring cache on short steps.

    Grouped per KV head (no ``repeat_kv`` copy of the cache): ``query`` ``[B, H, q, D]``, ``key``/``value``
    ``[B, H_kv, P, D]``, ``bias`` ``[B, 1 | H_kv | H, q, P]`` or ``None`` (no mask). Returns the output as
    ``[B, q, H, D]`` (transformers' attention-function layout) and the probabilities ``[B, H, q, P]``
    (the float32 softmax, as eager attention computes it before casting to the values' dtype).
    """
    batch, heads, q_len, dim = query.shape
    kv_heads, phys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    # The G query heads of a KV head become G * q query rows of it: one plain batched matmul against the
    # stored keys and values, where broadcasting [B, H_kv, 1, P, D] over G would copy them every step.
    rows = query.reshape(batch, kv_heads, groups * q_len, dim)
    logits = (rows @ key.transpose(-1, -2)).mul_(scaling)  # [B, H_kv, G * q, P]
    if bias is not None:
        outer = bias.shape[1] // groups if bias.shape[1] == heads else bias.shape[1]
        logits = logits.view(batch, kv_heads, groups, q_len, phys) + bias.reshape(
            bias.shape[0], outer, -1, q_len, phys
        )
    probs = logits.float().softmax(dim=-1).view(batch, kv_heads, groups * q_len, phys)
    output = probs.to(value.dtype) @ value  # [B, H_kv, G * q, D_v]
    return output.view(batch, heads, q_len, -1).transpose(1, 2), probs.view(batch, heads, q_len, phys)
