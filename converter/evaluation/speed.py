"""Prefill and decode throughput from a hand-written greedy decode loop."""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.runtime.kv_cache import returned_cache

from .common import (
    CacheFactory,
    _evaluating,
    _max_positions,
    _model_device,
    _model_dtype,
    _sync,
)


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
