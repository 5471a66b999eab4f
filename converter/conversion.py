"""End-to-end conversion: source -> graph -> passes -> measured, written output; and model loading.

``convert()`` checks everything it can before any work -- the output location, the pass options against
the source's graph (a dry run of the whole pipeline, so one pass's effect on the next is checked too), the
text sources, the evaluation settings, the calibration windows -- then measures the source model, runs the
pipeline, measures again, and writes checkpoint + report + replayable pipeline into a temporary
directory that becomes the output only when complete.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .devices import check_device, parse_dtype
from .errors import SlimformerError
from .graph import CheckpointGraph, load_graph
from .pipeline import DEFAULT_CALIBRATION, PassContext, PipelineSpec, build_passes, run_pipeline
from .report import REPORT_FORMAT, versions, write_report
from .report_html import write_html
from .source import resolve_source
from .tokenizer import load_tokenizer


@dataclass
class ConvertOptions:
    device: str = "cpu"
    dtype: str = "float32"  # working precision for calibration/evaluation
    save_dtype: str | None = None  # precision of the written weights (default: as loaded)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    overwrite: bool = False
    quiet: bool = False
    measure_speed: bool = False


def _logger(quiet: bool):
    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    return log


def _warn(message: str) -> None:
    """Warnings reach stderr even with -q: they change what the result means."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


DEFAULT_CALIBRATION_NOTE = (
    "no --calib given: calibrating on {sources} (Python standard-library source code); "
    "for a model of other text pass --calib with text like its own"
)


