"""``a2sf``: give the converted checkpoint a KV cache that evicts tokens by accumulated attention with a
forgetting factor (A2SF, Jo & Shin, arXiv 2407.20485), or by H2O's or StreamingLLM's rule.

The pass changes no weight. It writes the cache policy into the graph (``graph.kv_cache``, saved as
``config.json``'s ``kv_cache``), so the converted model's ``generate()`` -- through
``slimformer.load_model`` or ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` -- builds
the evicting cache of :mod:`converter.runtime.kv_cache` by default. ``slimformer generate/eval --a2sf``
override it per run.

Options are the fields of :class:`~converter.runtime.kv_cache.CachePolicy`, in the CLI's form::

    --a2sf budget=256,alpha=0.5,recent=32,sink=4      # tokens kept per (sequence, KV head) and layer
    --a2sf policy=h2o,budget_ratio=0.2                 # 20% of each prompt; H2O = A2SF with alpha 1
    --a2sf policy=streaming,budget=128,sink=4          # StreamingLLM: sinks + the most recent tokens
    --a2sf layer_budgets=64:64:32:32,alpha=0.1         # one budget per layer that keeps attention

Parsing and validation are CachePolicy's own; a bad value becomes a :class:`SlimformerError` naming the fix.

With an evaluation source (``--eval-ppl``) the pass also measures what eviction costs. Perplexity that
scores a window in one forward cannot see it (the cache evicts only *after* a forward), so this uses
:func:`converter.evaluation.eviction_perplexity`: each window's first three quarters are prefilled as the
prompt, the last quarter is decoded token by token through the evicting cache, and the same tokens are
scored with a full cache for comparison. (The report's "perplexity before/after" rows score windows in
one forward: they measure the weights, which this pass does not change.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import Block, CheckpointGraph
from slimformer.converter.runtime.kv_cache import (
    DEFAULT_ALPHA,
    DEFAULT_RECENT_RATIO,
    DEFAULT_STREAMING_SINK,
    POLICIES,
    CachePolicy,
)
from slimformer.passes.base import DryRun, Pass, PassContext, register

EXAMPLE = "e.g. --a2sf budget=256,alpha=0.5,recent=32,sink=4 (or policy=h2o|streaming, budget_ratio=0.2)"
# Besides K and V, an evicting slot keeps per token and KV head a float32 score, a bool validity flag and an
# int64 logical position (kv_cache.EvictingLayer).
BOOKKEEPING_BYTES = 4 + 1 + 8


def _as_text(value: Any) -> str:
    """A value in CachePolicy.parse's ``key=value`` syntax (``layer_budgets`` joins with ``:``)."""
    if isinstance(value, (list, tuple)):
        return ":".join(str(v) for v in value)
    return str(value)


@dataclass
class A2SFConfig(CachePolicy):
    """The pass's options are exactly :class:`CachePolicy`'s fields.

    Values arrive typed from a pipeline file, or as the CLI's loosely coerced scalars (``64:64:32`` stays a
    string, ``alpha=1`` becomes an int). Both are normalised by round-tripping through
    :meth:`CachePolicy.parse`, so parsing, type checks and validation have one home and one wording.

    ``OPTION_HELP`` describes each inherited field for ``slimformer convert --help``; a test checks that every
    field of CachePolicy has an entry, so a new cache option cannot go undocumented.
    """

    OPTION_HELP: ClassVar[dict[str, str | tuple[str, str]]] = {
        "policy": f"eviction rule: {', '.join(POLICIES)} (h2o = a2sf with alpha 1; streaming = sinks + recent; "
        "none = the plain growing cache)",
        "budget": (
            "unset",
            "tokens kept per (sequence, KV head) in every cache slot; give one of budget, "
            "budget_ratio or layer_budgets",
        ),
        "budget_ratio": ("unset", "the budget as a fraction of the prompt, resolved at prefill, e.g. 0.2"),
        "layer_budgets": ("unset", "one budget per layer that keeps attention, joined by ':' (64:64:32)"),
        "alpha": (
            f"{DEFAULT_ALPHA} for a2sf",
            "forgetting factor in (0, 1]: scores decay by alpha per step (1 = H2O, towards 0 = recency)",
        ),
        "recent": ("unset", "protected most recent tokens (or recent_ratio)"),
        "recent_ratio": (f"{DEFAULT_RECENT_RATIO}", "protected recent window as a fraction of the budget"),
        "sink": (f"0; {DEFAULT_STREAMING_SINK} for streaming", "first tokens that are never evicted"),
        "score_window": (
            "unset: every query row",
            "score a multi-token step from its last W query rows only",
        ),
        "window": ("32 for snapkv", "snapkv: the prompt's last query rows that vote"),
        "chunk_size": "query rows scored at a time, so a prompt's L x L probabilities never exist at once",
    }

    def __post_init__(self) -> None:
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(CachePolicy)}
        text = ",".join(f"{name}={_as_text(value)}" for name, value in given.items() if value is not None)
        parsed = _checked(lambda: CachePolicy.parse(text))
        for name in given:
            setattr(self, name, getattr(parsed, name))

    def cache_policy(self) -> CachePolicy:
        """The plain CachePolicy stored in the checkpoint (no pass-specific type in config.json)."""
        return CachePolicy(**dataclasses.asdict(self))


