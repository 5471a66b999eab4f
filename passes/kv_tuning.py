"""Measured KV-cache choices for the ``a2sf`` pass: the forgetting factor and recent split (``alpha=auto``)
and where a total budget goes across layers (``allocate=auto``), from calibration text.

Both compare many evicting caches on the same prompts. A prompt's forward does not depend on what the
cache keeps -- every layer attends over the whole prompt and evicts only afterwards -- so each batch of
calibration windows is prefilled ONCE (:func:`record_prefill`): the keys, values and queries each cache
slot saw are kept, and any policy's cache is rebuilt from them through the cache's own ``update`` and
``observe`` (exactly what the attention module calls), with no second forward. A token's score depends
on the policy's scoring rule (alpha), not on its budget or recent split, so one scored copy per rule
(:func:`scored_cache`) serves every budget (:func:`evicted_cache`). A test checks the result against
``converter.evaluation.eviction_perplexity_of_tokens`` running the cache end to end.

* ``alpha=auto`` (:func:`tune_scoring`): eviction perplexity by the decode protocol of
  ``converter/evaluation/eviction.py`` -- the prompt is prefilled and evicted, the continuation is
  teacher-forced one token per forward through the evicting cache and scored -- over a grid of
  (alpha, recent_ratio); the lowest perplexity wins.
* ``allocate=auto`` (:func:`lost_mass_curves`, :func:`allocate`): per cache slot, the attention mass that
  the continuation's queries (full cache) put on prompt tokens the policy would have evicted at budget b
  -- layers differ in how concentrated their attention is (PyramidKV, AdaKV). The total budget is spread
  greedily, a step at a time, to the slot where a step saves the most mass.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.evaluation.common import _token_logprobs
from slimformer.converter.evaluation.eviction import feed_continuation
from slimformer.converter.runtime.kv_cache import CachePolicy, EvictingCache, EvictingLayer
from slimformer.converter.runtime.masks import grouped_probabilities

# No slot gets less than this share of the uniform budget (AdaKV's safeguard: a layer whose measured
# attention looks diffuse on calibration text still keeps its sinks and recent tokens elsewhere).
ALLOCATION_FLOOR = 0.2
# Nor more than this multiple of it: calibration on a few windows must not starve the other layers.
ALLOCATION_CAP = 4.0
# Points of each slot's lost-mass curve (its budget grid); the greedy steps are the grid spacing.
CURVE_POINTS = 48
DEFAULT_ALPHA_GRID = (0.1, 0.5, 0.9, 1.0)
DEFAULT_RECENT_GRID = (0.1, 0.25, 0.5, 0.75)


@dataclass
class _SlotStep:
    """What one cache slot saw in one recorded forward: ``update``'s and ``observe``'s arguments."""

    key: torch.Tensor
    value: torch.Tensor
    kwargs: dict[str, Any] | None
    query: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    scaling: float = 1.0


class _Recorder(EvictingCache):
    """A cache that keeps every token and scores nothing (StreamingLLM with a budget no window reaches),
    remembering what each slot was given while ``recording``."""

    def __init__(self, keep: int) -> None:
        super().__init__(CachePolicy("streaming", budget=keep, sink=0))
        self.steps: dict[int, _SlotStep] = {}

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.steps[layer_idx] = _SlotStep(key_states, value_states, cache_kwargs)
        return super().update(key_states, value_states, layer_idx, cache_kwargs)

    def observe(
        self,
        slot: int,
        query: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        probs: torch.Tensor | None = None,
    ) -> None:
        step = self.steps[slot]
        step.query, step.bias, step.scaling = query, bias, scaling
        super().observe(slot, query, bias, scaling, probs)


@dataclass
class PrefillRecord:
    """A batch of windows prefilled once: what every cache slot saw, and the full-cache reference.

    ``full_logprobs`` ``[B, C]`` are the continuation's log-probabilities with nothing evicted (the prompt
    and continuation through a cache that keeps everything); ``first_logprobs`` ``[B, 1]`` the prompt
    forward's prediction of the first continuation token, which no eviction can change. ``future_mass``
    (per slot, ``[B, H_kv, P]``) is the attention the continuation's queries give each prompt token,
    averaged over the query heads of each KV head and over the continuation's rows.
    """

    prompt_len: int
    continuation: torch.Tensor
    first_logprobs: torch.Tensor
    full_logprobs: torch.Tensor
    steps: list[_SlotStep]
    future_mass: list[torch.Tensor] = field(default_factory=list)
    _scored: dict[tuple[Any, ...], EvictingCache] = field(default_factory=dict, repr=False)

    @property
    def batch(self) -> int:
        return self.continuation.shape[0]


def record_prefill(model: torch.nn.Module, prompt: torch.Tensor, continuation: torch.Tensor) -> PrefillRecord:
    """Prefill ``prompt`` ``[B, P]`` once, recording every slot; score ``continuation`` ``[B, C]`` with the
    full cache (the reference) and measure where its queries attend (for :func:`lost_mass_curves`)."""
    batch, prompt_len = prompt.shape
    n_cont = continuation.shape[1]
    if n_cont < 2:
        raise SlimformerError(
            "a calibration window needs at least 2 continuation tokens after the prompt",
            fix="raise tune_continuation or the calibration window length",
        )
    recorder = _Recorder(prompt_len + n_cont)
    mask = torch.ones(batch, prompt_len + n_cont, dtype=torch.long, device=prompt.device)
    with torch.inference_mode():
        out = model(
            input_ids=prompt, attention_mask=mask[:, :prompt_len], past_key_values=recorder, use_cache=True
        )
        first = _token_logprobs(out.logits[:, -1:], continuation[:, :1])
        steps = [recorder.steps[slot] for slot in sorted(recorder.steps)]
        if any(step.query is None for step in steps):
            raise SlimformerError(
                "the model's attention never showed its queries to the cache, so eviction cannot be replayed",
                fix="tune on a model built by the slimformer runtime (ctx.build_model / slimformer.load_model)",
            )
        recorder.steps = {}
        out = model(
            input_ids=continuation[:, :-1],
            attention_mask=mask[:, : prompt_len + n_cont - 1],
            past_key_values=recorder,
            use_cache=True,
        )
        full = torch.cat([first, _token_logprobs(out.logits, continuation[:, 1:])], dim=1)
        mass = []
        for slot in sorted(recorder.steps):
            step, keys = recorder.steps[slot], recorder.layers[slot].keys
            probs = grouped_probabilities(step.query, keys, step.bias, step.scaling)  # [B, H_kv, G, q, P+q]
            mass.append(probs.mean(dim=2).mean(dim=2)[..., :prompt_len])
    return PrefillRecord(prompt_len, continuation, first, full, steps, mass)


def _scoring_key(policy: CachePolicy) -> tuple[Any, ...]:
    kind = policy.kind
    fields = tuple(
        (name, getattr(policy, name)) for name in ("alpha", "score_window", "window") if name in kind.fields
    )
    return (policy.policy, fields, policy.chunk_size)


def scored_cache(record: PrefillRecord, policy: CachePolicy) -> EvictingCache:
    """The prompt's cache scored by ``policy``'s rule and nothing evicted (memoised per scoring rule)."""
    key = _scoring_key(policy)
    if key not in record._scored:
        kind = policy.kind
        given = {
            name: getattr(policy, name) for name in ("alpha", "score_window", "window") if name in kind.fields
        }
        # Same rule, a budget that holds the whole prompt, nothing protected: scores without eviction.
        spec = CachePolicy(
            policy.policy,
            budget=record.prompt_len,
            recent=0 if "recent" in kind.fields else None,
            sink=0,
            chunk_size=policy.chunk_size,
            **{k: v for k, v in given.items() if v is not None},
        )
        cache = EvictingCache(spec)
        with torch.inference_mode():
            for slot, step in enumerate(record.steps):
                cache.update(step.key, step.value, slot, step.kwargs)
                cache.observe(slot, step.query, step.bias, step.scaling)
        record._scored[key] = cache
    return record._scored[key]


def _reevict(layer: EvictingLayer, policy: CachePolicy, prompt_len: int) -> None:
    """What ``EvictingLayer.observe`` does after scoring the prompt, under ``policy``'s budget: the limits
    the first ``update`` resolves (``policy.limits(slot, prompt length)``), then the keep rule."""
    layer.policy = policy
    layer.limits = policy.limits(layer.slot, prompt_len)
    layer._evict()


def evicted_cache(record: PrefillRecord, policy: CachePolicy) -> EvictingCache:
    """The cache an :class:`EvictingCache` of ``policy`` holds right after prefilling the record's prompt."""
    scored = scored_cache(record, policy)
    with torch.inference_mode():
        cache = copy.deepcopy(scored)
        cache.policy = policy
        for layer in cache.layers:
            _reevict(layer, policy, record.prompt_len)
    return cache


