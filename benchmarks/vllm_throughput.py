"""vLLM CPU generation throughput and KV-cache capacity: original versus layer-dropped, in the same run.

For pycoder-8m (``--drop attn:2``, a quarter of its 8 attention layers) and SmolLM2-135M-Instruct (``--drop
attn:8`` of 30, the DESIGN.md §7 measurement): convert the original with no passes and with the drop, export
both with ``slimformer export vllm``, and load both into one vLLM process (``benchmarks/vllm_engine.py`` in
``.venv-vllm``): greedy generation of ``--new-tokens`` tokens for a batch of 16 prompts submitted together,
``--rounds`` timed rounds after a warm-up, alternating (original, dropped, original, dropped, ...) so that other
work on this shared machine hits both alike. The speed-up is the median over rounds of the paired ratio
(original round time / dropped round time); tokens/s are from the median round, and the best round is recorded
too, and so is the CPU time of each round. vLLM's worker threads are bound to one core (``--bind``): on a
shared machine a neighbour on any core of a multi-thread worker stalls every OpenMP barrier, and round times
swing tenfold. vLLM's own KV-cache capacity (tokens, at ``VLLM_CPU_KVCACHE_SPACE`` GiB) is recorded for each. As a
correctness spot check, vLLM's greedy tokens for two prompts are compared with the slimformer runtime's.

Prompts are 16 windows of 32 tokens of held-out text (pycode valid / WikiText-2 test). float32 (the CPU
build's exact path; the test suite compares in float32 too). Runs in the project's environment::

    .venv/bin/python benchmarks/vllm_throughput.py          # -> benchmarks/results/vllm_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from slimformer.converter.calibration import sample_windows  # noqa: E402
from slimformer.converter.conversion import ConvertOptions, convert, load_model  # noqa: E402
from slimformer.converter.pipeline import PassSpec, PipelineSpec  # noqa: E402
from slimformer.converter.tokenizer import load_tokenizer  # noqa: E402
from slimformer.exporters.vllm import export_vllm  # noqa: E402

from benchmarks.smollm2 import smollm2_dir  # noqa: E402

SHARED = Path(os.environ.get("SLIMFORMER_SHARED", ROOT.parent / "shared"))
DATA = SHARED / "data"
VLLM_PYTHON = Path(os.environ.get("SLIMFORMER_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
ENGINE_SCRIPT = ROOT / "benchmarks" / "vllm_engine.py"
BATCH = 16
PROMPT_TOKENS = 32
CHECK_PROMPTS, CHECK_TOKENS = 2, 32


def readable_by_this_transformers(model: Path, work: Path) -> Path:
    """``model`` itself, or a copy (weights linked) whose tokenizer config this transformers release can read.

    The cached SmolLM2 directory is written by transformers 5, whose ``tokenizer_class`` is
    ``TokenizersBackend``; transformers 4.57 (the project's environment) does not know that name but reads the
    same ``tokenizer.json`` as ``PreTrainedTokenizerFast``. Nothing else changes.
    """
    import transformers

    config = json.loads((model / "tokenizer_config.json").read_text())
    if (
        config.get("tokenizer_class") != "TokenizersBackend"
        or int(transformers.__version__.split(".")[0]) >= 5
    ):
        return model
    copy = work / f"{model.name}-tokenizer-4x"
    copy.mkdir(parents=True, exist_ok=True)
    for file in model.iterdir():
        target = copy / file.name
        if not target.exists() and file.name != "tokenizer_config.json":
            target.symlink_to(file)
    (copy / "tokenizer_config.json").write_text(
        json.dumps({**config, "tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return copy


def subjects(work: Path) -> list[dict[str, Any]]:
    """The models measured; each with where it comes from, what to drop and which text to calibrate/prompt on."""
    found = []
    pycoder = SHARED / "models" / "pycoder-8m"
    if pycoder.is_dir():
        found.append(
            {
                "name": "pycoder-8m",
                "path": pycoder,
                "drop": "attn:2",
                "calib": str(DATA / "pycode" / "train.txt.gz"),
                "prompts": str(DATA / "pycode" / "valid.txt.gz"),
            }
        )
    else:
        print(f"[vllm_throughput] skipping pycoder-8m: {pycoder} is absent", file=sys.stderr)
    try:
        smollm2 = smollm2_dir()
    except RuntimeError as exc:
        print(f"[vllm_throughput] skipping SmolLM2-135M-Instruct: {exc}", file=sys.stderr)
    else:
        found.append(
            {
                "name": "SmolLM2-135M-Instruct",
                "source": str(smollm2),
                "path": readable_by_this_transformers(smollm2, work),
                "drop": "attn:8",
                "calib": str(DATA / "wikitext2" / "wiki.valid.tokens"),
                "prompts": str(DATA / "wikitext2" / "wiki.test.raw"),
            }
        )
    return found


def prepare(subject: dict[str, Any], work: Path, calib_samples: int) -> dict[str, Any]:
    """Convert (identity and dropped), export both; the prompts as token ids; the runtime's greedy reference."""
    variants = {}
    for label, drop in (("original", None), ("dropped", subject["drop"])):
        ckpt = work / f"{subject['name']}-{label}"
        spec = PipelineSpec()
        spec.calibration.sources, spec.calibration.samples, spec.calibration.seq_len = (
            [subject["calib"]],
            calib_samples,
            256,
        )
        if drop:
            spec.passes.append(PassSpec("layer_drop", {"drop": drop}))
        started = time.perf_counter()
        report = convert(subject["path"], ckpt, spec, ConvertOptions(quiet=True))
        converted_s = time.perf_counter() - started
        metadata = export_vllm(ckpt, work / f"{subject['name']}-{label}-vllm", quiet=True)
        dropped = [layer["layer"] for layer in metadata["layers"] if layer["attention"] == "dropped"]
        variants[label] = {
            "checkpoint": ckpt,
            "export": work / f"{subject['name']}-{label}-vllm",
            "metadata": metadata,
            "convert_s": round(converted_s, 1),
            "dropped_attention_layers": dropped,
            "parameters": report["params_after"],
        }
    tokenizer = load_tokenizer(subject["path"])
    prompts = sample_windows(tokenizer, subject["prompts"], BATCH, PROMPT_TOKENS, seed=0).tolist()
    return {"variants": variants, "prompts": prompts}


def greedy(checkpoint: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    model = load_model(checkpoint)
    outputs = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(steps):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
            outputs.append(ids[len(prompt) :])
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vllm_throughput.json")
    parser.add_argument(
        "--work", type=Path, help="directory for the converted checkpoints (default: a temporary one)"
    )
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--kv-space", default="1", help="VLLM_CPU_KVCACHE_SPACE in GiB")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument(
        "--bind",
        default=str(max(os.sched_getaffinity(0))),
        help="VLLM_CPU_OMP_THREADS_BIND: the cores vLLM's worker threads run on (default: one core, so that a "
        "busy neighbour slows a round in proportion instead of stalling every OpenMP barrier); 'auto' for vLLM's own",
    )
    parser.add_argument("--models", help="comma-separated subset of: pycoder-8m, SmolLM2-135M-Instruct")
    args = parser.parse_args()
    if not VLLM_PYTHON.is_file():
        sys.exit(f"{VLLM_PYTHON} is absent: create it with .ci/setup_vllm.sh")
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        run(args, work)


def run(args: argparse.Namespace, work: Path) -> None:
    prepared = {}
    wanted = set(args.models.split(",")) if args.models else None
    for subject in subjects(work):
        if wanted is not None and subject["name"] not in wanted:
            continue
        print(
            f"[vllm_throughput] converting and exporting {subject['name']} ...", file=sys.stderr, flush=True
        )
        prepared[subject["name"]] = (subject, prepare(subject, work, args.calib_samples))
    job: dict[str, Any] = {
        "engine": {"dtype": "float32", "max_model_len": 512},
        "models": [],
        "interleaved": [],
    }
    for name, (_, data) in prepared.items():
        check = {"prompts": data["prompts"][:CHECK_PROMPTS], "max_tokens": CHECK_TOKENS}
        job["interleaved"].append(
            {
                "name": name,
                "models": [
                    {"name": f"{name}|{label}", "path": str(variant["export"]), "generate": check}
                    for label, variant in data["variants"].items()
                ],
                "throughput": {
                    "prompts": data["prompts"],
                    "max_tokens": args.new_tokens,
                    "rounds": args.rounds,
                },
            }
        )
    job_file, result_file = work / "throughput_job.json", work / "throughput_result.json"
    job_file.write_text(json.dumps(job))
    print(
        f"[vllm_throughput] timing {len(job['interleaved'])} model pair(s) in vLLM ...",
        file=sys.stderr,
        flush=True,
    )
    load_before = round(os.getloadavg()[0], 2)  # this machine is shared: say how busy it was
    started = time.perf_counter()
    done = subprocess.run(
        [str(VLLM_PYTHON), str(ENGINE_SCRIPT), str(job_file), str(result_file)],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": args.kv_space, "VLLM_CPU_OMP_THREADS_BIND": args.bind},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0 or not result_file.is_file():
        sys.exit(f"vLLM run failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    engine_s = time.perf_counter() - started
    raw = json.loads(result_file.read_text())
    records: dict[tuple[str, str], dict] = {}
    for record in raw["models"]:
        if record.get("error"):
            sys.exit(f"vLLM failed on {record['name']}: {record['error']}\n{record.get('traceback')}")
        name, label = record["name"].split("|")
        records[(name, label)] = record

    results: dict[str, Any] = {}
    for name, (subject, data) in prepared.items():
        entry: dict[str, Any] = {
            "source": subject.get("source", str(subject["path"])),
            "drop": subject["drop"],
            "calibration": {"source": subject["calib"], "samples": args.calib_samples, "seq_len": 256},
        }
        for label, variant in data["variants"].items():
            record = records[(name, label)]
            expected = greedy(variant["checkpoint"], data["prompts"][:CHECK_PROMPTS], CHECK_TOKENS)
            got = [generation["tokens"] for generation in record["generations"]]
            entry[label] = {
                "attention_layers": variant["metadata"]["attention_layers"],
                "mlp_layers": variant["metadata"]["mlp_layers"],
                "dropped_attention_layers": variant["dropped_attention_layers"],
                "parameters": variant["parameters"],
                "kv_bytes_per_token": variant["metadata"]["kv_bytes_per_token"],
                "kv_cache_tokens": record["kv_cache"]["tokens"],
                "kv_cache_reported_tokens": record["kv_cache"]["reported_tokens"],
                "load_s": record["load_s"],
                **record["throughput"],
                "greedy_matches_runtime": got == expected,
            }
        original, dropped = entry["original"], entry["dropped"]
        # Rounds alternate (original r, dropped r, original r+1, ...): the ratio within a round pair sees the
        # same machine load, and its median discards the rounds another job disturbed.
        pairs = [a / b for a, b in zip(original["seconds"], dropped["seconds"], strict=True)]
        entry["speedup_per_round"] = [round(ratio, 3) for ratio in pairs]
        entry["speedup"] = round(statistics.median(pairs), 3)
        entry["speedup_best_rounds"] = round(dropped["best_tokens_per_s"] / original["best_tokens_per_s"], 3)
        entry["speedup_cpu_time"] = round(
            statistics.median(
                a / b for a, b in zip(original["cpu_seconds"], dropped["cpu_seconds"], strict=True)
            ),
            3,
        )
        entry["kv_capacity_ratio"] = round(dropped["kv_cache_tokens"] / original["kv_cache_tokens"], 3)
        entry["attention_layer_ratio"] = round(original["attention_layers"] / dropped["attention_layers"], 3)
        results[name] = entry

    output = {
        "what": "vLLM CPU generation throughput (greedy, batch of 16 prompts submitted together) and KV-cache capacity, "
        "original vs layer-dropped, both loaded in one vLLM process and timed in alternating rounds",
        "command": "python benchmarks/vllm_throughput.py " + " ".join(sys.argv[1:]),
        "settings": {
            "batch": BATCH,
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "dtype": "float32",
            "max_model_len": 512,
            "enforce_eager": True,
            "VLLM_CPU_KVCACHE_SPACE_GiB": float(args.kv_space),
            "VLLM_CPU_OMP_THREADS_BIND": args.bind,
        },
        "environment": {
            "vllm": raw["vllm"],
            "transformers": raw["transformers"],
            "torch": raw["torch"],
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "processor": _cpu_model(),
        },
        "engine_seconds": round(engine_s, 1),
        "load_average_1min_before": load_before,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=2) + "\n")
    print(table(output))
    print(f"[vllm_throughput] wrote {args.out}", file=sys.stderr)


def table(output: dict[str, Any]) -> str:
    lines = [
        "| model | variant | attention layers | parameters | KV tokens (vLLM) | tok/s (median round) "
        "| tok/s (best round) | tok/CPU-s | speed-up (wall) | speed-up (CPU time) | greedy = runtime |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, entry in output["results"].items():
        for label in ("original", "dropped"):
            row = entry[label]
            variant = "original" if label == "original" else f"--drop {entry['drop']}"
            speedup = "1.00x" if label == "original" else f"{entry['speedup']:.2f}x"
            cpu_speedup = "1.00x" if label == "original" else f"{entry['speedup_cpu_time']:.2f}x"
            lines.append(
                f"| {name} | {variant} | {row['attention_layers']} | {row['parameters']:,} | "
                f"{row['kv_cache_tokens']:,} | {row['tokens_per_s']} | {row['best_tokens_per_s']} | "
                f"{row['tokens_per_cpu_s']} | {speedup} | {cpu_speedup} | {row['greedy_matches_runtime']} |"
            )
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