T = TypeVar("T")


def _checked(build: Callable[[], T]) -> T:
    """``build()``, with CachePolicy's ValueError turned into the user-facing error."""
    try:
        return build()
    except ValueError as exc:
        raise SlimformerError(f"bad --a2sf option: {exc}", where="pass a2sf", fix=EXAMPLE) from exc


@register
class A2SFPass(Pass):
    name = "a2sf"
    config_class = A2SFConfig

    def check(self, dry: DryRun) -> None:
        """A decoder, a cache slot left, per-layer budgets matching the slots; then store the policy."""
        graph = dry.graph
        if graph.is_encoder:
            raise SlimformerError(
                "a2sf configures the KV cache of text generation; this checkpoint is an encoder (no KV cache)",
                fix="drop --a2sf",
            )
        slots = [block for block in graph.blocks if block.attention.kept]
        if not slots:
            raise SlimformerError(
                f"no layer keeps attention{dry.after()}, so there is no KV cache to evict from",
                fix="drop --a2sf, or drop fewer attention layers",
            )
        # How many slots an earlier pass leaves may depend on scores; then only the run can check the count.
        exact = "attention" not in dry.uncertain
        policy = self.config.cache_policy()
        try:
            policy.validate(num_slots=len(slots) if exact else None)
        except ValueError as exc:
            raise SlimformerError(
                f"bad --a2sf option: {exc}{dry.after()}", where="pass a2sf", fix=EXAMPLE
            ) from exc
        graph.kv_cache = policy.to_dict() if policy.evicts else None

    def run(self, graph: CheckpointGraph, ctx: PassContext) -> dict[str, Any]:
        if graph.is_encoder:
            raise SlimformerError(
                "a2sf configures the KV cache of text generation; this checkpoint is an encoder (no KV cache)",
                fix="drop --a2sf",
            )
        slots = [block for block in graph.blocks if block.attention.kept]
        if not slots:
            raise SlimformerError(
                "no layer keeps attention, so there is no KV cache to evict from",
                fix="drop --a2sf, or drop fewer attention layers",
            )
        policy = self.config.cache_policy()
        _checked(lambda: policy.validate(num_slots=len(slots)))

        for block in graph.blocks:
            block.cache_policy = None
        if not policy.evicts:
            graph.kv_cache = None  # policy=none: the plain growing cache, as if the pass had not run
            return {
                "notes": ["policy none: the checkpoint keeps the plain (growing) KV cache"],
                "kv_cache": None,
            }
        graph.kv_cache = policy.to_dict()
        for slot, block in enumerate(slots):
            block.cache_policy = _slot_summary(policy, slot)

        bound = _memory_bound(graph, slots, policy)
        notes = [_describe(policy, len(slots)), bound["note"]]
        changes: dict[str, Any] = {
            "kv_cache": policy.to_dict(),
            "cache_slots": len(slots),
            "kv_bytes_bound_per_sequence": bound["bytes"],
            "eviction_perplexity": None,
        }
        if ctx.evaluation.ppl:
            result, note = _measure(graph, ctx, policy)
            changes["eviction_perplexity"] = result
            notes.append(note)
        changes["notes"] = notes
        return changes


# ---- what the report says --------------------------------------------------------------------------------


