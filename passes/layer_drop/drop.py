"""``layer_drop``: remove the attention and/or MLP sub-blocks that change the residual stream least
("What Matters in Transformers? Not All Attention is Needed", He et al., arXiv 2406.15786).

Importance comes from :mod:`converter.importance` (``1 - cos(X, Y)`` per token, LLM-Drop's exact
definition by default). What is dropped is chosen by a drop spec::

    attn:4      the 4 least important attention sub-blocks      (also mlp:N, block:N)
    joint:6     the 6 least important of attention and MLP sub-blocks, ranked together
    attn:0.25   a quarter of the model's attention sub-blocks (a number with a decimal point is a ratio
                of the model's modules of that kind -- 2 x layers for joint -- rounded to the nearest)
    attn        as many as ``max_ppl_increase`` allows

* One-shot (default): score the intact model once, drop the ``n`` least important together.
* ``iterative``: drop one module, re-score the changed model, repeat.
* ``max_ppl_increase = PCT``: drop in importance order while the perplexity on the evaluation source
  (``--eval-ppl``) stays within ``PCT`` percent of the model's own; the spec's count becomes an upper
  bound. The first module that breaks the target is put back and the search stops.
* ``heal_steps = N`` (``--heal-steps``): after dropping, distil the model towards the one before dropping --
  ``KL(teacher || student)`` of the next-token distributions on the calibration windows, the flow of
  :class:`slimformer.passes.healing.HealingRun` that ``sas`` uses too -- training ``heal_params``. The report
  gives perplexity before dropping, after it and after healing: on ``--eval-ppl`` when given (it should be
  another source than the calibration text), otherwise on calibration windows held out from healing.

With more than one calibration source, the first one decides and every source is scored: the report
gives the Spearman correlation of the scores and the overlap of the drop sets each source would choose,
and warns when the choice depends on the source.

Dropped sub-blocks become ``DROPPED`` nodes in the graph: their tensors are not written, the runtime
builds no module for them, and the KV cache has slots only for the attention layers that remain.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import DROPPED, CheckpointGraph, Node
from slimformer.passes.base import (
    DryRun,
    Pass,
    PassContext,
    PassResult,
    ReportRow,
    ReportTable,
    register,
    structural_copy,
)
from slimformer.passes.healing import HealingRun, HealSettings, perplexity_rows, require_holdout
from slimformer.passes.layer_drop.importance import (
    COMPARES,
    METRICS,
    LayerScores,
    ScoredModule,
    Stability,
    compare_sources,
    rank_modules,
    score_graph,
)

MODE_ALIASES = {
    "attn": "attention",
    "attention": "attention",
    "mlp": "mlp",
    "ffn": "mlp",
    "block": "block",
    "layer": "block",
    "joint": "joint",
}
SPEC_HELP = "write KIND:N or KIND:RATIO with KIND one of attn, mlp, block, joint (e.g. attn:4, joint:0.25)"
PLOT = "layer_importance.png"
HEAL_PARAMS = ("all", "neighbours", "norms", "mlp", "attention")


@dataclass(frozen=True)
class DropSpec:
    """``attn:4`` / ``mlp:0.25`` / ``block:2`` / ``joint:6`` / ``attn`` (count from the quality target)."""

    mode: str
    count: int | None = None
    ratio: float | None = None

    @classmethod
    def parse(cls, text: str) -> DropSpec:
        kind, _, amount = text.strip().partition(":")
        if kind.strip().lower() not in MODE_ALIASES:
            raise SlimformerError(f"unknown drop kind {kind!r} in --drop {text!r}", fix=SPEC_HELP)
        mode, amount = MODE_ALIASES[kind.strip().lower()], amount.strip()
        if not amount:
            return cls(mode)
        try:
            if "." in amount or "e" in amount.lower():
                ratio = float(amount)
                if not 0.0 <= ratio <= 1.0:
                    raise ValueError
                return cls(mode, ratio=ratio)
            count = int(amount)
            if count < 0:
                raise ValueError
            return cls(mode, count=count)
        except ValueError:
            raise SlimformerError(
                f"bad amount {amount!r} in --drop {text!r}: need a count >= 0 or a ratio in [0, 1]",
                fix=SPEC_HELP,
            ) from None

    def total(self, graph: CheckpointGraph) -> int:
        """How many modules of this kind the model has (dropped or not)."""
        return 2 * len(graph.blocks) if self.mode == "joint" else len(graph.blocks)

    def available(self, graph: CheckpointGraph) -> int:
        """How many can still be dropped."""
        kept_attention = sum(b.attention.kept for b in graph.blocks)
        kept_mlp = sum(b.mlp.kept for b in graph.blocks)
        return {
            "attention": kept_attention,
            "mlp": kept_mlp,
            "joint": kept_attention + kept_mlp,
            "block": sum(b.attention.kept or b.mlp.kept for b in graph.blocks),
        }[self.mode]

    def resolve(self, graph: CheckpointGraph, text: str) -> int:
        """The number of modules to drop (an upper bound with a quality target); checks it exists."""
        available = self.available(graph)
        if self.count is None and self.ratio is None:
            return available
        n = self.count if self.count is not None else math.floor(self.ratio * self.total(graph) + 0.5)
        if n > available:
            raise SlimformerError(
                f"--drop {text} asks for {n} {self.mode} module(s) but only {available} can be dropped "
                f"({self.total(graph)} in the model, {self.total(graph) - available} already dropped)",
                fix=f"ask for at most {available}, e.g. --drop {text.split(':')[0]}:{available}",
            )
        return n


@dataclass
class LayerDropConfig:
    """Options of the ``layer_drop`` pass (CLI: ``--drop``, ``--iterative``, ``--max-ppl-increase``, ``--streaming``,
    ``--heal-steps``; every key in a pipeline file). The ``help`` metadata is what ``slimformer convert --help``
    prints."""

    drop: str | None = field(
        default=None,
        metadata={
            "help": "what to drop: attn:N, mlp:N, block:N or joint:N, N a count or a ratio like 0.25 (--drop)",
            "default_text": "attn with max_ppl_increase",
        },
    )
    iterative: bool = field(
        default=False, metadata={"help": "re-score the model after each removal (--iterative)"}
    )
    max_ppl_increase: float | None = field(
        default=None,
        metadata={
            "help": "drop while --eval-ppl perplexity rises at most this many percent (--max-ppl-increase)"
        },
    )
    metric: str = field(
        default="cosine",
        metadata={"help": "importance: cosine (1 - cos, LLM-Drop) or angular (arccos(cos) / pi)"},
    )
    compare: str = field(
        default="residual",
        metadata={
            "help": "residual (X before the norm vs X + f(norm X), LLM-Drop) or norm_output (norm X vs f(norm X))"
        },
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "score one block at a time, one block's weights in memory (--streaming)"},
    )
    batch_size: int = field(default=8, metadata={"help": "calibration windows per scoring forward"})
    heal_steps: int = field(
        default=0,
        metadata={
            "help": "after dropping, KL-distillation steps towards the model before dropping, on the "
            "calibration windows (0: no healing; --heal-steps)"
        },
    )
    heal_lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate of healing"})
    heal_batch_size: int = field(default=4, metadata={"help": "calibration windows per healing step"})
    heal_params: str = field(
        default="all",
        metadata={
            "help": "what healing trains: all; neighbours (every kept parameter of the layers at and next to "
            "a dropped module); norms (every norm gain); mlp or attention (every kept sub-block of that kind, "
            "with its norm)"
        },
    )

    def __post_init__(self) -> None:
        if self.drop is not None and not isinstance(self.drop, str):
            raise SlimformerError(
                f"layer_drop drop={self.drop!r} must be a spec such as attn:2", fix=SPEC_HELP
            )
        for name in ("iterative", "streaming"):
            if not isinstance(getattr(self, name), bool):
                raise SlimformerError(
                    f"layer_drop {name}={getattr(self, name)!r} must be true or false",
                    fix=f"write {name} = true (or false)",
                )
        if self.max_ppl_increase is not None and (
            isinstance(self.max_ppl_increase, bool) or not isinstance(self.max_ppl_increase, (int, float))
        ):
            raise SlimformerError(
                f"layer_drop max_ppl_increase={self.max_ppl_increase!r} must be a number (percent)",
                fix="give a percentage, e.g. --max-ppl-increase 5",
            )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int):
            raise SlimformerError(
                f"layer_drop batch_size={self.batch_size!r} must be an integer", fix="e.g. batch_size = 8"
            )
        if self.drop is None and self.max_ppl_increase is None:
            raise SlimformerError(
                "layer_drop needs a drop spec or a quality target",
                fix="pass --drop attn:N (or mlp:N, block:N, joint:N) and/or --max-ppl-increase PCT",
            )
        if self.drop is not None:
            spec = DropSpec.parse(self.drop)
            if spec.count is None and spec.ratio is None and self.max_ppl_increase is None:
                raise SlimformerError(
                    f"--drop {self.drop} needs an amount, or a quality target to decide it",
                    fix=f"write e.g. --drop {self.drop}:2 or {self.drop}:0.25, or add --max-ppl-increase PCT",
                )
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise SlimformerError(
                f"--max-ppl-increase must be >= 0 (got {self.max_ppl_increase})",
                fix="give a percentage, e.g. 5",
            )
        if self.metric not in METRICS:
            raise SlimformerError(f"unknown metric {self.metric!r}", fix=f"use one of {', '.join(METRICS)}")
        if self.compare not in COMPARES:
            raise SlimformerError(
                f"unknown compare {self.compare!r}", fix=f"use one of {', '.join(COMPARES)}"
            )
        if self.batch_size < 1:
            raise SlimformerError(f"batch_size must be >= 1 (got {self.batch_size})", fix="raise batch_size")
        for name, least, example in (("heal_steps", 0, "--heal-steps 100"), ("heal_batch_size", 1, "4")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise SlimformerError(
                    f"layer_drop {name}={value!r} must be an integer >= {least}",
                    fix=f"e.g. {name} = {example}",
                )
        lr = self.heal_lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise SlimformerError(
                f"layer_drop heal_lr={lr!r} must be a positive number", fix="e.g. heal_lr = 5e-5"
            )
        if self.heal_params not in HEAL_PARAMS:
            raise SlimformerError(
                f"unknown layer_drop heal_params {self.heal_params!r}",
                fix=f"use one of {', '.join(HEAL_PARAMS)}",
            )


def _plan_drop(graph: CheckpointGraph, mode: str, n: int) -> None:
    """Mark ``n`` modules of ``mode`` dropped in a dry-run copy. Which ones depends on scores not yet
    computed, so take those whose loss costs later passes least: MLPs first for ``joint`` (attention is
    what sas and a2sf need), SAS-form attention before standard attention (sas converts standard ones)."""

    def order(kind: str) -> list[Node]:
        nodes = [getattr(block, kind) for block in reversed(graph.blocks) if getattr(block, kind).kept]
        return sorted(nodes, key=lambda node: node.details.get("form", "standard") == "standard")

    if mode == "block":
        candidates = [block for block in reversed(graph.blocks) if block.attention.kept or block.mlp.kept]
        for block in candidates[:n]:
            block.attention.state = block.mlp.state = DROPPED
        return
    kinds = {"attention": ["attention"], "mlp": ["mlp"], "joint": ["mlp", "attention"]}[mode]
    nodes = [node for kind in kinds for node in order(kind)]
    for node in nodes[:n]:
        node.state = DROPPED


def drop_module(
    graph: CheckpointGraph, module: ScoredModule, reason: str
) -> list[tuple[Node, str, str | None]]:
    """Mark ``module``'s node(s) (both of a block) DROPPED; returns what :func:`restore` needs to undo it."""
    block = graph.blocks[module.layer]
    nodes = {"attention": [block.attention], "mlp": [block.mlp], "block": [block.attention, block.mlp]}[
        module.kind
    ]
    saved = []
    for node in nodes:
        if node.kept:
            saved.append((node, node.state, node.reason))
            node.state, node.reason = DROPPED, reason
    return saved


