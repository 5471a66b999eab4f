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

Two choices can be measured instead of given (on the calibration text, ``--calib``; see
:mod:`passes.kv_tuning`)::

    --a2sf budget_ratio=0.2,alpha=auto                 # alpha and recent split by eviction perplexity
    --a2sf policy=h2o,budget_ratio=0.2,allocate=auto   # the total budget spread over layers where needed

``alpha=auto`` measures eviction perplexity (decode protocol) for every alpha of ``alpha_grid`` and recent
split of ``recent_grid`` and keeps the lowest; ``allocate=auto`` stores per-layer ``layer_budgets`` summing
to the uniform total, given where each layer loses the most attention. Both report grid, measurements and
choice in the pass result. Each calibration window's last ``tune_continuation`` tokens are decoded and
scored after the rest is prefilled as the prompt (``budget_ratio`` resolves against that prompt length:
with ``allocate=auto`` the stored budgets are token counts fitted for it).

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
    SLOT_BOOKKEEPING_BYTES,
    CachePolicy,
)
from slimformer.passes import kv_tuning
from slimformer.passes.base import DryRun, Pass, PassContext, PassResult, ReportRow, register

EXAMPLE = "e.g. --a2sf budget=256,alpha=0.5,recent=32,sink=4 (or policy=h2o|streaming, budget_ratio=0.2)"


def _as_text(value: Any) -> str:
    """A value in CachePolicy.parse's ``key=value`` syntax (``layer_budgets`` joins with ``:``)."""
    if isinstance(value, (list, tuple)):
        return ":".join(str(v) for v in value)
    return str(value)


AUTO = "auto"
ALLOCATIONS = ("uniform", AUTO)


