"""Zero-shot multiple-choice accuracy of SmolLM2-135M-Instruct after layer drop and under A2SF KV eviction.

Run from the repository root, on one thread (resumable: every finished (subject, task) cell is kept in the
JSON, and a rerun with the same settings skips it)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zero_shot_smollm2.py --limit 300
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/zero_shot_smollm2.py --limit 20 --tasks copa,arc_easy \\
        --out /tmp/probe.json                                     # a small run, to time things first
    .venv/bin/python benchmarks/zero_shot_smollm2.py --render    # the Markdown table again, from the JSON

Writes ``benchmarks/results/zero_shot_smollm2.json`` (settings, every cell with its per-example
correctness, CPU seconds, versions) and ``zero_shot_smollm2.md`` (the tables).

Subjects (all on the first ``--limit`` examples of each task in ``../shared/data/evals``):

* ``original`` -- the model as it is, every choice scored in one forward (lm-eval's protocol,
  ``multiple_choice_accuracy``).
* ``attn:4`` (and, on request, ``attn:8``) -- the ``layer_drop`` pass one-shot through
  ``slimformer.converter.conversion.convert``: attention sub-blocks scored on 32 x 256 tokens of WikiText-2
  valid, the most redundant 4 (8) dropped together. No healing (too expensive here). Converted once into
  ``--workdir``.
* ``a2sf @20%`` / ``a2sf @50%`` -- the original weights with an evicting KV cache (alpha 1, half of the
  budget as the recent window: today's defaults, so also what ``policy=a2sf`` with no alpha/recent gives),
  under the decode protocol
  (``decode_chunk``): the question is the prompt, prefilled and evicted down to ``budget_ratio`` of its
  length, then each choice is fed ``--chunk`` tokens per forward through that cache and scored. The first
  token of every choice is predicted by the prefill, before anything is evicted (as in ``generate()``), so
  a task whose choices are single tokens (boolq's "yes"/"no") cannot change.

Each subject is compared with ``original`` example by example: the difference of accuracies with a 95%
paired-bootstrap interval (examples resampled with replacement, the same resample for both subjects). The
average over tasks is the unweighted mean of the task accuracies; its interval resamples every task's
examples independently (stratified), the mean of the per-task differences each time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from a2sf_common import RESULTS, SHARED, cache_factory, environment, log, single_thread  # noqa: E402
from slimformer.converter.conversion import ConvertOptions, convert, load_model  # noqa: E402
from slimformer.converter.evaluation import multiple_choice_accuracy  # noqa: E402
from slimformer.converter.pipeline import PipelineSpec  # noqa: E402
from slimformer.converter.runtime.kv_policies import DEFAULT_ALPHA, DEFAULT_RECENT_RATIO  # noqa: E402
from slimformer.converter.tokenizer import load_tokenizer  # noqa: E402
from smollm2 import cache_root, smollm2_dir  # noqa: E402

EVALS = SHARED / "data" / "evals"
TASKS = ("arc_easy", "arc_challenge", "piqa", "winogrande", "openbook_qa", "copa", "boolq")
WIKI_VALID = str(SHARED / "data" / "wikitext2" / "wiki.valid.tokens")
CALIBRATION = {"sources": [WIKI_VALID], "samples": 32, "seq_len": 256, "seed": 0}
ORIGINAL = "original"
DROPS = {"attn:4": "attn:4", "attn:8": "attn:8"}  # attn:8 only when --subjects names it
# A2SF subjects: CachePolicy fields (alpha 1.0, half of the budget as the recent window).
A2SF_20 = "a2sf @20%"
A2SF_50 = "a2sf @50%"
EVICTION = {
    A2SF_20: {"policy": "a2sf", "alpha": 1.0, "recent_ratio": 0.5, "budget_ratio": 0.2},
    A2SF_50: {"policy": "a2sf", "alpha": 1.0, "recent_ratio": 0.5, "budget_ratio": 0.5},
}
# Most important first: a run cut short still has the original and the harshest budget everywhere.
SUBJECTS = (ORIGINAL, A2SF_20, "attn:4", A2SF_50)
KNOWN = (*SUBJECTS, "attn:8")
OUT = RESULTS / "zero_shot_smollm2.json"


# ---- paired bootstrap over examples ------------------------------------------------------------------
def _resample(n: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (samples, n), generator=generator)


def paired_difference(
    a: list[list[int]], b: list[list[int]], samples: int = 10000, seed: int = 0
) -> dict[str, Any]:
    """Mean over tasks of (accuracy of b - accuracy of a), with its 95% paired-bootstrap interval.

    ``a[t]`` / ``b[t]`` are task t's per-example 0/1 correctness, in the same example order. One task gives
    the plain paired interval; several resample each task's examples on their own (stratified)."""
    generator = torch.Generator().manual_seed(seed)
    point, draws = 0.0, torch.zeros(samples, dtype=torch.float64)
    for task_a, task_b in zip(a, b, strict=True):
        if len(task_a) != len(task_b):
            raise ValueError("a paired comparison needs the same examples for both subjects")
        diff = torch.tensor(task_b, dtype=torch.float64) - torch.tensor(task_a, dtype=torch.float64)
        point += float(diff.mean())
        draws += diff[_resample(len(diff), samples, generator)].mean(1)
    point, draws = point / len(a), draws / len(a)
    low, high = torch.quantile(draws, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"diff": point, "ci95": [low, high], "bootstrap_samples": samples}


