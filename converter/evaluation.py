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

``cache_factory`` (everywhere): an optional callable returning a *fresh* ``past_key_values`` object
(e.g. an evicting KV cache) that is passed into every forward, so a cache op's effect on quality and
speed is measured by exactly the same code as the plain model. ``None`` passes no cache.

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

__all__ = [
    "MCResult",
    "PerplexityResult",
    "SpeedResult",
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


def _token_logprob_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``log p(target_i)`` for rows ``logits[i]`` (shape ``[n, vocab]``), computed in float64."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return float(logprobs.gather(-1, targets.unsqueeze(-1)).sum())


def _progress(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="batch", file=sys.stderr, disable=not enabled, leave=False)


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

    past = out.past_key_values
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
        past = out.past_key_values
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
) -> list[float]:
    """``log p(continuation | context)`` for each ``(context, continuation)`` pair, in float64.

    The continuation is *not* joined to the context here: pass it with its leading space if it needs
    one. Tokenisation follows :func:`_encode_pair` (lm-eval's recipe); the tokenizer's BOS is put in
    front when its convention is to add one (otherwise, for an empty context, EOS serves as the only
    context token, as in lm-eval). Sequences longer than the model's ``max_position_embeddings`` are cut
    from the left. Requests are batched longest first with right padding and an attention mask.
    """
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

    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once.
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
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
    """
    if limit is not None and limit < 1:
        raise SlimformerError(
            f"limit must be at least 1 (got {limit})", fix="raise the limit or leave it unset"
        )
    path = _resolve_task(path_or_name, evals_dir)
    examples = _load_examples(path, limit)
    requests = [request for example in examples for request in example.requests]
    scores = loglikelihoods(
        model, tokenizer, requests, batch_size=batch_size, progress=progress, cache_factory=cache_factory
    )

    correct = correct_norm = 0
    offset = 0
    for example in examples:
        own = scores[offset : offset + len(example.requests)]
        offset += len(example.requests)
        normalised = [score / max(length, 1) for score, length in zip(own, example.norm_lengths)]
        correct += max(range(len(own)), key=own.__getitem__) == example.gold
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
    )
