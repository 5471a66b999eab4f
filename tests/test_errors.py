"""Bad input gets one clear SlimformerError (what, where, fix), a non-zero exit, and nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from slimformer.converter.conversion import ConvertOptions, convert
from slimformer.converter.errors import SlimformerError
from slimformer.converter.pipeline import CalibrationSpec, PipelineSpec


def _convert(source, out, **options):
    return convert(source, out, PipelineSpec(), ConvertOptions(quiet=True, **options))


def _assert_error(source, out, match, **options):
    with pytest.raises(SlimformerError, match=match) as info:
        _convert(source, out, **options)
    assert info.value.fix, "every user error says how to fix it"
    assert not Path(out).exists(), "nothing is written on failure"
    leftovers = [p for p in Path(out).parent.iterdir() if p.name.startswith(f".{Path(out).name}.")]
    assert not leftovers, f"temporary output left behind: {leftovers}"
    return info.value


def test_missing_directory(tmp_path):
    _assert_error(tmp_path / "nope", tmp_path / "out", "does not exist")


def test_bare_name_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a bare name must not reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.chdir(tmp_path)
    error = _assert_error("gpt2", tmp_path / "out", "does not exist")
    assert "'org/gpt2'" in error.fix


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_error(tmp_path / "empty", tmp_path / "out", "empty")


def test_source_is_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    _assert_error(tmp_path / "file.txt", tmp_path / "out", "is a file")


def test_hub_id_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    error = _assert_error("nobody-here/no-such-model", tmp_path / "out", "offline")
    assert "nobody-here/no-such-model" in error.message


def test_truncated_safetensors(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _assert_error(source, tmp_path / "out", "truncated or corrupt")


def test_corrupt_safetensors_header(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    (source / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + os.urandom(64)
    )
    _assert_error(source, tmp_path / "out", "truncated or corrupt")


def test_config_without_weights(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    (source / "model.safetensors").unlink()
    _assert_error(source, tmp_path / "out", "no weights")


def test_missing_shard(tmp_path):
    source = make_tiny("llama", tmp_path / "src", max_shard_size="40KB")
    next(source.glob("model-*.safetensors")).unlink()
    _assert_error(source, tmp_path / "out", "missing shard")


def test_unsupported_family_names_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path / "gpt2"
    )
    error = _assert_error(tmp_path / "gpt2", tmp_path / "out", "'gpt2' is not supported")
    assert "llama" in error.fix and "qwen3" in error.fix and "bert" in error.fix


def test_mismatched_tensor_shapes(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["intermediate_size"] = 48
    (source / "config.json").write_text(json.dumps(config))
    _assert_error(source, tmp_path / "out", "has shape")


def test_config_not_json(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    (source / "config.json").write_text("{broken")
    _assert_error(source, tmp_path / "out", "not valid JSON")


def test_output_path_is_a_file(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    (tmp_path / "out").write_text("precious")
    with pytest.raises(SlimformerError, match="existing file"):
        _convert(source, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "precious"


def test_unwritable_output_location(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    with pytest.raises(SlimformerError, match="not writable"):
        _convert(source, "/proc/slimformer-out")


def test_existing_output_is_not_touched_and_overwrite_is_atomic(tmp_path, monkeypatch):
    source = make_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(SlimformerError, match="already exists"):
        _convert(source, out)
    # A failure half-way through an --overwrite leaves the old output exactly as it was.
    import slimformer.converter.conversion as convert_module

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert_module, "write_report", explode)
    with pytest.raises(RuntimeError):
        _convert(source, out, overwrite=True)
    assert (out / "keep.txt").read_text() == "old" and not (out / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    monkeypatch.undo()
    _convert(source, out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()


def test_pickle_refused_unless_allowed(tmp_path):
    from transformers import LlamaForCausalLM

    source = make_tiny("llama", tmp_path / "src")
    model = LlamaForCausalLM.from_pretrained(source)
    (source / "model.safetensors").unlink()
    torch.save(model.state_dict(), source / "pytorch_model.bin")
    _assert_error(source, tmp_path / "out", "--allow-pickle|pickled")
    _convert(source, tmp_path / "out", allow_pickle=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_remote_code_refused_unless_trusted(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (source / "config.json").write_text(json.dumps(config))
    (source / "modeling_evil.py").write_text("raise SystemExit('ran remote code')\n")
    _assert_error(source, tmp_path / "out", "ships its own code")
    _convert(source, tmp_path / "out", trust_remote_code=True)


def test_calibration_source_empty_or_too_short(tmp_path):
    from slimformer.converter.calibration import sample_windows
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[UNK]")
    (tmp_path / "empty.txt").write_text("   \n")
    with pytest.raises(SlimformerError, match="empty"):
        sample_windows(tokenizer, str(tmp_path / "empty.txt"), 2, 8)
    (tmp_path / "short.txt").write_text("a b a b")
    with pytest.raises(SlimformerError, match="fewer than"):
        sample_windows(tokenizer, str(tmp_path / "short.txt"), 4, 8)
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(SlimformerError, match="no text files"):
        sample_windows(tokenizer, str(tmp_path / "emptydir"), 1, 4)
    with pytest.raises(SlimformerError, match="does not exist"):
        sample_windows(tokenizer, str(tmp_path / "missing.txt"), 1, 4)


def test_unknown_pass_fails_before_any_work(tmp_path):
    source = make_tiny("llama", tmp_path / "src")
    spec = PipelineSpec.from_dict({"passes": [{"name": "no_such_pass"}]})
    with pytest.raises(SlimformerError, match="unknown pass"):
        convert(source, tmp_path / "out", spec, ConvertOptions(quiet=True))
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_on_stderr_with_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "slimformer", "convert", str(tmp_path / "missing"), "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert result.stdout == ""


def test_calibration_spec_defaults_are_sane():
    spec = CalibrationSpec()
    assert spec.samples > 0 and spec.seq_len > 1 and spec.sources
