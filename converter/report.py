"""The pass report: ``report.json`` (machine-readable), ``report.md`` + ``layers.png`` and ``report.html``
(for people; :mod:`.report_html`), and a terminal summary (``slimformer report OUT``).

The JSON is the source of truth; the Markdown and the terminal view are rendered from it, so a report
from an older run renders the same way.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

REPORT_JSON, REPORT_MD, LAYERS_PNG = "report.json", "report.md", "layers.png"
# Version of report.json: 1 kept a pass's notes inside its "changes"; 2 has notes, rows, tables and
# warnings beside them (PassResult). Both render.
REPORT_FORMAT = 2


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
    if report.get("layers"):
        plot_layers(report, directory / LAYERS_PNG)
        # report.json lists every plot in the directory, the layer map first.
        report["plots"] = [LAYERS_PNG] + [name for name in report.get("plots", []) if name != LAYERS_PNG]
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
    (directory / REPORT_MD).write_text(render_markdown(report, report.get("plots", [])))


def load_report(directory: str | Path) -> dict[str, Any]:
    from .errors import SlimformerError

    path = Path(directory) / REPORT_JSON
    if not path.is_file():
        raise SlimformerError(
            "no report.json in this directory",
            where=str(directory),
            fix="point at a directory written by `slimformer convert`",
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SlimformerError(
            f"report.json is not valid JSON: {exc}", where=str(path), fix="re-run the conversion"
        ) from exc


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


def title(report: dict[str, Any]) -> str:
    """What the report is about: the output it describes, and where that came from."""
    source = report["source"]["spec"]
    output = report.get("output")  # reports written before 0.2.1 name only the source
    return f"{output} (converted from {source})" if output else source


def pass_notes(record: dict[str, Any]) -> list[str]:
    """A pass record's notes (reports before 0.3 kept them inside ``changes``)."""
    return record.get("notes", (record.get("changes") or {}).get("notes", []))


