"""Identity pipeline round trips: load -> convert -> save -> reload gives the original model exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import STORIES, make_tiny, require
from slimformer import load_model
from slimformer.converter.conversion import convert
from slimformer.converter.pipeline import PipelineSpec


def _reference(path, family):
    from transformers import AutoModel, AutoModelForCausalLM

    return (AutoModel if family == "bert" else AutoModelForCausalLM).from_pretrained(path).eval()


def _compare(reference, model, family, vocab):
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding on the second row
    with torch.no_grad():
        if family == "bert":
            a, b = reference(ids, attention_mask=mask), model(ids, attention_mask=mask)
            assert (a.last_hidden_state - b.last_hidden_state).abs().max() <= 1e-5
            assert (a.pooler_output - b.pooler_output).abs().max() <= 1e-5
            return
        a, b = reference(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
        assert (a - b)[mask.bool()].abs().max() <= 1e-5
        kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(reference.generate(ids, **kwargs), model.generate(ids, **kwargs))


def test_identity_roundtrip_every_family(tiny_checkpoint, tmp_path):
    family, source = tiny_checkpoint
    out = tmp_path / "out"
    report = convert(source, out, PipelineSpec())
    assert report["params_before"] == report["params_after"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "slimformer" and config["base_model_type"] == family
    assert all(not b["attention"]["no_op"] and not b["ffn"]["no_op"] for b in config["block_configs"])
    _compare(_reference(source, family), load_model(out), family, 96)


def test_sharded_source_and_sharded_output(tmp_path):
    from slimformer.converter.graph import load_graph
    from slimformer.converter.outputs import atomic_output_dir
    from slimformer.converter.source import resolve_source
    from slimformer.exporters.safetensors import write_checkpoint

    source = make_tiny("qwen2", tmp_path / "sharded", max_shard_size="40KB")
    assert (source / "model.safetensors.index.json").is_file()
    graph = load_graph(resolve_source(source))
    with atomic_output_dir(tmp_path / "out") as tmp:
        written = write_checkpoint(graph, tmp, max_shard_bytes=30_000)
    assert written["shards"] > 1
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    _compare(_reference(source, "qwen2"), load_model(tmp_path / "out"), "qwen2", 96)


def test_real_stories260k_roundtrip(tmp_path):
    source = require(STORIES)
    convert(source, tmp_path / "out", PipelineSpec())
    reference = _reference(source, "llama")
    model = load_model(tmp_path / "out")
    _compare(reference, model, "llama", 512)
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_converted_dir_loads_with_remote_code_in_fresh_process(tmp_path):
    """A process that never imports slimformer loads the output with plain transformers."""
    llama = make_tiny("llama", tmp_path / "llama")
    bert = make_tiny("bert", tmp_path / "bert")
    convert(llama, tmp_path / "out-llama", PipelineSpec())
    convert(bert, tmp_path / "out-bert", PipelineSpec())
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModel, AutoModelForCausalLM
        ids = torch.randint(3, 96, (1, 9))
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path / "out-llama")!r}, trust_remote_code=True).eval()
        r = AutoModelForCausalLM.from_pretrained({str(llama)!r}).eval()
        assert (m(ids).logits - r(ids).logits).abs().max() <= 1e-5
        assert torch.equal(m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0),
                           r.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0))
        e = AutoModel.from_pretrained({str(tmp_path / "out-bert")!r}, trust_remote_code=True).eval()
        b = AutoModel.from_pretrained({str(bert)!r}).eval()
        assert (e(ids).last_hidden_state - b(ids).last_hidden_state).abs().max() <= 1e-5
        assert not any(k.split('.')[0] in ('converter', 'passes', 'exporters') for k in sys.modules), 'slimformer imported'
        print('OK', type(m).__module__)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK transformers_modules" in result.stdout


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_save_dtype(tmp_path, dtype):
    from safetensors import safe_open
    from slimformer.converter.conversion import ConvertOptions

    source = make_tiny("llama", tmp_path / "src")
    convert(source, tmp_path / "out", PipelineSpec(), ConvertOptions(save_dtype=dtype, quiet=True))
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as handle:
        assert all(str(handle.get_tensor(k).dtype) == f"torch.{dtype}" for k in handle.keys())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype
