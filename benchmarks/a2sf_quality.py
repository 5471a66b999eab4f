"""Quality under KV-cache eviction: A2SF at several alphas vs H2O vs StreamingLLM vs the full cache.

Run from the repository root (about 12 minutes on one CPU core with the defaults; ``--render`` redraws
the plot and tables from an earlier run's JSON)::

    .venv/bin/python benchmarks/a2sf_quality.py                  # both models, every measurement
    .venv/bin/python benchmarks/a2sf_quality.py --models stories260K --mc-limit 20

Writes ``benchmarks/results/a2sf_quality.json`` and ``a2sf_quality.png`` (quality vs budget per policy)
and prints the Markdown tables that go into the README.

Protocol (``converter.evaluation``'s decode protocol; one forward per window would never see eviction):

* Perplexity: ``--windows`` windows of ``--prompt + --continuation`` tokens sampled from each source
  (``calibration.sample_windows``, seed 0). The prompt is prefilled in one forward -- the cache then evicts
  down to its budget, a fraction of the prompt -- and the continuation is decoded token by token
  (``--chunk 1``) through the cache, teacher-forced, and scored. The full-cache number scores the same
  tokens in one forward.
* Multiple choice (``../shared/data/evals``, first ``--mc-limit`` examples per task, zero-shot, each
  choice scored by log-likelihood as lm-eval does): the question/context is the prompt (prefilled, then
  evicted down to the budget) and each choice is scored against that compressed cache, ``--mc-chunk``
  tokens per forward (default 64: the whole choice in one forward -- prompt compression, A2SF's own
  zero-shot setting, and affordable on a CPU; 1 would also evict while the choice is read). Budgets are
  fractions of the prompt, so on short prompts they are a handful of tokens (``prompt_tokens`` in the
  JSON says how many); the choice's first token is predicted before anything is evicted, as in
  ``generate()``. Besides accuracy,
  ``agreement`` is the share of examples where the evicting run picks the same answer as the full cache:
  it still measures the damage when the model is near chance.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from a2sf_common import (
    FULL,
    MODELS,
    POLICIES,
    RESULTS,
    SHARED,
    cache_factory,
    environment,
    log,
    single_thread,
    write_json,
)
from slimformer.converter.calibration import sample_windows
from slimformer.converter.conversion import load_model
from slimformer.converter.evaluation import eviction_perplexity_of_tokens, multiple_choice_accuracy
from slimformer.converter.tokenizer import load_tokenizer

PPL_SOURCES = {
    "pycode valid": SHARED / "data" / "pycode" / "valid.txt.gz",
    "wikitext2 test": SHARED / "data" / "wikitext2" / "wiki.test.raw",
}
EVALS = SHARED / "data" / "evals"
TASKS = ("arc_easy", "arc_challenge", "boolq", "copa", "openbook_qa", "piqa", "winogrande")


def budget_key(ratio: float) -> str:
    return f"{ratio:.0%}"


def perplexities(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Every policy x budget on the same windows; the first run also scores them with the full cache."""
    out: dict[str, Any] = {}
    for name, fields in POLICIES.items():
        out[name] = {}
        for ratio in args.budgets:
            result = eviction_perplexity_of_tokens(
                model,
                ids,
                prompt_len=args.prompt,
                continuation=args.continuation,
                chunk=args.chunk,
                batch_size=args.windows,
                cache_factory=cache_factory({**fields, "budget_ratio": ratio}),
                full_cache=FULL not in out,
            )
            if FULL not in out:
                out[FULL] = {"perplexity": result.full_cache_perplexity, "nll": result.full_cache_nll}
            full = out[FULL]["perplexity"]
            out[name][budget_key(ratio)] = {
                "perplexity": result.perplexity,
                "increase_pct": 100.0 * (result.perplexity / full - 1.0),
                "cache_tokens": result.cache_tokens,
            }
            log(
                f"  {name:<11} {budget_key(ratio):>4}: ppl {result.perplexity:9.3f} ({out[name][budget_key(ratio)]['increase_pct']:+.2f}%)"
            )
    return out