def measured_rows(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(pass name, row)`` for every before/after number a pass measured (its ``PassResult.rows``)."""
    return [(record["name"], row) for record in report.get("passes", []) for row in record.get("rows", [])]


def format_change(row: dict[str, Any]) -> str:
    change = row.get("change_pct")
    if change is None:
        return "n/a"
    text = f"{change:+.1f}%"
    if change < 0 and row.get("before_label") == "full cache":
        # Seen on stories260K: a model hurt by its own long context scores better with less of it. That is
        # a fact about the model, not a gain from eviction; say so next to the number.
        text += " (the evicting cache scored better: the model uses its long context poorly)"
    return text


def format_value(row: dict[str, Any], key: str) -> str:
    """``full cache 55.400`` where the column needs its own name, else the number."""
    value = row.get(key)
    label = row.get(f"{key}_label", key)
    number = "n/a" if value is None else f"{value:.3f}"
    return number if label == key else f"{label} {number}"


def _cell_text(cell: Any) -> str:
    if cell is None:
        return "-"
    return f"{cell:.4g}" if isinstance(cell, float) else str(cell)


def headline_rows(report: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Before/after rows of the conversion: parameters, KV bytes, and the weights' perplexity."""
    rows = [
        (
            "parameters",
            f"{report['params_before']:,}",
            f"{report['params_after']:,}",
            _ratio(report["params_before"], report["params_after"]),
        ),
        (
            "KV cache bytes/token (fp32)",
            f"{report['kv_bytes_per_token_before']:,}",
            f"{report['kv_bytes_per_token_after']:,}",
            _ratio(report["kv_bytes_per_token_before"], report["kv_bytes_per_token_after"]),
        ),
    ]
    evaluation = report.get("evaluation") or {}
    before, after = evaluation.get("perplexity_before"), evaluation.get("perplexity_after")
    if before is not None and after is not None:
        # One forward per window, so no cache ever evicts: this measures the weights. Eviction has its own table.
        rows.append(
            (
                f"perplexity of the weights ({evaluation.get('source')})",
                f"{before:.3f}",
                f"{after:.3f}",
                _ratio(before, after),
            )
        )
    return rows


def describe_cache(policy: dict[str, Any]) -> str:
    """One cell's worth of a cache slot's policy, e.g. ``KV a2sf: 64 tokens (sink 0, recent 48), alpha 0.9``."""
    if "budget_ratio" in policy:
        size = f"{policy['budget_ratio']:.0%} of the prompt"
    else:
        size = f"{policy.get('budget')} tokens"
    parts = [
        f"{key} {policy[key]:.0%}" if key == "recent_ratio" else f"{key} {policy[key]}"
        for key in ("sink", "recent", "recent_ratio")
        if key in policy
    ]
    text = f"KV {policy.get('policy')}: {size}" + (f" ({', '.join(parts)})" if parts else "")
    text += f", alpha {policy['alpha']}" if "alpha" in policy else ""
    # A ratio budget resolves per prompt: the slot summary says what that means in tokens.
    return text + (f"; {policy['kept']}" if "kept" in policy else "")


def layer_notes(layer: dict[str, Any]) -> list[str]:
    notes = [str(layer[key]) for key in ("attention_reason", "mlp_reason") if key in layer]
    if "attention_form" in layer:
        notes.append(f"attention form {layer['attention_form']}")
    if "cache_policy" in layer:
        notes.append(describe_cache(layer["cache_policy"]))
    return notes


def render_markdown(report: dict[str, Any], plots: list[str] | None = None) -> str:
    lines = [f"# slimformer report: {title(report)}", ""]
    lines += [
        f"Family **{report['source']['family']}**, {report['source']['num_layers']} layers. "
        f"Output written {report.get('created', '')}.",
        "",
    ]
    lines += [f"- {note}" for note in report.get("notes", [])] + ([""] if report.get("notes") else [])
    lines += ["| | before | after | change |", "|---|---:|---:|---:|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline_rows(report)]
    measured = measured_rows(report)
    if measured:
        lines += [
            "",
            "Measured by the passes:",
            "",
            "| pass | what | settings | before | after | change |",
            "|---|---|---|---:|---:|---:|",
        ]
        lines += [
            f"| {name} | {row['what']} | {row.get('settings', '')} | {format_value(row, 'before')} | "
            f"{format_value(row, 'after')} | {format_change(row)} |"
            for name, row in measured
        ]
    lines += ["", "## Passes", ""]
    if not report["passes"]:
        lines.append("Identity pipeline: no pass changed the model.")
    for record in report["passes"]:
        params = ", ".join(f"{k}={v}" for k, v in record["params"].items()) or "defaults"
        lines.append(f"### {record['name']} ({params}) -- {record['duration_s']:.2f} s")
        lines.append("")
        for note in pass_notes(record):
            lines.append(f"- {note}")
        for warning in record.get("warnings", []):
            lines.append(f"- **warning:** {warning}")
        for table in record.get("tables", []):
            lines += [
                "",
                f"{table['title']}:",
                "",
                "| " + " | ".join(table["columns"]) + " |",
                "|" + "---|" * len(table["columns"]),
            ]
            lines += ["| " + " | ".join(_cell_text(cell) for cell in row) + " |" for row in table["rows"]]
        lines.append("")
    lines += ["## Layers", "", "| layer | attention | MLP | notes |", "|---:|---|---|---|"]
    for layer in report["layers"]:
        notes = "; ".join(layer_notes(layer))
        lines.append(f"| {layer['layer']} | {layer['attention']} | {layer['mlp']} | {notes} |")
    for plot in plots or []:
        lines += ["", f"![{plot}]({plot})"]
    speed = report.get("speed")
    if speed:
        lines += ["", "## Speed", "", "| | prefill tok/s | decode tok/s |", "|---|---:|---:|"]
        for key in ("before", "after"):
            if key in speed:
                lines.append(
                    f"| {key} | {speed[key]['prefill_tokens_per_s']:.1f} | {speed[key]['decode_tokens_per_s']:.1f} |"
                )
    lines += ["", "## Versions", ""] + [f"- {k} {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def render_terminal(report: dict[str, Any]) -> str:
    rows = headline_rows(report)
    width = max(len(row[0]) for row in rows)
    out = [
        f"slimformer report -- {title(report)} ({report['source']['family']}, "
        f"{report['source']['num_layers']} layers)",
        "",
    ]
    out += [f"note: {note}" for note in report.get("notes", [])] + ([""] if report.get("notes") else [])
    out.append(f"{'':<{width}} {'before':>14} {'after':>14} {'change':>9}")
    for name, before, after, change in rows:
        out.append(f"{name:<{width}} {before:>14} {after:>14} {change:>9}")
    for name, row in measured_rows(report):
        out += [
            "",
            f"{name}: {row['what']} ({row.get('settings', '')})",
            f"  {format_value(row, 'before')} -> {format_value(row, 'after')} ({format_change(row)})",
        ]
    out.append("")
    if report["passes"]:
        for record in report["passes"]:
            params = ", ".join(f"{k}={v}" for k, v in record["params"].items())
            out.append(f"pass {record['name']} ({params}) {record['duration_s']:.2f}s")
            out += [f"  - {note}" for note in pass_notes(record)]
            out += [f"  - warning: {warning}" for warning in record.get("warnings", [])]
    else:
        out.append("identity pipeline (no passes)")
    out.append("")
    out.append("layer  attention  mlp")
    for layer in report["layers"]:
        out.append(f"{layer['layer']:>5}  {layer['attention']:<9}  {layer['mlp']}")
    return "\n".join(out)


def render_summary(report: dict[str, Any]) -> str:
    """What ``slimformer convert`` prints on stdout: the outcome in a few lines and where the report is.
    The full report is ``slimformer report OUT`` (so ``make demo``, which runs both, prints it once)."""
    lines = [f"converted {report['source']['spec']} -> {report.get('output')}"]
    lines += [
        f"  {name}: {before} -> {after} ({change})" for name, before, after, change in headline_rows(report)
    ]
    lines += [
        f"  {name}: {row['what']}: {format_value(row, 'before')} -> {format_value(row, 'after')} ({format_change(row)})"
        for name, row in measured_rows(report)
    ]
    lines += [f"  note: {note}" for note in report.get("notes", [])]
    lines.append(
        f"full report: slimformer report {report.get('output')}  (or {Path(str(report.get('output'))) / REPORT_MD})"
    )
    return "\n".join(lines)


def plot_layers(report: dict[str, Any], path: Path) -> None:
    """A two-row map of the blocks: which attention and MLP sub-blocks were kept, dropped or replaced."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    states = {"kept": 0, "replaced": 1, "dropped": 2}
    colors = ["#4c9a5b", "#e0a526", "#c9c9c9"]
    layers = report["layers"]
    grid = [[states[layer["attention"]] for layer in layers], [states[layer["mlp"]] for layer in layers]]
    fig, ax = plt.subplots(figsize=(max(4, 0.45 * len(layers) + 1.5), 2.2))
    ax.imshow(grid, cmap=ListedColormap(colors), vmin=0, vmax=2, aspect="auto")
    ax.set_yticks([0, 1], ["attention", "MLP"])
    ax.set_xticks(range(len(layers)), [str(layer["layer"]) for layer in layers])
    ax.set_xlabel("layer")
    # A legend below the map, and a tight bounding box when saving, so it is never cut off on a few layers.
    ax.legend(
        handles=[Patch(color=c, label=name) for name, c in zip(states, colors)],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.32),
        ncol=3,
        fontsize=8,
        frameon=False,
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
