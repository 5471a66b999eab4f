"""Benchmark: approximate SAS conversion of a pretrained Llama-family model, before / after / healed.

First, a check of the layer-selection score: every layer is converted alone (fitted gains, no healing) and
its perplexity rank-correlated with its score. Then, for each number of converted layers (default 1, 2 and 4) the ``sas`` pass runs on a fresh copy of the model
(``converter.pipeline`` API, exactly what ``slimformer convert --sas layers=N,heal-steps=S`` runs): it scores
the layers, converts the N best to shaped attention with identity V/P, heals by distillation and measures
perplexity before the conversion, after it and after healing. The converted checkpoint is then written, its
files checked for the removed tensors, and reloaded to confirm it measures the healed perplexity.

    python benchmarks/sas.py                       # ../shared/models/pycoder-8m, writes benchmarks/results/sas.json
    python benchmarks/sas.py --heal-steps 200 --device cuda
    python benchmarks/sas.py --smollm2             # SmolLM2-135M-Instruct: results/sas_smollm2.{json,md}

Every perplexity is measured per evaluation window (``benchmarks/bootstrap.py``), so the converted and the
healed model are compared with the original by a paired bootstrap over the windows (95% intervals).
``--eval-extra`` adds a second evaluation source (e.g. another domain), measured on the same three models.

Skips (exit 0, nothing written) when the model is absent.

The layer fit (the score) depends only on the original model and the calibration windows, so within one
process it is computed once and reused by every row and by the score check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from slimformer.converter.calibration import token_stream
from slimformer.converter.conversion import load_model
from slimformer.converter.graph import CheckpointGraph, load_graph
from slimformer.converter.pipeline import CalibrationSpec, EvaluationSpec, PassContext
from slimformer.converter.source import resolve_source
from slimformer.converter.tokenizer import load_tokenizer
from slimformer.exporters.safetensors import write_checkpoint
from slimformer.passes.sas import simplify
from slimformer.passes.sas.simplify import SasPass, replace_attention

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/bootstrap.py, benchmarks/smollm2.py
from bootstrap import WindowNLL, compare, perplexity_interval, window_nll  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"


def smollm2_path() -> Path:
    """Where benchmarks/smollm2.py keeps the converted model (not fetched here: absent means skipped)."""
    from smollm2 import cache_root

    return cache_root() / "smollm2" / "SmolLM2-135M-Instruct"


# --smollm2: calibrate and heal on WikiText-2 valid, measure on WikiText-2 test (64 windows of 256 tokens) and
# on pycode valid (32 windows, a second domain). One healing step of 2 x 256 tokens with heal_params=converted
# costs about 5.5 core-seconds here (teacher forward, student forward and backward down to the lowest converted
# layer); 48 steps see each of the 96 calibration windows once. lr 1e-3 healed best in a 16-step probe of the
# 4-layer conversion (held-out KL 0.175, against 0.211 at 3e-4 and 0.254 at 1e-4).
SMOLLM2_PRESET = {
    "calib": str(DATA / "wikitext2" / "wiki.valid.tokens"),
    "calib_samples": 96,
    "eval_ppl": str(DATA / "wikitext2" / "wiki.test.raw"),
    "eval_max_tokens": 16384,
    "eval_extra": str(DATA / "pycode" / "valid.txt.gz"),
    "eval_extra_max_tokens": 8192,
    "heal_steps": 48,
    "heal_lr": 1e-3,
    "heal_batch_size": 2,
    "score_check": False,
    "reload_windows": 4,
    "out": RESULTS / "sas_smollm2.json",
    "md": RESULTS / "sas_smollm2.md",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="SmolLM2-135M-Instruct with the settings of SMOLLM2_PRESET (explicit options still override them)",
    )
    parser.add_argument("--model", type=Path, default=ROOT.parent / "shared" / "models" / "pycoder-8m")
    parser.add_argument("--layers", default="1,2,4", help="comma-separated numbers of layers to convert")
    parser.add_argument("--heal-steps", type=int, default=100)
    parser.add_argument("--heal-lr", type=float, default=1e-3)
    parser.add_argument("--heal-batch-size", type=int, default=4)
    parser.add_argument("--heal-params", default="converted")
    parser.add_argument("--hidden-mse", type=float, default=0.0)
    parser.add_argument("--calib", default="stdlib:train")
    parser.add_argument("--calib-samples", type=int, default=256)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--eval-ppl", default="stdlib:valid")
    parser.add_argument("--eval-max-tokens", type=int, default=16384)
    parser.add_argument("--eval-window", type=int, default=256)
    parser.add_argument("--eval-extra", default=None, help="a second evaluation source, e.g. another domain")
    parser.add_argument("--eval-extra-max-tokens", type=int, default=8192)
    parser.add_argument(
        "--reload-windows",
        type=int,
        default=0,
        help="measure the reloaded checkpoint on the first N evaluation windows only (0: all of them)",
    )
    parser.add_argument("--bootstrap-samples", type=int, default=10000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-score-check",
        dest="score_check",
        action="store_false",
        help="skip converting each layer alone to check that the score ranks the damage",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "sas.json")
    parser.add_argument("--md", type=Path, default=None, help="also render the results as markdown here")
    args = parser.parse_args(argv)
    if args.smollm2:
        parser.set_defaults(model=smollm2_path(), **SMOLLM2_PRESET)
        args = parser.parse_args(argv)
    return args


# ---- per-window measurement ---------------------------------------------------------------------------------


def fingerprint(model: torch.nn.Module) -> str:
    """Names, shapes and a strided sample of every parameter: equal for the same weights and structure."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