def _grid(name: str, value: Any, low_open: bool) -> list[float] | None:
    """A grid option as a list of floats: the CLI gives ``0.1:0.5:0.9`` (a string) or one number."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = [part.strip() for part in value.split(":")]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        grid = [float(part) for part in parts]
    except (TypeError, ValueError):
        raise SlimformerError(
            f"bad --a2sf option: {name}={value!r} must be numbers joined by ':'", fix=f"e.g. {name}=0.5:0.9"
        ) from None
    bad = [g for g in grid if not ((0.0 < g if low_open else 0.0 <= g) and g <= 1.0)]
    if not grid or bad:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise SlimformerError(
            f"bad --a2sf option: {name} values must lie in {interval} (got {bad or 'none'})",
            fix=f"e.g. {name}=0.5:0.9",
        )
    return grid


@dataclass
class A2SFConfig(CachePolicy):
    """The pass's options: :class:`CachePolicy`'s fields, plus what ``alpha=auto`` / ``allocate=auto`` measure.

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

    allocate: str | None = dataclasses.field(
        default=None,
        metadata={
            "default_text": "uniform",
            "help": "uniform (every layer the same budget) or auto: spread the total budget over layers by "
            "the attention each loses on the calibration text (stored as layer_budgets)",
        },
    )
    alpha_grid: list[float] | None = dataclasses.field(
        default=None,
        metadata={
            "default_text": ":".join(f"{a:g}" for a in kv_tuning.DEFAULT_ALPHA_GRID),
            "help": "alpha=auto: the alphas measured, joined by ':'",
        },
    )
    recent_grid: list[float] | None = dataclasses.field(
        default=None,
        metadata={
            "default_text": ":".join(f"{r:g}" for r in kv_tuning.DEFAULT_RECENT_GRID)
            + " (unless recent is given)",
            "help": "alpha=auto: the recent splits (fractions of the budget) measured, joined by ':'",
        },
    )
    tune_continuation: int | None = dataclasses.field(
        default=None,
        metadata={
            "default_text": "a quarter of --calib-seq-len",
            "help": "alpha=auto / allocate=auto: tokens at the end of each calibration window decoded and scored "
            "(the rest is the prompt)",
        },
    )

    def __post_init__(self) -> None:
        # alpha=auto is the pass's, not the cache's: CachePolicy validates a placeholder (alpha unset).
        self.auto_alpha = isinstance(self.alpha, str) and self.alpha.strip().lower() == AUTO
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(CachePolicy)}
        if self.auto_alpha:
            given["alpha"] = None
        text = ",".join(f"{name}={_as_text(value)}" for name, value in given.items() if value is not None)
        parsed = _checked(lambda: CachePolicy.parse(text))
        for name in given:
            setattr(self, name, getattr(parsed, name))
        if self.auto_alpha:
            self.alpha = AUTO  # kept, so the written pipeline replays the measurement
        self._check_tuning()

    def _check_tuning(self) -> None:
        def bad(message: str, fix: str) -> SlimformerError:
            return SlimformerError(f"bad --a2sf option: {message}", where="pass a2sf", fix=fix)

        if self.allocate is not None:
            self.allocate = str(self.allocate).strip().lower()
            if self.allocate not in ALLOCATIONS:
                raise bad(f"allocate={self.allocate!r} is unknown", "allocate=auto or allocate=uniform")
        if self.auto_alpha and self.policy != "a2sf":
            raise bad(
                f"alpha=auto tunes A2SF's forgetting factor; policy {self.policy!r} has none to tune",
                "use policy=a2sf with alpha=auto, or drop alpha=auto",
            )
        if self.allocate == AUTO:
            if not self.evicts:
                raise bad(
                    "allocate=auto spreads an eviction budget; policy 'none' has none",
                    "pick an evicting policy",
                )
            if self.layer_budgets is not None:
                raise bad(
                    "allocate=auto chooses the per-layer budgets itself; layer_budgets fixes them",
                    "give the total as budget or budget_ratio, or drop allocate=auto",
                )
        self.alpha_grid = _grid("alpha_grid", self.alpha_grid, low_open=True)
        self.recent_grid = _grid("recent_grid", self.recent_grid, low_open=False)
        for name in ("alpha_grid", "recent_grid"):
            if getattr(self, name) is not None and not self.auto_alpha:
                raise bad(
                    f"{name} is the grid alpha=auto measures; alpha is not auto",
                    f"add alpha=auto or drop {name}",
                )
        if self.recent_grid is not None and (self.recent is not None or self.recent_ratio is not None):
            raise bad(
                "recent_grid searches the recent split, which recent/recent_ratio fixes",
                "drop recent_grid, or drop recent/recent_ratio",
            )
        if self.tune_continuation is not None and (
            not isinstance(self.tune_continuation, int)
            or isinstance(self.tune_continuation, bool)
            or self.tune_continuation < 2
        ):
            raise bad(
                f"tune_continuation={self.tune_continuation!r} must be an integer >= 2",
                "e.g. tune_continuation=64",
            )

    @property
    def tunes(self) -> bool:
        """Whether the pass measures something on calibration text (alpha=auto or allocate=auto)."""
        return self.auto_alpha or self.allocate == AUTO

    def cache_policy(self) -> CachePolicy:
        """The plain CachePolicy stored in the checkpoint (no pass-specific type in config.json); before
        alpha=auto has measured, alpha is unset (the default) there."""
        names = {f.name for f in dataclasses.fields(CachePolicy)}
        values = {name: getattr(self, name) for name in names}
        if self.auto_alpha:
            values["alpha"] = None
        return CachePolicy(**values)


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
        if self.config.tunes:
            _tuning_split(self.config, dry.ctx.calibration.seq_len)  # fails now, not after the weights load
        _assign_slots(graph, policy)

    def needs_calibration(self) -> bool:
        return self.config.tunes

    def run(self, graph: CheckpointGraph, ctx: PassContext) -> PassResult:
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

        tuning: dict[str, Any] | None = None
        tuning_notes: list[str] = []
        if self.config.tunes and policy.evicts:
            policy, tuning, tuning_notes = _tune(graph, ctx, self.config, policy, len(slots))
            _checked(lambda: policy.validate(num_slots=len(slots)))
        policy = policy.with_defaults()  # stored resolved: the checkpoint must not follow later defaults
        _assign_slots(graph, policy)
        if not policy.evicts:
            return PassResult(
                notes=["policy none: the checkpoint keeps the plain (growing) KV cache"],
                data={"kv_cache": None},
            )

        bound = _memory_bound(graph, slots, policy)
        notes = [_describe(policy, len(slots)), bound["note"], *tuning_notes]
        changes: dict[str, Any] = {
            "kv_cache": policy.to_dict(),
            "cache_slots": len(slots),
            "kv_bytes_bound_per_sequence": bound["bytes"],
            "eviction_perplexity": None,
            "tuning": tuning,
        }
        rows = []
        if ctx.evaluation.ppl:
            result, note = _measure(graph, ctx, policy)
            changes["eviction_perplexity"] = result
            notes.append(note)
            rows.append(eviction_row(result))
        return PassResult(notes=notes, rows=rows, data=changes)


