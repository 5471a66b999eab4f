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
``slimformer convert SRC -o OUT2 --pipeline OUT/pipeline.toml`` replays it exactly, from any directory:
local text sources are written as absolute paths, and a ``[data]`` table records the SHA-256 of each, so
that a replay on changed data says so. Relative paths in a hand-written pipeline file are read relative
to the file's own directory (then, for compatibility, the current directory).

Before any work, :func:`dry_run` checks every pass against the graph as it will be when that pass runs
(``Pass.check``): a pass validates its options against the layers, budgets and family it will see, then
applies its structural effect to a copy of the graph, so ``--drop attn:2 --sas layers=4`` on a 5-layer
model fails in a second instead of after the layer-drop pass.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from slimformer.passes.base import (  # noqa: F401 (the contract, re-exported for pipeline users)
    REGISTRY,
    CalibrationSpec,
    DryRun,
    EvaluationSpec,
    Pass,
    PassContext,
    PassResult,
    ReportRow,
    canonical_key,
    option_rows,
    register,
    structural_copy,
)

from .errors import SlimformerError
from .graph import CheckpointGraph

PASS_MODULES = (
    "slimformer.passes.layer_drop.drop",
    "slimformer.passes.sas.simplify",
    "slimformer.passes.a2sf",
)

PASS_ENTRY_POINTS = "slimformer.passes"
# Version of the pipeline file: 1 had no version field; 2 writes `format = 2` (same sections otherwise).
PIPELINE_FORMAT = 2


def available_passes() -> dict[str, type[Pass]]:
    """Every registered pass: the modules named in the ``slimformer.passes`` entry-point group (the built-in
    passes and any another package declares) are imported, and their ``@register`` classes fill the registry.
    A module that fails to import is named in one line instead of hiding every other pass."""
    for entry in entry_points(group=PASS_ENTRY_POINTS):
        try:
            entry.load()
        except ImportError as exc:
            raise SlimformerError(
                f"pass module {entry.value!r} (entry point {entry.name!r}) cannot be imported: {exc}",
                fix="reinstall the package that provides it, or uninstall it",
            ) from exc
    if not REGISTRY:
        raise SlimformerError(
            "no passes are registered: slimformer's entry points are missing",
            fix="reinstall slimformer (pip install -e .) so its metadata lists the passes",
        )
    return REGISTRY


# ---- specification ---------------------------------------------------------------------------------
@dataclass
class PassSpec:
    name: str
    params: dict[str, Any] = field(default_factory=dict)


DEFAULT_CALIBRATION = CalibrationSpec().sources


