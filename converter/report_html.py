"""``report.html``: the pass report as one self-contained page a person opens in a browser.

Rendered from ``report.json`` (the source of truth, like ``report.md``), with every plot inlined as a
``data:`` URI and the styles in the page: no network, no script, nothing to install. Sections, top to
bottom: what was converted and the headline numbers; quality before/after with the evaluation settings;
the pipeline that ran; each pass's notes, tables and warnings; the layer map (kept / dropped / replaced,
why, and each cache slot's policy); the plots; speed where measured; versions.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from .report import (
    describe_cache,
    format_change,
    format_value,
    headline_rows,
    layer_notes,
    measured_rows,
    pass_notes,
    title,
)

REPORT_HTML = "report.html"

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2329; margin: 0; background: #f6f7f9; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #dde1e6; }
h3 { font-size: 16px; margin: 20px 0 6px; } .sub { color: #5a6470; margin: 0 0 12px; }
table { border-collapse: collapse; margin: 8px 0 12px; font-size: 14px; }
th, td { border: 1px solid #dde1e6; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.worse { color: #a4161a; } .better { color: #1b7f3b; }
.kept { color: #1b7f3b; } .dropped { color: #8a8f96; text-decoration: line-through; } .replaced { color: #b26b00; }
.warning { background: #fff4e5; border-left: 4px solid #e08a00; padding: 6px 10px; margin: 6px 0; }
figure { margin: 12px 0; } figure img { max-width: 100%; border: 1px solid #dde1e6; }
figcaption { color: #5a6470; font-size: 13px; } pre { background: #f1f3f5; padding: 10px; overflow-x: auto; font-size: 13px; }
"""


def write_html(report: dict[str, Any], directory: Path) -> Path:
    path = directory / REPORT_HTML
    path.write_text(render_html(report, directory))
    return path


def render_html(report: dict[str, Any], directory: Path) -> str:
    """The page for ``report``; plots are read from ``directory`` (the converted output)."""
    source = report["source"]
    parts = [
        f"<h1>slimformer report</h1><p class='sub'>{_e(title(report))}<br>family <b>{_e(source['family'])}</b>, "
        f"{source['num_layers']} layers, weights from {_e(source.get('weight_format', 'safetensors'))}; "
        f"written {_e(report.get('created', ''))}</p>",
        _summary(report),
        _quality(report),
        _pipeline(report, directory),
        _passes(report),
        _layers(report),
        _plots(report, directory),
        _speed(report),
        "<h2 id='versions'>Versions</h2>"
        + _table(["package", "version"], [[k, v] for k, v in report.get("versions", {}).items()]),
    ]
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>slimformer report: {_e(title(report))}</title><style>{STYLE}</style></head>\n"
        "<body><main>\n" + "\n".join(part for part in parts if part) + "\n</main></body></html>\n"
    )


# ---- sections -------------------------------------------------------------------------------------------


def _summary(report: dict[str, Any]) -> str:
    rows = [
        [name, _Num(before), _Num(after), _Change(change)]
        for name, before, after, change in headline_rows(report)
    ]
    notes = "".join(f"<div class='warning'>{_e(note)}</div>" for note in report.get("notes", []))
    return "<h2 id='summary'>Summary</h2>" + _table(["", "before", "after", "change"], rows) + notes


def _quality(report: dict[str, Any]) -> str:
    measured = measured_rows(report)
    evaluation = report.get("evaluation") or {}
    if not measured and not evaluation:
        return "<h2 id='quality'>Quality</h2><p>Not measured: convert with <code>--eval-ppl SPEC</code>.</p>"
    text = "<h2 id='quality'>Quality</h2>"
    if evaluation:
        text += (
            f"<p>Perplexity of the weights on <b>{_e(evaluation.get('source'))}</b>: windows of "
            f"{evaluation.get('window')} tokens, at most {evaluation.get('max_tokens', 0):,} tokens, one forward "
            "per window (no cache evicts, so this measures the weights).</p>"
        )
    if measured:
        rows = [
            [
                name,
                row["what"],
                row.get("settings", ""),
                _Num(format_value(row, "before")),
                _Num(format_value(row, "after")),
                _Change(format_change(row)),
            ]
            for name, row in measured
        ]
        text += "<p>Measured by the passes:</p>" + _table(
            ["pass", "what", "settings", "before", "after", "change"], rows
        )
    return text


