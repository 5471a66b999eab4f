"""Sliding-window perplexity of a text source or a token tensor."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from slimformer.converter.calibration import token_stream
from slimformer.converter.errors import SlimformerError

from .common import (
    CacheFactory,
    _evaluating,
    _logits,
    _max_positions,
    _model_device,
    _progress,
    _token_logprob_sum,
)


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity of a token stream: ``perplexity = exp(nll)`` with ``nll`` the mean over scored tokens."""

    perplexity: float
    nll: float
    n_tokens: int
    window: int
    stride: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Window:
    row: int
    begin: int
    end: int
    n_scored: int  # the last n_scored tokens of ids[row, begin:end] are scored


def _plan_windows(length: int, window: int, stride: int, row: int) -> list[_Window]:
    """The Hugging Face sliding-window recipe: every token after the first is scored exactly once."""
    windows = []
    prev_end = 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        # Tokens before prev_end were scored by an earlier window and are context only here; the
        # window's first token has no prediction inside the window, hence the ``- 1``.
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            windows.append(_Window(row, begin, end, n_scored))
        prev_end = end
        if end == length:
            break
    return windows


def perplexity_of_tokens(
    model: torch.nn.Module,
    ids: torch.Tensor,
    *,
    window: int = 256,
    stride: int | None = None,
    batch_size: int = 4,
    progress: bool = False,
    cache_factory: CacheFactory | None = None,
    source: str = "<tokens>",
) -> PerplexityResult:
    """Sliding-window perplexity of a token tensor; the core of :func:`perplexity`.

    ``ids`` is a 1-D ``LongTensor`` (one stream) or 2-D ``[rows, length]`` (independent streams, e.g.
    the output of :func:`converter.calibration.sample_windows`; each row is windowed on its own).

    Windows of ``window`` tokens start every ``stride`` tokens (default ``stride = window``: disjoint
    windows). In the first window every token but the first is scored; in each later window only the
    tokens not scored before are -- its last ``stride`` tokens, or fewer in the final window -- and the
    earlier ones serve as context only (the standard Hugging Face sliding-window recipe). So:

    * ``stride == window``: each window scores ``len - 1`` tokens (its first token has no context);
      ``n_tokens = length - number of windows``.
    * ``stride < window``: every token after the stream's first is scored exactly once, with at least
      ``window - stride`` tokens of context (except early in the first window); ``n_tokens = length - 1``.

    The negative log-likelihood is summed in float64 over the scored tokens; ``nll`` is its mean and
    ``perplexity = exp(nll)``. Windows of equal length are batched ``batch_size`` at a time (no padding).
    """
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dtype.is_floating_point
        or ids.dtype.is_complex
        or ids.dim() not in (1, 2)
    ):
        raise SlimformerError(
            "perplexity needs an integer token tensor of shape [length] or [rows, length]",
            where=source,
            fix="pass token ids, e.g. from slimformer.converter.calibration.token_stream",
        )
    stride = window if stride is None else stride
    if window < 2:
        raise SlimformerError(
            f"perplexity window must be at least 2 tokens (got {window})", fix="raise the window"
        )
    if not 1 <= stride <= window:
        raise SlimformerError(
            f"stride must be between 1 and the window ({window}), got {stride}",
            fix="choose 1 <= stride <= window",
        )
    if batch_size < 1:
        raise SlimformerError(f"batch size must be at least 1 (got {batch_size})", fix="raise the batch size")
    max_positions = _max_positions(model)
    if max_positions is not None and window > max_positions:
        raise SlimformerError(
            f"perplexity window {window} is longer than the model's {max_positions} positions",
            where=source,
            fix=f"use a window of at most {max_positions} tokens",
        )

    rows = ids.view(1, -1) if ids.dim() == 1 else ids
    rows = rows.long()
    plan = [w for r in range(rows.shape[0]) for w in _plan_windows(rows.shape[1], window, stride, r)]
    if not plan:
        raise SlimformerError(
            f"nothing to score: the token stream has {rows.shape[1]} token(s) per row, perplexity needs at least 2",
            where=source,
            fix="use a longer source or a larger max_tokens",
        )

    # Consecutive windows of equal length form a batch, so no padding (and no padding-mask subtleties)
    # enters the computation; in stream order only the final window of a row can be shorter.
    batches: list[list[_Window]] = []
    for w in plan:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and last[0].end - last[0].begin == w.end - w.begin:
            last.append(w)
        else:
            batches.append([w])

    device = _model_device(model)
    nll_sum = 0.0
    n_tokens = 0
    with _evaluating(model), _progress(len(batches), "perplexity", progress) as bar:
        for batch in batches:
            input_ids = torch.stack([rows[w.row, w.begin : w.end] for w in batch]).to(device)
            logits = _logits(model, input_ids, torch.ones_like(input_ids), cache_factory)
            length = input_ids.shape[1]
            for i, w in enumerate(batch):
                # logits at position p predict token p + 1: the last n_scored tokens need positions
                # length-1-n_scored .. length-2.
                predicted = logits[i, length - 1 - w.n_scored : length - 1]
                nll_sum -= _token_logprob_sum(predicted, input_ids[i, length - w.n_scored :])
                n_tokens += w.n_scored
            bar.update(1)

    nll = nll_sum / n_tokens
    return PerplexityResult(
        perplexity=math.exp(nll), nll=nll, n_tokens=n_tokens, window=window, stride=stride, source=source
    )


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: str,
    *,
    window: int = 256,
    stride: int | None = None,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    progress: bool = False,
    cache_factory: CacheFactory | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of the text source ``spec`` (see :mod:`converter.calibration`).

    The source is read with ``token_stream(tokenizer, spec, max_tokens)`` -- documents in natural order,
    joined by EOS, cut at ``max_tokens`` (``None``: the whole source) -- and scored by
    :func:`perplexity_of_tokens`: windows of ``window`` tokens every ``stride`` tokens (default: disjoint
    windows, each scoring all its tokens but the first); with ``stride < window`` each later window
    scores only its last ``stride`` tokens and uses the rest as context, the standard Hugging Face
    recipe. ``nll`` is the float64 mean over scored tokens and ``perplexity = exp(nll)``.

    Raises :class:`SlimformerError` when the source is missing, empty or shorter than 2 tokens.
    """
    ids = token_stream(tokenizer, spec, max_tokens)
    if ids.numel() < 2:
        raise SlimformerError(
            f"source {spec!r} gives {ids.numel()} token(s); perplexity needs at least 2",
            fix="use a longer source or a larger max_tokens",
        )
    return perplexity_of_tokens(
        model,
        ids,
        window=window,
        stride=stride,
        batch_size=batch_size,
        progress=progress,
        cache_factory=cache_factory,
        source=spec,
    )
