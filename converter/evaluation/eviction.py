"""Quality under KV-cache eviction: prefill a prompt, then decode (teacher-forced) the continuation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from slimformer.converter.calibration import token_stream
from slimformer.converter.errors import SlimformerError
from slimformer.converter.progress import progress_bar
from slimformer.converter.runtime.kv_cache import returned_cache

from .common import (
    CacheFactory,
    _evaluating,
    _logits,
    _max_positions,
    _model_device,
    _token_logprobs,
)


@dataclass(frozen=True)
class EvictionPerplexityResult:
    """Perplexity of decoded continuations under the model's KV cache, and on the same tokens with a full
    cache (one forward, nothing evicted); see :func:`eviction_perplexity_of_tokens`.

    ``cache_tokens`` is what the cache physically held per slot after the last step (the largest slot; a
    full cache holds ``prompt_len + continuation - 1``), or ``None`` when the cache cannot tell. The
    ``full_cache_*`` fields are ``None`` when the comparison was not asked for.
    """

    perplexity: float
    nll: float
    full_cache_perplexity: float | None
    full_cache_nll: float | None
    n_tokens: int
    n_windows: int
    prompt_len: int
    continuation: int
    chunk: int
    cache_tokens: int | None
    source: str

    @property
    def increase_pct(self) -> float | None:
        """How much eviction raised perplexity over the full cache, in percent."""
        if self.full_cache_perplexity is None:
            return None
        return 100.0 * (self.perplexity / self.full_cache_perplexity - 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "increase_pct": self.increase_pct}


def _cache_tokens(cache: Any) -> int | None:
    """Tokens the cache holds in its fullest slot (an evicting cache says; a plain one keeps all)."""
    lengths = getattr(cache, "kept_lengths", None)
    if callable(lengths):
        return max(lengths(), default=0)
    seq_length = getattr(cache, "get_seq_length", None)
    return int(seq_length()) if callable(seq_length) else None


def _decoded_logprobs(
    model: torch.nn.Module,
    prompt: torch.Tensor,
    continuation: torch.Tensor,
    cache_factory: CacheFactory | None,
    chunk: int,
    on_tokens: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, Any]:
    """``log p`` of each continuation token ``[B, C]`` (float64) when ``prompt [B, P]`` is prefilled in one
    forward and ``continuation [B, C]`` is fed ``chunk`` tokens per forward through the same cache.

    Returns the cache too, so callers can see what it holds. Rows are independent: tokens a row feeds
    after its own last scored token (right padding) cannot change that row's scores. ``on_tokens(n)`` is
    told after each forward how many continuation tokens it scored (progress: decoding is the long part).
    """
    on_tokens = on_tokens or (lambda n: None)
    batch, prompt_len = prompt.shape
    n_cont = continuation.shape[1]
    cache_kwargs = {} if cache_factory is None else {"past_key_values": cache_factory()}
    # The mask covers every logical position so far (the usual generate() convention); slimformer's runtime
    # masks by what its cache actually holds, other models by this mask.
    mask = torch.ones(batch, prompt_len + n_cont, dtype=torch.long, device=prompt.device)
    out = model(input_ids=prompt, attention_mask=mask[:, :prompt_len], use_cache=True, **cache_kwargs)
    cache = returned_cache(out)
    if cache is None:
        raise SlimformerError(
            "the model returned no past_key_values with use_cache=True, so decoding cannot be measured",
            fix="measure a model that supports a KV cache",
        )
    first = _token_logprobs(out.logits[:, -1:], continuation[:, :1])
    on_tokens(1)
    rest = feed_continuation(model, cache, continuation, prompt_len, chunk, on_tokens)
    return torch.cat([first, rest], dim=1), cache


def feed_continuation(
    model: torch.nn.Module,
    cache: Any,
    continuation: torch.Tensor,
    prompt_len: int,
    chunk: int,
    on_tokens: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """``log p`` ``[B, C - 1]`` of continuation tokens 1.. when ``continuation`` is teacher-forced ``chunk``
    tokens per forward through ``cache``, which already holds the ``prompt_len``-token prompt (token 0 is
    predicted by the prefill). The last continuation token is only ever predicted, never fed."""
    batch, n_cont = continuation.shape
    mask = torch.ones(batch, prompt_len + n_cont, dtype=torch.long, device=continuation.device)
    pieces = [torch.zeros(batch, 0, dtype=torch.float64, device=continuation.device)]
    fed = prompt_len
    for start in range(0, n_cont - 1, chunk):
        stop = min(start + chunk, n_cont - 1)
        out = model(
            input_ids=continuation[:, start:stop],
            attention_mask=mask[:, : fed + stop - start],
            past_key_values=cache,
            use_cache=True,
        )
        fed += stop - start
        pieces.append(_token_logprobs(out.logits, continuation[:, start + 1 : stop + 1]))
        if on_tokens is not None:
            on_tokens(stop - start)
    return torch.cat(pieces, dim=1)


def _full_cache_logprobs(
    model: torch.nn.Module, prompt: torch.Tensor, continuation: torch.Tensor
) -> torch.Tensor:
    """The same ``[B, C]`` log-probabilities from one forward over prompt + continuation: nothing evicted."""
    ids = torch.cat([prompt, continuation[:, :-1]], dim=1)
    logits = _logits(model, ids, torch.ones_like(ids), None)
    return _token_logprobs(logits[:, prompt.shape[1] - 1 :], continuation)


def eviction_perplexity_of_tokens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    prompt_len: int,
    continuation: int,
    chunk: int = 1,
    batch_size: int = 8,
    max_windows: int | None = None,
    progress: bool = False,
    cache_factory: CacheFactory | None = None,
    full_cache: bool = True,
    source: str = "<tokens>",
) -> EvictionPerplexityResult:
    """Perplexity of ``continuation`` tokens decoded after a ``prompt_len``-token prompt, under a KV cache.

    ``ids`` (1-D stream or 2-D ``[rows, length]``) is cut into disjoint windows of ``prompt_len +
    continuation`` tokens (each row on its own; a short tail is dropped; at most ``max_windows``). Each
    window's prompt is prefilled in one forward, then its continuation is teacher-forced ``chunk`` tokens
    per forward through the same cache -- a fresh ``cache_factory()`` per batch of windows, or (``None``)
    the cache the model builds itself. Only the ``continuation`` tokens are scored; the first of them is
    predicted by the prefill forward. ``full_cache_*`` scores the same tokens in one forward over the
    window (nothing evicted), so ``increase_pct`` is the cost of eviction alone (``full_cache=False``
    skips it, e.g. when a benchmark compares many caches on the same windows). With a cache that keeps
    everything (budget >= window) both numbers agree to float rounding.
    """
    for name, value in (
        ("prompt_len", prompt_len),
        ("continuation", continuation),
        ("chunk", chunk),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int) or value < 1:
            raise SlimformerError(
                f"eviction perplexity: {name} must be a positive integer (got {value!r})", fix=f"raise {name}"
            )
    if max_windows is not None and max_windows < 1:
        raise SlimformerError(
            f"max_windows must be at least 1 (got {max_windows})", fix="raise it or leave it unset"
        )
    window = prompt_len + continuation
    max_positions = _max_positions(model)
    if max_positions is not None and window > max_positions:
        raise SlimformerError(
            f"prompt + continuation = {window} tokens is longer than the model's {max_positions} positions",
            where=source,
            fix=f"use at most {max_positions} tokens per window",
        )
    rows = (ids.view(1, -1) if ids.dim() == 1 else ids).long()
    windows = [
        rows[r, begin : begin + window]
        for r in range(rows.shape[0])
        for begin in range(0, rows.shape[1] - window + 1, window)
    ]
    windows = windows[:max_windows]
    if not windows:
        raise SlimformerError(
            f"nothing to score: each row has {rows.shape[1]} token(s), a window needs {window}",
            where=source,
            fix="use a longer source, a larger max_tokens, or a shorter prompt/continuation",
        )

    device = _model_device(model)
    nll_sum = full_nll_sum = 0.0
    cache_tokens: int | None = None
    batches = [
        torch.stack(windows[i : i + batch_size]).to(device) for i in range(0, len(windows), batch_size)
    ]
    # Counted in decoded tokens (per batch of windows), not batches: one batch can take a minute.
    bar = progress_bar(len(batches) * continuation, "eviction perplexity", progress, unit="decoded token")
    with _evaluating(model), bar:
        for batch in batches:
            prompt, cont = batch[:, :prompt_len], batch[:, prompt_len:]
            logprobs, cache = _decoded_logprobs(
                model, prompt, cont, cache_factory, chunk, on_tokens=bar.update
            )
            nll_sum -= float(logprobs.sum())
            if full_cache:
                full_nll_sum -= float(_full_cache_logprobs(model, prompt, cont).sum())
            cache_tokens = _cache_tokens(cache)

    n_tokens = len(windows) * continuation
    nll = nll_sum / n_tokens
    full_nll = full_nll_sum / n_tokens if full_cache else None
    return EvictionPerplexityResult(
        perplexity=math.exp(nll),
        nll=nll,
        full_cache_perplexity=math.exp(full_nll) if full_nll is not None else None,
        full_cache_nll=full_nll,
        n_tokens=n_tokens,
        n_windows=len(windows),
        prompt_len=prompt_len,
        continuation=continuation,
        chunk=chunk,
        cache_tokens=cache_tokens,
        source=source,
    )


def eviction_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: str,
    *,
    window: int = 256,
    continuation: int | None = None,
    chunk: int = 1,
    max_tokens: int | None = 16384,
    max_windows: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    cache_factory: CacheFactory | None = None,
    full_cache: bool = True,
) -> EvictionPerplexityResult:
    """:func:`eviction_perplexity_of_tokens` on the text source ``spec``: disjoint windows of ``window``
    tokens, of which the last ``continuation`` (default: a quarter of the window) are decoded and scored
    after the first ``window - continuation`` are prefilled as the prompt."""
    continuation = max(1, window // 4) if continuation is None else continuation
    if not 1 <= continuation < window:
        raise SlimformerError(
            f"continuation must be between 1 and window - 1 = {window - 1} (got {continuation})",
            fix="the window holds the prompt and the continuation; shorten the continuation or widen the window",
        )
    ids = token_stream(tokenizer, spec, max_tokens)
    return eviction_perplexity_of_tokens(
        model,
        ids,
        prompt_len=window - continuation,
        continuation=continuation,
        chunk=chunk,
        batch_size=batch_size,
        max_windows=max_windows,
        progress=progress,
        cache_factory=cache_factory,
        full_cache=full_cache,
        source=spec,
    )
