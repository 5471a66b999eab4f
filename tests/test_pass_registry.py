"""Passes are found through the ``slimformer.passes`` entry-point group: another installed package adds one
without touching slimformer. The "package" here is real metadata on ``sys.path`` (a ``.dist-info`` with
``entry_points.txt``), found by ``importlib.metadata`` exactly as an installed wheel's would be."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_LM
from slimformer.converter.cli import cli
from slimformer.converter.errors import SlimformerError
from slimformer.converter.pipeline import REGISTRY, available_passes

PLUGIN = '''
from dataclasses import dataclass, field

from slimformer.converter.graph import DROPPED
from slimformer.passes.base import Pass, PassResult, ReportRow, register


@dataclass
class DropLastMlpConfig:
    keep: int = field(default=0, metadata={"help": "how many trailing MLPs to keep"})


@register
class DropLastMlp(Pass):
    """A third-party pass: drops the last MLP sub-block."""

    name = "drop_last_mlp"
    config_class = DropLastMlpConfig

    def run(self, graph, ctx):
        block = graph.blocks[-1 - self.config.keep]
        before = graph.num_params()
        block.mlp.state, block.mlp.reason = DROPPED, "drop_last_mlp"
        return PassResult(notes=[f"dropped the MLP of layer {block.index}"],
                          rows=[ReportRow("parameters", before, graph.num_params())], data={"layer": block.index})
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "slimformer_plugin_demo.py").write_text(PLUGIN)
    info = tmp_path / "slimformer_plugin_demo-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: slimformer-plugin-demo\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""\
            [slimformer.passes]
            drop_last_mlp = slimformer_plugin_demo
            """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "drop_last_mlp"
    REGISTRY.pop("drop_last_mlp", None)
    sys.modules.pop("slimformer_plugin_demo", None)


def test_builtin_passes_come_from_the_entry_points() -> None:
    assert {"layer_drop", "sas", "a2sf"} <= set(available_passes())


def test_a_package_adds_a_pass_without_touching_slimformer(plugin: str, tmp_path: Path) -> None:
    assert plugin in available_passes()
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'[calibration]\nsamples = 2\nseq_len = 16\n\n[[passes]]\nname = "{plugin}"\n')
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli, ["convert", str(TINY_LM), "-o", str(out), "--pipeline", str(pipeline), "-q"]
    )
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert "### drop_last_mlp" in markdown and "dropped the MLP of layer" in markdown
    assert "| drop_last_mlp | parameters |" in markdown


def test_a_broken_plugin_is_named_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "broken_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[slimformer.passes]\nbroken = no_such_module_for_slimformer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SlimformerError, match="no_such_module_for_slimformer.*cannot be imported"):
        available_passes()