def kept_positions(record: PrefillRecord, policy: CachePolicy, slot: int) -> torch.Tensor:
    """``[B, H_kv, K]`` prompt positions slot ``slot`` keeps under ``policy`` (-1 = empty), without copying K/V."""
    layer = copy.copy(scored_cache(record, policy).layers[slot])
    layer.valid = layer.valid.clone()  # the one tensor eviction may change in place
    with torch.inference_mode():
        _reevict(layer, policy, record.prompt_len)
        return layer.kept_positions()


def continuation_logprobs(
    model: torch.nn.Module, record: PrefillRecord, cache: EvictingCache, chunk: int
) -> torch.Tensor:
    """``log p`` ``[B, C]`` of the continuation fed ``chunk`` tokens per forward through ``cache`` (the
    prompt already in it): ``chunk=1`` evicts while decoding; ``chunk >= C`` scores the whole continuation
    against the prefill-compressed cache (prefill-only compression). The feeding is ``eviction.feed_continuation``, the decode protocol's own."""
    with torch.inference_mode():
        rest = feed_continuation(model, cache, record.continuation, record.prompt_len, chunk)
    return torch.cat([record.first_logprobs, rest], dim=1)


def window_nll(
    model: torch.nn.Module, records: Sequence[PrefillRecord], policy: CachePolicy | None, chunk: int
) -> torch.Tensor:
    """Mean negative log-likelihood per window ``[windows]`` (``policy=None``: the full cache)."""
    per_window = []
    for record in records:
        logprobs = (
            record.full_logprobs
            if policy is None
            else continuation_logprobs(model, record, evicted_cache(record, policy), chunk)
        )
        per_window.append(-logprobs.mean(dim=1))
    return torch.cat(per_window)


