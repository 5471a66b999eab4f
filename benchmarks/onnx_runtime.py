"""ONNX Runtime (CPU provider) against the PyTorch runtime: prefill and decode speed, and peak memory
against generated length with and without A2SF eviction.

Run from the repository root (about ten minutes on one busy core)::

    .venv/bin/python benchmarks/onnx_runtime.py
    .venv/bin/python benchmarks/onnx_runtime.py --models stories260K --lengths 128,512 --repeats 3

Writes ``benchmarks/results/onnx.json`` and prints the README tables. (The script is not called
``onnx.py``: run as a script, its directory comes first on ``sys.path`` and it would shadow the ``onnx``
package.)

Subjects: the identity conversion of each real model (``slimformer convert``, no passes), exported twice
with ``exporters.onnx.export_onnx`` -- a plain graph, and a graph with the A2SF cache op. Everything runs
with ONE intra-op thread in both runtimes (on a shared 2-core machine more threads oversubscribe and the
timings collapse), batch 1.

* Speed: a random prompt of ``--prompt`` tokens is prefilled (timed), then ``--new-tokens`` tokens are
  decoded greedily one at a time (timed); medians over ``--repeats`` rounds after a warm-up round, each
  round running every configuration once (interleaved, so that load drifts hit all alike). PyTorch is
  measured with ``converter.evaluation.speed_probe`` (eager mode, the runtime's default SDPA attention);
  ONNX Runtime with the same protocol through ``OnnxCausalLM.forward``.
* Memory: each (runtime, cache, length) runs in a fresh process that loads the model, warms up, then
  decodes ``length`` tokens after a 32-token prompt. Reported: the KV-cache bytes held at the end (keys,
  values and, when evicting, scores; read from the cache) and the growth of the process's resident
  memory during that generation (highest RSS sampled every 2 ms minus the RSS at its start) -- what the
  generation costs the machine, the runtime's allocator included.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from a2sf_common import MODELS, RESULTS, cache_factory, environment, log, single_thread, write_json
from slimformer.converter.conversion import ConvertOptions, convert, load_model
from slimformer.converter.evaluation import speed_probe
from slimformer.converter.pipeline import PipelineSpec
from slimformer.exporters.onnx import OnnxExportOptions, export_onnx
from slimformer.exporters.onnx_runtime import OnnxCausalLM

MEMORY_PROMPT = 32


def a2sf(budget: int) -> dict[str, Any]:
    return {"policy": "a2sf", "budget": budget, "alpha": 0.5}


# ---- speed ------------------------------------------------------------------------------------------


def ort_run(lm: OnnxCausalLM, prompt: np.ndarray, new_tokens: int) -> tuple[float, float]:
    """One run of ``speed_probe``'s protocol over ONNX Runtime: timed prefill, then timed greedy steps.
    Returns (prefill tokens/s, decode tokens/s)."""
    state = lm.start(1)
    start = time.perf_counter()
    logits = lm.forward(prompt, None, state)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = lm.forward(logits[:, -1].argmax(-1)[:, None], None, state)
    return prompt.shape[1] / prefill, new_tokens / (time.perf_counter() - start)


def speed_rows(ckpt: Path, plain: Path, evicting: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every configuration once per round, rounds repeated: on a shared machine the load drifts, and
    interleaving gives every configuration the same conditions."""
    budget = a2sf(args.budget)
    model = load_model(ckpt)
    vocab = model.config.vocab_size
    prompt = np.random.default_rng(0).integers(3, vocab, (1, args.prompt))

    def torch_run(factory: Any) -> tuple[float, float]:
        result = speed_probe(
            model,
            prompt_len=args.prompt,
            new_tokens=args.new_tokens,
            repeats=1,
            warmup=0,
            cache_factory=factory,
        ).to_dict()
        return result["prefill_tokens_per_s"], result["decode_tokens_per_s"]

    def ort(directory: Path, policy: dict[str, Any] | None) -> Any:
        lm = OnnxCausalLM(directory, provider="cpu", kv_cache=policy, threads=1)
        return lambda: ort_run(lm, prompt, args.new_tokens)

    configs = {
        ("PyTorch", "full cache"): lambda: torch_run(None),
        ("PyTorch", f"A2SF budget {args.budget}"): lambda: torch_run(cache_factory(budget)),
        ("ONNX Runtime CPU", "full cache"): ort(plain, None),
        ("ONNX Runtime CPU", "full cache, cache-op graph"): ort(evicting, {"policy": "none"}),
        ("ONNX Runtime CPU", f"A2SF budget {args.budget}"): ort(evicting, budget),
    }
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {key: [] for key in configs}
    for round_ in range(args.repeats + 1):
        for key, run in configs.items():
            result = run()
            if round_:  # round 0 is the warm-up
                runs[key].append(result)
    rows = []
    for (runtime, cache), results in runs.items():
        rows.append(
            {
                "runtime": runtime,
                "cache": cache,
                "prefill_tokens_per_s": statistics.median(r[0] for r in results),
                "decode_tokens_per_s": statistics.median(r[1] for r in results),
            }
        )
        log(f"  {rows[-1]}")
    return rows


