"""Benchmark: approximate SAS conversion of a pretrained Llama-family model, before / after / healed.

First, a check of the layer-selection score: every layer is converted alone (fitted gains, no healing) and
its perplexity rank-correlated with its score. Then, for each number of converted layers (default 1, 2 and 4) the ``sas`` pass runs on a fresh copy of the model
(``converter.pipeline`` API, exactly what ``slimformer convert --sas layers=N,heal-steps=S`` runs): it scores
the layers, converts the N best to shaped attention with identity V/P, heals by distillation and measures
perplexity before the conversion, after it and after healing. The converted checkpoint is then written, its
files checked for the removed tensors, and reloaded to confirm it measures the healed perplexity.

    python benchmarks/sas.py                       # ../shared/models/pycoder-8m, writes benchmarks/results/sas.json
    python benchmarks/sas.py --heal-steps 200 --device cuda

Skips (exit 0, nothing written) when the model is absent.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from slimformer.converter.conversion import load_model
from slimformer.converter.graph import load_graph
from slimformer.converter.pipeline import CalibrationSpec, EvaluationSpec, PassContext
from slimformer.converter.source import resolve_source
from slimformer.converter.tokenizer import load_tokenizer
from slimformer.exporters.safetensors import write_checkpoint
from slimformer.passes.sas.simplify import SasPass, fit_layers, replace_attention

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-score-check",
        dest="score_check",
        action="store_false",
        help="skip converting each layer alone to check that the score ranks the damage",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sas.json")
    return parser.parse_args(argv)


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
    started = time.perf_counter()
    result = sas.run(graph, ctx)["conversion"]
    seconds = time.perf_counter() - started
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
        reloaded = ctx.perplexity(load_model(tmp, device=args.device))
    ppl = result["perplexity"]
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
        "reloaded_perplexity": reloaded,
        "removed_tensors_absent_from_files": not leftover,
        "checkpoint_bytes": written["bytes"],
        "heal": {k: v for k, v in (result["heal"] or {}).items() if k != "history"},
        "heal_history": (result["heal"] or {}).get("history"),
        "layer_scores": result["layer_scores"],
        "seconds": round(seconds, 1),
    }


def score_check(model: Path, ctx: PassContext, args: argparse.Namespace) -> dict[str, Any]:
    """Does the selection score predict the damage? Convert each layer alone (fitted gains, no healing), measure
    perplexity, and rank-correlate it with the score (and with the cost of dropping the attention instead)."""
    graph = load_graph(resolve_source(model))
    fits = fit_layers(
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
    ctx = PassContext(
        load_tokenizer(args.model),
        CalibrationSpec(sources=[args.calib], samples=args.calib_samples, seq_len=args.calib_seq_len),
        EvaluationSpec(ppl=args.eval_ppl, max_tokens=args.eval_max_tokens),
        device=args.device,
        progress=False,
        log=log,
    )
    started = time.perf_counter()
    scores = score_check(args.model, ctx, args) if args.score_check else None
    runs = []
    for layers in (int(n) for n in args.layers.split(",")):
        log(f"== {layers} layer(s) ==")
        runs.append(convert_layers(args.model, layers, ctx, args))
    record = {
        "description": "approximate SAS conversion (shaped attention, identity V/P, residual kept) + distillation healing",
        "model": str(args.model.name),
        "command": shlex.join(["python", "benchmarks/sas.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
            "threads": args.threads,
        },
        "runs": runs,
        "score_check": scores,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for run in runs:
        log(
            f"{run['layers']} layer(s) {run['converted_layers']}: ppl {run['perplexity_before']:.3f} -> "
            f"{run['perplexity_after_conversion']:.3f} -> healed {run['perplexity_after_healing']:.3f}, "
            f"-{run['params_removed']:,} params"
        )
    log(f"wrote {args.out} in {record['wall_s']:.0f}s")
    return record


if __name__ == "__main__":
    main()