@dataclass
class WindowContext(PassContext):
    """The pass context whose perplexity is measured per evaluation window (the same disjoint windows that
    ``--eval-ppl`` with ``--window`` scores, so the pass's numbers are the bootstrap's), on the evaluation
    source and on every ``extra`` source. A model measured before (same fingerprint) is not measured again:
    the original is measured once for all rows. Each call's measurements are appended to ``calls``."""

    extra: dict[str, int] = field(default_factory=dict)  # source -> max tokens
    calls: list[dict[str, WindowNLL]] = field(default_factory=list)
    cache: dict[str, WindowNLL] = field(default_factory=dict)
    _ids: dict[str, torch.Tensor] = field(default_factory=dict)

    def windows(self, spec: str) -> torch.Tensor:
        if spec not in self._ids:
            limit = self.extra.get(spec, self.evaluation.max_tokens)
            ids = token_stream(self.tokenizer, spec, limit)
            n = ids.numel() // self.evaluation.window
            self._ids[spec] = ids[: n * self.evaluation.window].view(n, self.evaluation.window)
        return self._ids[spec]

    def measure(self, model: torch.nn.Module, spec: str) -> WindowNLL:
        key = f"{fingerprint(model)}|{spec}"
        if key not in self.cache:
            started = time.perf_counter()
            self.cache[key] = window_nll(model, self.windows(spec).to(self.device))
            self.log(
                f"   perplexity {self.cache[key].perplexity:.3f} on {len(self.windows(spec))} windows of "
                f"{Path(spec).name} ({time.perf_counter() - started:.0f}s)"
            )
        return self.cache[key]

    def perplexity(self, graph_or_model: CheckpointGraph | torch.nn.Module, spec: str | None = None) -> float:
        model = (
            self.build_model(graph_or_model)
            if isinstance(graph_or_model, CheckpointGraph)
            else graph_or_model
        )
        spec = spec or self.evaluation.ppl
        measured = {source: self.measure(model, source) for source in [spec, *self.extra]}
        self.calls.append(measured)
        return measured[spec].perplexity


