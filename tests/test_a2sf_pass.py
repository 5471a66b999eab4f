"""The ``a2sf`` pass end to end: CLI options -> checkpoint config -> the evicting cache in ``generate()``
(slimformer runtime and ``trust_remote_code``), errors for bad values, the ``eval``/``generate`` overrides,
and the eviction-aware perplexity that makes eviction measurable at all.

Self-contained: a tiny random Llama (conftest) with a character-level tokenizer saved beside it.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny
from slimformer import load_model
from slimformer.converter.cli import cli, main
from slimformer.converter.errors import SlimformerError
from slimformer.converter.evaluation import eviction_perplexity_of_tokens, loglikelihoods
from slimformer.converter.graph import DROPPED, load_graph
from slimformer.converter.pipeline import CalibrationSpec, EvaluationSpec, PassContext
from slimformer.converter.runtime.kv_cache import CachePolicy, EvictingCache
from slimformer.converter.source import resolve_source
from slimformer.passes.a2sf import A2SFPass
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

BUDGET = 8
OPTIONS = f"budget={BUDGET},alpha=0.5,recent=4,sink=1"
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n" * 12


def save_char_tokenizer(directory: Path) -> None:
    """One token per character; ids fit the tiny model's 96-token vocabulary (specials as in its config)."""
    chars = ["<unk>", "<s>", "</s>", "<pad>"] + sorted(
        set(string.ascii_letters + string.digits + " .,;:!?'\"()-\n")
    )
    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(directory)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    directory = make_tiny("llama", tmp_path_factory.mktemp("a2sf") / "src", layers=3)
    save_char_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def converted(source: Path) -> Path:
    out = source.parent / "out"
    result = CliRunner().invoke(cli, ["convert", str(source), "-o", str(out), "--a2sf", OPTIONS, "-q"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def text_file(source: Path) -> Path:
    path = source.parent / "eval.txt"
    path.write_text(TEXT)
    return path


def prompt_ids(n: int = 20) -> torch.Tensor:
    return torch.randint(4, 70, (1, n), generator=torch.Generator().manual_seed(0))


# ---- convert -> config.json -> generate() ---------------------------------------------------------------


def test_convert_writes_policy_and_report(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    assert config["kv_cache"] == CachePolicy("a2sf", budget=BUDGET, alpha=0.5, recent=4, sink=1).to_dict()
    report = json.loads((converted / "report.json").read_text())
    record = report["passes"][0]
    assert record["name"] == "a2sf" and record["changes"]["cache_slots"] == 3
    # 3 layers x 2 KV heads x 8 head_dim x (K + V) x 4 bytes = 384 B/token; the bound is 8 tokens of that.
    assert report["kv_bytes_per_token_after"] == 384
    assert record["changes"]["kv_bytes_bound_per_sequence"] == BUDGET * 384
    assert [layer["cache_policy"] for layer in report["layers"]] == [
        {"policy": "a2sf", "budget": BUDGET, "sink": 1, "recent": 4, "alpha": 0.5}
    ] * 3
    assert any("KV memory bound: 3,072 B per sequence" in note for note in record["notes"])
    # The Markdown layer table states each slot's policy in words, not as a Python dict.
    markdown = (converted / "report.md").read_text()
    assert (
        markdown.count("| KV a2sf: 8 tokens (sink 1, recent 4), alpha 0.5 |") == 3
        and "{'policy'" not in markdown
    )
    # The written pipeline replays the same policy.
    assert '[[passes]]\nname = "a2sf"\nbudget = 8\nalpha = 0.5' in (converted / "pipeline.toml").read_text()


def generate(model: torch.nn.Module) -> tuple[torch.Tensor, object]:
    with torch.no_grad():
        out = model.generate(
            prompt_ids(), max_new_tokens=12, do_sample=False, pad_token_id=3, return_dict_in_generate=True
        )
    return out.sequences, out.past_key_values


def test_generate_uses_the_stored_policy_in_both_loaders(converted: Path) -> None:
    sequences, cache = generate(load_model(converted))
    assert isinstance(cache, EvictingCache)
    assert cache.kept_lengths() == [BUDGET] * 3 and cache.get_seq_length() == 20 + 12 - 1

    # Plain transformers with the shipped code: its own copy of the cache classes, same behaviour.
    remote = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True).eval()
    remote_sequences, remote_cache = generate(remote)
    assert type(remote_cache).__name__ == "EvictingCache" and remote_cache.kept_lengths() == [BUDGET] * 3
    assert torch.equal(remote_sequences, sequences)

    # An override replaces the stored policy; policy=none is the plain growing cache.
    _, cache = generate(load_model(converted, kv_cache={"policy": "streaming", "budget": 6}))
    assert cache.kept_lengths() == [6] * 3
    _, cache = generate(load_model(converted, kv_cache={"policy": "none"}))
    assert not isinstance(cache, EvictingCache) and cache.get_seq_length() == 31


def test_cli_generate_accepts_override(converted: Path) -> None:
    runner = CliRunner()
    for options in ([], ["--a2sf", "policy=h2o,budget=6"], ["--a2sf", "policy=none"]):
        result = runner.invoke(
            cli, ["generate", str(converted), "--prompt", "The quick", "--max-new-tokens", "5", *options]
        )
        assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["generate", str(converted), "--prompt", "x", "--a2sf", "alpha=2,budget=6"])
    assert isinstance(result.exception, SlimformerError) and "alpha=2.0 must lie in (0, 1]" in str(
        result.exception
    )


# ---- bad values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("budget=8,alpha=1.5", r"alpha=1.5 must lie in (0, 1]"),
        ("budget=8,alpha=0", r"alpha=0.0 must lie in (0, 1]"),
        ("budget=8,recent=6,sink=4", "budget 8 is smaller than sink 4 + recent 6"),
        ("budget=-3", "budget=-3 must be a non-negative integer"),
        ("budget=8,sink=-1", "sink=-1 must be a non-negative integer"),
        ("budget=8,alpha=half", "alpha='half' must be a number"),
        ("budget=8.5", "budget='8.5' must be an integer"),
        ("alpha=0.5", "needs exactly one of budget"),
        ("policy=lru,budget=8", "policy 'lru' is unknown"),
        ("policy=h2o,budget=8,alpha=0.5", "h2o is A2SF with alpha=1"),
        ("budget=8,windw=4", "unknown option(s) ['windw']"),
    ],
)
def test_bad_values_fail_before_any_work(source: Path, tmp_path: Path, options: str, message: str) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(source), "-o", str(out), "--a2sf", options, "-q"])
    assert isinstance(result.exception, SlimformerError), result.output
    assert message in str(result.exception) and "Fix:" in str(result.exception)
    assert not out.exists()