def calibration_records(
    model: torch.nn.Module, windows: torch.Tensor, prompt_len: int, batch_size: int = 4
) -> Iterator[PrefillRecord]:
    """:func:`record_prefill` over ``windows`` ``[N, P + C]`` in batches (a record holds every slot's queries,
    so batches stay small)."""
    if not 1 <= prompt_len <= windows.shape[1] - 2:
        raise SlimformerError(
            f"calibration windows of {windows.shape[1]} tokens leave no room for a {prompt_len}-token prompt "
            "and a continuation of at least 2 tokens",
            fix="raise --calib-seq-len or lower tune_continuation",
        )
    for start in range(0, windows.shape[0], batch_size):
        rows = windows[start : start + batch_size]
        yield record_prefill(model, rows[:, :prompt_len], rows[:, prompt_len:])


# ---- alpha=auto ----------------------------------------------------------------------------------------


@dataclass
class ScoringChoice:
    """The (alpha, recent_ratio) grid measured on calibration windows, and the lowest-perplexity point."""

    policy: CachePolicy
    grid: list[dict[str, Any]]
    full_cache_perplexity: float
    windows: int
    prompt_len: int
    continuation: int

    def to_dict(self) -> dict[str, Any]:
        best = min(self.grid, key=lambda row: row["perplexity"])
        return {
            "chosen": {"alpha": best["alpha"], "recent_ratio": best["recent_ratio"]},
            "grid": self.grid,
            "full_cache_perplexity": self.full_cache_perplexity,
            "windows": self.windows,
            "prompt_len": self.prompt_len,
            "continuation": self.continuation,
            "protocol": "decode (one token per forward through the evicting cache), teacher-forced",
        }


