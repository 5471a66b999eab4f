"""The installed stack: unsupported versions, missing extras and checkpoints from a newer slimformer each get
one clear line (checked through the real CLI in a subprocess), and the ranges the code checks are the ones
``pyproject.toml`` declares."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ROOT, make_tiny
from packaging.requirements import Requirement
from slimformer.converter.conversion import convert
from slimformer.converter.environment import SUPPORTED
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import load_graph
from slimformer.converter.pipeline import PipelineSpec
from slimformer.converter.source import resolve_source


def _cli(args: list[str], tmp_path: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "slimformer", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_supported_ranges_are_the_declared_ones():
    declared = {}
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        requirement = Requirement(text)
        declared[requirement.name] = str(requirement.specifier)
    for package, spec in SUPPORTED.items():
        assert (
            Requirement(f"{package}{spec}").specifier
            == Requirement(f"{package}{declared[package]}").specifier
        )


def test_unsupported_transformers_gets_one_line(tmp_path):
    # A dist-info earlier on sys.path is what importlib.metadata reports: an environment with transformers 4.40.
    fake = tmp_path / "site"
    (fake / "transformers-4.40.0.dist-info").mkdir(parents=True)
    (fake / "transformers-4.40.0.dist-info" / "METADATA").write_text("Name: transformers\nVersion: 4.40.0\n")
    line = _one_line_error(_cli(["inspect", str(tmp_path)], tmp_path, extra_path=fake))
    assert (
        "transformers 4.40.0 is installed" in line
        and SUPPORTED["transformers"] in line
        and "Fix: pip install" in line
    )


def test_missing_onnx_extra_names_the_extra(tmp_path):
    ckpt = tmp_path / "ckpt"
    convert(make_tiny("llama", tmp_path / "src"), ckpt, PipelineSpec())
    hide = tmp_path / "hide"
    hide.mkdir()
    # sys.modules[name] = None is how Python marks a module as not importable: find_spec() answers None.
    (hide / "sitecustomize.py").write_text(
        "import sys\nsys.modules['onnx'] = None\nsys.modules['onnxruntime'] = None\n"
    )
    line = _one_line_error(
        _cli(["export", "onnx", str(ckpt), "-o", str(tmp_path / "out")], tmp_path, extra_path=hide)
    )
    assert "needs onnx and onnxruntime" in line and "pip install 'slimformer[onnx]'" in line
    assert not (tmp_path / "out").exists()


def test_checkpoint_from_a_newer_slimformer_names_its_writer(tmp_path):
    ckpt = tmp_path / "ckpt"
    convert(make_tiny("llama", tmp_path / "src"), ckpt, PipelineSpec())
    config = json.loads((ckpt / "config.json").read_text())
    assert config["slimformer_format"] >= 2 and config["slimformer_version"]
    config.update(slimformer_format=99, slimformer_version="9.0.0")
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(SlimformerError, match=r"written by slimformer 9\.0\.0 \(format 99\)") as info:
        load_graph(resolve_source(ckpt))
    assert "trust_remote_code=True" in info.value.fix


def test_modeling_file_imports_every_runtime_module_directly():
    """transformers 4.57 copies a remote-code checkpoint's modules only when the modeling file imports them
    itself (nested relative imports are not followed), so each shipped runtime module must appear there."""
    import re

    from slimformer.converter.runtime import RUNTIME_FILES

    modeling = (ROOT / "converter" / "runtime" / "modeling_slimformer.py").read_text()
    imported = set(re.findall(r"^from \.(\w+) import", modeling, flags=re.MULTILINE))
    assert {name.removesuffix(".py") for name in RUNTIME_FILES} - {"modeling_slimformer"} <= imported