def _check_inputs(cfg: LayerDropConfig, graph: CheckpointGraph, ctx: PassContext) -> None:
    """What the pass needs besides counts: a decoder and an evaluation source for a quality target, a
    tokenizer to score, and healing options that fit (checked before work and again at run time)."""
    if cfg.max_ppl_increase is not None:
        if graph.is_encoder:
            raise SlimformerError(
                "--max-ppl-increase needs a causal language model; this checkpoint is an encoder",
                fix="give a count instead, e.g. --drop attn:2",
            )
        if ctx.evaluation.ppl is None:
            raise SlimformerError(
                "--max-ppl-increase needs a held-out evaluation source",
                fix="add --eval-ppl SPEC (e.g. --eval-ppl stdlib:valid)",
            )
    if ctx.tokenizer is None:
        raise SlimformerError(
            "layer_drop scores on calibration text, but the checkpoint has no tokenizer",
            fix="add the tokenizer files (tokenizer.json / tokenizer_config.json) to the checkpoint",
        )
    _check_healing(cfg, graph, ctx)


def _release_cache_slots(graph: CheckpointGraph) -> None:
    """A dropped attention has no KV-cache slot: clear the slot summary an earlier a2sf pass left on it."""
    for block in graph.blocks:
        if not block.attention.kept:
            block.cache_policy = None


