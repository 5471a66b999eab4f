"""Measuring a model's quality and speed: perplexity, multiple-choice accuracy, prefill/decode throughput.

Every pass, the CLI and the benchmarks judge a model through these functions, so they work on *any*
Hugging Face causal LM -- anything called as ``model(input_ids=, attention_mask=, past_key_values=,
use_cache=)`` that returns ``.logits`` (and ``.past_key_values`` for :func:`speed_probe`) -- plus its
tokenizer. Nothing here depends on a particular architecture.

* :func:`perplexity` / :func:`perplexity_of_tokens` -- sliding-window perplexity of a text source (any
  spec :mod:`converter.calibration` understands) or of a token tensor.
* :func:`multiple_choice_accuracy` / :func:`loglikelihoods` -- zero-shot accuracy on an llm-foundry ICL
  ``.jsonl`` task, scored the way lm-evaluation-harness scores it.
* :func:`speed_probe` -- prefill and decode tokens/s from a hand-written greedy decode loop.
* :func:`eviction_perplexity` / :func:`eviction_perplexity_of_tokens` -- perplexity of continuations
  *decoded* after a prompt, so that a KV cache which evicts tokens after each forward really shapes the
  scores (see "Quality under KV-cache eviction" below); ``loglikelihoods`` / ``multiple_choice_accuracy``
  take ``decode_chunk=`` for the same protocol.

``cache_factory`` (everywhere): an optional callable returning a *fresh* ``past_key_values`` object
(e.g. an evicting KV cache) that is passed into every forward, so a cache op's effect on quality and
speed is measured by exactly the same code as the plain model. ``None`` passes no cache -- except in the
decode protocol (``eviction_perplexity*``, ``decode_chunk=``), which always runs with a cache: there
``None`` means the one the model builds itself with ``use_cache=True`` (for a slimformer checkpoint, the
policy stored in its ``config.kv_cache``).

Quality under KV-cache eviction: an evicting cache drops tokens *after* each forward. A sequence scored
in one forward therefore attends to every token and measures nothing of the eviction -- ``perplexity``
with an evicting ``cache_factory`` equals the plain number. The decode protocol measures it the way
``generate()`` meets it: the prompt is prefilled in one forward (the cache then evicts down to its
budget; a ``budget_ratio`` resolves against this prompt), and the continuation is teacher-forced
``chunk`` tokens per forward (1 = exactly token-by-token decoding; larger chunks are faster and let the
cache hold up to ``budget + chunk - 1`` tokens while a chunk is scored). The first continuation token is
predicted by the prefill forward, before anything is evicted, exactly as in ``generate()``.

All likelihood arithmetic is done in float64 on the scored positions, so a result does not depend on
the batch size beyond the model's own floating-point noise.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .calibration import token_stream
from .errors import SlimformerError
from .runtime.kv_cache import returned_cache

__all__ = [
    "EvictionPerplexityResult",
    "MCResult",
    "PerplexityResult",
    "SpeedResult",
    "eviction_perplexity",
    "eviction_perplexity_of_tokens",
    "loglikelihoods",
    "multiple_choice_accuracy",
    "perplexity",
    "perplexity_of_tokens",
    "speed_probe",
]

CacheFactory = Callable[[], Any]

# Environment variable naming a directory of ICL ``.jsonl`` files, so tasks can be named ("copa").
EVALS_DIR_ENV = "SLIMFORMER_EVALS_DIR"


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class SpeedResult:
    """Throughput of one model: prefill and decode measured separately, medians over the repeats.

    ``peak_memory_bytes`` is ``torch.cuda.max_memory_allocated`` over the timed runs (weights
    included) on CUDA, and ``None`` elsewhere (a process-wide RSS peak would not be attributable).
    """

    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_s: float
    decode_s_per_token: float
    prompt_len: int
    new_tokens: int
    batch_size: int
    repeats: int
    device: str
    dtype: str
    num_threads: int
    peak_memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class MCResult:
    """Zero-shot multiple-choice accuracy; the stderrs are lm-eval's (sample std of the mean)."""

    task: str
    source: str
    n: int
    acc: float
    acc_norm: float
    acc_stderr: float | None
    acc_norm_stderr: float | None
    # The choice ``acc`` picked for each example, in file order: two runs (say with and without KV-cache
    # eviction) can then be compared example by example, which still means something at chance accuracy.
    predictions: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Shared model plumbing