@dataclass
class PipelineSpec:
    passes: list[PassSpec] = field(default_factory=list)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    # SHA-256 of each local text source (absolute path -> "sha256:..."), as recorded when the spec ran.
    data: dict[str, str] = field(default_factory=dict)
    # Whether someone chose the calibration sources (a flag or a file), or they are the default; the default
    # (Python source) is said out loud, because it is a poor choice for a prose model.
    calibration_given: bool = field(default=False, compare=False)

    @classmethod
    def from_file(cls, path: str | Path) -> PipelineSpec:
        path = Path(path)
        if not path.is_file():
            raise SlimformerError(
                "pipeline file does not exist", where=str(path), fix="give a .toml or .yaml pipeline file"
            )
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                data = tomllib.loads(text)
        except Exception as exc:  # tomllib/yaml parse errors carry line numbers in their message
            raise SlimformerError(
                f"cannot parse pipeline file: {exc}", where=str(path), fix="fix the syntax"
            ) from exc
        if not isinstance(data, dict):
            raise SlimformerError(
                "pipeline file does not hold a table of sections",
                where=str(path),
                fix="write [calibration], [evaluation] and [[passes]] sections",
            )
        spec = cls.from_dict(data, where=str(path))
        # A replay must not depend on the directory it runs from: relative data paths mean "beside this file".
        spec.calibration.sources = [_relative_to(source, path.parent) for source in spec.calibration.sources]
        if spec.evaluation.ppl:
            spec.evaluation.ppl = _relative_to(spec.evaluation.ppl, path.parent)
        return spec

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "pipeline") -> PipelineSpec:
        written = data.get("format", 1)
        if not isinstance(written, int) or written > PIPELINE_FORMAT:
            raise SlimformerError(
                f"pipeline format {written!r} is newer than this slimformer reads ({PIPELINE_FORMAT})",
                where=where,
                fix="upgrade slimformer, or write the pipeline for this release",
            )
        unknown = set(data) - {"format", "passes", "calibration", "evaluation", "data"}
        if unknown:
            raise SlimformerError(
                f"unknown pipeline section(s) {sorted(unknown)}",
                where=where,
                fix="use [calibration], [evaluation], [[passes]] (and [data], written by slimformer)",
            )
        passes = []
        for entry in data.get("passes", []):
            if not isinstance(entry, dict) or "name" not in entry:
                raise SlimformerError(
                    "each [[passes]] entry needs a 'name'",
                    where=where,
                    fix='add name = "layer_drop" (or another pass)',
                )
            params = {k: v for k, v in entry.items() if k != "name"}
            passes.append(PassSpec(entry["name"], params))
        hashes = data.get("data", {})
        if not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            raise SlimformerError(
                '[data] must map data paths to "sha256:..." strings',
                where=where,
                fix="remove the [data] section (the next conversion writes it again)",
            )
        calibration = data.get("calibration", {})
        return cls(
            passes=passes,
            calibration=_dataclass_from(CalibrationSpec, calibration, f"{where} [calibration]"),
            evaluation=_dataclass_from(EvaluationSpec, data.get("evaluation", {}), f"{where} [evaluation]"),
            data=dict(hashes),
            calibration_given=isinstance(calibration, dict) and "sources" in calibration,
        )

    def to_dict(self) -> dict[str, Any]:
        evaluation = {k: v for k, v in dataclasses.asdict(self.evaluation).items() if v is not None}
        data = {
            "format": PIPELINE_FORMAT,
            "calibration": dataclasses.asdict(self.calibration),
            "evaluation": evaluation,
            "passes": [{"name": p.name, **p.params} for p in self.passes],
        }
        if self.data:
            data["data"] = dict(self.data)
        return data

    def to_toml(self) -> str:
        data = self.to_dict()
        lines = [
            "# slimformer pipeline: replay with `slimformer convert SOURCE -o OUT --pipeline pipeline.toml`",
            "# (from any directory: local data paths are absolute, and [data] holds their content hashes)",
            f"format = {data['format']}",
        ]
        for section in ("calibration", "evaluation"):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in data[section].items()]
        for entry in data["passes"]:
            lines += ["", "[[passes]]"] + [f"{k} = {_toml_value(v)}" for k, v in entry.items()]
        if data.get("data"):
            lines += [
                "",
                "# SHA-256 of each local text source when this pipeline ran; a replay warns if one changed",
                "[data]",
            ] + [f"{_toml_value(k)} = {_toml_value(v)}" for k, v in data["data"].items()]
        return "\n".join(lines) + "\n"

    def record_data(self, warn: Callable[[str], None]) -> PipelineSpec:
        """This spec with local text sources as absolute paths and their content hashes in ``data``.

        A hash recorded earlier (a replayed ``pipeline.toml``) that no longer matches is reported through
        ``warn``, naming the file: the replay then cannot reproduce the recorded result.
        """
        from .calibration import local_source_path, source_digest

        def absolute(source: str) -> str:
            path = local_source_path(source)
            return str(path.absolute()) if path is not None else source

        spec = copy.deepcopy(self)
        spec.calibration.sources = [absolute(source) for source in spec.calibration.sources]
        if spec.evaluation.ppl:
            spec.evaluation.ppl = absolute(spec.evaluation.ppl)
        recorded, spec.data = spec.data, {}
        for source in dict.fromkeys([*spec.calibration.sources, spec.evaluation.ppl]):
            path = local_source_path(source) if source else None
            if path is None or not path.exists():
                continue  # not a local file (stdlib, hf:), or missing: the source check says so
            digest = source_digest(path)
            spec.data[source] = digest
            if source in recorded and recorded[source] != digest:
                warn(
                    f"data file {source} changed since the pipeline was written ({recorded[source][:19]}... then, "
                    f"{digest[:19]}... now): the replay will not reproduce the recorded result"
                )
        return spec


def _dataclass_from(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise SlimformerError(
            f"unknown key(s) {sorted(unknown)}", where=where, fix=f"allowed keys: {sorted(names)}"
        )
    if isinstance(values.get("sources"), str):
        values = {**values, "sources": [values["sources"]]}
    return cls(**values)


def _relative_to(source: str, directory: Path) -> str:
    """``source`` read relative to ``directory`` when it is a relative local path that exists there."""
    from .calibration import local_source_path

    path = local_source_path(source)
    if path is None or path.is_absolute() or not (directory / path).exists():
        return source
    return str((directory / path).absolute())


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


def dry_run(graph: CheckpointGraph, passes: list[Pass], ctx: PassContext) -> DryRun:
    """Check every pass, in order, against the graph it will see; raises the first problem found."""
    dry = DryRun(structural_copy(graph), ctx)
    for p in passes:
        p.check(dry)
        # Tensors are not touched in a dry run (a drop keeps its references), so only the cache and its slots
        # are checked, and only while the structure is known (a quality target decides drops at run time).
        if not dry.uncertain:
            _require_invariants(
                dry.graph, f"pass {p.name} (checked before any work{dry.after()})", tensors=False
            )
    return dry


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
    """Run ``passes`` in order over ``graph``; returns one report record per pass. After every pass the
    graph's invariants are checked, so a pass that leaves it inconsistent is named at once, not at model build."""
    records = []
    for p in passes:
        ctx.log(f"[slimformer] pass {p.name} ...")
        start = time.perf_counter()
        result = p.run(graph, ctx)
        duration = time.perf_counter() - start
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {p.name!r} returned {type(result).__name__}, not a PassResult")
        _require_invariants(graph, f"pass {p.name}")
        ctx.log(f"[slimformer] pass {p.name} done in {duration:.1f}s")
        records.append(
            {"name": p.name, "params": p.params(), "duration_s": round(duration, 3), **result.to_record()}
        )
    return records


def _require_invariants(graph: CheckpointGraph, after: str, *, tensors: bool = True) -> None:
    problems = graph.invariant_problems(tensors=tensors)
    if problems:
        raise SlimformerError(
            f"{after} left the checkpoint graph invalid: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            fix="run the passes in another order (layer_drop and sas before a2sf), or report this as a bug in the pass",
        )