def _check_healing(config: LayerDropConfig, graph: CheckpointGraph, ctx: PassContext) -> None:
    if not config.heal_steps:
        return
    if graph.is_encoder:
        raise SlimformerError(
            "layer_drop healing distils next-token distributions, and this checkpoint is an encoder",
            fix="leave out --heal-steps / heal_steps (the drop itself is exact)",
        )
    require_holdout(ctx)


def heal_filter(graph: CheckpointGraph, layers: list[int], which: str) -> Callable[[str], bool]:
    """The parameter names ``heal_params=which`` trains; ``layers`` are the layers that lost a module."""
    if which == "all":
        return lambda name: True
    blocks = graph.blocks
    if which == "neighbours":
        near = sorted({j for i in layers for j in (i - 1, i, i + 1) if 0 <= j < len(blocks)})
        nodes = [node for j in near for node in (blocks[j].attention, blocks[j].mlp)]
    elif which == "norms":
        nodes = list(graph.nodes())
    else:
        nodes = [getattr(block, which) for block in blocks]
    names = {name for node in nodes if node.kept for name in node.tensors}
    if which == "norms":  # input_layernorm, post_attention_layernorm, q_norm / k_norm, the final norm
        names = {name for name in names if name.rsplit(".", 1)[0].endswith("norm")}
    return frozenset(names).__contains__