# --------------------------------------------------------------------------------------------------


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for param in model.parameters():
        return param.dtype
    return torch.get_default_dtype()


def _max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model was built for, from its config, or ``None`` if it does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``eval()`` + ``inference_mode`` for the duration, then the caller's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache_factory: CacheFactory | None,
) -> torch.Tensor:
    """One scoring forward. A cache only goes in when the caller supplies one: that is how a cache op
    (e.g. eviction during prefill) takes part in the measurement; otherwise no cache is built at all."""
    if cache_factory is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache_factory(),
            use_cache=True,
        )
    return out.logits


def _sync(device: torch.device) -> None:
    # Kernels run asynchronously on accelerators; without a sync the clock would measure launch time.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` per position, float64: ``logits [..., vocab]`` and ``targets [...]``."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _token_logprob_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``log p(target_i)`` for rows ``logits[i]`` (shape ``[n, vocab]``), computed in float64."""
    return float(_token_logprobs(logits, targets).sum())


def _progress(total: int, desc: str, enabled: bool) -> Any:
    return progress_bar(total, desc, enabled)


# Seconds between two plain progress lines: often enough to show life in a log, rarely enough to read it.
PROGRESS_INTERVAL_S = 10.0


class LineProgress:
    """tqdm's interface as plain lines, for a stderr that is not a terminal (a log file, a CI pipe): there
    ``\\r`` bars turn into one unreadable line. Writes ``[slimformer] DESC: N/TOTAL UNIT (P%), Ts`` at most
    every :data:`PROGRESS_INTERVAL_S` seconds, and a last line at the end if it wrote any, so a step
    shorter than the interval stays silent and a long one is never silent for longer than it."""

    def __init__(self, total: int, desc: str, unit: str, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.postfix, self.lines, self.written = 0, "", 0, -1
        self.started = self.last = time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.perf_counter() - self.last >= self.interval:
            self._write()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def _write(self) -> None:
        self.last = time.perf_counter()
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"[slimformer] {self.desc}: {self.n}/{self.total} {self.unit}{share}, "
              f"{self.last - self.started:.0f}s{extra}", file=sys.stderr, flush=True)
        self.lines, self.written = self.lines + 1, self.n

    def close(self) -> None:
        if self.lines and self.n != self.written:  # the last state, unless the last line already showed it
            self._write()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _NoProgress(LineProgress):
    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool, *, unit: str = "batch") -> Any:
    """Progress of a long step on stderr: a tqdm bar on a terminal, :class:`LineProgress` lines otherwise,
    nothing when ``enabled`` is false (``-q``). Supports ``update``, ``set_postfix_str``, ``close`` and
    ``with``."""
    if not enabled:
        return _NoProgress(total, desc, unit)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
    return LineProgress(total, desc, unit)


# --------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------


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
            fix="pass token ids, e.g. from converter.calibration.token_stream",
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


# --------------------------------------------------------------------------------------------------
# Quality under KV-cache eviction: prefill a prompt, then decode (teacher-forced) the continuation
# --------------------------------------------------------------------------------------------------


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
    pieces = [_token_logprobs(out.logits[:, -1:], continuation[:, :1])]
    on_tokens(1)
    fed = prompt_len
    # The last continuation token is only ever predicted, never fed.
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
        on_tokens(stop - start)
    return torch.cat(pieces, dim=1), cache


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
            logprobs, cache = _decoded_logprobs(model, prompt, cont, cache_factory, chunk, on_tokens=bar.update)
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


# --------------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------------


def _prompt_vocabulary(model: torch.nn.Module, tokenizer: Any | None) -> torch.Tensor:
    """Token ids a random prompt may use: the model's vocabulary minus the tokenizer's special tokens
    (a BOS/EOS in mid-prompt is unrepresentative, and some models treat them specially)."""
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if tokenizer is not None:
        vocab_size = min(vocab_size, len(tokenizer)) if vocab_size else len(tokenizer)
    if not vocab_size:
        raise SlimformerError(
            "cannot tell the model's vocabulary size", fix="pass the tokenizer, or set config.vocab_size"
        )
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    special = [i for i in getattr(tokenizer, "all_special_ids", None) or [] if 0 <= i < vocab_size]
    allowed[special] = False
    ids = allowed.nonzero().flatten()
    return ids if ids.numel() else torch.arange(vocab_size)