def _tuning_split(config: A2SFConfig, seq_len: int) -> tuple[int, int]:
    """(prompt, continuation) tokens of each calibration window: the continuation is decoded and scored."""
    continuation = config.tune_continuation or max(2, seq_len // 4)
    if seq_len - continuation < 1:
        raise SlimformerError(
            f"tune_continuation={continuation} leaves no prompt in {seq_len}-token calibration windows",
            where="pass a2sf",
            fix=f"lower tune_continuation below {seq_len - 1} or raise --calib-seq-len",
        )
    return seq_len - continuation, continuation


def _tune(
    graph: CheckpointGraph, ctx: PassContext, config: A2SFConfig, policy: CachePolicy, n_slots: int
) -> tuple[CachePolicy, dict[str, Any], list[str]]:
    """alpha=auto, then allocate=auto (with the chosen alpha), on the calibration windows (kv_tuning)."""
    if ctx.tokenizer is None:
        raise SlimformerError(
            "alpha=auto / allocate=auto measure on calibration text, but the checkpoint has no tokenizer",
            fix="add tokenizer files, or give alpha and the budgets explicitly",
        )
    source = ctx.calibration.sources[0]
    windows = ctx.calibration_windows(source)
    prompt_len, continuation = _tuning_split(config, windows.shape[1])
    ctx.log(
        f"[slimformer] a2sf: measuring on {windows.shape[0]} calibration window(s) of {source} "
        f"({prompt_len} prompt + {continuation} decoded tokens) ..."
    )
    model = ctx.build_model(graph)
    records = list(kv_tuning.calibration_records(model, windows, prompt_len))
    setting = f"{windows.shape[0]} calibration window(s) of {source} ({prompt_len} prompt + {continuation} decoded tokens)"
    data: dict[str, Any] = {
        "calibration": {
            "source": source,
            "windows": int(windows.shape[0]),
            "prompt_len": prompt_len,
            "continuation": continuation,
        }
    }
    notes: list[str] = []
    if config.auto_alpha:
        fixed_split = policy.recent is not None or policy.recent_ratio is not None
        alphas = config.alpha_grid or list(kv_tuning.DEFAULT_ALPHA_GRID)
        recents = None if fixed_split else (config.recent_grid or list(kv_tuning.DEFAULT_RECENT_GRID))
        choice = _checked(
            lambda: kv_tuning.tune_scoring(model, records, policy, alphas, recents, log=ctx.log)
        )
        policy = choice.policy
        data["alpha"] = choice.to_dict()
        ranked = sorted(choice.grid, key=lambda row: row["perplexity"])
        best = ranked[0]
        split = "" if best["recent_ratio"] is None else f", recent {best['recent_ratio']:.0%} of the budget"
        runner = (
            f"; next best alpha {ranked[1]['alpha']:g}"
            + ("" if ranked[1]["recent_ratio"] is None else f", recent {ranked[1]['recent_ratio']:.0%}")
            + f" ({ranked[1]['increase_pct']:+.2f}%)"
            if len(ranked) > 1
            else ""
        )
        notes.append(
            f"alpha=auto: alpha {best['alpha']:g}{split}, the lowest of {len(ranked)} measured by eviction perplexity "
            f"(decode protocol) on {setting}: {best['perplexity']:.3f} vs {choice.full_cache_perplexity:.3f} with the "
            f"full cache ({best['increase_pct']:+.2f}%){runner}"
        )
    if config.allocate == AUTO:
        if policy.budget is not None:
            uniform = policy.budget
        else:
            uniform = policy.limits(0, prompt_len).budget  # the ratio resolved on the calibration prompt
        total = uniform * n_slots
        allocation = _checked(lambda: kv_tuning.allocate_total(records, policy, total))
        data["allocation"] = {**allocation.to_dict(), "fitted_prompt_len": prompt_len}
        ratio = (
            ""
            if policy.budget_ratio is None
            else f" ({policy.budget_ratio:.0%} of a {prompt_len}-token prompt)"
        )
        notes.append(
            f"allocate=auto: {total} tokens{ratio} over {n_slots} cache slot(s) where the continuation's attention "
            f"needs them, measured on {setting}: budgets {min(allocation.layer_budgets)}..{max(allocation.layer_budgets)} "
            f"(uniform {uniform}); attention mass on evicted tokens {allocation.lost_mass_uniform:.3f} uniform -> "
            f"{allocation.lost_mass_allocated:.3f} allocated"
            + (
                "; stored as token counts, fitted for prompts of that length (per-layer ratios need a runtime change)"
                if policy.budget_ratio is not None
                else ""
            )
        )
        policy = dataclasses.replace(
            policy, budget=None, budget_ratio=None, layer_budgets=list(allocation.layer_budgets)
        )
    return policy, data, notes


def _assign_slots(graph: CheckpointGraph, policy: CachePolicy) -> None:
    """Store the policy in the graph and its summary on each cache slot (layers keeping attention);
    ``policy=none`` leaves the plain growing cache, as if the pass had not run."""
    graph.kv_cache = policy.with_defaults().to_dict() if policy.evicts else None
    slots = [block for block in graph.blocks if block.attention.kept]
    for block in graph.blocks:
        block.cache_policy = None
    if policy.evicts:
        for slot, block in enumerate(slots):
            block.cache_policy = _slot_summary(policy, slot)


# ---- what the report says --------------------------------------------------------------------------------


def eviction_row(evicted: dict[str, Any]) -> ReportRow:
    """The decode-protocol measurement as a report row: the same weights with the full and the evicting cache."""
    return ReportRow(
        f"perplexity on {evicted['source']} under eviction",
        evicted["full_cache_perplexity"],
        evicted["perplexity"],
        settings=f"{evicted['n_windows']} window(s) of {evicted['prompt_len']} prompt + {evicted['continuation']} "
        f"decoded tokens, chunk {evicted['chunk']}",
        before_label="full cache",
        after_label="evicting cache",
    )


def _slot_summary(policy: CachePolicy, slot: int) -> dict[str, Any]:
    """What cache slot ``slot`` keeps, for the report's layer table: the budget, sink and recent window it
    actually uses (``CachePolicy.limits``). A ratio budget is resolved per prompt, so its entry states the
    rule in words -- ``kept`` -- and the windows as the most they can be."""
    summary: dict[str, Any] = {"policy": policy.policy}
    if policy.budget_ratio is None:
        limits = policy.limits(slot, prompt_len=0)  # a token budget does not depend on the prompt
        summary.update(budget=limits.budget, sink=limits.sink, recent=limits.recent)
    else:
        summary["budget_ratio"] = policy.budget_ratio
        summary["sink"] = f"up to {policy.effective_sink}" if policy.effective_sink else 0
        if policy.scores_attention and policy.recent is not None:
            summary["recent"] = f"up to {policy.recent}"
        elif policy.scores_attention:
            summary["recent_ratio"] = (
                DEFAULT_RECENT_RATIO if policy.recent_ratio is None else policy.recent_ratio
            )
        example = policy.limits(slot, 100).describe()
        summary["kept"] = (
            f"floor({policy.budget_ratio:g} x prompt tokens), at least 1, sink and recent shrunk to fit: "
            f"a 100-token prompt keeps {example}"
        )
    if policy.scores_attention:
        summary["alpha"] = policy.effective_alpha
    return summary


def _describe(policy: CachePolicy, n_slots: int) -> str:
    """The pass's note on what the cache keeps, with the resolved numbers (``LayerLimits.describe``)."""
    rule = policy.kind.describe(policy)
    where = f"per (sequence, KV head) in each of {n_slots} cache slot(s)"
    if policy.budget_ratio is not None:
        examples = ", ".join(
            f"a {n}-token prompt keeps {policy.limits(0, n).describe()}" for n in (100, 1000)
        )
        return (
            f"policy {policy.policy}: keeps floor({policy.budget_ratio:.0%} of the prompt) tokens (at least 1) {where}, "
            f"sink {policy.effective_sink} and the recent window shrunk to fit inside it ({examples}); {rule}"
        )
    slots: dict[str, list[int]] = {}
    for slot in range(n_slots):
        slots.setdefault(policy.limits(slot, prompt_len=0).describe(), []).append(slot)
    if len(slots) == 1:
        return f"policy {policy.policy}: keeps {next(iter(slots))} {where}; {rule}"
    per_slot = "; ".join(f"slot(s) {', '.join(map(str, ids))}: {text}" for text, ids in slots.items())
    return f"policy {policy.policy}: per (sequence, KV head), {per_slot}; {rule}"


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
                f"KV memory bound: floor({policy.budget_ratio:.0%} of the prompt) tokens x {growing:,} B/token (fp32) "
                f"instead of growing by {growing:,} B with every generated token"
            ),
        }
    budgets = [policy.limits(slot, prompt_len=0).budget for slot in range(len(slots))]
    kv = sum(budget * width for budget, width in zip(budgets, per_layer))
    extra = sum(budgets) * kv_heads * SLOT_BOOKKEEPING_BYTES
    return {
        "bytes": kv,
        "note": (
            f"KV memory bound: {kv:,} B per sequence (fp32; budget x {growing:,} B/token over all layers) plus "
            f"{extra:,} B of scores/positions/ranks, instead of growing by {growing:,} B with every token; decode "
            "steps use one more storage slot (the free one the new token is written into), and a forward of q "
            "tokens briefly holds budget + q before evicting"
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
