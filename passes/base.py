"""The pass contract: what a pass is, what it may use, what it returns, and how it registers.

A pass is one small class with a config dataclass (torchao style): ``Pass.from_params({...})`` builds it
from a pipeline file's table or a CLI flag; ``check(dry)`` validates it against the graph it will see
before any work; ``run(graph, ctx)`` rewrites the checkpoint graph and returns a :class:`PassResult`.
A pass registers itself with ``@register``; the pipeline finds pass modules through the
``slimformer.passes`` entry-point group (``pyproject.toml``), so another package can add one.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import CheckpointGraph


# ---- what a pass sees -------------------------------------------------------------------------------
@dataclass
class CalibrationSpec:
    sources: list[str] = field(default_factory=lambda: ["stdlib:train"])
    samples: int = 32
    seq_len: int = 256
    seed: int = 0


@dataclass
class EvaluationSpec:
    ppl: str | None = None
    window: int = 256
    max_tokens: int = 16384


# ---- what a pass returns ------------------------------------------------------------------------------
@dataclass
class ReportRow:
    """One headline number of a pass: ``what`` was measured before and after it, and how (``settings``).

    ``before_label`` / ``after_label`` name the two columns where "before" and "after" would mislead (the
    a2sf pass compares the full cache with the evicting one on the same weights)."""

    what: str
    before: float | None
    after: float | None
    settings: str = ""
    before_label: str = "before"
    after_label: str = "after"

    @property
    def change_pct(self) -> float | None:
        if self.before in (None, 0) or self.after is None:
            return None
        return 100.0 * (self.after / self.before - 1.0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "change_pct": self.change_pct}


@dataclass
class ReportTable:
    """A table a pass wants a person to see (per-layer scores, a search grid); cells are numbers or text."""

    title: str
    columns: list[str]
    rows: list[list[Any]]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    """What ``Pass.run`` returns. The report renders it without knowing the pass: ``notes`` as sentences,
    ``rows`` as a before/after table, ``tables`` as they are, ``warnings`` in the report, ``data``
    (JSON-able details: scores, fits, decisions) in report.json under the pass's ``changes``."""

    notes: list[str] = field(default_factory=list)
    rows: list[ReportRow] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tables: list[ReportTable] = field(default_factory=list)

    def to_record(self) -> dict[str, Any]:
        return {
            "notes": list(self.notes),
            "rows": [row.to_dict() for row in self.rows],
            "tables": [table.to_dict() for table in self.tables],
            "warnings": list(self.warnings),
            "changes": self.data,
        }


# ---- passes -----------------------------------------------------------------------------------------
class Pass(ABC):
    """One graph rewrite. Subclasses set ``name`` and ``config_class`` and implement ``run``."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, config: Any) -> None:
        self.config = config

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Pass:
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        normalised = {canonical_key(k): v for k, v in params.items()}
        unknown = set(normalised) - names
        if unknown:
            raise SlimformerError(
                f"unknown option(s) {sorted(unknown)} for pass {cls.name!r}",
                fix=f"{cls.name} options are {', '.join(sorted(names))} "
                "(meanings and defaults: `slimformer convert --help`)",
            )
        try:
            config = cls.config_class(**normalised)
        except (TypeError, ValueError) as exc:
            raise SlimformerError(
                f"bad options for pass {cls.name!r}: {exc}", fix=cls._fix_for(str(exc))
            ) from exc
        return cls(config)

    @classmethod
    def _fix_for(cls, message: str) -> str:
        """The meaning and default of the option an error message names, so the fix needs no second look-up."""
        for key, default, meaning in option_rows(cls.config_class):
            if re.search(rf"\b{key}\b", message):
                return f"{key} is {meaning} (default {default}); every {cls.name} option: `slimformer convert --help`"
        return f"every {cls.name} option, with its default: `slimformer convert --help`"

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self.config).items() if v is not None}

    def needs_calibration(self) -> bool:
        """Whether ``run`` reads calibration windows; they are then drawn (and so checked) before any work."""
        return False

    def check(self, dry: DryRun) -> None:
        """Validate the options against the graph as it will be when this pass runs (``dry.graph``), then
        apply the pass's structural effect to ``dry.graph`` so later passes are checked against what it
        leaves. Reads no tensor: this runs before any work. The default checks nothing and changes nothing."""
        return None

    @abstractmethod
    def run(self, graph: CheckpointGraph, ctx: PassContext) -> PassResult:
        """Rewrite ``graph`` in place; say what changed and what it cost (the report renders it as is)."""


def canonical_key(key: str) -> str:
    """Option keys have one spelling, the config field's: ``heal-steps`` is read as ``heal_steps``."""
    return str(key).strip().replace("-", "_")