def _timed_generation(
    model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, cache_factory: CacheFactory | None
) -> tuple[float, float]:
    """One prefill + ``new_tokens`` greedy decode steps; returns (prefill seconds, decode seconds)."""
    device = prompt.device
    batch, prompt_len = prompt.shape
    # One mask for the whole run, sliced per step: building it inside the loop would be timed too.
    full_mask = torch.ones(batch, prompt_len + new_tokens, dtype=torch.long, device=device)
    cache_kwargs = {} if cache_factory is None else {"past_key_values": cache_factory()}

    _sync(device)
    start = time.perf_counter()
    out = model(input_ids=prompt, attention_mask=full_mask[:, :prompt_len], use_cache=True, **cache_kwargs)
    _sync(device)
    prefill_s = time.perf_counter() - start

    past = returned_cache(out)
    if past is None:
        raise SlimformerError(
            "the model returned no past_key_values with use_cache=True, so decoding cannot be timed",
            fix="measure a model that supports a KV cache",
        )
    next_token = out.logits[:, -1].argmax(-1, keepdim=True)

    _sync(device)
    start = time.perf_counter()
    for step in range(new_tokens):
        out = model(
            input_ids=next_token,
            attention_mask=full_mask[:, : prompt_len + step + 1],
            past_key_values=past,
            use_cache=True,
        )
        past = returned_cache(out)
        next_token = out.logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return prefill_s, time.perf_counter() - start