class MemoFits:
    """``fit_layers`` computed once per (model, windows, layers, batch size) and reused: the fit depends on
    nothing else, so the rows for 1, 2 and 4 layers (and the score check) share one pass over the windows."""

    def __init__(self, fit: Any) -> None:
        self.fit, self.memo = fit, {}

    def __call__(self, model: torch.nn.Module, windows: torch.Tensor, layers: list[int], batch_size: int = 4):
        data = hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()[:16]
        key = (fingerprint(model), data, tuple(layers), batch_size)
        if key not in self.memo:
            started = time.perf_counter()
            self.memo[key] = self.fit(model, windows, layers, batch_size=batch_size)
            print(
                f"   fitted {len(layers)} layer(s) on {len(windows)} windows ({time.perf_counter() - started:.0f}s)",
                file=sys.stderr,
                flush=True,
            )
        return self.memo[key]


def intervals(original: WindowNLL, model: WindowNLL, samples: int) -> dict[str, Any]:
    return {
        **model.to_dict(),
        "ci95": list(perplexity_interval(model, samples)),
        "vs_original": compare(original, model, samples),
    }


def convert_layers(model: Path, layers: int, ctx: PassContext, args: argparse.Namespace) -> dict[str, Any]:
    graph = load_graph(resolve_source(model))
    params_before = graph.num_params()
    sas = SasPass.from_params(
        {
            "layers": layers,
            "heal_steps": args.heal_steps,
            "heal_lr": args.heal_lr,
            "heal_batch_size": args.heal_batch_size,
            "heal_params": args.heal_params,
            "hidden_mse": args.hidden_mse,
        }
    )
    started, cpu = time.perf_counter(), time.process_time()
    first = len(ctx.calls)
    result = sas.run(graph, ctx).data["conversion"]
    seconds, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    before, after, healed = ctx.calls[first : first + 3] + [None] * (3 - len(ctx.calls[first : first + 3]))
    with tempfile.TemporaryDirectory() as tmp:
        written = write_checkpoint(graph, Path(tmp))
        with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as handle:
            saved = set(handle.keys())
        leftover = [
            n
            for n in saved
            for i in result["converted_layers"]
            if n.startswith((f"model.layers.{i}.self_attn.v_proj.", f"model.layers.{i}.self_attn.o_proj."))
        ]
        reloaded_model = load_model(tmp, device=args.device)
        spec = ctx.evaluation.ppl
        rows = ctx.windows(spec)
        if args.reload_windows:
            rows = rows[: args.reload_windows]
        reloaded = window_nll(reloaded_model, rows.to(args.device))
    ppl = result["perplexity"]
    final = healed or after
    final_main = final[spec]
    n = len(reloaded.nll)
    subset = WindowNLL(final_main.nll[:n], final_main.tokens[:n])
    reload_check = {
        "windows": n,
        "perplexity": reloaded.perplexity,
        "in_memory_perplexity_same_windows": subset.perplexity,
        "max_window_nll_difference_nats": max(abs(a - b) for a, b in zip(reloaded.nll, subset.nll)),
    }
    measured = {}
    for source in before:
        measured[source] = {
            "original": {**before[source].to_dict(), "ci95": list(perplexity_interval(before[source]))},
            "converted": intervals(before[source], after[source], args.bootstrap_samples),
        }
        if healed is not None:
            measured[source]["healed"] = intervals(before[source], healed[source], args.bootstrap_samples)
            measured[source]["healed_vs_converted"] = compare(
                after[source], healed[source], args.bootstrap_samples
            )
    return {
        "layers": layers,
        "converted_layers": result["converted_layers"],
        "params_before": params_before,
        "params_after": graph.num_params(),
        "params_removed": result["params_removed"],
        "kv_bytes_per_token": result["kv_bytes_per_token"],
        "perplexity_before": ppl["before"],
        "perplexity_after_conversion": ppl["after_conversion"],
        "perplexity_after_healing": ppl["after_healing"],
        "reloaded_perplexity": reloaded.perplexity if n == len(final_main.nll) else None,
        "reload_check": reload_check,
        "removed_tensors_absent_from_files": not leftover,
        "checkpoint_bytes": written["bytes"],
        "heal": {k: v for k, v in (result["heal"] or {}).items() if k != "history"},
        "heal_history": (result["heal"] or {}).get("history"),
        "layer_scores": result["layer_scores"],
        "measured": measured,
        "seconds": round(seconds, 1),
        "cpu_s": round(cpu_s, 1),
    }


