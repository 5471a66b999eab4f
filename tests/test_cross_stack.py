"""Checkpoints converted under one transformers release load and run under the other.

The checkpoints are converted here (on whichever stack runs this test) from the real stories260K and
then loaded by plain ``transformers`` with ``trust_remote_code=True`` -- in a fresh process that never
imports slimformer -- once with this stack's Python and once with the OTHER stack's Python
(``SLIMFORMER_OTHER_PYTHON``; ``make test-slow`` points it at the legacy venv and ``make test-legacy``
at the current one, so both directions run in CI). Greedy generation must be token-identical and the
logits within 1e-5, for an identity conversion, a layer-dropped one, an A2SF-evicting one and a SAS one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import STORIES, require
from safetensors.torch import load_file
from slimformer.converter.cli import cli

pytestmark = pytest.mark.slow

CONVERSIONS = {
    "identity": [],
    "layer_drop": ["--drop", "attn:2"],
    "a2sf": ["--a2sf", "budget=24,alpha=0.5,recent=8,sink=2"],
    "sas": ["--sas", "layers=1,heal-steps=2", "--calib-samples", "4", "--calib-seq-len", "64"],
}

# Runs in a process that never imports slimformer: plain transformers + the code the checkpoint ships.
LOADER = textwrap.dedent("""
    import json, sys, torch, transformers
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    ckpt, out = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 512, (2, 40), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in row 1
    with torch.inference_mode():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert not any(m.split(".")[0] in ("converter", "passes", "exporters", "slimformer") for m in sys.modules)
    save_file({"logits": logits.float().contiguous(), "tokens": tokens.contiguous()}, out)
    print(json.dumps({"transformers": transformers.__version__, "model": type(model).__module__}))
""")


def _other_python() -> str:
    other = os.environ.get("SLIMFORMER_OTHER_PYTHON")
    if not other or not Path(other).is_file():
        pytest.skip(
            "SLIMFORMER_OTHER_PYTHON (the other transformers stack's python) is not set; "
            "`make test-slow` / `make test-legacy` set it when both venvs exist"
        )
    return other


def _load_in(python: str, ckpt: Path, out: Path) -> tuple[dict, dict]:
    env = {
        "HF_HUB_OFFLINE": "1",
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(out.parent),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [python, "-c", LOADER, str(ckpt), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=out.parent,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), load_file(str(out))


@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_converted_here_loads_on_the_other_stack(tmp_path, name):
    other = _other_python()
    source = require(STORIES)
    out = tmp_path / f"out-{name}"
    result = CliRunner().invoke(cli, ["convert", str(source), "-o", str(out), "-q", *CONVERSIONS[name]])
    assert result.exit_code == 0, result.output
    here_info, here = _load_in(sys.executable, out, tmp_path / "here.safetensors")
    there_info, there = _load_in(other, out, tmp_path / "there.safetensors")
    assert here_info["transformers"] != there_info["transformers"], "both pythons run the same transformers"
    assert there_info["model"].startswith("transformers_modules"), there_info  # the shipped runtime ran
    assert torch.equal(here["tokens"], there["tokens"])
    real = torch.ones(2, 40, dtype=torch.bool)
    real[1, :5] = False
    assert (here["logits"] - there["logits"])[real].abs().max() <= 1e-5
