"""The pass pipeline: a pass interface, a registry, a replayable specification, and the runner.

A pass is one small class with a config dataclass (torchao style): ``Pass.from_params({...})`` builds it
from a spec file's table or a CLI flag, ``run(graph, ctx)`` rewrites the checkpoint graph and returns
what it changed, which the runner times and files into the report. Passes register themselves with
``@register`` in their own module under ``passes/``; a pass that does not exist simply is not there,
and an empty pipeline (the identity) converts the checkpoint unchanged.

A pipeline spec is a TOML or YAML file::

    [calibration]
    sources = ["stdlib:train"]   # one or more calibration specs (see converter.calibration)
    samples = 32
    seq_len = 256
    seed = 0

    [evaluation]
    ppl = "stdlib:valid"         # optional: perplexity before and after

    [[passes]]
    name = "layer_drop"
    drop = "attn:2"

Every conversion writes the spec it ran as ``pipeline.toml`` into the output, so
``slimformer convert SRC -o OUT2 --pipeline OUT/pipeline.toml`` replays it exactly.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tomllib
import torch

from .errors import SlimformerError
from .graph import CheckpointGraph

PASS_MODULES = ("passes.layer_drop", "passes.sas", "passes.a2sf")

REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    REGISTRY[cls.name] = cls
    return cls


def available_passes() -> dict[str, type[Pass]]:
    """Import the pass modules that exist and return the registry."""
    for module in PASS_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return REGISTRY


# ---- specification ---------------------------------------------------------------------------------
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


@dataclass
class PassSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineSpec:
    passes: list[PassSpec] = field(default_factory=list)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)

    @classmethod
    def from_file(cls, path: str | Path) -> PipelineSpec:
        path = Path(path)
        if not path.is_file():
            raise SlimformerError("pipeline file does not exist", where=str(path), fix="give a .toml or .yaml pipeline file")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = tomllib.loads(text)
        except Exception as exc:  # tomllib/yaml parse errors carry line numbers in their message
            raise SlimformerError(f"cannot parse pipeline file: {exc}", where=str(path), fix="fix the syntax") from exc
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pipeline") -> PipelineSpec:
        unknown = set(data) - {"passes", "calibration", "evaluation"}
        if unknown:
            raise SlimformerError(f"unknown pipeline section(s) {sorted(unknown)}", where=where,
                                  fix="use [calibration], [evaluation] and [[passes]]")
        passes = []
        for entry in data.get("passes", []):
            if not isinstance(entry, dict) or "name" not in entry:
                raise SlimformerError("each [[passes]] entry needs a 'name'", where=where, fix="add name = \"layer_drop\" (or another pass)")
            params = {k: v for k, v in entry.items() if k != "name"}
            passes.append(PassSpec(entry["name"], params))
        return cls(
            passes=passes,
            calibration=_dataclass_from(CalibrationSpec, data.get("calibration", {}), f"{where} [calibration]"),
            evaluation=_dataclass_from(EvaluationSpec, data.get("evaluation", {}), f"{where} [evaluation]"),
        )

    def to_dict(self) -> dict[str, Any]:
        evaluation = {k: v for k, v in dataclasses.asdict(self.evaluation).items() if v is not None}
        return {
            "calibration": dataclasses.asdict(self.calibration),
            "evaluation": evaluation,
            "passes": [{"name": p.name, **p.params} for p in self.passes],
        }

    def to_toml(self) -> str:
        data = self.to_dict()
        lines = ["# slimformer pipeline: replay with `slimformer convert SOURCE -o OUT --pipeline pipeline.toml`"]
        for section in ("calibration", "evaluation"):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in data[section].items()]
        for entry in data["passes"]:
            lines += ["", "[[passes]]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        return "\n".join(lines) + "\n"


def _dataclass_from(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise SlimformerError(f"unknown key(s) {sorted(unknown)}", where=where, fix=f"allowed keys: {sorted(names)}")
    if isinstance(values.get("sources"), str):
        values = {**values, "sources": [values["sources"]]}
    return cls(**values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} to TOML")


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
        normalised = {k.replace("-", "_"): v for k, v in params.items()}
        unknown = set(normalised) - names
        if unknown:
            raise SlimformerError(f"unknown option(s) {sorted(unknown)} for pass {cls.name!r}", fix=f"allowed: {sorted(names)}")
        try:
            config = cls.config_class(**normalised)
        except (TypeError, ValueError) as exc:
            raise SlimformerError(f"bad options for pass {cls.name!r}: {exc}", fix="see `slimformer convert --help`") from exc
        return cls(config)

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self.config).items() if v is not None}

    @abstractmethod
    def run(self, graph: CheckpointGraph, ctx: PassContext) -> dict[str, Any]:
        """Rewrite ``graph`` in place; return a JSON-able summary of what changed (goes into the report)."""


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
        from .calibration import sample_windows

        source = source or self.calibration.sources[0]
        if source not in self._windows:
            c = self.calibration
            self._windows[source] = sample_windows(self.tokenizer, source, c.samples, c.seq_len, c.seed)
        return self._windows[source]

    def build_model(self, graph: CheckpointGraph, attn_implementation: str = "sdpa") -> torch.nn.Module:
        return graph.build_model(dtype=self.dtype, device=self.device, attn_implementation=attn_implementation)

    def perplexity(self, graph_or_model: CheckpointGraph | torch.nn.Module, spec: str | None = None) -> float:
        from .evaluation import perplexity

        model = self.build_model(graph_or_model) if isinstance(graph_or_model, CheckpointGraph) else graph_or_model
        spec = spec or self.evaluation.ppl
        if spec is None:
            raise SlimformerError("this pass needs an evaluation source", fix="pass --eval-ppl SPEC")
        e = self.evaluation
        return perplexity(model, self.tokenizer, spec, window=e.window, max_tokens=e.max_tokens, progress=self.progress).perplexity


def build_passes(spec: PipelineSpec) -> list[Pass]:
    registry = available_passes()
    passes = []
    for entry in spec.passes:
        if entry.name not in registry:
            known = ", ".join(sorted(registry)) or "none installed"
            raise SlimformerError(f"unknown pass {entry.name!r}", fix=f"available passes: {known}")
        passes.append(registry[entry.name].from_params(entry.params))
    return passes


def run_pipeline(graph: CheckpointGraph, passes: list[Pass], ctx: PassContext) -> list[dict[str, Any]]:
    """Run ``passes`` in order over ``graph``; returns one report record per pass."""
    records = []
    for p in passes:
        ctx.log(f"[slimformer] pass {p.name} ...")
        start = time.perf_counter()
        changes = p.run(graph, ctx)
        duration = time.perf_counter() - start
        ctx.log(f"[slimformer] pass {p.name} done in {duration:.1f}s")
        records.append({"name": p.name, "params": p.params(), "duration_s": round(duration, 3), "changes": changes})
    return records
