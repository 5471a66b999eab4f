"""ONNX Runtime decode speed of the A2SF cache op: native kernel against function body against no op.

Run from the repository root after ``make kernels``::

    .venv/bin/python benchmarks/onnx_kernels.py
    .venv/bin/python benchmarks/onnx_kernels.py --models pycoder-8m --contexts 128,1024 --repeats 3

Writes ``benchmarks/results/onnx_kernels.json`` and prints the table.

Subjects: the identity conversion of each model, exported twice with ``exporters.onnx.export_onnx`` -- a
plain full-cache graph, and a graph with the A2SF cache op (``cache_op=True``; the policy is given at run
time). Three configurations per (model, context):

* (a) plain: the plain graph, whose cache grows with every token;
* (b) function: the cache-op graph with A2SF (alpha 0.5) at ``budget`` tokens per slot, the op running
  as its ONNX function body (``cache_kernel="function"``);
* (c) native: the same graph and policy with the native CPU kernel (``cache_kernel="native"``).

Protocol: batch 1, ONE intra-op thread (a shared 2-core machine), CPU provider. A random prompt of
``context`` tokens is prefilled once per configuration in chunks of ``--prefill-chunk`` tokens (timed,
reported as prefill tok/s; one 4k-token forward of the cache-op graph materialises [heads, 4096, 4096]
float32 probabilities per layer, and five sessions' arenas holding that exhaust 24 GB; with A2SF the
cache is evicted down to the budget after every chunk, which changes which tokens are kept but not
the decode cost, set by the budget), then
``--new-tokens`` greedy tokens are decoded from a copy of that state, ``--repeats`` times. The
configurations take turns token by token and every step is timed alone; the decode rate is one over the
median step time (the mean-based rate is kept too). On a machine shared with other jobs this is what
keeps the ratios meaningful: a burst of load lands on one step of each configuration, not on one
configuration's whole run. The function body's and the native kernel's states after the prompt are
compared (same kept tokens; score difference).

``--profile``: ORT's profiler over the decode steps of (c) at the first context and budget gives the
op's share of a step (sum of A2SFCacheUpdate node times over the sum of model-run times).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from a2sf_common import MODELS, RESULTS, environment, log, single_thread, write_json
from slimformer.converter.conversion import ConvertOptions, convert
from slimformer.converter.pipeline import PipelineSpec
from slimformer.exporters.native import find_library, register_cache_kernel
from slimformer.exporters.native.build import default_build_dir, read_manifest
from slimformer.exporters.onnx import OnnxExportOptions, export_onnx
from slimformer.exporters.onnx_runtime import CacheState, OnnxCausalLM

ALPHA = 0.5


def model_source(name: str, work: Path) -> Path:
    if name == "SmolLM2-135M":
        return smollm2_source(work)
    return MODELS[name]


def smollm2_source(work: Path) -> Path:
    """SmolLM2-135M from ``benchmarks/smollm2.py``, readable by this venv's transformers 4.57.

    The cached directory may have been written by transformers 5, whose config keeps RoPE's base in
    ``rope_parameters`` (4.57 would silently use its default 10,000 instead of 100,000) and whose
    tokenizer_config names a ``TokenizersBackend`` class 4.57 lacks. This copy rewrites both (the
    weights are linked, not copied); a 4.57-written directory passes through unchanged.
    """
    from smollm2 import smollm2_dir

    source = smollm2_dir()
    config = json.loads((source / "config.json").read_text())
    tokenizer_config = json.loads((source / "tokenizer_config.json").read_text())
    if "rope_parameters" not in config and tokenizer_config.get("tokenizer_class") != "TokenizersBackend":
        return source
    target = work / "SmolLM2-135M-src"
    target.mkdir(parents=True, exist_ok=True)
    rope = config.pop("rope_parameters", {}) or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    (target / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (target / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    for name in ("model.safetensors", "tokenizer.json", "generation_config.json"):
        link = target / name
        if (source / name).is_file() and not link.exists():
            link.symlink_to(source / name)
    return target


def prepare(name: str, work: Path) -> tuple[Path, Path]:
    """(plain graph, cache-op graph) of the identity conversion; reused when ``work`` already has them."""
    ckpt, plain, cache_op = work / f"{name}-ckpt", work / f"{name}-onnx", work / f"{name}-onnx-cache-op"
    if not (ckpt / "config.json").is_file():
        convert(
            str(model_source(name, work)), ckpt, PipelineSpec(), ConvertOptions(quiet=True, overwrite=True)
        )
    for out, with_op in ((plain, False), (cache_op, True)):
        if not (out / "slimformer_onnx.json").is_file():
            export_onnx(
                ckpt, out, OnnxExportOptions(cache_op=with_op, validate=False, quiet=True, overwrite=True)
            )
    return plain, cache_op


def policy(budget: int) -> dict[str, Any]:
    return {"policy": "a2sf", "budget": budget, "alpha": ALPHA}


def prefill(lm: OnnxCausalLM, prompt: np.ndarray, chunk: int) -> tuple[CacheState, np.ndarray, float]:
    """The prompt in chunks of ``chunk`` tokens (see the module docstring); returns the state, the last
    logits and prefill tokens/s."""
    state = lm.start(1)
    start = time.perf_counter()
    for first in range(0, prompt.shape[1], chunk):
        logits = lm.forward(prompt[:, first : first + chunk], None, state)
    return state, logits, prompt.shape[1] / (time.perf_counter() - start)


def decode(lm: OnnxCausalLM, state: CacheState, logits: np.ndarray, steps: int) -> float:
    """Greedy decode tokens/s of ``steps`` tokens from a copy of ``state`` (the prefilled one stays)."""
    state = copy.deepcopy(state)
    start = time.perf_counter()
    for _ in range(steps):
        logits = lm.forward(logits[:, -1].argmax(-1)[:, None], None, state)
    return steps / (time.perf_counter() - start)


def compare_states(a: CacheState, b: CacheState) -> dict[str, Any]:
    """Whether two prefilled states kept the same tokens (keys and values equal bit for bit) and how far
    their scores are apart (a multi-token step sums in another order than the body's MatMul)."""
    same_kv = all(np.array_equal(x, y) for pa, pb in zip(a.caches, b.caches) for x, y in zip(pa[:2], pb[:2]))
    worst = 0.0
    for pa, pb in zip(a.caches, b.caches):
        finite = np.isfinite(pa[2])
        if same_kv and np.array_equal(finite, np.isfinite(pb[2])):
            worst = max(worst, float(np.abs(pa[2][finite] - pb[2][finite]).max(initial=0.0)))
    return {"same_keys_and_values": same_kv, "max_score_difference": worst if same_kv else None}


def measure_context(
    plain: Path, cache_op: Path, context: int, args: argparse.Namespace
) -> list[dict[str, Any]]:
    vocab = json.loads((plain / "config.json").read_text())["vocab_size"]
    prompt = np.random.default_rng(context).integers(3, vocab, (1, context))
    configs: dict[tuple[str, int | None], OnnxCausalLM] = {
        ("plain", None): OnnxCausalLM(plain, provider="cpu", threads=1)
    }
    for budget in args.budgets:
        for kind in ("function", "native"):
            lm = OnnxCausalLM(cache_op, provider="cpu", kv_cache=policy(budget), threads=1, cache_kernel=kind)
            assert lm.cache_kernel_impl == kind, lm.cache_kernel_description
            configs[kind, budget] = lm
    prefilled = {key: prefill(lm, prompt, args.prefill_chunk) for key, lm in configs.items()}
    identical = {
        budget: compare_states(prefilled["function", budget][0], prefilled["native", budget][0])
        for budget in args.budgets
    }
    # Round-robin at the token: every configuration advances one step in turn, and each step is timed on
    # its own, so a burst of load from other jobs hits one step of each rather than one whole run.
    times: dict[tuple[str, int | None], list[float]] = {key: [] for key in configs}
    for _ in range(args.repeats):
        running = {key: (copy.deepcopy(prefilled[key][0]), prefilled[key][1]) for key in configs}
        for _ in range(args.new_tokens):
            for key, lm in configs.items():
                state, logits = running[key]
                start = time.perf_counter()
                logits = lm.forward(logits[:, -1].argmax(-1)[:, None], None, state)
                times[key].append(time.perf_counter() - start)
                running[key] = state, logits
    decode_rate = {key: 1.0 / statistics.median(values) for key, values in times.items()}
    mean_rate = {key: len(values) / sum(values) for key, values in times.items()}
    rows = []
    for budget in args.budgets:
        a, b, c = decode_rate["plain", None], decode_rate["function", budget], decode_rate["native", budget]
        rows.append(
            {
                "context": context,
                "budget": budget,
                "decode_tokens_per_s": {"plain": a, "function": b, "native": c},
                "decode_tokens_per_s_mean": {
                    "plain": mean_rate["plain", None],
                    "function": mean_rate["function", budget],
                    "native": mean_rate["native", budget],
                },
                "prefill_tokens_per_s": {
                    "plain": prefilled["plain", None][2],
                    "function": prefilled["function", budget][2],
                    "native": prefilled["native", budget][2],
                },
                "native_over_plain": c / a,
                "native_over_function": c / b,
                "prefill_native_vs_function": identical[budget],
            }
        )
        log(
            f"  context {context} budget {budget}: plain {a:.1f}, function {b:.1f}, native {c:.1f} tok/s "
            f"(native/plain {c / a:.2f}x, native/function {c / b:.2f}x)"
        )
    return rows


def profile_share(cache_op: Path, context: int, budget: int, steps: int, chunk: int) -> dict[str, Any]:
    """The native op's share of a decode step, two ways.

    * ``profiler``: ORT's profiler over ``steps`` decode steps (its own session, profiling on): the sum of
      A2SFCacheUpdate node times over the sum of model-run times. Profiling adds a fixed cost to every
      node, which inflates small nodes -- this op among them.
    * ``op_alone``: the op in a one-node model at this model's decode shapes (P = budget + 1, one new
      token), median time per call minus that of an Identity model with the same inputs (the cost of
      ``session.run`` itself), times the number of cache slots, over the step time of the unprofiled run.
    """
    import onnxruntime as ort

    lm = OnnxCausalLM(cache_op, provider="cpu", kv_cache=policy(budget), threads=1, cache_kernel="native")
    config = json.loads((cache_op / "config.json").read_text())
    state, logits, _ = prefill(
        lm, np.random.default_rng(context).integers(3, config["vocab_size"], (1, context)), chunk
    )
    step_us = 1e6 / decode(lm, state, logits, steps)
    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(scratch) / "profile")
        register_cache_kernel(options, "cpu", "native")
        lm.session = ort.InferenceSession(
            str(cache_op / lm.metadata["model_file"]), options, providers=["CPUExecutionProvider"]
        )
        decode(lm, state, logits, steps)
        events = json.loads(Path(lm.session.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    op = [
        e["dur"]
        for e in events
        if e.get("cat") == "Node" and e.get("args", {}).get("op_name") == "A2SFCacheUpdate"
    ]
    profiled_step = sum(runs) / len(runs)
    profiled_op = sum(op) / len(runs)

    (heads, key_dim), (_, value_dim) = (
        lm.metadata["cache_shapes"][0]["key"],
        lm.metadata["cache_shapes"][0]["value"],
    )
    groups = config["num_attention_heads"] // heads
    alone = op_alone(heads, groups, key_dim, value_dim, budget)
    slots = len(lm.metadata["cache_layers"])
    return {
        "context": context,
        "budget": budget,
        "steps": steps,
        "profiler": {
            "step_us": profiled_step,
            "op_us_per_step": profiled_op,
            "op_share": profiled_op / profiled_step,
        },
        "op_alone": {
            **alone,
            "slots": slots,
            "step_us": step_us,
            "native_share": slots * alone["native_us"] / step_us,
            "function_share_estimate": slots * alone["function_us"] / step_us,
        },
    }


def op_alone(
    heads: int, groups: int, key_dim: int, value_dim: int, budget: int, calls: int = 3000
) -> dict[str, float]:
    """Median microseconds per decode-step call of the op alone (native, function body), net of the cost
    of running an Identity model with the same feeds."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from slimformer.exporters import onnx_cache_op

    types = [TensorProto.FLOAT] * 4 + [TensorProto.BOOL, TensorProto.FLOAT, TensorProto.INT64]
    inputs = [helper.make_tensor_value_info(n, t, None) for n, t in zip(onnx_cache_op.INPUTS, types)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in onnx_cache_op.OUTPUTS]
    nodes = [
        helper.make_node("Identity", [a], [b]) for a, b in zip(onnx_cache_op.INPUTS, onnx_cache_op.OUTPUTS)
    ]
    baseline = helper.make_model(
        helper.make_graph(nodes, "baseline", inputs, outputs),
        opset_imports=[helper.make_opsetid("", 18)],
        ir_version=8,
    )

    def session(model: Any, native: bool) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        if native:
            register_cache_kernel(options, "cpu", "native")
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    rng = np.random.default_rng(0)
    phys = budget + 1
    probs = rng.random((1, heads * groups, 1, phys)).astype(np.float32)
    feeds = dict(
        zip(
            onnx_cache_op.INPUTS,
            (
                rng.standard_normal((1, heads, phys, key_dim)).astype(np.float32),
                rng.standard_normal((1, heads, phys, value_dim)).astype(np.float32),
                rng.random((1, heads, budget)).astype(np.float32),
                probs / probs.sum(-1, keepdims=True),
                np.ones((1, 1), bool),
                np.asarray(ALPHA, np.float32),
                np.asarray((budget, 0, budget * 3 // 4, 0), np.int64),
            ),
        )
    )
    model = onnx_cache_op.standalone_model()
    medians = {}
    for name, run in (
        ("baseline", session(baseline, False)),
        ("function", session(model, False)),
        ("native", session(model, True)),
    ):
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            run.run(None, feeds)
            times.append(time.perf_counter() - start)
        medians[name] = 1e6 * statistics.median(times[calls // 5 :])  # the first calls warm caches and arenas
    return {
        "native_us": medians["native"] - medians["baseline"],
        "function_us": medians["function"] - medians["baseline"],
        "baseline_us": medians["baseline"],
    }


def table(data: dict[str, Any]) -> str:
    lines = [
        f"Decode tokens/s (batch 1, one thread, CPU provider, {data['new_tokens']} greedy tokens after a random "
        f"prompt of `context` tokens, median of {data['repeats']} interleaved rounds; A2SF alpha {ALPHA}):",
        "",
        "| model | context | budget | (a) plain | (b) function body | (c) native | c / a | c / b |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, result in data["models"].items():
        for row in result["rows"]:
            rate = row["decode_tokens_per_s"]
            lines.append(
                f"| {model} | {row['context']:,} | {row['budget']} | {rate['plain']:,.1f} | "
                f"{rate['function']:,.1f} | {rate['native']:,.1f} | {row['native_over_plain']:.2f}x | "
                f"{row['native_over_function']:.2f}x |"
            )
    for model, result in data["models"].items():
        if result.get("profile"):
            p, alone = result["profile"], result["profile"]["op_alone"]
            lines.append(
                f"\n{model}, context {p['context']}, budget {p['budget']}: the native op costs {alone['native_us']:.1f} us "
                f"per call alone (function body {alone['function_us']:.1f} us), {100 * alone['native_share']:.1f}% of a "
                f"{alone['step_us'] / 1000:.2f} ms decode step over {alone['slots']} slots; ORT's profiler: "
                f"{100 * p['profiler']['op_share']:.1f}% of a profiled step."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="pycoder-8m,SmolLM2-135M")
    parser.add_argument("--contexts", default="128,1024,4096")
    parser.add_argument("--budgets", default="64,256")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per forward call")
    parser.add_argument("--profile", action="store_true", help="also profile the op's share of a decode step")
    parser.add_argument(
        "--work",
        type=Path,
        default=RESULTS / "tmp" / "onnx_kernels",
        help="checkpoints and exports (reused when present; default benchmarks/results/tmp)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx_kernels.json")
    args = parser.parse_args()
    args.contexts = [int(n) for n in args.contexts.split(",")]
    args.budgets = [int(n) for n in args.budgets.split(",")]
    library = find_library("cpu")
    if not library.usable:
        sys.exit(f"the native kernel is needed: {library.reason}")
    single_thread()
    data = {
        "environment": environment(),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "threads": 1,
        "alpha": ALPHA,
        "contexts": args.contexts,
        "budgets": args.budgets,
        "kernel_build": read_manifest(default_build_dir()),
        "models": {},
    }
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        log(f"{name}: converting and exporting (reused from {args.work} when present)")
        plain, cache_op = prepare(name, args.work)
        rows = []
        for context in args.contexts:
            log(f"{name}: context {context}")
            rows += measure_context(plain, cache_op, context, args)
            data["models"][name] = {"rows": rows}
            write_json(args.out, data)  # partial results survive an interrupted long run
        if args.profile:
            data["models"][name]["profile"] = profile_share(
                cache_op, args.contexts[0], args.budgets[0], args.new_tokens, args.prefill_chunk
            )
        write_json(args.out, data)
    print(table(data))


if __name__ == "__main__":
    main()