def prompt_tokens(tokenizer: Any, path: Path, limit: int) -> float:
    """Mean tokens of the prompt (query, or Winogrande's first context option) over the examples used."""
    lengths = []
    with path.open() as handle:
        for line in handle:
            if len(lengths) == limit:
                break
            record = json.loads(line)
            text = record["query"] if "query" in record else record["context_options"][0]
            lengths.append(len(tokenizer(text)["input_ids"]))
    return statistics.fmean(lengths)


def multiple_choice(model: torch.nn.Module, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task in args.tasks:
        path = EVALS / f"{task}.jsonl"
        full = multiple_choice_accuracy(model, tokenizer, str(path), limit=args.mc_limit)
        record: dict[str, Any] = {
            "n": full.n,
            "prompt_tokens": prompt_tokens(tokenizer, path, args.mc_limit),
            FULL: {"acc": full.acc, "acc_norm": full.acc_norm, "agreement": 1.0},
        }
        for name, fields in POLICIES.items():
            record[name] = {}
            for ratio in args.budgets:
                result = multiple_choice_accuracy(
                    model,
                    tokenizer,
                    str(path),
                    limit=args.mc_limit,
                    decode_chunk=args.mc_chunk,
                    cache_factory=cache_factory({**fields, "budget_ratio": ratio}),
                )
                agreement = statistics.fmean(a == b for a, b in zip(result.predictions, full.predictions))
                record[name][budget_key(ratio)] = {
                    "acc": result.acc,
                    "acc_norm": result.acc_norm,
                    "agreement": agreement,
                }
        log(f"  {task}: full acc {full.acc:.3f}, prompt {record['prompt_tokens']:.0f} tokens")
        out[task] = record
    return out


def mc_summary(tasks: dict[str, Any], budgets: list[float]) -> dict[str, Any]:
    """Mean over tasks of acc and agreement, per policy and budget."""

    def mean(policy: str, key: str, budget: str | None) -> float:
        return statistics.fmean(
            (r[policy] if budget is None else r[policy][budget])[key] for r in tasks.values()
        )

    summary: dict[str, Any] = {FULL: {"acc": mean(FULL, "acc", None), "agreement": 1.0}}
    for name in POLICIES:
        summary[name] = {
            budget_key(b): {key: mean(name, key, budget_key(b)) for key in ("acc", "agreement")}
            for b in budgets
        }
    return summary


# ---- presentation ---------------------------------------------------------------------------------------


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(data["models"])
    panels = [(f"ppl +% ({source})", "perplexity", source) for source in PPL_SOURCES] + [
        ("MC agreement with full cache", "multiple_choice_summary", None)
    ]
    fig, axes = plt.subplots(
        len(models), len(panels), figsize=(4.2 * len(panels), 3.3 * len(models)), squeeze=False
    )
    budgets = data["protocol"]["budgets"]
    for row, model in enumerate(models):
        for col, (title, section, source) in enumerate(panels):
            ax = axes[row][col]
            block = data["models"][model].get(section)
            if not block:
                ax.set_axis_off()
                continue
            for name in POLICIES:
                if source is not None:
                    values = [block[source][name][budget_key(b)]["increase_pct"] for b in budgets]
                else:
                    values = [100 * block[name][budget_key(b)]["agreement"] for b in budgets]
                ax.plot([100 * b for b in budgets], values, marker="o", label=name)
            ax.axhline(0 if source is not None else 100, color="black", lw=0.8, ls="--", label=FULL)
            ax.set_title(f"{model}: {title}", fontsize=9)
            ax.set_xlabel("cache budget (% of prompt)")
            ax.set_xticks([100 * b for b in budgets])
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def markdown(data: dict[str, Any]) -> str:
    budgets = [budget_key(b) for b in data["protocol"]["budgets"]]
    lines = []
    for model, block in data["models"].items():
        for source, table in block.get("perplexity", {}).items():
            lines += [
                f"**{model}, perplexity on {source}** (full cache {table[FULL]['perplexity']:.3f}; "
                "change under eviction, budget = % of the prompt)",
                "",
                "| policy | " + " | ".join(budgets) + " |",
                "|---|" + "---:|" * len(budgets),
            ]
            for name in POLICIES:
                cells = [
                    f"{table[name][b]['perplexity']:.2f} ({table[name][b]['increase_pct']:+.1f}%)"
                    for b in budgets
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
        summary = block.get("multiple_choice_summary")
        if summary:
            tasks = block["multiple_choice"]
            sizes = ", ".join(f"{t} {r['prompt_tokens']:.0f}" for t, r in tasks.items())
            lines += [
                f"**{model}, zero-shot multiple choice** (mean over {len(tasks)} tasks, "
                f"{data['protocol']['mc_limit']} examples each; full-cache accuracy {summary[FULL]['acc']:.3f}). "
                f"Cells: accuracy / agreement with the full cache's answers. Mean prompt tokens: {sizes}.",
                "",
                "| policy | " + " | ".join(budgets) + " |",
                "|---|" + "---:|" * len(budgets),
            ]
            for name in POLICIES:
                cells = [
                    f"{summary[name][b]['acc']:.3f} / {summary[name][b]['agreement']:.2f}" for b in budgets
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="pycoder-8m,stories260K", help="comma-separated: " + ", ".join(MODELS)
    )
    parser.add_argument("--budgets", default="0.1,0.2,0.5", help="cache budgets as fractions of the prompt")
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows per source (one batch)")
    parser.add_argument("--prompt", type=int, default=384, help="prompt tokens per perplexity window")
    parser.add_argument("--continuation", type=int, default=64, help="decoded, scored tokens per window")
    parser.add_argument(
        "--chunk", type=int, default=1, help="continuation tokens per forward (1 = token by token)"
    )
    parser.add_argument(
        "--mc-limit", type=int, default=20, help="examples per multiple-choice task (0 = skip)"
    )
    parser.add_argument("--mc-chunk", type=int, default=64, help="choice tokens per forward after the prompt")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", action="store_true", help="only redraw the plot and tables from the JSON in --out"
    )
    args = parser.parse_args()
    if args.render:
        data = json.loads((args.out / "a2sf_quality.json").read_text())
        plot(data, args.out / "a2sf_quality.png")
        print(markdown(data))
        return
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.tasks = [t for t in args.tasks.split(",") if t]
    single_thread()

    data: dict[str, Any] = {
        "environment": environment(),
        "protocol": {
            "budgets": args.budgets,
            "windows": args.windows,
            "prompt": args.prompt,
            "continuation": args.continuation,
            "chunk": args.chunk,
            "mc_limit": args.mc_limit,
            "mc_chunk": args.mc_chunk,
            "tasks": args.tasks,
            "policies": POLICIES,
            "window_seed": 0,
        },
        "models": {},
    }
    for model_name in args.models.split(","):
        path = MODELS[model_name]
        model, tokenizer = load_model(path), load_tokenizer(path)
        block: dict[str, Any] = {"perplexity": {}}
        for source, spec in PPL_SOURCES.items():
            log(f"{model_name}: perplexity on {source}")
            ids = sample_windows(tokenizer, str(spec), args.windows, args.prompt + args.continuation, seed=0)
            block["perplexity"][source] = perplexities(model, ids, args)
        if args.mc_limit:
            log(f"{model_name}: multiple choice, {args.mc_limit} examples per task")
            block["multiple_choice"] = multiple_choice(model, tokenizer, args)
            block["multiple_choice_summary"] = mc_summary(block["multiple_choice"], args.budgets)
        data["models"][model_name] = block
        write_json(args.out / "a2sf_quality.json", data)  # after each model, so a cut-short run keeps results
    plot(data, args.out / "a2sf_quality.png")
    print(markdown(data))


if __name__ == "__main__":
    main()