# ---- subjects --------------------------------------------------------------------------------------
def dropped_checkpoint(drop: str, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The layer_drop conversion of SmolLM2 (one-shot), written once into ``workdir`` and reused."""
    out = workdir / f"smollm2-{drop.replace(':', '')}-calib{CALIBRATION['samples']}x{CALIBRATION['seq_len']}"
    if not (out / "report.json").is_file():
        spec = PipelineSpec.from_dict(
            {"passes": [{"name": "layer_drop", "drop": drop}], "calibration": dict(CALIBRATION)}
        )
        log(f"converting {drop} -> {out}")
        started, cpu = time.perf_counter(), time.process_time()
        convert(smollm2_dir(), out, spec, ConvertOptions(quiet=True, overwrite=True))
        log(f"  converted in {time.perf_counter() - started:.0f}s wall, {time.process_time() - cpu:.0f}s CPU")
    report = json.loads((out / "report.json").read_text())
    dropped = [
        f"{kind}:{layer['layer']}"
        for layer in report["layers"]
        for kind in ("attention", "mlp")
        if layer.get(kind) == "dropped"
    ]
    return out, {
        "checkpoint": str(out),
        "dropped": dropped,
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "kv_bytes_per_token_after": report["kv_bytes_per_token_after"],
        "pass_seconds": report["passes"][0]["duration_s"],
    }


def scorer(subject: str, args: argparse.Namespace) -> tuple[Callable[[str], Any], dict[str, Any]]:
    """A function task -> MCResult for ``subject``, and what describes the subject in the JSON."""
    if subject in DROPS:
        path, info = dropped_checkpoint(DROPS[subject], args.workdir)
    else:
        path, info = smollm2_dir(), {"checkpoint": str(smollm2_dir())}
    model = load_model(path)
    tokenizer = load_tokenizer(path)
    kwargs: dict[str, Any] = {"limit": args.limit, "batch_size": args.batch_size}
    if subject in EVICTION:
        kwargs.update(cache_factory=cache_factory(EVICTION[subject]), decode_chunk=args.chunk)
        info.update(kv_cache=EVICTION[subject], protocol=f"decode, chunk {args.chunk}")
    else:
        info.update(protocol="one forward per choice")
    return lambda task: multiple_choice_accuracy(
        model, tokenizer, str(EVALS / f"{task}.jsonl"), **kwargs
    ), info


def cell_settings(subject: str, args: argparse.Namespace) -> dict[str, Any]:
    """What a cell's numbers depend on: a stored cell is reused only when these match."""
    settings: dict[str, Any] = {"limit": args.limit}
    if subject in EVICTION:
        settings.update(chunk=args.chunk, kv_cache=EVICTION[subject])
    if subject in DROPS:
        settings.update(drop=DROPS[subject], calibration=CALIBRATION)
    return settings


def measure(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    data.setdefault("cells", {})
    data.setdefault("subjects", {})
    data["settings"] = {
        "limit": args.limit,
        "chunk": args.chunk,
        "batch_size": args.batch_size,
        "tasks": list(args.tasks),
        "evals": str(EVALS),
        "calibration": CALIBRATION,
        "eviction": EVICTION,
        # What policy=a2sf resolves to when alpha / recent are not given, in the runtime that measured.
        "a2sf_defaults": {"alpha": DEFAULT_ALPHA, "recent_ratio": DEFAULT_RECENT_RATIO},
        "bootstrap": "paired over examples, 10000 resamples, seed 0; average: stratified by task",
    }
    for subject in args.subjects:
        cells = data["cells"].setdefault(subject, {})
        todo = [t for t in args.tasks if cells.get(t, {}).get("settings") != cell_settings(subject, args)]
        if not todo:
            log(f"{subject}: every task already measured")
            continue
        started, cpu = time.perf_counter(), time.process_time()
        score, info = scorer(subject, args)
        data["subjects"][subject] = {**info, "setup_cpu_s": round(time.process_time() - cpu, 1)}
        log(f"{subject}: ready in {time.perf_counter() - started:.0f}s; tasks {', '.join(todo)}")
        for task in todo:
            started, cpu = time.perf_counter(), time.process_time()
            result = score(task)
            cells[task] = {
                "settings": cell_settings(subject, args),
                **{k: v for k, v in result.to_dict().items() if k not in ("predictions", "norm_predictions")},
                "correct": [int(p == g) for p, g in zip(result.predictions, result.golds)],
                "correct_norm": [int(p == g) for p, g in zip(result.norm_predictions, result.golds)],
                "predictions": list(result.predictions),
                "wall_s": round(time.perf_counter() - started, 1),
                "cpu_s": round(time.process_time() - cpu, 1),
                "load_average": os.getloadavg(),
            }
            log(
                f"  {subject} / {task}: acc {result.acc:.3f} acc_norm {result.acc_norm:.3f} (n={result.n}) "
                f"{cells[task]['cpu_s']:.0f}s CPU"
            )
            data["environment"] = environment()
            write_atomically(args.out, data)
    data["comparisons"] = comparisons(data, args.tasks)
    data["cpu_s_total"] = round(sum(c["cpu_s"] for s in data["cells"].values() for c in s.values()), 1)
    write_atomically(args.out, data)
    return data


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---- comparisons and rendering ---------------------------------------------------------------------
def comparisons(data: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """Every subject against the original: per task and averaged, for acc and acc_norm."""
    base = data["cells"].get(ORIGINAL, {})
    out: dict[str, Any] = {}
    for subject, cells in data["cells"].items():
        if subject == ORIGINAL:
            continue
        shared = [t for t in tasks if t in cells and t in base and cells[t]["n"] == base[t]["n"]]
        if not shared:
            continue
        out[subject] = {}
        for metric in ("correct", "correct_norm"):
            per_task = {t: paired_difference([base[t][metric]], [cells[t][metric]]) for t in shared}
            if set(shared) == set(tasks):
                per_task["average"] = paired_difference(
                    [base[t][metric] for t in shared], [cells[t][metric] for t in shared]
                )
            out[subject][metric] = per_task
        out[subject]["agreement"] = {
            t: statistics.fmean(a == b for a, b in zip(base[t]["predictions"], cells[t]["predictions"]))
            for t in shared
        }
    return out


def _acc(cell: dict[str, Any], key: str) -> str:
    stderr = cell[f"{key}_stderr"]
    return f"{cell[key]:.3f} ± {stderr:.3f}" if stderr is not None else f"{cell[key]:.3f}"


def _diff(item: dict[str, Any] | None) -> str:
    if item is None:
        return ""
    low, high = item["ci95"]
    return f"{100 * item['diff']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def markdown(data: dict[str, Any]) -> str:
    settings, cells = data["settings"], data["cells"]
    tasks = [t for t in settings["tasks"] if all(t in c for c in cells.values())]
    subjects = [s for s in KNOWN if s in cells] + [s for s in cells if s not in KNOWN]
    calibration = settings["calibration"]
    copa = " (copa has 100)" if settings["limit"] > 100 else ""
    lines = [
        "# Zero-shot accuracy of SmolLM2-135M-Instruct: layer drop and A2SF eviction",
        "",
        f"First {settings['limit']} examples of each task{copa}; zero-shot, each choice scored by "
        "log-likelihood as lm-evaluation-harness does. A2SF subjects use the decode protocol "
        f"(question prefilled and evicted to the budget, choices fed {settings['chunk']} token(s) per forward). "
        f"Layer drop: one-shot, scored on {calibration['samples']} x {calibration['seq_len']} tokens of "
        "WikiText-2 valid, no healing. "
        "Generated by `benchmarks/zero_shot_smollm2.py`.",
    ]
    for metric, key in (("acc", "correct"), ("acc_norm", "correct_norm")):
        lines += ["", f"## {metric} ± stderr", ""]
        lines += ["| subject | " + " | ".join(tasks) + " | average |", "|---|" + "---:|" * (len(tasks) + 1)]
        for subject in subjects:
            row = [_acc(cells[subject][t], metric) for t in tasks]
            mean = statistics.fmean(cells[subject][t][metric] for t in tasks) if tasks else float("nan")
            lines.append(f"| {subject} | " + " | ".join(row) + f" | {mean:.3f} |")
        lines += [
            "",
            f"### {metric}: difference from the original, points [95% paired-bootstrap CI]",
            "",
            "| subject | " + " | ".join(tasks) + " | average |",
            "|---|" + "---:|" * (len(tasks) + 1),
        ]
        for subject, comparison in data.get("comparisons", {}).items():
            row = [_diff(comparison[key].get(t)) for t in [*tasks, "average"]]
            lines.append(f"| {subject} | " + " | ".join(row) + " |")
    lines += ["", "## Agreement with the original (share of examples with the same acc pick)", ""]
    lines += ["| subject | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for subject, comparison in data.get("comparisons", {}).items():
        lines.append(
            f"| {subject} | " + " | ".join(f"{comparison['agreement'][t]:.3f}" for t in tasks) + " |"
        )
    lines += ["", "## Subjects", ""]
    for subject in subjects:
        info = data["subjects"].get(subject, {})
        extra = f", dropped {', '.join(info['dropped'])}" if info.get("dropped") else ""
        cpu = sum(cells[subject][t]["cpu_s"] for t in tasks)
        lines.append(f"* {subject}: {info.get('protocol', '')}{extra}; {cpu:.0f} CPU s for the tasks")
    lines += [
        "",
        f"Total CPU: {data.get('cpu_s_total', 0):.0f} s; torch threads "
        f"{data.get('environment', {}).get('torch_threads')}; versions "
        f"{json.dumps(data.get('environment', {}).get('versions', {}))}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, default=300, help="first N examples of each task")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--subjects", default=",".join(SUBJECTS), help=f"comma-separated, of {KNOWN}")
    parser.add_argument("--chunk", type=int, default=1, help="decode protocol: choice tokens per forward")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=OUT, help="the JSON (the .md is written beside it)")
    parser.add_argument("--workdir", type=Path, default=cache_root() / "zero_shot_smollm2")
    parser.add_argument("--render", action="store_true", help="only redraw the Markdown from the JSON")
    args = parser.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.subjects = [s for s in args.subjects.split(",") if s]
    unknown = sorted(set(args.subjects) - set(KNOWN)) + sorted(set(args.tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"unknown subject(s) or task(s): {unknown}")
    single_thread()
    if args.render:
        data = json.loads(args.out.read_text())
        data["comparisons"] = comparisons(data, data["settings"]["tasks"])
    else:
        args.workdir.mkdir(parents=True, exist_ok=True)
        data = measure(args)
    md = args.out.with_suffix(".md")
    md.write_text(markdown(data))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