def tune_scoring(
    model: torch.nn.Module,
    records: Sequence[PrefillRecord],
    policy: CachePolicy,
    alphas: Sequence[float],
    recents: Sequence[float] | None,
    log: Callable[[str], None] = lambda message: None,
) -> ScoringChoice:
    """Eviction perplexity (decode protocol) of ``policy`` with each ``alpha`` x ``recent_ratio``
    (``recents=None``: keep the policy's own recent window); the lowest wins (ties: the first in the grid)."""
    splits: list[float | None] = list(recents) if recents else [None]
    grid = [(alpha, split) for alpha in alphas for split in splits]
    nll = {point: torch.zeros(0, dtype=torch.float64) for point in grid}
    full = torch.cat([-r.full_logprobs.mean(dim=1) for r in records])
    for record in records:
        for alpha, split in grid:
            changes: dict[str, Any] = {"alpha": alpha}
            if split is not None:
                changes.update(recent_ratio=split, recent=None)
            candidate = dataclasses.replace(policy, **changes)
            candidate.validate()
            nll[(alpha, split)] = torch.cat(
                [nll[(alpha, split)], window_nll(model, [record], candidate, chunk=1)]
            )
        record._scored.clear()  # the next record's scored caches replace these
    full_ppl = math.exp(float(full.mean()))
    rows = []
    for alpha, split in grid:
        ppl = math.exp(float(nll[(alpha, split)].mean()))
        rows.append(
            {
                "alpha": alpha,
                "recent_ratio": split,
                "perplexity": ppl,
                "increase_pct": 100.0 * (ppl / full_ppl - 1.0),
            }
        )
        log(
            f"[slimformer] a2sf alpha=auto: alpha {alpha:g}, recent {split}: {rows[-1]['increase_pct']:+.2f}%"
        )
    best = min(rows, key=lambda row: row["perplexity"])
    changes = {"alpha": best["alpha"]}
    if best["recent_ratio"] is not None:
        changes.update(recent_ratio=best["recent_ratio"], recent=None)
    return ScoringChoice(
        dataclasses.replace(policy, **changes),
        rows,
        full_ppl,
        int(full.numel()),
        records[0].prompt_len,
        int(records[0].continuation.shape[1]),
    )


# ---- allocate=auto --------------------------------------------------------------------------------------


@dataclass
class LossCurves:
    """Per cache slot, the mean attention mass lost (evicted prompt tokens' share of the continuation's
    attention) at each budget of ``budgets``: ``loss[slot][i]`` for ``budgets[i]``."""

    budgets: list[int]
    loss: list[list[float]]

    def at(self, slot: int, budget: float) -> float:
        """Linear interpolation between grid budgets (a budget below the grid takes the first point)."""
        points, values = self.budgets, self.loss[slot]
        if budget <= points[0]:
            return values[0]
        for (b0, v0), (b1, v1) in zip(zip(points, values), zip(points[1:], values[1:])):
            if budget <= b1:
                return v0 + (v1 - v0) * (budget - b0) / (b1 - b0)
        return values[-1]


def budget_grid(low: int, high: int, points: int = CURVE_POINTS) -> list[int]:
    step = max(1, math.ceil((high - low) / max(1, points - 1)))
    grid = list(range(low, high, step)) + [high]
    return sorted(set(grid))


def lost_mass_curves(
    records: Sequence[PrefillRecord], policy: CachePolicy, budgets: Sequence[int]
) -> LossCurves:
    """:class:`LossCurves` of ``policy``'s keep rule (its sink, recent split and scores) at token ``budgets``."""
    n_slots = len(records[0].steps)
    total = [[0.0] * len(budgets) for _ in range(n_slots)]
    count = 0
    for record in records:
        for j, budget in enumerate(budgets):
            at_budget = dataclasses.replace(policy, budget=int(budget), budget_ratio=None, layer_budgets=None)
            for slot in range(n_slots):
                mass = record.future_mass[slot]  # [B, H_kv, P]
                kept = kept_positions(record, at_budget, slot)
                kept_mass = mass.gather(-1, kept.clamp(min=0)) * (kept >= 0)
                total[slot][j] += float((mass.sum(-1) - kept_mass.sum(-1)).sum())
        count += record.future_mass[0].shape[0] * record.future_mass[0].shape[1]  # windows x KV heads
        record._scored.clear()
    return LossCurves([int(b) for b in budgets], [[value / count for value in row] for row in total])


