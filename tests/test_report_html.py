"""``report.html``: self-contained, complete, and rendered by a real browser (headless Chromium).

The conversion is real (the embedded tiny LM, layer drop + SAS + A2SF, perplexity measured), so the page
is checked against the numbers report.json holds, not against a hand-made dict. The browser test loads
the page from disk in Debian's Chromium (``make setup-browser`` installs it) with a probe script added
to a *copy* of the page (the shipped page has no script): the probe records uncaught errors and each
image's decoded and displayed size into the DOM, which ``--dump-dom`` returns; console messages come
from Chromium's own log.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_LM
from slimformer.converter.conversion import ConvertOptions, convert
from slimformer.converter.pipeline import PipelineSpec

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SPEC = {
    "calibration": {"sources": ["stdlib:train"], "samples": 8, "seq_len": 64},
    "evaluation": {"ppl": "stdlib:valid", "window": 64, "max_tokens": 1024},
    "passes": [
        {"name": "layer_drop", "drop": "attn:1"},
        {"name": "sas", "layers": 1, "heal_steps": 4},
        {"name": "a2sf", "budget": 16},
    ],
}
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.type)), true);
window.addEventListener('load', () => {
  const images = [...document.images].map(img => {
    const box = img.getBoundingClientRect();
    return {alt: img.alt, natural: [img.naturalWidth, img.naturalHeight], shown: [box.width, box.height]};
  });
  const out = document.createElement('pre');
  out.id = 'probe';
  out.textContent = JSON.stringify({errors: window.__errors, images});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html") / "out"
    convert(TINY_LM, out, PipelineSpec.from_dict(SPEC), ConvertOptions(quiet=True))
    return out


def key_numbers(report: dict) -> list[str]:
    """Numbers a reader must find on the page, formatted as the page formats them."""
    evaluation = report["evaluation"]
    numbers = [f"{report['params_before']:,}", f"{report['params_after']:,}"]
    numbers += [f"{evaluation['perplexity_before']:.3f}", f"{evaluation['perplexity_after']:.3f}"]
    for record in report["passes"]:
        for row in record["rows"]:
            numbers += [f"{row['before']:.3f}", f"{row['after']:.3f}"]
    return numbers


def test_page_is_self_contained_and_complete(converted: Path) -> None:
    page = (converted / "report.html").read_text()
    report = json.loads((converted / "report.json").read_text())
    # Nothing from the network, no script, every plot inline as a PNG.
    assert not re.search(r"""(src|href)\s*=\s*['"](https?:|//)""", page) and "<script" not in page
    images = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert len(images) == len(report["plots"]) >= 3  # layers, importance, healing curve
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    for number in key_numbers(report):
        assert number in page, number
    # The pipeline, every pass, the per-layer importance table and the cache policy per slot.
    assert "pipeline.toml" in page and all(f"<h3>{p['name']}</h3>" in page for p in SPEC["passes"])
    assert "importance per layer" in page and page.count("KV a2sf: 16 tokens") >= 1
    assert (
        "healing" in page.split("Measured by the passes")[1]
    )  # SAS: before / after conversion / after healing


@pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium (Debian package chromium): run `make setup-browser`"
)
def test_page_renders_in_headless_chromium(converted: Path, tmp_path: Path) -> None:
    page = (converted / "report.html").read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    flags = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--window-size=1200,2000",
    ]
    result = subprocess.run(
        [*flags, "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    probe = re.search(r'<pre id="probe">(.*?)</pre>', result.stdout, re.S)
    assert probe, "the probe never ran: the page did not finish loading"
    state = json.loads(probe.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line]
    assert state["errors"] == [] and console == [], (state["errors"], console)
    report = json.loads((converted / "report.json").read_text())
    assert len(state["images"]) == len(report["plots"])
    for image in state["images"]:  # decoded (natural size) and laid out on the page (displayed size)
        assert min(image["natural"]) > 50 and min(image["shown"]) > 50, image
    text = re.sub(r"<[^>]+>", " ", result.stdout)
    for number in key_numbers(report):
        assert number in text, number
    # A screenshot for a person to look at (kept with SLIMFORMER_KEEP_SCREENSHOT=DIR).
    shots = Path(os.environ.get("SLIMFORMER_KEEP_SCREENSHOT", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    shot = shots / "report.png"
    subprocess.run(
        [*flags, "--window-size=1200,3600", f"--screenshot={shot}", (converted / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
