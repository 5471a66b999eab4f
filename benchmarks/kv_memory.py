"""Resident memory of a long generation under every eviction policy: flat beyond the budget?

One process per policy (so one policy's allocations never hide another's), each generating ``--tokens``
greedy tokens after a 64-token random prompt at ``--budget`` tokens per slot, sampling the resident set
size every 512 steps (``kv_decode_step.memory_curve``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_memory.py --model pycoder-8m --tokens 8192

Writes ``benchmarks/results/kv_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from kv_decode_step import POLICIES, RESULTS, memory_curve, model_dir  # noqa: E402


def one(model_name: str, policy: str, budget: int, tokens: int) -> list[dict[str, float]]:
    import torch
    from slimformer.converter.conversion import load_model

    torch.set_num_threads(1)
    model = load_model(model_dir(model_name))
    model.eval()
    return memory_curve(model, budget, tokens, policy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pycoder-8m")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--parallel", type=int, default=2, help="policies measured at once (one thread each)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this policy, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.one, args.budget, args.tokens)))
        return
    policies = args.policies.split(",")
    common = ["--model", args.model, "--budget", str(args.budget), "--tokens", str(args.tokens)]
    curves: dict[str, list] = {}
    for start in range(0, len(policies), args.parallel):
        batch = policies[start : start + args.parallel]
        runs = {
            p: subprocess.Popen(
                [sys.executable, __file__, "--one", p, *common], stdout=subprocess.PIPE, text=True
            )
            for p in batch
        }
        for policy, run in runs.items():
            out, _ = run.communicate()
            if run.returncode:
                raise SystemExit(f"{policy}: exit {run.returncode}")
            curves[policy] = json.loads(out.strip().splitlines()[-1])
    result = {
        "model": args.model,
        "budget": args.budget,
        "tokens": args.tokens,
        "curves": curves,
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kv_memory.py " + " ".join(sys.argv[1:]),
    }
    lines = [
        f"# Resident memory over {args.tokens:,} generated tokens ({args.model}, budget {args.budget})",
        "",
        f"Command: `{result['command']}`; one process per policy, RSS sampled every 512 steps.",
        "",
        "| policy | RSS MiB at 512 | at the end | max - min | kept / stored per slot at the end |",
        "|---|---:|---:|---:|---|",
    ]
    for policy, curve in curves.items():
        rss = [point["rss_mib"] for point in curve]
        lines.append(
            f"| {policy} | {rss[0]:.1f} | {rss[-1]:.1f} | {max(rss) - min(rss):.1f} | "
            f"{curve[-1]['kept']} / {curve[-1]['stored']} |"
        )
    out = RESULTS / "kv_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
