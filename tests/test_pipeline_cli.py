"""Pipeline specs (TOML/YAML, replay), the runner, and the CLI commands end to end."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import STORIES, make_tiny, require
from slimformer.converter.cli import cli, parse_options
from slimformer.converter.errors import SlimformerError
from slimformer.converter.pipeline import PassContext, PipelineSpec, run_pipeline


def test_spec_toml_roundtrip_and_yaml(tmp_path):
    spec = PipelineSpec.from_dict(
        {
            "calibration": {"sources": ["stdlib:train", "a.txt"], "samples": 8, "seq_len": 64, "seed": 3},
            "evaluation": {"ppl": "stdlib:valid", "window": 128},
            "passes": [{"name": "layer_drop", "drop": "attn:2", "iterative": True}],
        }
    )
    (tmp_path / "p.toml").write_text(spec.to_toml())
    assert PipelineSpec.from_file(tmp_path / "p.toml") == spec
    (tmp_path / "p.yaml").write_text(
        "calibration:\n  sources: stdlib:train\n  samples: 4\npasses:\n  - name: layer_drop\n    drop: mlp:1\n"
    )
    loaded = PipelineSpec.from_file(tmp_path / "p.yaml")
    assert loaded.calibration.sources == ["stdlib:train"] and loaded.passes[0].params == {"drop": "mlp:1"}


@pytest.mark.parametrize(
    "text,match",
    [
        ("[bogus]\nx = 1\n", "unknown pipeline section"),
        ("[calibration]\nsamplez = 3\n", "unknown key"),
        ("[[passes]]\ndrop = 1\n", "needs a 'name'"),
        ("[calibration\n", "cannot parse"),
    ],
)
def test_spec_errors(tmp_path, text, match):
    (tmp_path / "p.toml").write_text(text)
    with pytest.raises(SlimformerError, match=match):
        PipelineSpec.from_file(tmp_path / "p.toml")


def test_runner_times_and_records_each_pass(tiny_llama):
    from dataclasses import dataclass

    from slimformer.converter.graph import DROPPED, load_graph
    from slimformer.converter.source import resolve_source
    from slimformer.passes.base import Pass, PassResult

    @dataclass
    class DropMlpConfig:
        layer: int = 0

    class DropMlp(Pass):  # a minimal pass, to exercise the interface without the real passes
        name = "drop_mlp_for_test"
        config_class = DropMlpConfig

        def run(self, graph, ctx):
            graph.blocks[self.config.layer].mlp.state = DROPPED
            return PassResult(notes=[f"dropped MLP {self.config.layer}"], data={"layer": self.config.layer})

    graph = load_graph(resolve_source(tiny_llama))
    before = graph.num_params()
    records = run_pipeline(
        graph, [DropMlp.from_params({"layer": 1})], PassContext(None, None, None, log=lambda m: None)
    )
    assert records[0]["name"] == "drop_mlp_for_test" and records[0]["params"] == {"layer": 1}
    assert records[0]["duration_s"] >= 0 and records[0]["notes"] == ["dropped MLP 1"]
    assert records[0]["changes"] == {"layer": 1} and records[0]["rows"] == [] and records[0]["warnings"] == []
    assert graph.num_params() < before
    with pytest.raises(SlimformerError, match="unknown option"):
        DropMlp.from_params({"layr": 1})


def test_parse_options():
    assert parse_options("budget=256,alpha=0.5,policy=h2o,flag=true", "--a2sf") == {
        "budget": 256,
        "alpha": 0.5,
        "policy": "h2o",
        "flag": True,
    }
    with pytest.raises(SlimformerError, match="malformed"):
        parse_options("budget", "--a2sf")


def test_cli_convert_report_eval_generate(tmp_path):
    source = require(STORIES)
    out = tmp_path / "out"
    runner = CliRunner()
    text = tmp_path / "eval.txt"
    text.write_text(
        "Once upon a time there was a little girl. She liked to play in the park with her dog. " * 30
    )
    result = runner.invoke(cli, ["convert", str(source), "-o", str(out), "--eval-ppl", str(text), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    for key in (
        "source",
        "versions",
        "passes",
        "layers",
        "params_before",
        "params_after",
        "kv_bytes_per_token_before",
        "kv_bytes_per_token_after",
        "evaluation",
    ):
        assert key in report
    assert report["evaluation"]["perplexity_before"] == pytest.approx(
        report["evaluation"]["perplexity_after"], rel=1e-6
    )
    assert (out / "report.md").read_text().startswith("# slimformer report")
    assert (out / "layers.png").stat().st_size > 1000 and (out / "pipeline.toml").is_file()

    result = runner.invoke(cli, ["report", str(out)])
    assert result.exit_code == 0 and "parameters" in result.output and "layer  attention" in result.output

    result = runner.invoke(
        cli, ["eval", str(out), "--ppl", str(text), "--json", str(tmp_path / "ppl.json"), "-q"]
    )
    assert result.exit_code == 0
    value = float(result.output.strip().split("perplexity: ")[1])
    assert value == pytest.approx(report["evaluation"]["perplexity_after"], rel=1e-4)
    assert json.loads((tmp_path / "ppl.json").read_text())["perplexity"] == pytest.approx(value, rel=1e-4)

    result = runner.invoke(
        cli, ["generate", str(out), "--prompt", "Once upon a time", "--max-new-tokens", "12"]
    )
    assert result.exit_code == 0 and len(result.output.strip()) > 10

    # Replaying the written pipeline gives the same conversion.
    result = runner.invoke(
        cli,
        [
            "convert",
            str(source),
            "-o",
            str(tmp_path / "again"),
            "--pipeline",
            str(out / "pipeline.toml"),
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["pipeline"] == report["pipeline"] and again["layers"] == report["layers"]


def test_cli_help_has_examples():
    runner = CliRunner()
    for command in ("convert", "report", "eval", "generate"):
        result = runner.invoke(cli, [command, "--help"])
        assert result.exit_code == 0 and "Example" in result.output


def test_identity_conversion_of_tiny_model_via_cli(tmp_path):
    source = make_tiny("qwen3", tmp_path / "src")
    result = CliRunner().invoke(cli, ["convert", str(source), "-o", str(tmp_path / "out"), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["qk_norm"] is True


def test_cli_inspect_lists_every_node(tmp_path):
    source = make_tiny("llama", tmp_path / "src", layers=2)
    result = CliRunner().invoke(cli, ["inspect", str(source)])
    assert result.exit_code == 0, result.output
    for label in ("embeddings", "0.attention", "0.mlp", "1.attention", "1.mlp", "final_norm", "head"):
        assert label in result.output


def test_a_pass_that_breaks_the_graph_is_named(tiny_llama):
    from dataclasses import dataclass

    from slimformer.converter.graph import load_graph
    from slimformer.converter.source import resolve_source
    from slimformer.passes.base import Pass, PassResult

    @dataclass
    class NoOptions:
        pass

    class BadBudgets(Pass):  # stores one budget per slot for a model with more slots
        name = "bad_budgets_for_test"
        config_class = NoOptions

        def run(self, graph, ctx):
            graph.kv_cache = {"policy": "a2sf", "layer_budgets": [8]}
            return PassResult()

    graph = load_graph(resolve_source(tiny_llama))
    with pytest.raises(
        SlimformerError, match="pass bad_budgets_for_test left the checkpoint graph invalid: the KV"
    ):
        run_pipeline(graph, [BadBudgets.from_params({})], PassContext(None, None, None, log=lambda m: None))


def test_pass_order_is_free_where_the_result_is_valid(tmp_path):
    from conftest import TINY_LM

    def convert_with(passes: str, out: str):
        pipeline = tmp_path / f"{out}.toml"
        pipeline.write_text("[calibration]\nsamples = 4\nseq_len = 32\n\n" + passes)
        return CliRunner().invoke(
            cli, ["convert", str(TINY_LM), "-o", str(tmp_path / out), "--pipeline", str(pipeline), "-q"]
        )

    # One budget for every slot: dropping attention afterwards leaves a valid cache, with one slot fewer.
    ok = convert_with(
        '[[passes]]\nname = "a2sf"\nbudget = 16\n\n[[passes]]\nname = "layer_drop"\ndrop = "attn:1"\n', "ok"
    )
    assert ok.exit_code == 0, ok.output
    layers = json.loads((tmp_path / "ok" / "report.json").read_text())["layers"]
    assert [("cache_policy" in layer) for layer in layers] == [
        layer["attention"] != "dropped" for layer in layers
    ]
    # One budget per slot: the budgets would no longer match the layers -- refused before any work.
    budgets = ":".join(["16"] * 6)
    bad = convert_with(
        f'[[passes]]\nname = "a2sf"\nlayer_budgets = "{budgets}"\n\n[[passes]]\nname = "layer_drop"\ndrop = "attn:1"\n',
        "bad",
    )
    assert bad.exit_code != 0 and "put layer_drop before a2sf" in str(bad.exception)
    assert not (tmp_path / "bad").exists()