def speed_probe(
    model: torch.nn.Module,
    tokenizer: Any | None = None,
    *,
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    cache_factory: CacheFactory | None = None,
) -> SpeedResult:
    """Prefill and decode throughput of ``model``, measured separately.

    A random prompt of ``batch_size x prompt_len`` tokens is drawn from ``torch.Generator`` seeded with
    ``seed`` over the vocabulary (special tokens excluded when ``tokenizer`` is given). Each run is one
    prefill forward with ``use_cache=True`` (timed as prefill), then ``new_tokens`` greedy single-token
    forwards feeding ``past_key_values`` back (timed as decode). The loop is written here rather than
    using ``generate()`` so that only model time is measured and an evicting ``cache_factory()`` cache
    (passed as the initial ``past_key_values``) is exercised the same way. ``warmup`` untimed runs come
    first; reported times are medians over ``repeats`` runs, measured with ``time.perf_counter`` and
    with CUDA synchronised around each phase.

    ``prefill_tokens_per_s = batch_size * prompt_len / prefill_s``;
    ``decode_tokens_per_s = batch_size / decode_s_per_token``.
    """
    for name, value, minimum in (
        ("prompt_len", prompt_len, 1),
        ("new_tokens", new_tokens, 1),
        ("batch_size", batch_size, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if value < minimum:
            raise SlimformerError(
                f"speed probe: {name} must be at least {minimum} (got {value})", fix=f"raise {name}"
            )
    max_positions = _max_positions(model)
    if max_positions is not None and prompt_len + new_tokens > max_positions:
        raise SlimformerError(
            f"speed probe: prompt_len + new_tokens = {prompt_len + new_tokens} exceeds the model's {max_positions} positions",
            fix="shorten the prompt or the number of new tokens",
        )

    device = _model_device(model)
    vocabulary = _prompt_vocabulary(model, tokenizer)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(vocabulary.numel(), (batch_size, prompt_len), generator=generator)
    prompt = vocabulary[picks].to(device)

    with _evaluating(model):
        for _ in range(warmup):
            _timed_generation(model, prompt, new_tokens, cache_factory)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        runs = [_timed_generation(model, prompt, new_tokens, cache_factory) for _ in range(repeats)]
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None

    prefill_s = statistics.median(r[0] for r in runs)
    decode_s_per_token = statistics.median(r[1] for r in runs) / new_tokens
    # A timer tick of 0 is possible for a trivially small model on a coarse clock; keep results finite.
    tiny = sys.float_info.min
    return SpeedResult(
        prefill_tokens_per_s=batch_size * prompt_len / max(prefill_s, tiny),
        decode_tokens_per_s=batch_size / max(decode_s_per_token, tiny),
        prefill_s=prefill_s,
        decode_s_per_token=decode_s_per_token,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        batch_size=batch_size,
        repeats=repeats,
        device=str(device),
        dtype=str(_model_dtype(model)).removeprefix("torch."),
        num_threads=torch.get_num_threads(),
        peak_memory_bytes=peak,
    )


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Example:
    requests: list[tuple[str, str]]  # (context, continuation) per choice
    norm_lengths: list[int]  # characters each choice's score is divided by for acc_norm
    gold: int


def _join(context: str, text: str) -> str:
    """The continuation as appended to ``context``: one space between them unless either side already
    has whitespace there (piqa's queries end in a newline, for instance)."""
    if not context or context[-1].isspace() or text[:1].isspace():
        return text
    return " " + text


def _resolve_task(path_or_name: str, evals_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise SlimformerError(
            "a multiple-choice task must be a .jsonl file, not a directory",
            where=str(path),
            fix="name one file in it",
        )
    # A bare name ("copa") is looked up in the evals directory, when one is configured.
    directory = evals_dir if evals_dir is not None else os.environ.get(EVALS_DIR_ENV)
    if directory and len(path.parts) == 1:
        candidate = Path(directory).expanduser() / (
            path.name if path.suffix == ".jsonl" else f"{path.name}.jsonl"
        )
        if candidate.is_file():
            return candidate
    raise SlimformerError(
        f"multiple-choice task {path_or_name!r} not found",
        where=str(directory) if directory else None,
        fix=f"give the path of an llm-foundry ICL .jsonl file, or a task name with {EVALS_DIR_ENV} (or evals_dir) set to its directory",
    )


def _parse_example(record: Any, where: str) -> _Example:
    fix = "each line must be {'query', 'choices', 'gold'} or {'context_options', 'continuation', 'gold'} (llm-foundry ICL format)"
    if not isinstance(record, dict):
        raise SlimformerError("a line is not a JSON object", where=where, fix=fix)
    if {"query", "choices", "gold"} <= record.keys():
        query, choices = record["query"], record["choices"]
        if (
            not isinstance(query, str)
            or not isinstance(choices, list)
            or not all(isinstance(c, str) for c in choices)
        ):
            raise SlimformerError(
                "'query' must be a string and 'choices' a list of strings", where=where, fix=fix
            )
        requests = [(query, _join(query, choice)) for choice in choices]
        norm_lengths = [len(choice) for choice in choices]
    elif {"context_options", "continuation", "gold"} <= record.keys():
        # Winogrande-style partial scoring: the options are contexts, the shared continuation is scored.
        options, continuation = record["context_options"], record["continuation"]
        if (
            not isinstance(continuation, str)
            or not isinstance(options, list)
            or not all(isinstance(o, str) for o in options)
        ):
            raise SlimformerError(
                "'context_options' must be a list of strings and 'continuation' a string",
                where=where,
                fix=fix,
            )
        requests = [(option, _join(option, continuation)) for option in options]
        norm_lengths = [len(continuation)] * len(options)
    else:
        raise SlimformerError(
            f"unknown multiple-choice format (keys: {sorted(record)})", where=where, fix=fix
        )
    gold = record["gold"]
    if len(requests) < 2:
        raise SlimformerError(
            f"an example needs at least 2 choices, this one has {len(requests)}", where=where, fix=fix
        )
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(requests):
        raise SlimformerError(
            f"'gold' must be a choice index in 0..{len(requests) - 1}, got {gold!r}", where=where, fix=fix
        )
    return _Example(requests=requests, norm_lengths=norm_lengths, gold=gold)


def _load_examples(path: Path, limit: int | None) -> list[_Example]:
    examples: list[_Example] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise SlimformerError(
            f"cannot read multiple-choice task: {exc}", where=str(path), fix="check the file is readable"
        ) from exc
    with handle:
        for line_number, line in enumerate(handle, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimformerError(
                    f"invalid JSON: {exc.msg}", where=where, fix="each line must be one JSON object"
                ) from exc
            examples.append(_parse_example(record, where))
    if not examples:
        raise SlimformerError(
            "multiple-choice task has no examples", where=str(path), fix="point at a non-empty .jsonl file"
        )
    return examples


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer's own convention puts BOS in front of a text (Llama-style), else ``[]``.

    Texts are encoded without special tokens and this prefix is added once, so no tokenizer that also
    appends EOS (``add_special_tokens=True``) can smuggle one between context and continuation.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if probe[:1] == [bos] else []


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) such that the continuation ids are exactly the ones scored.

    As lm-evaluation-harness does: trailing whitespace of the context moves into the continuation, the
    joined text is encoded once, and the continuation is the tail after the encoded context -- so the
    continuation is tokenised as it would appear in running text (encoding it alone would give a
    different first token for SentencePiece tokenizers). If the tokenizer merges across the boundary
    (the context's ids are not a prefix of the joined ids), the continuation is encoded on its own.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    if whole_ids[: len(context_ids)] == context_ids:
        return context_ids, whole_ids[len(context_ids) :]
    return context_ids, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    progress: bool = False,
    cache_factory: CacheFactory | None = None,
    decode_chunk: int | None = None,
) -> list[float]:
    """``log p(continuation | context)`` for each ``(context, continuation)`` pair, in float64.

    The continuation is *not* joined to the context here: pass it with its leading space if it needs
    one. Tokenisation follows :func:`_encode_pair` (lm-eval's recipe); the tokenizer's BOS is put in
    front when its convention is to add one (otherwise, for an empty context, EOS serves as the only
    context token, as in lm-eval). Sequences longer than the model's ``max_position_embeddings`` are cut
    from the left. Requests are batched longest first with right padding and an attention mask.

    ``decode_chunk`` switches to the decode protocol (module docstring), for quality under KV-cache
    eviction: the context is the prompt, prefilled in one forward, and the continuation is fed
    ``decode_chunk`` tokens per forward through the same cache (``cache_factory()``, or the model's own).
    Requests with the same context (one example's choices) share a batch; others run one at a time.
    """
    if decode_chunk is not None and decode_chunk < 1:
        raise SlimformerError(
            f"decode_chunk must be at least 1 (got {decode_chunk})", fix="use 1 for token-by-token decoding"
        )
    if batch_size < 1:
        raise SlimformerError(f"batch size must be at least 1 (got {batch_size})", fix="raise the batch size")
    prefix = _bos_prefix(tokenizer)
    max_positions = _max_positions(model)

    # Per request: the model input, and how many of its final positions are scored.
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    for context, continuation in requests:
        context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation)
        context_ids = prefix + context_ids
        if not context_ids:
            fallback = getattr(tokenizer, "eos_token_id", None)
            if fallback is None:
                raise SlimformerError(
                    "empty context and the tokenizer has neither BOS nor EOS to condition on",
                    fix="give every request a non-empty context",
                )
            context_ids = [int(fallback)]
        whole = context_ids + continuation_ids
        if max_positions is not None:
            whole = whole[-(max_positions + 1) :]
        model_input = whole[:-1]
        n_scored = min(len(continuation_ids), len(model_input))
        inputs.append(model_input)
        targets.append(whole[len(whole) - n_scored :] if n_scored else [])

    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    if decode_chunk is not None:
        return _decoded_loglikelihoods(
            model, inputs, targets, batch_size, progress, cache_factory, decode_chunk, pad_id
        )

    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once.
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = _model_device(model)

    results = [0.0] * len(requests)
    with _evaluating(model), _progress(len(batches), "loglikelihood", progress) as bar:
        for batch in batches:
            length = len(inputs[batch[0]])
            input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, index in enumerate(batch):
                input_ids[row, : len(inputs[index])] = torch.tensor(inputs[index])
                attention_mask[row, : len(inputs[index])] = 1
            logits = _logits(model, input_ids.to(device), attention_mask.to(device), cache_factory)
            for row, index in enumerate(batch):
                n_scored, end = len(targets[index]), len(inputs[index])
                if n_scored:
                    target = torch.tensor(targets[index], device=logits.device)
                    results[index] = _token_logprob_sum(logits[row, end - n_scored : end], target)
            bar.update(1)
    return results


def _decoded_loglikelihoods(
    model: torch.nn.Module,
    inputs: list[list[int]],
    targets: list[list[int]],
    batch_size: int,
    progress: bool,
    cache_factory: CacheFactory | None,
    chunk: int,
    pad_id: int,
) -> list[float]:
    """The decode protocol for :func:`loglikelihoods`: prompt = the model input minus the scored tail."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (model_input, target) in enumerate(zip(inputs, targets)):
        if target:  # nothing to score: log p = 0
            prompt = tuple(model_input[: len(model_input) - len(target) + 1])
            groups.setdefault(prompt, []).append(index)
    # Same prompt, same batch: the rows differ only in their continuations, so no prompt padding is needed
    # (padding inside the prompt would shift what an evicting cache keeps).
    batches = [
        (prompt, members[i : i + batch_size])
        for prompt, members in groups.items()
        for i in range(0, len(members), batch_size)
    ]
    device = _model_device(model)
    results = [0.0] * len(inputs)
    with _evaluating(model), _progress(len(batches), "loglikelihood (decode)", progress) as bar:
        for prompt, batch in batches:
            width = max(len(targets[index]) for index in batch)
            continuation = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, index in enumerate(batch):
                continuation[row, : len(targets[index])] = torch.tensor(targets[index])
            prompt_ids = torch.tensor(prompt, dtype=torch.long).expand(len(batch), -1)
            logprobs, _ = _decoded_logprobs(
                model, prompt_ids.to(device), continuation.to(device), cache_factory, chunk
            )
            for row, index in enumerate(batch):
                results[index] = float(logprobs[row, : len(targets[index])].sum())
            bar.update(1)
    return results


def _stderr(p: float, n: int) -> float | None:
    # lm-eval's stderr of a mean of 0/1 scores: sample standard deviation over sqrt(n).
    return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else None


def multiple_choice_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    path_or_name: str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    cache_factory: CacheFactory | None = None,
    evals_dir: str | os.PathLike[str] | None = None,
    decode_chunk: int | None = None,
) -> MCResult:
    """Zero-shot accuracy on one llm-foundry ICL ``.jsonl`` task, scored as lm-evaluation-harness does.

    ``path_or_name`` is a file path, or a bare task name (``copa``) looked up as ``NAME.jsonl`` in
    ``evals_dir`` (default: the ``SLIMFORMER_EVALS_DIR`` environment variable). ``limit`` keeps the
    first N examples of the file. Two line formats are understood:

    * ``{"query", "choices", "gold"}``: context = the query, continuation = the choice, joined by one
      space unless the query already ends in whitespace (piqa's end in a newline) or the choice starts
      with it; no "Answer:" or other template is added.
    * ``{"context_options", "continuation", "gold"}`` (Winogrande): each option is a context and the
      shared continuation (after a space) is scored -- lm-eval's partial scoring.

    Each choice scores ``log p(continuation | context)`` (see :func:`loglikelihoods` for tokenisation,
    BOS and truncation). ``acc`` picks the highest score; ``acc_norm`` divides each score by the
    character length of the choice text (without the joining space), lm-eval's ``acc_norm``; for
    Winogrande all choices share one continuation so ``acc_norm == acc``. Ties go to the first choice.
    ``decode_chunk`` scores under the decode protocol (the context is the prompt; see :func:`loglikelihoods`),
    which is what makes an evicting cache matter.
    """
    if limit is not None and limit < 1:
        raise SlimformerError(
            f"limit must be at least 1 (got {limit})", fix="raise the limit or leave it unset"
        )
    path = _resolve_task(path_or_name, evals_dir)
    examples = _load_examples(path, limit)
    requests = [request for example in examples for request in example.requests]
    scores = loglikelihoods(
        model,
        tokenizer,
        requests,
        batch_size=batch_size,
        progress=progress,
        cache_factory=cache_factory,
        decode_chunk=decode_chunk,
    )

    correct = correct_norm = 0
    predictions = []
    offset = 0
    for example in examples:
        own = scores[offset : offset + len(example.requests)]
        offset += len(example.requests)
        normalised = [score / max(length, 1) for score, length in zip(own, example.norm_lengths)]
        predictions.append(max(range(len(own)), key=own.__getitem__))
        correct += predictions[-1] == example.gold
        correct_norm += max(range(len(own)), key=normalised.__getitem__) == example.gold

    n = len(examples)
    acc, acc_norm = correct / n, correct_norm / n
    return MCResult(
        task=path.name.removesuffix(".jsonl"),
        source=str(path),
        n=n,
        acc=acc,
        acc_norm=acc_norm,
        acc_stderr=_stderr(acc, n),
        acc_norm_stderr=_stderr(acc_norm, n),
        predictions=tuple(predictions),
    )