def smallest_valid_budget(policy: CachePolicy) -> int:
    """The smallest budget ``policy`` accepts: room for its sinks and its recent window at that budget."""
    budget = 1
    while budget < policy.effective_sink + policy.kind.recent_window(policy, budget):
        budget += 1
    return budget


def allocate(curves: LossCurves, total: int, floor: int, cap: int) -> list[int]:
    """Spread ``total`` tokens over the slots, each within [``floor``, ``cap``]: from the floor, each step of
    the curves' grid spacing goes to the slot whose lost mass it lowers most; the remainder (less than a
    step) to the slot with the best next step. Sums to ``total`` exactly."""
    n = len(curves.loss)
    if not n * floor <= total <= n * cap:
        raise SlimformerError(
            f"cannot spread {total} tokens over {n} cache slots within [{floor}, {cap}] each",
            fix="choose a total budget between the slots' smallest and largest budgets",
        )
    step = max(1, curves.budgets[1] - curves.budgets[0]) if len(curves.budgets) > 1 else 1
    budgets = [floor] * n
    left = total - n * floor

    def gain(slot: int, size: int) -> float:
        return curves.at(slot, budgets[slot]) - curves.at(slot, budgets[slot] + size)

    while left > 0:
        size = min(step, left)
        open_slots = [slot for slot in range(n) if budgets[slot] + size <= cap]
        if not open_slots:  # every slot within a step of its cap: fill one token at a time
            size = 1
            open_slots = [slot for slot in range(n) if budgets[slot] < cap]
        best = max(open_slots, key=lambda slot: (gain(slot, size), -slot))
        budgets[best] += size
        left -= size
    return budgets


@dataclass
class Allocation:
    """Per-slot budgets from :func:`allocate`, with the lost mass they and the uniform split predict."""

    layer_budgets: list[int]
    total: int
    uniform: float
    floor: int
    cap: int
    lost_mass_uniform: float
    lost_mass_allocated: float
    per_slot_lost_mass_uniform: list[float]
    curves: LossCurves

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer_budgets": self.layer_budgets,
            "total": self.total,
            "uniform_budget": self.uniform,
            "floor": self.floor,
            "cap": self.cap,
            "lost_attention_mass_uniform": self.lost_mass_uniform,
            "lost_attention_mass_allocated": self.lost_mass_allocated,
            "per_slot_lost_mass_uniform": self.per_slot_lost_mass_uniform,
            "curve_budgets": self.curves.budgets,
            "curves": self.curves.loss,
        }


def allocate_total(
    records: Sequence[PrefillRecord], policy: CachePolicy, total: int, curves: LossCurves | None = None
) -> Allocation:
    """Per-slot budgets summing to ``total`` for ``policy``'s keep rule, from the calibration ``records``."""
    n_slots = len(records[0].steps)
    prompt_len = records[0].prompt_len
    uniform = total / n_slots
    floor = max(smallest_valid_budget(policy), math.ceil(ALLOCATION_FLOOR * uniform))
    cap = max(min(prompt_len, math.floor(ALLOCATION_CAP * uniform)), math.ceil(uniform))
    floor = min(floor, math.floor(uniform))
    if curves is None:
        curves = lost_mass_curves(records, policy, budget_grid(floor, cap))
    budgets = allocate(curves, total, floor, cap)
    per_slot_uniform = [curves.at(slot, uniform) for slot in range(n_slots)]
    return Allocation(
        budgets,
        total,
        uniform,
        floor,
        cap,
        sum(per_slot_uniform) / n_slots,
        sum(curves.at(slot, b) for slot, b in enumerate(budgets)) / n_slots,
        per_slot_uniform,
        curves,
    )