def option_rows(config_class: type) -> list[tuple[str, str, str]]:
    """``(key, default, meaning)`` for every option of a pass config, read from the dataclass itself (its
    fields' ``metadata["help"]``, or the class's ``OPTION_HELP`` for inherited fields), so ``--help`` and
    error messages cannot drift from what the pass accepts."""
    notes = getattr(config_class, "OPTION_HELP", {})  # name -> meaning, or (default text, meaning)
    rows = []
    for f in dataclasses.fields(config_class):
        note = notes.get(f.name)
        default_text, meaning = note if isinstance(note, tuple) else (f.metadata.get("default_text"), note)
        meaning = f.metadata.get("help") or meaning
        if not meaning:
            raise TypeError(f"{config_class.__name__}.{f.name} has no help text")  # a bug; tests catch it
        if default_text is not None:
            default = default_text
        else:
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            default = (
                "unset" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            )
        rows.append((f.name, default, meaning))
    return rows


@dataclass
class DryRun:
    """The pipeline's structure as each pass will find it, for :meth:`Pass.check` (no tensor is read).

    ``graph`` is a structural copy of the checkpoint graph that each check updates. Where what a pass does
    depends on scores (which modules a quality target drops, how a joint drop splits between attention and
    MLP) the check assumes the outcome that leaves later passes the most room and names the sub-block kind
    in ``uncertain``: checks refuse only what must fail, the passes' own checks at run time do the rest.
    """

    graph: CheckpointGraph
    ctx: PassContext
    uncertain: set[str] = field(default_factory=set)
    history: list[str] = field(default_factory=list)  # "layer_drop drops 2 attention sub-block(s)", ...

    def after(self) -> str:
        """`` (after layer_drop drops 2 attention sub-block(s))`` once an earlier pass changed the structure."""
        return f" (after {'; '.join(self.history)})" if self.history else ""


@dataclass
class PassContext:
    """What passes may use: the tokenizer, calibration data, a model built from the current graph."""

    tokenizer: Any
    calibration: CalibrationSpec
    evaluation: EvaluationSpec
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    progress: bool = True
    log: Callable[[str], None] = print
    output_dir: Path | None = None  # where passes may write artefacts (plots); set by the converter
    artefacts: dict[str, bytes] = field(default_factory=dict)  # file name -> content, written with the output
    _windows: dict[str, torch.Tensor] = field(default_factory=dict)

    def calibration_windows(self, source: str | None = None) -> torch.Tensor:
        """``LongTensor[samples, seq_len]`` from ``source`` (default: the first calibration source)."""
        from slimformer.converter.calibration import sample_windows

        source = source or self.calibration.sources[0]
        if source not in self._windows:
            c = self.calibration
            self._windows[source] = sample_windows(self.tokenizer, source, c.samples, c.seq_len, c.seed)
        return self._windows[source]

    def build_model(self, graph: CheckpointGraph, attn_implementation: str = "sdpa") -> torch.nn.Module:
        return graph.build_model(
            dtype=self.dtype, device=self.device, attn_implementation=attn_implementation
        )

    def perplexity(self, graph_or_model: CheckpointGraph | torch.nn.Module, spec: str | None = None) -> float:
        from slimformer.converter.evaluation import perplexity

        model = (
            self.build_model(graph_or_model)
            if isinstance(graph_or_model, CheckpointGraph)
            else graph_or_model
        )
        spec = spec or self.evaluation.ppl
        if spec is None:
            raise SlimformerError("this pass needs an evaluation source", fix="pass --eval-ppl SPEC")
        e = self.evaluation
        return perplexity(
            model, self.tokenizer, spec, window=e.window, max_tokens=e.max_tokens, progress=self.progress
        ).perplexity


def structural_copy(graph: CheckpointGraph) -> CheckpointGraph:
    """A copy of ``graph`` whose node states, details and cache policy can change without touching the
    original; the tensors are the same lazy references, never loaded."""

    def node(n: Any) -> Any:
        return dataclasses.replace(n, tensors=dict(n.tensors), details=copy.deepcopy(n.details))

    blocks = [
        dataclasses.replace(
            b, attention=node(b.attention), mlp=node(b.mlp), cache_policy=copy.deepcopy(b.cache_policy)
        )
        for b in graph.blocks
    ]
    return dataclasses.replace(
        graph,
        embeddings=node(graph.embeddings),
        blocks=blocks,
        final_norm=node(graph.final_norm),
        head=node(graph.head),
        kv_cache=copy.deepcopy(graph.kv_cache),
    )


# ---- registry ------------------------------------------------------------------------------------
REGISTRY: dict[str, type[Pass]] = {}  # pass name -> class


def register(cls: type[Pass]) -> type[Pass]:
    REGISTRY[cls.name] = cls
    return cls