def check_before_work(graph: CheckpointGraph, passes: list, ctx: PassContext, spec: PipelineSpec) -> None:
    """Everything that can fail without loading weights or running a pass, in the order a user fixes it:
    text sources, evaluation settings, every pass against the graph it will see (a dry run of the
    pipeline), and the calibration windows the passes will draw."""
    from .calibration import check_source
    from .pipeline import dry_run

    needs_calibration = any(p.needs_calibration() for p in passes)
    if needs_calibration:
        for source in spec.calibration.sources:
            check_source(source, flag="--calib")
    if spec.evaluation.ppl:
        check_source(spec.evaluation.ppl, flag="--eval-ppl")
        if graph.is_encoder:
            raise SlimformerError(
                "perplexity needs a causal language model; this checkpoint is an encoder",
                fix="drop --eval-ppl",
            )
        if ctx.tokenizer is None:
            raise SlimformerError(
                "the checkpoint has no tokenizer, so perplexity cannot be measured",
                fix="add tokenizer files or drop --eval-ppl",
            )
        window, positions = spec.evaluation.window, graph.base_config.get("max_position_embeddings")
        if not isinstance(window, int) or window < 2:
            raise SlimformerError(
                f"the evaluation window must be at least 2 tokens (got {window!r})",
                fix="e.g. --window 256 (pipeline: [evaluation] window)",
            )
        if positions and window > positions:
            raise SlimformerError(
                f"the evaluation window {window} is longer than the model's {positions} positions",
                fix=f"use --window {positions} or less",
            )
        if not isinstance(spec.evaluation.max_tokens, int) or spec.evaluation.max_tokens < 2:
            raise SlimformerError(
                f"the evaluation needs at least 2 tokens (max_tokens {spec.evaluation.max_tokens!r})",
                fix="e.g. --max-tokens 16384 (pipeline: [evaluation] max_tokens)",
            )
    dry_run(graph, passes, ctx)
    if needs_calibration:
        for source in spec.calibration.sources:  # drawn now (and kept): too little text fails here, not later
            ctx.calibration_windows(source)


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    spec: PipelineSpec,
    options: ConvertOptions | None = None,
) -> dict:
    """Convert ``source`` into ``out`` with the pipeline ``spec``; returns the report dict."""
    from slimformer.converter.outputs import atomic_output_dir, check_output_location
    from slimformer.exporters.safetensors import write_checkpoint

    options = options or ConvertOptions()
    log = _logger(options.quiet)
    out = check_output_location(out, overwrite=options.overwrite)
    device = check_device(options.device)
    dtype = parse_dtype(options.dtype)
    save_dtype = parse_dtype(options.save_dtype) if options.save_dtype else None
    passes = build_passes(spec)  # validates pass names and options before any heavy work
    # What runs is what pipeline.toml records: absolute data paths and their hashes (a replay names changed data).
    spec = spec.record_data(_warn)

    started = time.perf_counter()
    src = resolve_source(
        source, allow_pickle=options.allow_pickle, trust_remote_code=options.trust_remote_code
    )
    graph = load_graph(src)
    tokenizer = load_tokenizer(src.path, trust_remote_code=options.trust_remote_code)
    ctx = PassContext(
        tokenizer,
        spec.calibration,
        spec.evaluation,
        device=device,
        dtype=dtype,
        progress=not options.quiet,
        log=log,
    )
    check_before_work(graph, passes, ctx, spec)  # so that a bad input is the only line a failed run prints
    log(
        f"[slimformer] loaded {src.spec}: {graph.family}, {len(graph.blocks)} layers, {graph.num_params():,} parameters"
    )
    notes = []
    if (
        any(p.needs_calibration() for p in passes)
        and not spec.calibration_given
        and spec.calibration.sources == DEFAULT_CALIBRATION
    ):
        notes.append(DEFAULT_CALIBRATION_NOTE.format(sources=", ".join(spec.calibration.sources)))
        _warn(notes[-1])

    params_before, kv_before = graph.num_params(), graph.kv_bytes_per_token()
    evaluation = _measure(graph, ctx, "before", log) if spec.evaluation.ppl else None
    speed = {"before": _speed(graph, ctx)} if options.measure_speed else None

    records = run_pipeline(graph, passes, ctx)

    if evaluation is not None:
        evaluation.update(_measure(graph, ctx, "after", log))
    if speed is not None:
        speed["after"] = _speed(graph, ctx)
    report = {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "output": str(out),
        "notes": notes,
        "source": {
            "spec": src.spec,
            "path": str(src.path),
            "family": graph.family,
            "hub": src.is_hub,
            "num_layers": len(graph.blocks),
            **src.format_record,  # weight_format; for GGUF also the quantisation (e.g. Q4_1)
        },
        "versions": versions(),
        "pipeline": spec.to_dict(),
        "passes": records,
        "layers": graph.layer_states(),
        "params_before": params_before,
        "params_after": graph.num_params(),
        "kv_bytes_per_token_before": kv_before,
        "kv_bytes_per_token_after": graph.kv_bytes_per_token(),
        "kv_cache": graph.kv_cache,
        "evaluation": evaluation,
        "speed": speed,
        "plots": sorted(name for name in ctx.artefacts if name.endswith(".png")),
        "duration_s": None,
    }
    with atomic_output_dir(out, overwrite=options.overwrite) as tmp:
        written = write_checkpoint(graph, tmp, dtype=save_dtype)
        report["files"] = written
        (tmp / "pipeline.toml").write_text(spec.to_toml())
        for name, content in ctx.artefacts.items():
            (tmp / name).write_bytes(content)
        report["duration_s"] = round(time.perf_counter() - started, 3)
        write_report(report, tmp)
        write_html(report, tmp)
    log(f"[slimformer] wrote {out} ({written['bytes'] / 1e6:.1f} MB in {written['shards']} file(s))")
    return report


def _measure(graph: CheckpointGraph, ctx: PassContext, when: str, log) -> dict[str, Any]:
    # check_before_work made sure the model is a decoder with a tokenizer.
    log(f"[slimformer] perplexity {when} on {ctx.evaluation.ppl} ...")
    value = ctx.perplexity(graph)
    log(f"[slimformer] perplexity {when}: {value:.3f}")
    return {
        "source": ctx.evaluation.ppl,
        "window": ctx.evaluation.window,
        "max_tokens": ctx.evaluation.max_tokens,
        f"perplexity_{when}": value,
    }


def _speed(graph: CheckpointGraph, ctx: PassContext) -> dict[str, Any]:
    from .evaluation import speed_probe

    return speed_probe(ctx.build_model(graph), ctx.tokenizer).to_dict()


def load_model(
    path: str | os.PathLike,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "sdpa",
    kv_cache: dict[str, Any] | None = None,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a converted (or any supported original) checkpoint into the slimformer runtime, no remote code.

    ``kv_cache`` overrides the checkpoint's cache policy (e.g. ``{"policy": "h2o", "budget": 128}``).
    """
    dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    src = resolve_source(path, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    graph = load_graph(src)
    if kv_cache is not None:
        graph.kv_cache = kv_cache
    return graph.build_model(
        dtype=dtype, device=check_device(device), attn_implementation=attn_implementation
    )


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())