def _slot_summary(policy: CachePolicy, slot: int) -> dict[str, Any]:
    """What cache slot ``slot`` keeps, for the report's layer table."""
    summary: dict[str, Any] = {"policy": policy.policy}
    if policy.budget_ratio is not None:
        summary["budget_ratio"] = policy.budget_ratio  # resolved per prompt at prefill
        summary["sink"] = policy.effective_sink
        if policy.scores_attention:
            if policy.recent is not None:
                summary["recent"] = policy.recent
            else:
                summary["recent_ratio"] = (
                    DEFAULT_RECENT_RATIO if policy.recent_ratio is None else policy.recent_ratio
                )
    else:
        limits = policy.limits(slot, prompt_len=0)  # a token budget does not depend on the prompt
        summary.update(budget=limits.budget, sink=limits.sink, recent=limits.recent)
    if policy.scores_attention:
        summary["alpha"] = policy.effective_alpha
    return summary


def _describe(policy: CachePolicy, n_slots: int) -> str:
    if policy.layer_budgets is not None:
        size = f"per-layer budgets {policy.layer_budgets} tokens"
    elif policy.budget is not None:
        size = f"budget {policy.budget} tokens"
    else:
        size = f"budget {policy.budget_ratio:.0%} of each prompt (resolved at prefill)"
    rule = policy.kind.describe(policy)
    return (
        f"policy {policy.policy}: {size} per (sequence, KV head) in each of {n_slots} cache slot(s); {rule}"
    )


def _memory_bound(graph: CheckpointGraph, slots: list[Block], policy: CachePolicy) -> dict[str, Any]:
    """The KV bytes one sequence can hold between forwards: sum over slots of budget x that layer's K+V bytes."""
    # Each layer's own K+V width, by the graph's formula (a SAS layer caches wider values than a standard one).
    per_layer = [
        dataclasses.replace(graph, blocks=[block]).kv_bytes_per_token(torch.float32) for block in slots
    ]
    kv_heads = graph.base_config["num_key_value_heads"]
    growing = sum(per_layer)
    if policy.budget_ratio is not None:
        return {
            "bytes": None,
            "note": (
                f"KV memory bound: {policy.budget_ratio:.0%} of the prompt's {growing:,} B/token (fp32) instead of "
                f"growing by {growing:,} B with every generated token"
            ),
        }
    budgets = [policy.limits(slot, prompt_len=0).budget for slot in range(len(slots))]
    kv = sum(budget * width for budget, width in zip(budgets, per_layer))
    extra = sum(budgets) * kv_heads * BOOKKEEPING_BYTES
    return {
        "bytes": kv,
        "note": (
            f"KV memory bound: {kv:,} B per sequence (fp32; budget x {growing:,} B/token over all layers) plus "
            f"{extra:,} B of scores/positions, instead of growing by {growing:,} B with every token; a forward of "
            "q tokens briefly holds budget + q before evicting"
        ),
    }


def _measure(graph: CheckpointGraph, ctx: PassContext, policy: CachePolicy) -> tuple[dict[str, Any], str]:
    """Eviction-aware perplexity on the evaluation source, with the cache the converted model will build."""
    from slimformer.converter.evaluation import eviction_perplexity

    if ctx.tokenizer is None:
        raise SlimformerError(
            "the checkpoint has no tokenizer, so perplexity under eviction cannot be measured",
            fix="add tokenizer files or drop --eval-ppl",
        )
    e = ctx.evaluation
    ctx.log(f"[slimformer] a2sf: perplexity under eviction on {e.ppl} ...")
    # The model's config carries the policy, so its own default cache evicts: what generate() will use.
    model = ctx.build_model(graph)
    result = eviction_perplexity(
        model, ctx.tokenizer, e.ppl, window=e.window, max_tokens=e.max_tokens, progress=ctx.progress
    )
    note = (
        f"perplexity under eviction on {e.ppl}: {result.perplexity:.3f} vs {result.full_cache_perplexity:.3f} with the "
        f"full cache ({result.increase_pct:+.2f}%); {result.n_windows} window(s) of {result.prompt_len} prompt tokens + "
        f"{result.continuation} decoded tokens, the cache holding {result.cache_tokens} token(s) per slot at the end"
    )
    if result.cache_tokens is not None and result.cache_tokens >= result.prompt_len + result.continuation - 1:
        note += "; the budget covers the whole window, so nothing was evicted (widen the evaluation window to see a cost)"
    return result.to_dict(), note