def _pipeline(report: dict[str, Any], directory: Path) -> str:
    pipeline = report.get("pipeline") or {}
    calibration = pipeline.get("calibration") or {}
    items = "".join(
        f"<li><b>{_e(record['name'])}</b> ({_e(_params(record['params']))}), {record['duration_s']:.2f} s</li>"
        for record in report.get("passes", [])
    )
    text = "<h2 id='pipeline'>Pipeline</h2>"
    if calibration:
        text += (
            f"<p>Calibration: {calibration.get('samples')} windows of {calibration.get('seq_len')} tokens "
            f"from {_e(', '.join(calibration.get('sources', [])))} (seed {calibration.get('seed')}).</p>"
        )
    text += f"<ol>{items}</ol>" if items else "<p>Identity pipeline: no pass changed the model.</p>"
    spec = directory / "pipeline.toml"
    if spec.is_file():
        text += f"<details><summary>pipeline.toml (replay with <code>--pipeline</code>)</summary><pre>{_e(spec.read_text())}</pre></details>"
    return text


def _passes(report: dict[str, Any]) -> str:
    text = ""
    for record in report.get("passes", []):
        text += (
            f"<h3>{_e(record['name'])}</h3><ul>"
            + "".join(f"<li>{_e(n)}</li>" for n in pass_notes(record))
            + "</ul>"
        )
        text += "".join(f"<div class='warning'>warning: {_e(w)}</div>" for w in record.get("warnings", []))
        for table in record.get("tables", []):
            text += f"<p>{_e(table['title'])}</p>" + _table(
                table["columns"], [[_Num(c) for c in r] for r in table["rows"]]
            )
    return "<h2 id='passes'>Passes</h2>" + text if text else ""


def _layers(report: dict[str, Any]) -> str:
    rows = [
        [layer["layer"], _State(layer["attention"]), _State(layer["mlp"]), "; ".join(layer_notes(layer))]
        for layer in report.get("layers", [])
    ]
    text = "<h2 id='layers'>Layers</h2>" + _table(["layer", "attention", "MLP", "why / cache slot"], rows)
    policy = {k: v for k, v in (report.get("kv_cache") or {}).items() if v is not None and k != "format"}
    if policy:
        text += f"<p>KV cache policy of the checkpoint: {_e(describe_cache(policy))} (per slot: the table above).</p>"
    return text


def _plots(report: dict[str, Any], directory: Path) -> str:
    figures = ""
    for name in report.get("plots", []):
        path = directory / name
        if not path.is_file():
            continue
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        figures += (
            f"<figure><img src='data:image/png;base64,{data}' alt='{_e(name)}'>"
            f"<figcaption>{_e(name)}</figcaption></figure>"
        )
    return "<h2 id='plots'>Plots</h2>" + figures if figures else ""


def _speed(report: dict[str, Any]) -> str:
    speed = report.get("speed")
    if not speed:
        return ""
    rows = [
        [
            key,
            _Num(f"{speed[key]['prefill_tokens_per_s']:.1f}"),
            _Num(f"{speed[key]['decode_tokens_per_s']:.1f}"),
        ]
        for key in ("before", "after")
        if key in speed
    ]
    return "<h2 id='speed'>Speed</h2>" + _table(["", "prefill tok/s", "decode tok/s"], rows)


# ---- cells ----------------------------------------------------------------------------------------------


class _Num(str):
    """A right-aligned cell; floats get 4 significant digits."""

    def __new__(cls, value: Any) -> _Num:
        if isinstance(value, float):
            value = f"{value:.4g}"
        return super().__new__(cls, "-" if value is None else str(value))


class _Change(str):
    """A change cell, red when it got worse (every change the report shows is a cost when positive)."""


class _State(str):
    """kept / dropped / replaced, coloured."""


def _cell(value: Any) -> str:
    if isinstance(value, _Change):
        css = "worse" if value.startswith("+") else "better" if value.startswith("-") else ""
        return f"<td class='num {css}'>{_e(value)}</td>"
    if isinstance(value, _State):
        return f"<td class='{_e(value)}'>{_e(value)}</td>"
    if isinstance(value, (_Num, int, float)):
        return f"<td class='num'>{_e(_Num(value))}</td>"
    return f"<td>{_e(value)}</td>"


def _table(columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "defaults"


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)