# ---- memory (one fresh process per point) -----------------------------------------------------------


def probe_memory(spec: dict[str, Any]) -> dict[str, Any]:
    """Run inside a child process: decode ``spec["length"]`` tokens, report cache bytes and RSS growth."""
    single_thread()
    prompt = np.random.default_rng(0).integers(3, 500, (1, MEMORY_PROMPT))
    if spec["runtime"] == "onnx":
        lm = OnnxCausalLM(spec["path"], provider="cpu", kv_cache=spec["kv_cache"], threads=1)
        lm.generate(prompt, max_new_tokens=8)  # warm-up: sessions and arenas exist before the baseline
        with RssPeak() as peak:
            state = lm.generate(prompt, max_new_tokens=spec["length"]).state
        cache_bytes, stored = state.nbytes(), max(state.physical_lengths())
    else:
        model = load_model(spec["path"], kv_cache=spec["kv_cache"])
        _torch_decode(model, torch.from_numpy(prompt), 8)
        with RssPeak() as peak:
            cache = _torch_decode(model, torch.from_numpy(prompt), spec["length"])
        cache_bytes = sum(
            value.numel() * value.element_size()
            for layer in cache.layers
            for value in vars(layer).values()
            if isinstance(value, torch.Tensor)
        )
        stored = max(layer.keys.shape[-2] for layer in cache.layers)
    return {"cache_bytes": cache_bytes, "cache_tokens_per_slot": stored, "peak_rss_growth_bytes": peak.growth}