def score_check(model: Path, ctx: PassContext, args: argparse.Namespace) -> dict[str, Any]:
    """Does the selection score predict the damage? Convert each layer alone (fitted gains, no healing), measure
    perplexity, and rank-correlate it with the score (and with the cost of dropping the attention instead)."""
    graph = load_graph(resolve_source(model))
    fits = simplify.fit_layers(
        graph.build_model(device=args.device),
        ctx.calibration_windows(),
        list(range(len(graph.blocks))),
        batch_size=args.heal_batch_size,
    )
    rows = []
    for fit in fits:
        single = load_graph(resolve_source(model))
        replace_attention(single.blocks[fit.layer], fit)
        rows.append({**fit.to_dict(), "perplexity_converted_alone": ctx.perplexity(single)})
        ctx.log(
            f"layer {fit.layer}: score {fit.fit_error:.4f}, perplexity converted alone {rows[-1]['perplexity_converted_alone']:.3f}"
        )
    damage = [row["perplexity_converted_alone"] for row in rows]
    return {
        "layers": rows,
        "spearman_score_vs_perplexity": spearman([row["fit_error"] for row in rows], damage),
        "spearman_drop_error_vs_perplexity": spearman([row["drop_error"] for row in rows], damage),
        "spearman_attention_error_vs_perplexity": spearman([row["attention_error"] for row in rows], damage),
    }


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> torch.Tensor:
        return torch.tensor(values).argsort().argsort().double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not (args.model / "config.json").is_file():
        print(f"skipped: {args.model} is absent", file=sys.stderr)
        return None
    torch.set_num_threads(args.threads)
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    ctx = WindowContext(
        load_tokenizer(args.model),
        CalibrationSpec(sources=[args.calib], samples=args.calib_samples, seq_len=args.calib_seq_len),
        EvaluationSpec(ppl=args.eval_ppl, window=args.eval_window, max_tokens=args.eval_max_tokens),
        device=args.device,
        progress=False,
        log=log,
        extra={args.eval_extra: args.eval_extra_max_tokens} if args.eval_extra else {},
    )
    if not isinstance(simplify.fit_layers, MemoFits):  # this process only: see the module docstring
        simplify.fit_layers = MemoFits(simplify.fit_layers)
    started, cpu = time.perf_counter(), time.process_time()
    scores = score_check(args.model, ctx, args) if args.score_check else None
    runs = []
    for layers in (int(n) for n in args.layers.split(",")):
        log(f"== {layers} layer(s) ==")
        runs.append(convert_layers(args.model, layers, ctx, args))
    record = {
        "description": "approximate SAS conversion (shaped attention, identity V/P, residual kept) + distillation healing",
        "model": str(args.model.name),
        "params": runs[0]["params_before"] if runs else None,
        "command": shlex.join(["python", "benchmarks/sas.py", *(sys.argv[1:] if argv is None else argv)]),
        "evaluation": {
            source: {"windows": len(ctx.windows(source)), "window": args.eval_window}
            for source in [args.eval_ppl, *ctx.extra]
        },
        "bootstrap": "paired over evaluation windows, benchmarks/bootstrap.py; 95% percentile intervals",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
            "threads": args.threads,
            "load_average_at_end": os.getloadavg(),
        },
        "runs": runs,
        "score_check": scores,
        "wall_s": round(time.perf_counter() - started, 1),
        "cpu_s": round(time.process_time() - cpu, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    if args.md:
        args.md.write_text(render(record))
        log(f"wrote {args.md}")
    for run in runs:
        log(
            f"{run['layers']} layer(s) {run['converted_layers']}: ppl {run['perplexity_before']:.3f} -> "
            f"{run['perplexity_after_conversion']:.3f} -> healed {run['perplexity_after_healing']:.3f}, "
            f"-{run['params_removed']:,} params"
        )
    log(f"wrote {args.out} in {record['wall_s']:.0f}s wall, {record['cpu_s']:.0f}s CPU")
    return record


def _pct(c: dict[str, Any]) -> str:
    low, high = c["change_pct_ci95"]
    return f"{c['change_pct']:+.1f}% [{low:+.1f}, {high:+.1f}]"


def _ci(m: dict[str, Any]) -> str:
    low, high = m["ci95"]
    return f"{m['perplexity']:.2f} [{low:.2f}, {high:.2f}]"


def render(record: dict[str, Any]) -> str:
    """The record as markdown: one table per evaluation source, then healing and the checks."""
    s = record["settings"]
    runs = record["runs"]
    md = [
        f"# SAS conversion of {record['model']}",
        "",
        f"Approximate SAS conversion (shaped attention with identity V/P inside the original residual block) of "
        f"the N attention sub-blocks with the lowest fit error, then KL distillation to the original. "
        f"Calibration and healing: {s['calib_samples']} windows x {s['calib_seq_len']} tokens of `{s['calib']}`; "
        f"healing {s['heal_steps']} steps x {s['heal_batch_size']} windows, AdamW lr {s['heal_lr']:g}, "
        f"heal_params={s['heal_params']}, hidden_mse={s['hidden_mse']:g}. Brackets: 95% intervals, paired "
        f"bootstrap over the evaluation windows ({s['bootstrap_samples']:,} resamples, `benchmarks/bootstrap.py`). "
        f"{record['environment']['device']}, {record['environment']['threads']} thread(s), float32.",
        "",
    ]
    for source, info in record["evaluation"].items():
        original = runs[0]["measured"][source]["original"]
        md += [
            f"## `{source}` ({info['windows']} windows of {info['window']} tokens)",
            "",
            f"Original: {_ci(original)}.",
            "",
            "| converted layers | params removed | converted | vs original | healed | vs original | healed vs converted |",
            "| --- | ---: | --- | --- | --- | --- | --- |",
        ]
        for run in runs:
            m = run["measured"][source]
            healed = m.get("healed")
            md.append(
                f"| {run['layers']} ({', '.join(map(str, run['converted_layers']))}) | "
                f"{run['params_removed']:,} ({100 * run['params_removed'] / run['params_before']:.2f}%) | "
                f"{_ci(m['converted'])} | {_pct(m['converted']['vs_original'])} | "
                + (
                    f"{_ci(healed)} | {_pct(healed['vs_original'])} | {_pct(m['healed_vs_converted'])} |"
                    if healed
                    else "- | - | - |"
                )
            )
        md.append("")
    md += [
        "## Healing and checks",
        "",
        "| converted layers | KV bytes/token | KL first -> last logged | epochs | trainable params | heal s | row CPU s | reload: windows, max NLL difference |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for run in runs:
        heal, hist, kv, rc = (
            run["heal"],
            run["heal_history"] or [],
            run["kv_bytes_per_token"],
            run["reload_check"],
        )
        md.append(
            f"| {run['layers']} | {kv['before']:,} -> {kv['after']:,} | "
            + (f"{hist[0]['kl']:.3f} -> {hist[-1]['kl']:.3f}" if hist else "-")
            + f" | {heal.get('epochs', '-')} | {heal.get('trainable_params', 0):,} | {heal.get('seconds', '-')} | "
            f"{run['cpu_s']} | {rc['windows']}, {rc['max_window_nll_difference_nats']:.1e} nats"
            f"{'' if run['removed_tensors_absent_from_files'] else ' (REMOVED TENSORS STILL IN FILES)'} |"
        )
    scores = sorted(runs[-1]["layer_scores"], key=lambda f: f["fit_error"])
    md += [
        "",
        "Lowest fit errors (score = ||y - y_fit|| / ||x||; in brackets the error relative to the attention output): "
        + ", ".join(
            f"layer {f['layer']} {f['fit_error']:.4f} ({f['attention_error']:.3f})" for f in scores[:8]
        )
        + ".",
        "",
        "```",
        f"OMP_NUM_THREADS=1 {record['command']}   # {record['cpu_s']:.0f}s CPU, {record['wall_s']:.0f}s wall",
        "```",
        "",
    ]
    return "\n".join(md)


if __name__ == "__main__":
    main()