def _healing_note(healing: dict[str, Any]) -> str:
    ppl, heal = healing["perplexity"], healing["heal"]
    return (
        f"healed by {heal['steps']} step(s) of KL distillation to the model before dropping "
        f"({heal['params']}: {heal['trainable_params']:,} parameters trained, {heal['epochs']:g} epoch(s) of "
        f"{heal['windows']} calibration windows, {heal['seconds']:.0f}s): perplexity on {ppl['source']} "
        f"{ppl['before']:.3f} before dropping, {ppl['after_drop']:.3f} after, {ppl['after_healing']:.3f} healed"
    )


def _healing_warnings(healing: dict[str, Any], ctx: PassContext) -> list[str]:
    ppl, warnings = healing["perplexity"], []
    if ctx.evaluation.ppl and ctx.evaluation.ppl in ctx.calibration.sources:
        warnings.append(
            f"healing trained on {ctx.evaluation.ppl}, the source its perplexity is measured on: the healed "
            "perplexity is optimistic; pass an --eval-ppl source other than the calibration text"
        )
    if ppl["after_healing"] > ppl["after_drop"]:
        warnings.append(
            f"healing raised perplexity ({ppl['after_drop']:.3f} -> {ppl['after_healing']:.3f}): lower "
            "heal_lr or give more calibration windows (--calib-samples)"
        )
    for warning in warnings:
        ctx.log(f"[slimformer] WARNING: {warning}")
    return warnings