def test_bad_value_is_one_line_and_exit_code_2(source: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    argv = [
        "slimformer",
        "convert",
        str(source),
        "-o",
        str(tmp_path / "out"),
        "--a2sf",
        "budget=4,recent=4,sink=2",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: bad --a2sf option: kv_cache budget 4 is smaller than sink 2 + recent 4")
    assert "Fix: e.g. --a2sf budget=256" in err and err.count("\n") == 1


# ---- layers without attention, per-layer budgets ------------------------------------------------------------


def test_only_layers_with_attention_get_a_slot(source: Path) -> None:
    graph = load_graph(resolve_source(source))
    graph.blocks[1].attention.state = DROPPED
    ctx = PassContext(None, CalibrationSpec(), EvaluationSpec(), log=lambda message: None)
    changes = A2SFPass.from_params({"layer_budgets": "6:9", "policy": "h2o", "recent": 2}).run(graph, ctx)
    assert graph.kv_cache["layer_budgets"] == [6, 9] and changes.data["cache_slots"] == 2
    assert [b.cache_policy and b.cache_policy["budget"] for b in graph.blocks] == [6, None, 9]
    assert graph.blocks[0].cache_policy == {
        "policy": "h2o",
        "budget": 6,
        "sink": 0,
        "recent": 2,
        "alpha": 1.0,
    }
    # 2 layers x 128 B/token: 6 x 128 + 9 x 128.
    assert changes.data["kv_bytes_bound_per_sequence"] == 15 * 128
    with pytest.raises(SlimformerError, match="layer_budgets has 3 entries but the model has 2 cache slots"):
        A2SFPass.from_params({"layer_budgets": [6, 6, 6]}).run(graph, ctx)
    # A ratio budget depends on the prompt, so there is no fixed bound; policy=none removes the policy.
    assert (
        A2SFPass.from_params({"budget_ratio": 0.25}).run(graph, ctx).data["kv_bytes_bound_per_sequence"]
        is None
    )
    A2SFPass.from_params({"policy": "none"}).run(graph, ctx)
    assert graph.kv_cache is None and all(b.cache_policy is None for b in graph.blocks)


# ---- eviction-aware perplexity --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(source: Path) -> torch.nn.Module:
    model = load_model(source)
    # A random model at init attends almost uniformly and barely uses its context; sharpen attention and
    # strengthen values so that which tokens the cache keeps visibly matters.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                param.mul_(6.0)
    return model


def stream(n: int = 4 * 48) -> torch.Tensor:
    return torch.randint(4, 90, (n,), generator=torch.Generator().manual_seed(1))


def evicting(**fields) -> object:
    return lambda: EvictingCache(CachePolicy("a2sf", **fields))


def test_eviction_perplexity_equals_full_cache_until_something_is_evicted(model: torch.nn.Module) -> None:
    measure = dict(prompt_len=32, continuation=16, batch_size=3)
    plain = eviction_perplexity_of_tokens(model, stream(), **measure)  # the model's own plain cache
    assert plain.n_windows == 4 and plain.n_tokens == 64 and plain.cache_tokens == 47
    assert plain.perplexity == pytest.approx(plain.full_cache_perplexity, rel=1e-6)

    roomy = eviction_perplexity_of_tokens(
        model, stream(), cache_factory=evicting(budget=48), chunk=5, **measure
    )
    assert (
        roomy.perplexity == pytest.approx(plain.full_cache_perplexity, rel=1e-6) and roomy.cache_tokens == 47
    )

    tight = eviction_perplexity_of_tokens(
        model, stream(), cache_factory=evicting(budget=8, alpha=0.5), **measure
    )
    assert tight.cache_tokens == 8 and tight.full_cache_perplexity == plain.full_cache_perplexity
    assert abs(tight.increase_pct) > 0.1  # float noise is ~1e-5 %
    # Scoring each window in one forward cannot see the eviction: that is why the decode protocol exists.
    from slimformer.converter.evaluation import perplexity_of_tokens

    one_forward = perplexity_of_tokens(
        model, stream().view(4, 48), window=48, cache_factory=evicting(budget=8)
    )
    no_cache = perplexity_of_tokens(model, stream().view(4, 48), window=48)
    assert one_forward.perplexity == pytest.approx(no_cache.perplexity, rel=1e-6)


def test_decoded_loglikelihoods_match_one_forward_without_eviction(model, source: Path) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    requests = [
        ("The quick brown fox jumps over the", " lazy dog."),
        ("The quick brown fox jumps over the", " moon"),
        ("Pack my box", " with five dozen liquor jugs!"),
    ]
    reference = loglikelihoods(model, tokenizer, requests)
    decoded = loglikelihoods(model, tokenizer, requests, decode_chunk=1, cache_factory=evicting(budget=64))
    assert decoded == pytest.approx(reference, rel=1e-5)
    evicted = loglikelihoods(
        model, tokenizer, requests, decode_chunk=1, cache_factory=evicting(budget=6, recent=2)
    )
    assert evicted[0] != pytest.approx(reference[0], rel=1e-4)


def test_cli_eval_measures_under_eviction(converted: Path, text_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["eval", str(converted), "--ppl", str(text_file), "--window", "48", "-q"]

    def run(*extra: str) -> list[str]:
        result = runner.invoke(cli, [*base, *extra])
        assert result.exit_code == 0, result.output
        return result.output.strip().splitlines()

    stored = run("--json", str(tmp_path / "ppl.json"))  # the checkpoint's own policy (budget 8): evicts
    assert len(stored) == 2 and stored[1].startswith("full-cache perplexity of the same tokens")
    record = json.loads((tmp_path / "ppl.json").read_text())
    assert record["kv_cache"]["budget"] == BUDGET and record["cache_tokens"] == BUDGET
    assert record["prompt_len"] == 36 and record["continuation"] == 12
    assert record["perplexity"] != pytest.approx(record["full_cache_perplexity"], rel=1e-4)

    roomy = run("--a2sf", "budget=64")  # an override that evicts nothing gives the full-cache number
    assert float(roomy[0].split(": ")[1]) == pytest.approx(record["full_cache_perplexity"], rel=1e-4)

    plain = run("--a2sf", "policy=none")  # no eviction: the ordinary one-line perplexity
    assert len(plain) == 1 and plain[0].startswith("perplexity: ")

    result = runner.invoke(cli, [*base, "--stride", "24"])
    assert isinstance(result.exception, SlimformerError) and "--stride does not apply" in str(
        result.exception
    )


def test_pass_reports_eviction_perplexity(source: Path, text_file: Path, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.toml"
    pipeline.write_text(
        f'[evaluation]\nppl = "{text_file}"\nwindow = 64\nmax_tokens = 512\n\n'
        '[[passes]]\nname = "a2sf"\nbudget = 8\nalpha = 0.1\n'
    )
    result = CliRunner().invoke(
        cli, ["convert", str(source), "-o", str(tmp_path / "out"), "--pipeline", str(pipeline), "-q"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    measured = report["passes"][0]["changes"]["eviction_perplexity"]
    assert measured["prompt_len"] == 48 and measured["continuation"] == 16 and measured["cache_tokens"] == 8
    assert measured["increase_pct"] == pytest.approx(
        100 * (measured["perplexity"] / measured["full_cache_perplexity"] - 1)
    )
    assert any(note.startswith("perplexity under eviction on") for note in report["passes"][0]["notes"])
    # The report's before/after rows score windows in one forward: the weights are unchanged, so are they.
    assert report["evaluation"]["perplexity_after"] == pytest.approx(
        report["evaluation"]["perplexity_before"]
    )


# ---- measured choices: alpha=auto, allocate=auto (passes/kv_tuning.py) ---------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"policy": "a2sf", "budget_ratio": 0.25, "alpha": 0.5},
        {"policy": "h2o", "budget": 10, "recent_ratio": 0.25, "sink": 1},
        {"policy": "streaming", "budget": 12},
        {"policy": "a2sf", "layer_budgets": [6, 12, 20], "alpha": 0.9},
    ],
)
def test_prefill_replay_equals_the_decode_protocol(model: torch.nn.Module, fields: dict) -> None:
    """kv_tuning prefills once and rebuilds each policy's cache through its update/observe; that must give the
    numbers eviction_perplexity_of_tokens gets by running the cache end to end, decoding and prefill-only."""
    from slimformer.passes import kv_tuning

    # chunk_size 8 < the prompt: the prompt is scored in chunks in both flows (as every real prompt is).
    policy = CachePolicy.from_dict({**fields, "chunk_size": 8})
    ids = stream().view(4, 48)
    record = kv_tuning.record_prefill(model, ids[:, :32], ids[:, 32:])
    for chunk in (1, 16):
        direct = eviction_perplexity_of_tokens(
            model,
            ids,
            prompt_len=32,
            continuation=16,
            chunk=chunk,
            batch_size=4,
            cache_factory=lambda: EvictingCache(policy),
        )
        replayed = kv_tuning.window_nll(model, [record], policy, chunk)
        assert float(replayed.mean()) == pytest.approx(direct.nll, rel=1e-9, abs=1e-12)
        assert float(kv_tuning.window_nll(model, [record], None, chunk).mean()) == pytest.approx(
            direct.full_cache_nll, rel=1e-6
        )
    # The kept positions the allocation measures are the ones the evicting cache really keeps.
    cache = EvictingCache(policy)
    with torch.inference_mode():
        model(input_ids=ids[:, :32], past_key_values=cache, use_cache=True)
    for slot, layer in enumerate(cache.layers):
        kept = kv_tuning.kept_positions(record, policy, slot)
        assert torch.equal(kept.sort(dim=-1).values, layer.kept_positions().sort(dim=-1).values)


def test_allocate_spreads_the_total_where_a_step_saves_most() -> None:
    from slimformer.passes import kv_tuning

    budgets = [4, 8, 12, 16, 20]
    curves = kv_tuning.LossCurves(
        budgets,
        [
            [0.50, 0.20, 0.10, 0.05, 0.00],  # steep: tokens here save the most attention mass
            [0.10, 0.09, 0.08, 0.07, 0.06],  # flat
            [0.30, 0.25, 0.20, 0.15, 0.10],
        ],
    )
    allocated = kv_tuning.allocate(curves, total=30, floor=4, cap=20)
    assert sum(allocated) == 30 and all(4 <= b <= 20 for b in allocated)
    assert allocated[0] > allocated[2] > allocated[1]
    assert sum(kv_tuning.allocate(curves, total=31, floor=4, cap=20)) == 31  # a remainder below one step
    with pytest.raises(SlimformerError, match="cannot spread 70 tokens over 3 cache slots"):
        kv_tuning.allocate(curves, total=70, floor=4, cap=20)


@pytest.fixture(scope="module")
def tuned(source: Path, text_file: Path) -> Path:
    out = source.parent / "tuned"
    options = "budget_ratio=0.25,alpha=auto,allocate=auto,alpha_grid=0.5:1,recent_grid=0.25:0.75,chunk_size=8"
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(source),
            "-o",
            str(out),
            "--a2sf",
            options,
            "--calib",
            str(text_file),
            "--calib-samples",
            "4",
            "--calib-seq-len",
            "48",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_alpha_auto_and_allocate_auto_choose_store_and_report(tuned: Path) -> None:
    config = json.loads((tuned / "config.json").read_text())["kv_cache"]
    record = json.loads((tuned / "report.json").read_text())["passes"][0]
    tuning = record["changes"]["tuning"]
    # alpha=auto: the whole grid measured (decode protocol), the lowest perplexity chosen and stored.
    grid = tuning["alpha"]["grid"]
    assert {(row["alpha"], row["recent_ratio"]) for row in grid} == {
        (0.5, 0.25),
        (0.5, 0.75),
        (1.0, 0.25),
        (1.0, 0.75),
    }
    best = min(grid, key=lambda row: row["perplexity"])
    assert tuning["alpha"]["chosen"] == {"alpha": best["alpha"], "recent_ratio": best["recent_ratio"]}
    assert (config["alpha"], config["recent_ratio"]) == (best["alpha"], best["recent_ratio"])
    assert tuning["calibration"] == {
        "source": tuning["calibration"]["source"],
        "windows": 4,
        "prompt_len": 36,
        "continuation": 12,
    }
    # allocate=auto: per-layer budgets summing to the uniform total (25% of the 36-token prompt = 9 per slot).
    assert config["budget_ratio"] is None and config["budget"] is None
    assert sum(config["layer_budgets"]) == 3 * 9 == tuning["allocation"]["total"]
    assert config["layer_budgets"] == tuning["allocation"]["layer_budgets"]
    assert (
        tuning["allocation"]["lost_attention_mass_allocated"]
        <= tuning["allocation"]["lost_attention_mass_uniform"] + 1e-9
    )
    notes = " ".join(record["notes"])
    assert "alpha=auto: alpha" in notes and "allocate=auto: 27 tokens" in notes
    # The written pipeline replays the measurement, not its outcome.
    pipeline = (tuned / "pipeline.toml").read_text()
    assert 'alpha = "auto"' in pipeline and 'allocate = "auto"' in pipeline
    # generate() builds the allocated cache.
    _, cache = generate(load_model(tuned))
    assert cache.kept_lengths() == config["layer_budgets"]


def test_allocated_budgets_export_to_onnx(tuned: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from slimformer.exporters.onnx import OnnxExportOptions, export_onnx
    from slimformer.exporters.onnx_runtime import OnnxCausalLM, load_metadata

    export_onnx(tuned, tmp_path / "onnx", OnnxExportOptions(quiet=True))
    budgets = json.loads((tuned / "config.json").read_text())["kv_cache"]["layer_budgets"]
    assert load_metadata(tmp_path / "onnx")["kv_cache"]["layer_budgets"] == budgets
    # ONNX Runtime decodes with the same per-layer budgets and picks the same tokens as the PyTorch runtime.
    expected, _ = generate(load_model(tuned))
    got = OnnxCausalLM(tmp_path / "onnx", threads=1).generate(
        prompt_ids().numpy(), max_new_tokens=12, pad_token_id=3
    )
    assert got.state.physical_lengths() == budgets
    assert (got.sequences == expected.numpy()).all()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("policy=h2o,budget=8,alpha=auto", "alpha=auto tunes A2SF's forgetting factor"),
        ("layer_budgets=8:8:8,allocate=auto", "allocate=auto chooses the per-layer budgets itself"),
        ("budget=8,allocate=sometimes", "allocate='sometimes' is unknown"),
        ("budget=8,alpha_grid=0.5:0.9", "alpha_grid is the grid alpha=auto measures"),
        ("budget=8,alpha=auto,alpha_grid=0:0.5", "alpha_grid values must lie in (0, 1]"),
        ("budget=8,alpha=auto,recent=2,recent_grid=0.5", "recent_grid searches the recent split"),
        ("budget=8,alpha=auto,tune_continuation=1", "tune_continuation=1 must be an integer >= 2"),
    ],
)
def test_bad_tuning_options_fail_before_any_work(
    source: Path, tmp_path: Path, options: str, message: str
) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(source), "-o", str(out), "--a2sf", options, "-q"])
    assert isinstance(result.exception, SlimformerError), result.output
    assert message in str(result.exception) and "Fix:" in str(result.exception)
    assert not out.exists()