def _torch_decode(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Any:
    """``new_tokens`` greedy tokens, fed back as ``generate()`` does (the last one is never fed)."""
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        for _ in range(new_tokens - 1):
            out = model(
                input_ids=out.logits[:, -1:].argmax(-1), past_key_values=out.past_key_values, use_cache=True
            )
    return out.past_key_values


class RssPeak:
    """Highest resident set size while the block runs minus the RSS at its start (sampled every 2 ms).

    ``ru_maxrss`` cannot be used: its high-water mark is set by imports and model loading, long before a
    few MiB of cache are allocated.
    """

    PAGE = resource.getpagesize()

    def __enter__(self) -> RssPeak:
        self.start = self.highest = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        self.thread.join()
        self.highest = max(self.highest, self._rss())
        self.growth = self.highest - self.start

    def _sample(self) -> None:
        while self.running:
            self.highest = max(self.highest, self._rss())
            time.sleep(0.002)

    @classmethod
    def _rss(cls) -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * cls.PAGE


def memory_rows(ckpt: Path, plain: Path, evicting: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for length in args.lengths:
        for runtime, path, policy, label in (
            ("onnx", plain, None, "full cache"),
            ("onnx", evicting, a2sf(args.budget), f"A2SF budget {args.budget}"),
            ("torch", ckpt, None, "full cache"),
            ("torch", ckpt, a2sf(args.budget), f"A2SF budget {args.budget}"),
        ):
            spec = {"runtime": runtime, "path": str(path), "kv_cache": policy, "length": length}
            child = subprocess.run(
                [sys.executable, __file__, "--probe-memory", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(child.stdout.strip().splitlines()[-1])
            rows.append(
                {
                    "runtime": "ONNX Runtime CPU" if runtime == "onnx" else "PyTorch",
                    "cache": label,
                    "generated": length,
                    **result,
                }
            )
            log(f"  {rows[-1]}")
    return rows


# ---- driver -----------------------------------------------------------------------------------------


def prepare(name: str, work: Path) -> tuple[Path, Path, Path]:
    ckpt, plain, evicting = work / f"{name}-ckpt", work / f"{name}-onnx", work / f"{name}-onnx-cache-op"
    if not ckpt.exists():
        convert(MODELS[name], ckpt, PipelineSpec(), ConvertOptions(quiet=True))
    for out, cache_op in ((plain, False), (evicting, True)):
        if not out.exists():
            export_onnx(ckpt, out, OnnxExportOptions(cache_op=cache_op, quiet=True))
    return ckpt, plain, evicting


def tables(data: dict[str, Any]) -> str:
    lines = [
        f"Speed (batch 1, one thread, prompt {data['prompt']} tokens, {data['new_tokens']} decoded tokens, "
        "medians; tokens/s):",
        "",
        "| model | runtime | cache | prefill tok/s | decode tok/s |",
        "|---|---|---|---:|---:|",
    ]
    for model, result in data["models"].items():
        for row in result["speed"]:
            lines.append(
                f"| {model} | {row['runtime']} | {row['cache']} | {row['prefill_tokens_per_s']:,.0f} | "
                f"{row['decode_tokens_per_s']:,.0f} |"
            )
    lines += [
        "",
        f"Memory after a {MEMORY_PROMPT}-token prompt and N generated tokens (KV cache held at the end / growth of "
        "the process's peak RSS during the generation, MiB):",
        "",
        "| model | runtime | cache | " + " | ".join(f"N={n}" for n in data["lengths"]) + " |",
        "|---|---|---|" + "---:|" * len(data["lengths"]),
    ]
    for model, result in data["models"].items():
        keys = dict.fromkeys((row["runtime"], row["cache"]) for row in result["memory"])
        for runtime, cache in keys:
            cells = [
                f"{row['cache_bytes'] / 2**20:.2f} / {row['peak_rss_growth_bytes'] / 2**20:.1f}"
                for n in data["lengths"]
                for row in result["memory"]
                if row["generated"] == n and (row["runtime"], row["cache"]) == (runtime, cache)
            ]
            lines.append(f"| {model} | {runtime} | {cache} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="stories260K,pycoder-8m")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=int, default=64, help="A2SF token budget per cache slot")
    parser.add_argument("--lengths", default="256,1024,2048", help="generated lengths for the memory curve")
    parser.add_argument(
        "--work", type=Path, help="keep checkpoints and exports here (default: a temporary dir)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "onnx.json")
    parser.add_argument("--probe-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_memory:
        print(json.dumps(probe_memory(json.loads(args.probe_memory))))
        return
    args.lengths = [int(n) for n in args.lengths.split(",")]
    single_thread()
    data = {
        "environment": environment(),
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "budget": args.budget,
        "lengths": args.lengths,
        "threads": 1,
        "models": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            log(f"{name}: converting and exporting")
            paths = prepare(name, work)
            log(f"{name}: speed")
            speed = speed_rows(*paths, args)
            log(f"{name}: memory")
            data["models"][name] = {"speed": speed, "memory": memory_rows(*paths, args)}
    write_json(args.out, data)
    print(tables(data))


if __name__ == "__main__":
    main()