def restore(saved: list[tuple[Node, str, str | None]]) -> None:
    for node, state, reason in saved:
        node.state, node.reason = state, reason


@register
class LayerDrop(Pass):
    name = "layer_drop"
    config_class = LayerDropConfig

    def needs_calibration(self) -> bool:
        return True

    def check(self, dry: DryRun) -> None:
        """Counts against what is left, the quality target's needs, a tokenizer; then drop in the copy."""
        cfg, graph, ctx = self.config, dry.graph, dry.ctx
        text = cfg.drop or "attn"
        spec = DropSpec.parse(text)
        try:
            limit = spec.resolve(graph, text)
        except SlimformerError as exc:
            raise SlimformerError(exc.what + dry.after(), where=exc.where, fix=exc.fix) from None
        _check_inputs(cfg, graph, ctx)
        kinds = {
            "attention": ["attention"],
            "mlp": ["mlp"],
            "block": ["attention", "mlp"],
            "joint": ["attention", "mlp"],
        }
        if "attention" in kinds[spec.mode] and (graph.kv_cache or {}).get("layer_budgets") is not None:
            raise SlimformerError(
                "layer_drop would drop attention after a2sf set one budget per cache slot (layer_budgets): "
                "the budgets would no longer match the layers",
                fix="put layer_drop before a2sf in the pipeline (or give a2sf one budget for every slot)",
            )
        if cfg.max_ppl_increase is not None:
            # How many go depends on measured perplexity: up to the limit, maybe none. Leave the copy intact.
            dry.uncertain.update(kinds[spec.mode])
            dry.history.append(f"layer_drop drops up to {limit} {spec.mode} module(s)")
            return
        _plan_drop(graph, spec.mode, limit)
        _release_cache_slots(graph)
        if spec.mode == "joint":
            dry.uncertain.update(kinds["joint"])  # the split between attention and MLP comes from the scores
        dry.history.append(f"layer_drop drops {limit} {spec.mode} module(s) ({text})")

    def run(self, graph: CheckpointGraph, ctx: PassContext) -> PassResult:
        cfg = self.config
        text = cfg.drop or "attn"
        spec = DropSpec.parse(text)
        limit = spec.resolve(graph, text)
        _check_inputs(cfg, graph, ctx)

        self._ctx, self._graph = ctx, graph
        # The teacher of healing is the graph before dropping: a copy of its structure, same tensors.
        healing = HealingRun(ctx, self.name) if cfg.heal_steps else None
        original = structural_copy(graph) if healing else None
        sources = list(ctx.calibration.sources)
        by_source = {source: self._score(source) for source in sources}
        initial = by_source[sources[0]]
        params_before, kv_before = graph.num_params(), graph.kv_bytes_per_token()
        notes = [
            f"scored {len(graph.blocks)} layers on {sources[0]}: {initial.n_tokens:,} tokens, "
            f"{'angular distance' if cfg.metric == 'angular' else '1 - cos'} ({cfg.compare}), "
            f"{initial.mode} mode, {initial.seconds:.2f}s"
        ]
        notes.append(
            "importance per layer (attention / mlp / block): "
            + "; ".join(
                f"{i}: " + " / ".join("-" if v is None else f"{v:.4g}" for v in (a, m, b))
                for i, (a, m, b) in enumerate(zip(initial.attention, initial.mlp, initial.block))
            )
        )
        changes: dict[str, Any] = {
            "mode": spec.mode,
            "drop": text,
            "iterative": cfg.iterative,
            "metric": cfg.metric,
            "compare": cfg.compare,
            "calibration": sources[0],
            "scores": initial.to_dict(),
        }

        if cfg.max_ppl_increase is None:
            dropped = self._drop_count(spec.mode, limit, initial)
        else:
            dropped, ppl = self._drop_within_target(spec.mode, limit, initial, cfg.max_ppl_increase)
            changes["perplexity"] = ppl
            notes += [
                f"step {s['step']}: drop {s['module']} -> perplexity {s['perplexity']:.3f} "
                f"({s['increase_pct']:+.2f}%) {'kept' if s['accepted'] else 'over the target, put back'}"
                for s in ppl["steps"]
            ]
        changes["dropped"] = dropped

        if not dropped:
            notes.append(f"dropped nothing ({spec.mode}, limit {limit})")
        else:
            listing = ", ".join(f"{d['module']} ({d['score']:.4g})" for d in dropped)
            notes.append(
                f"dropped {len(dropped)} {spec.mode} module(s){' iteratively' if cfg.iterative else ''}: {listing}"
            )
        notes.append(
            f"parameters {params_before:,} -> {graph.num_params():,}; KV cache bytes/token (fp32) "
            f"{kv_before:,} -> {graph.kv_bytes_per_token():,}"
        )
        changes.update(
            params_before=params_before,
            params_after=graph.num_params(),
            kv_bytes_per_token_before=kv_before,
            kv_bytes_per_token_after=graph.kv_bytes_per_token(),
        )

        warnings = []
        if healing is not None and not dropped:
            notes.append("nothing was dropped, so nothing was healed")
        elif healing is not None:
            changes["healing"] = self._heal(original, dropped, healing, changes.get("perplexity"))
            notes.append(_healing_note(changes["healing"]))
            warnings += _healing_warnings(changes["healing"], ctx)
        if len(sources) > 1:
            changes["scores_by_source"] = {s: sc.to_dict() for s, sc in by_source.items()}
            stability = compare_sources(by_source, spec.mode, max(len(dropped), 1))
            changes["stability"] = stability.to_dict()
            notes += stability.describe()
            warning = stability.warning()
            if warning:
                warnings.append(warning)
                ctx.log(f"[slimformer] WARNING: {warning}")
        ctx.artefacts[PLOT] = plot_importance(
            initial,
            {d["module"] for d in dropped},
            title=f"{graph.family}, {len(graph.blocks)} layers: {text}",
        )
        changes["plot"] = PLOT
        _release_cache_slots(graph)
        rows = []
        if "healing" in changes:
            healed = changes["healing"]
            ppl = healed["perplexity"]
            rows = perplexity_rows(
                ppl["source"],
                "dropping",
                ppl["before"],
                ppl["after_drop"],
                ppl["after_healing"],
                healed["measured_on"],
                healed["heal"],
            )
        elif "perplexity" in changes:
            ppl = changes["perplexity"]
            rows.append(
                ReportRow(
                    f"perplexity on {ppl['source']} while dropping",
                    ppl["baseline"],
                    ppl["final"],
                    settings=f"target +{ppl['max_increase_pct']:g}%, window {ctx.evaluation.window}, "
                    f"at most {ctx.evaluation.max_tokens:,} tokens",
                )
            )
        table = importance_table(initial, {d["module"] for d in dropped})
        return PassResult(notes=notes, rows=rows, data=changes, warnings=warnings, tables=[table])

    # ---- healing -----------------------------------------------------------------------------------------
    def _heal(
        self,
        original: CheckpointGraph,
        dropped: list[dict[str, Any]],
        run: HealingRun,
        search: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Distil the dropped graph towards ``original`` (the graph before dropping); the trained parameters
        end up in the graph, so the checkpoint written holds them."""
        cfg, ctx, graph = self.config, self._ctx, self._graph
        _release_cache_slots(graph)  # the student is built from the graph as it will be written
        # Healing trains in float32 whatever --dtype is (AdamW steps vanish in half precision), as sas does.
        teacher = original.build_model(device=run.device)
        student = graph.build_model(device=run.device)
        if search is not None and ctx.dtype == torch.float32:
            # The quality-target search measured both on the same source and in the same precision.
            before, after = search["baseline"], search["final"]
        else:
            before, after = run.measure(teacher), run.measure(student)
        ctx.log(
            f"[layer_drop] perplexity before dropping {before:.3f}, after {after:.3f} ({run.source}); "
            f"healing {cfg.heal_steps} step(s), heal_params={cfg.heal_params} ..."
        )
        trainable = heal_filter(graph, sorted({d["layer"] for d in dropped}), cfg.heal_params)
        settings = HealSettings(steps=cfg.heal_steps, lr=cfg.heal_lr, batch_size=cfg.heal_batch_size)
        record, healed = run.heal(
            graph,
            student,
            teacher,
            trainable,
            settings,
            params=cfg.heal_params,
            fix="use heal_params=all (or the kind of sub-block that is left: mlp or attention)",
        )
        return {
            "teacher": "the model before dropping",
            "perplexity": {
                "source": run.source,
                "before": before,
                "after_drop": after,
                "after_healing": healed,
            },
            "measured_on": run.where,
            "heal": record,
        }

    # ---- scoring and dropping -------------------------------------------------------------------------
    def _score(self, source: str) -> LayerScores:
        ctx, cfg = self._ctx, self.config
        return score_graph(
            self._graph,
            ctx.calibration_windows(source),
            streaming=cfg.streaming,
            metric=cfg.metric,
            compare=cfg.compare,
            batch_size=cfg.batch_size,
            device=ctx.device,
            dtype=ctx.dtype,
            progress=ctx.progress,
            source=source,
        )

    def _next(
        self, mode: str, step: int, order: list[ScoredModule]
    ) -> tuple[ScoredModule, list[ScoredModule]]:
        """The next module to drop: from the one-shot order, or from a fresh score of the changed graph."""
        if self.config.iterative and step > 0:
            order = rank_modules(self._score(self._ctx.calibration.sources[0]), mode)
            return order[0], order
        return order[step if not self.config.iterative else 0], order

    def _apply(
        self, module: ScoredModule, rank: int, of: int, extra: str = ""
    ) -> list[tuple[Node, str, str | None]]:
        cfg = self.config
        how = "re-scored" if cfg.iterative else "one-shot"
        name = "angular distance" if cfg.metric == "angular" else "importance 1-cos"
        return drop_module(
            self._graph,
            module,
            f"layer_drop: {module.kind} {name} {module.score:.4g} ({how}, rank {rank} of {of}{extra})",
        )

    def _record(self, module: ScoredModule, step: int) -> dict[str, Any]:
        return {
            "module": module.label,
            "kind": module.kind,
            "layer": module.layer,
            "score": module.score,
            "step": step,
        }

    def _drop_count(self, mode: str, n: int, initial: LayerScores) -> list[dict[str, Any]]:
        order = rank_modules(initial, mode)
        dropped = []
        for step in range(n):
            module, order = self._next(mode, step, order)
            rank = 1 if self.config.iterative else step + 1
            self._apply(module, rank, len(order))
            dropped.append(self._record(module, step + 1))
        return dropped

    def _drop_within_target(
        self, mode: str, n: int, initial: LayerScores, pct: float
    ) -> tuple[list, dict[str, Any]]:
        ctx = self._ctx
        baseline = ctx.perplexity(self._graph)
        target = baseline * (1 + pct / 100)
        order = rank_modules(initial, mode)
        dropped, steps = [], []
        for step in range(n):
            module, order = self._next(mode, step, order)
            rank = 1 if self.config.iterative else step + 1
            saved = self._apply(module, rank, len(order), f", perplexity within +{pct:g}%")
            value = ctx.perplexity(self._graph)
            accepted = value <= target
            steps.append(
                {
                    "step": step + 1,
                    "module": module.label,
                    "score": module.score,
                    "perplexity": value,
                    "increase_pct": 100 * (value / baseline - 1),
                    "accepted": accepted,
                }
            )
            ctx.log(
                f"[slimformer] layer_drop step {step + 1}: {module.label} -> perplexity {value:.3f} "
                f"(target {target:.3f}) {'kept' if accepted else 'put back'}"
            )
            if not accepted:
                restore(saved)
                break
            dropped.append({**self._record(module, step + 1), "perplexity": value})
        final = dropped[-1]["perplexity"] if dropped else baseline
        return dropped, {
            "source": ctx.evaluation.ppl,
            "baseline": baseline,
            "target": target,
            "max_increase_pct": pct,
            "final": final,
            "steps": steps,
        }


# ---- report ----------------------------------------------------------------------------------------------
def importance_table(scores: LayerScores, dropped: set[str]) -> ReportTable:
    """Per-layer importance of each kind, with what was dropped, for the report."""
    rows = []
    for layer, values in enumerate(zip(scores.attention, scores.mlp, scores.block)):
        gone = [kind for kind in ("attention", "mlp", "block") if f"{kind}:{layer}" in dropped]
        rows.append([layer, *values, ", ".join(gone) or "-"])
    name = "angular distance" if scores.metric == "angular" else "1 - cos"
    return ReportTable(
        f"importance per layer ({name}, {scores.compare}, {scores.n_tokens:,} tokens of {scores.source})",
        ["layer", "attention", "MLP", "block", "dropped"],
        rows,
    )


# ---- plot ----------------------------------------------------------------------------------------------
def plot_importance(scores: LayerScores, dropped: set[str], title: str = "") -> bytes:
    """PNG of the per-layer importance of attention, MLP and blocks; dropped modules circled in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(range(len(scores.attention)))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 2.5), 3.4))
    styles = {"attention": ("#3a6ea5", "o"), "mlp": ("#d9822b", "s"), "block": ("#6b6b6b", "^")}
    positive = []
    for kind, (color, marker) in styles.items():
        points = [(layer, v) for layer, v in zip(layers, scores.of(kind)) if v is not None]
        positive += [v for _, v in points if v > 0]
        if points:
            xs, ys = zip(*points)
            ax.plot(
                xs,
                ys,
                marker=marker,
                color=color,
                label=kind,
                linewidth=1.2,
                linestyle="--" if kind == "block" else "-",
            )
        hits = [(layer, v) for layer, v in points if f"{kind}:{layer}" in dropped]
        if hits:
            xs, ys = zip(*hits)
            ax.scatter(xs, ys, s=180, facecolors="none", edgecolors="#c0392b", linewidths=2, zorder=5)
    if positive and min(positive) > 0 and max(positive) / min(positive) > 20:
        ax.set_yscale("log")  # importances span decades on real models; a linear axis hides the small ones
    ax.scatter([], [], s=120, facecolors="none", edgecolors="#c0392b", linewidths=2, label="dropped")
    name = "angular distance" if scores.metric == "angular" else "importance (1 - cos)"
    ax.set_xlabel("layer")
    ax.set_ylabel(name)
    ax.set_xticks(layers)
    ax.set_title(title or "layer importance", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def stability_of(scores: dict[str, LayerScores], text: str, graph: CheckpointGraph) -> Stability:
    """Stability of ``--drop text`` across calibration sources (used by ``slimformer score``)."""
    spec = DropSpec.parse(text)
    n = spec.available(graph) if spec.count is None and spec.ratio is None else spec.resolve(graph, text)
    return compare_sources(scores, spec.mode, max(n, 1))
