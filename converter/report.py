"""The pass report: ``report.json`` (machine-readable), ``report.md`` + ``layers.png`` (for people), and
a terminal summary (``slimformer report OUT``).

The JSON is the source of truth; the Markdown and the terminal view are rendered from it, so a report
from an older run renders the same way.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

REPORT_JSON, REPORT_MD, LAYERS_PNG = "report.json", "report.md", "layers.png"


def versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    from . import __version__

    return {
        "slimformer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
    }


def write_report(report: dict[str, Any], directory: Path) -> None:
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    plots = list(report.get("plots", []))
    if report.get("layers"):
        plot_layers(report, directory / LAYERS_PNG)
        plots.insert(0, LAYERS_PNG)
    (directory / REPORT_MD).write_text(render_markdown(report, plots))


def load_report(directory: str | Path) -> dict[str, Any]:
    from .errors import SlimformerError

    path = Path(directory) / REPORT_JSON
    if not path.is_file():
        raise SlimformerError("no report.json in this directory", where=str(directory),
                              fix="point at a directory written by `slimformer convert`")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SlimformerError(f"report.json is not valid JSON: {exc}", where=str(path), fix="re-run the conversion") from exc


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _ratio(before: float, after: float) -> str:
    if not before:
        return "n/a"
    return f"{100.0 * (after - before) / before:+.1f}%"


def headline_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows = [
        ("parameters", f"{report['params_before']:,}", f"{report['params_after']:,}",
         _ratio(report["params_before"], report["params_after"])),
        ("KV cache bytes/token (fp32)", f"{report['kv_bytes_per_token_before']:,}", f"{report['kv_bytes_per_token_after']:,}",
         _ratio(report["kv_bytes_per_token_before"], report["kv_bytes_per_token_after"])),
    ]
    evaluation = report.get("evaluation") or {}
    before, after = evaluation.get("perplexity_before"), evaluation.get("perplexity_after")
    if before is not None and after is not None:
        rows.append((f"perplexity ({evaluation.get('source')})", f"{before:.3f}", f"{after:.3f}", _ratio(before, after)))
    for record in report.get("passes", []):
        # Perplexity above scores each window in one forward, which never evicts; the a2sf pass measures the
        # cost of eviction itself (prompt prefilled, continuation decoded through the evicting cache).
        evicted = (record.get("changes") or {}).get("eviction_perplexity")
        if evicted and evicted.get("full_cache_perplexity") is not None:
            rows.append(("perplexity: full cache -> KV eviction", f"{evicted['full_cache_perplexity']:.3f}",
                         f"{evicted['perplexity']:.3f}", f"{evicted['increase_pct']:+.1f}%"))
    return rows


def _describe_cache(policy: dict[str, Any]) -> str:
    """One cell's worth of a cache slot's policy, e.g. ``KV a2sf: 64 tokens (sink 0, recent 48), alpha 0.9``."""
    if "budget_ratio" in policy:
        size = f"{policy['budget_ratio']:.0%} of the prompt"
    else:
        size = f"{policy.get('budget')} tokens"
    parts = [f"{key} {policy[key]:.0%}" if key == "recent_ratio" else f"{key} {policy[key]}"
             for key in ("sink", "recent", "recent_ratio") if key in policy]
    text = f"KV {policy.get('policy')}: {size}" + (f" ({', '.join(parts)})" if parts else "")
    return text + (f", alpha {policy['alpha']}" if "alpha" in policy else "")


def _layer_notes(layer: dict[str, Any]) -> list[str]:
    notes = [str(layer[key]) for key in ("attention_reason", "mlp_reason") if key in layer]
    if "attention_form" in layer:
        notes.append(f"attention form {layer['attention_form']}")
    if "cache_policy" in layer:
        notes.append(_describe_cache(layer["cache_policy"]))
    return notes


def render_markdown(report: dict[str, Any], plots: list[str] | None = None) -> str:
    lines = [f"# slimformer report: {report['source']['spec']}", ""]
    lines += [f"Family **{report['source']['family']}**, {report['source']['num_layers']} layers. "
              f"Output written {report.get('created', '')}.", ""]
    lines += ["| | before | after | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline_rows(report)]
    lines += ["", "## Passes", ""]
    if not report["passes"]:
        lines.append("Identity pipeline: no pass changed the model.")
    for record in report["passes"]:
        params = ", ".join(f"{k}={v}" for k, v in record["params"].items()) or "defaults"
        lines.append(f"### {record['name']} ({params}) -- {record['duration_s']:.2f} s")
        lines.append("")
        for note in record.get("changes", {}).get("notes", []):
            lines.append(f"- {note}")
        lines.append("")
    lines += ["## Layers", "", "| layer | attention | MLP | notes |", "|---:|---|---|---|"]
    for layer in report["layers"]:
        notes = "; ".join(_layer_notes(layer))
        lines.append(f"| {layer['layer']} | {layer['attention']} | {layer['mlp']} | {notes} |")
    for plot in plots or []:
        lines += ["", f"![{plot}]({plot})"]
    speed = report.get("speed")
    if speed:
        lines += ["", "## Speed", "", "| | prefill tok/s | decode tok/s |", "|---|---:|---:|"]
        for key in ("before", "after"):
            if key in speed:
                lines.append(f"| {key} | {speed[key]['prefill_tokens_per_s']:.1f} | {speed[key]['decode_tokens_per_s']:.1f} |")
    lines += ["", "## Versions", ""] + [f"- {k} {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def render_terminal(report: dict[str, Any]) -> str:
    rows = headline_rows(report)
    width = max(len(row[0]) for row in rows)
    out = [f"slimformer report -- {report['source']['spec']} ({report['source']['family']}, "
           f"{report['source']['num_layers']} layers)", ""]
    out.append(f"{'':<{width}} {'before':>14} {'after':>14} {'change':>9}")
    for name, before, after, change in rows:
        out.append(f"{name:<{width}} {before:>14} {after:>14} {change:>9}")
    out.append("")
    if report["passes"]:
        for record in report["passes"]:
            params = ", ".join(f"{k}={v}" for k, v in record["params"].items())
            out.append(f"pass {record['name']} ({params}) {record['duration_s']:.2f}s")
            out += [f"  - {note}" for note in record.get("changes", {}).get("notes", [])]
    else:
        out.append("identity pipeline (no passes)")
    out.append("")
    out.append("layer  attention  mlp")
    for layer in report["layers"]:
        out.append(f"{layer['layer']:>5}  {layer['attention']:<9}  {layer['mlp']}")
    return "\n".join(out)


def plot_layers(report: dict[str, Any], path: Path) -> None:
    """A two-row map of the blocks: which attention and MLP sub-blocks were kept, dropped or replaced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    states = {"kept": 0, "replaced": 1, "dropped": 2}
    layers = report["layers"]
    grid = [[states[layer["attention"]] for layer in layers], [states[layer["mlp"]] for layer in layers]]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(layers) + 1.5), 1.9))
    ax.imshow(grid, cmap=ListedColormap(["#4c9a5b", "#e0a526", "#c9c9c9"]), vmin=0, vmax=2, aspect="auto")
    ax.set_yticks([0, 1], ["attention", "MLP"])
    ax.set_xticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    ax.set_xlabel("layer (green kept, amber replaced, grey dropped)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
