"""The vLLM (Nemotron-NAS / DeciLM) export itself, without vLLM: ``exporters/vllm.py``.

Checked here on tiny random models of the decoder families (fast, no vLLM needed):

* the config vLLM reads -- ``model_type``, ``architectures``, ``auto_map``, one exact ``block_configs`` entry per
  layer (no ``ffn_mult``), the bias flags in vLLM's reading -- and that the shipped config class loads it;
* the tensors: vLLM's names, none for dropped modules, nothing else;
* that the export computes the checkpoint's function: :func:`decilm_logits` below runs an export the way
  vLLM's ``DeciLMForCausalLM`` does (written from ``vllm/model_executor/models/nemotron_nas.py`` and
  ``llama.py``: per-layer no-ops, ``n_heads_in_group``, ``intermediate_size``, ``qkv_bias`` / ``attention_bias``,
  partial rotary, scores scaled by ``head_dim ** -0.5``, a model-wide sliding window) and its logits must match
  the slimformer runtime's -- for dropped sub-blocks, the stand-in attention and head-size padding;
* refusals (Qwen3 q/k norms, encoders, SAS layers), the A2SF note, atomic output and the CLI.

``tests/test_vllm.py`` runs the exports in vLLM's real engine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_LM, make_tiny
from safetensors.torch import load_file
from slimformer.converter.cli import cli
from slimformer.converter.conversion import load_model
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import DROPPED, load_graph
from slimformer.converter.outputs import atomic_output_dir
from slimformer.converter.source import resolve_source
from slimformer.exporters.safetensors import write_checkpoint
from slimformer.exporters.vllm import CONFIG_FILE, METADATA_FILE, check_exportable, export_vllm
from torch.nn import functional as F

LOGITS_ATOL = 1e-4


@pytest.fixture(autouse=True)
def single_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ---- helpers ---------------------------------------------------------------------------------------


def converted(source: Path, out: Path, *, drop_attention=(), drop_mlp=(), kv_cache=None) -> Path:
    """A slimformer-format checkpoint of ``source`` with the given sub-blocks dropped (no calibration needed)."""
    graph = load_graph(resolve_source(source))
    for layer in drop_attention:
        graph.blocks[layer].attention.state = DROPPED
    for layer in drop_mlp:
        graph.blocks[layer].mlp.state = DROPPED
    graph.kv_cache = kv_cache
    with atomic_output_dir(out) as directory:
        write_checkpoint(graph, directory)
    return out


def export_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def decilm_logits(directory: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, V]`` of a Nemotron-NAS export for one sequence, computed as vLLM's DeciLMForCausalLM does."""
    config = json.loads((directory / "config.json").read_text())
    weights = {name: tensor.float() for name, tensor in export_tensors(directory).items()}
    heads, head_dim, eps = config["num_attention_heads"], config["head_dim"], config["rms_norm_eps"]
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "default", "this reference implements default RoPE only"
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    length = input_ids.shape[0]
    inv_freq = 1.0 / (
        rope["rope_theta"] ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    )
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:  # neox style on the first rotary_dim dimensions of each head
        first, second = x[..., : rotary_dim // 2], x[..., rotary_dim // 2 : rotary_dim]
        return torch.cat(
            [first * cos - second * sin, second * cos + first * sin, x[..., rotary_dim:]], dim=-1
        )

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weights[name]

    def linear(x: torch.Tensor, name: str, bias: bool) -> torch.Tensor:
        return F.linear(x, weights[name + ".weight"], weights[name + ".bias"] if bias else None)

    query = torch.arange(length)[:, None]
    visible = torch.arange(length)[None, :] <= query
    if config.get("sliding_window"):
        visible &= query - torch.arange(length)[None, :] < config["sliding_window"]
    x = weights["model.embed_tokens.weight"][input_ids]
    for layer, spec in enumerate(config["block_configs"]):
        prefix = f"model.layers.{layer}."
        assert set(spec["attention"]) == {"no_op", "replace_with_linear", "n_heads_in_group"}
        assert set(spec["ffn"]) == {"no_op", "replace_with_linear", "intermediate_size"}  # no ffn_mult
        if not spec["attention"]["no_op"]:
            kv_heads = heads // spec["attention"]["n_heads_in_group"]
            h = norm(x, prefix + "input_layernorm.weight")
            q = rotate(
                linear(h, prefix + "self_attn.q_proj", config["qkv_bias"]).view(length, heads, head_dim)
            )
            k = rotate(
                linear(h, prefix + "self_attn.k_proj", config["qkv_bias"]).view(length, kv_heads, head_dim)
            )
            v = linear(h, prefix + "self_attn.v_proj", config["qkv_bias"]).view(length, kv_heads, head_dim)
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
            scores = torch.einsum("qhd,khd->hqk", q, k) * head_dim**-0.5
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            attended = torch.einsum("hqk,khd->qhd", probs, v).reshape(length, heads * head_dim)
            x = x + linear(attended, prefix + "self_attn.o_proj", config["attention_bias"])
        if not spec["ffn"]["no_op"]:
            h = norm(x, prefix + "post_attention_layernorm.weight")
            assert weights[prefix + "mlp.gate_proj.weight"].shape[0] == spec["ffn"]["intermediate_size"]
            gate = linear(h, prefix + "mlp.gate_proj", config["mlp_bias"])
            up = linear(h, prefix + "mlp.up_proj", config["mlp_bias"])
            x = x + linear(F.silu(gate) * up, prefix + "mlp.down_proj", config["mlp_bias"])
    x = norm(x, "model.norm.weight")
    head = (
        weights["model.embed_tokens.weight"] if config["tie_word_embeddings"] else weights["lm_head.weight"]
    )
    return x @ head.T


def runtime_logits(checkpoint: Path, input_ids: torch.Tensor) -> torch.Tensor:
    model = load_model(checkpoint)
    with torch.inference_mode():
        return model(input_ids=input_ids[None]).logits[0].float()


def tokens(vocab: int = 96, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(seed))


# ---- config, tensors, function ------------------------------------------------------------------------


def test_config_and_tensors_of_a_layer_dropped_llama(tmp_path, capsys):
    source = make_tiny(
        "llama", tmp_path / "src", layers=4
    )  # q/k/v/o biases (conftest), GQA 4 heads / 2 KV heads
    ckpt = converted(source, tmp_path / "ckpt", drop_attention=[1], drop_mlp=[2])
    metadata = export_vllm(ckpt, tmp_path / "out", quiet=True)
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "nemotron-nas"
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert (out / CONFIG_FILE).is_file() and (out / METADATA_FILE).is_file()
    assert (out / "generation_config.json").is_file()
    kept = {"no_op": False, "replace_with_linear": False}
    assert config["block_configs"] == [
        {"attention": {**kept, "n_heads_in_group": 2}, "ffn": {**kept, "intermediate_size": 64}},
        {
            "attention": {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None},
            "ffn": {**kept, "intermediate_size": 64},
        },
        {
            "attention": {**kept, "n_heads_in_group": 2},
            "ffn": {"no_op": True, "replace_with_linear": False, "intermediate_size": None},
        },
        {"attention": {**kept, "n_heads_in_group": 2}, "ffn": {**kept, "intermediate_size": 64}},
    ]
    # conftest's Llama has attention_bias=True: q/k/v and output biases, in vLLM's two flags.
    assert (config["qkv_bias"], config["attention_bias"], config["mlp_bias"]) == (True, True, False)
    assert config["head_dim"] == 8 and config["num_attention_heads"] == 4 and config["num_hidden_layers"] == 4

    names = set(export_tensors(out))
    assert not any(
        name.startswith("model.layers.1.self_attn") or name.startswith("model.layers.1.input_layernorm")
        for name in names
    )
    assert not any(
        name.startswith("model.layers.2.mlp") or name.startswith("model.layers.2.post_attention")
        for name in names
    )
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for layer in (0, 2, 3):
        expected |= {f"model.layers.{layer}.input_layernorm.weight"}
        expected |= {
            f"model.layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkvo" for kind in ("weight", "bias")
        }
    for layer in (0, 1, 3):
        expected |= {f"model.layers.{layer}.post_attention_layernorm.weight"}
        expected |= {f"model.layers.{layer}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected
    assert metadata["attention_layers"] == 3 and metadata["mlp_layers"] == 3
    assert metadata["kv_bytes_per_token"] == 3 * 2 * 2 * 8 * 4
    assert metadata["not_carried"] == [] and metadata["stand_in_attention_layer"] is None
    # head_dim 8 is outside vLLM's CPU kernels: said once, with the way out
    assert "--pad-head-dim" in capsys.readouterr().err


def test_shipped_config_class_loads_the_export(tmp_path):
    from transformers import AutoConfig

    source = make_tiny("llama", tmp_path / "src", layers=3)
    export_vllm(converted(source, tmp_path / "ckpt", drop_attention=[2]), tmp_path / "out", quiet=True)
    config = AutoConfig.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig" and config.model_type == "nemotron-nas"
    # vLLM reads these by attribute and tells the FFN width fields apart with hasattr().
    assert config.block_configs[2].attention.no_op is True
    assert config.block_configs[0].attention.n_heads_in_group == 2
    assert config.block_configs[0].ffn.intermediate_size == 64
    assert not hasattr(config.block_configs[0].ffn, "ffn_mult")
    assert config.rope_parameters["rope_theta"] == 10000.0 and config.tie_word_embeddings is False
    assert json.loads(config.to_json_string())["block_configs"][2]["attention"]["no_op"] is True


@pytest.mark.parametrize(
    "family, drops",
    [
        ("llama", {"drop_attention": [1], "drop_mlp": [2]}),
        ("mistral", {"drop_mlp": [0]}),
        ("qwen2", {"drop_attention": [2]}),
        ("llama", {}),  # identity
    ],
)
def test_export_computes_the_checkpoint(tmp_path, family, drops):
    source = make_tiny(family, tmp_path / "src", layers=3)
    if family == "mistral":  # a window shorter than the sequence, so that it matters
        config = json.loads((source / "config.json").read_text())
        (source / "config.json").write_text(json.dumps({**config, "sliding_window": 8}))
    ckpt = converted(source, tmp_path / "ckpt", **drops)
    export_vllm(ckpt, tmp_path / "out", quiet=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if family == "qwen2":  # q/k/v biases without an output bias
        assert (config["qkv_bias"], config["attention_bias"]) == (True, False)
    if family == "mistral":
        assert config["sliding_window"] == 8
    ids = tokens()
    expected = runtime_logits(ckpt, ids)
    got = decilm_logits(tmp_path / "out", ids)
    assert (got - expected).abs().max().item() <= LOGITS_ATOL


def test_export_of_an_original_checkpoint(tmp_path):
    source = make_tiny("qwen2", tmp_path / "src", layers=2)
    metadata = export_vllm(source, tmp_path / "out", quiet=True)
    assert metadata["source_model_type"] == "qwen2"
    ids = tokens()
    assert (
        decilm_logits(tmp_path / "out", ids) - runtime_logits(source, ids)
    ).abs().max().item() <= LOGITS_ATOL


@pytest.mark.parametrize(
    "drops, stub",
    [
        ({"drop_attention": [0]}, 0),  # the first sub-block to run would be an MLP
        ({"drop_attention": [0, 1], "drop_mlp": [0]}, 1),  # layer 0 is empty; layer 1's MLP runs first
        ({"drop_attention": [0, 1, 2], "drop_mlp": [0, 1, 2]}, 0),  # nothing runs at all
        ({"drop_attention": [1, 2]}, None),  # layer 0 keeps its attention: no stand-in
    ],
)
def test_stand_in_attention_where_vllm_needs_one(tmp_path, capsys, drops, stub):
    source = make_tiny("llama", tmp_path / "src", layers=3)
    ckpt = converted(source, tmp_path / "ckpt", **drops)
    metadata = export_vllm(ckpt, tmp_path / "out", quiet=True)
    assert metadata["stand_in_attention_layer"] == stub
    err = capsys.readouterr().err
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if stub is not None:
        assert f"layer {stub}:" in err and "stand-in attention" in err
        assert config["block_configs"][stub]["attention"]["no_op"] is False
        assert metadata["layers"][stub]["attention"] == "stand-in"
        tensors = export_tensors(tmp_path / "out")
        assert tensors[f"model.layers.{stub}.self_attn.o_proj.weight"].abs().max() == 0
        assert tensors[f"model.layers.{stub}.self_attn.v_proj.weight"].abs().max() == 0
    else:
        assert "stand-in" not in err
    ids = tokens()
    assert (
        decilm_logits(tmp_path / "out", ids) - runtime_logits(ckpt, ids)
    ).abs().max().item() <= LOGITS_ATOL


def test_pad_head_dim_is_exact(tmp_path):
    source = make_tiny("qwen2", tmp_path / "src", layers=3)  # head_dim 8, q/k/v biases
    ckpt = converted(
        source, tmp_path / "ckpt", drop_attention=[0], drop_mlp=[1]
    )  # padding + stand-in together
    metadata = export_vllm(ckpt, tmp_path / "out", quiet=True, pad_head_dim=32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["head_dim"] == 32 and config["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert (
        metadata["source_head_dim"] == 8 and metadata["kv_bytes_per_token"] == 3 * 2 * 2 * 32 * 4
    )  # stand-in included
    tensors = export_tensors(tmp_path / "out")
    assert tensors["model.layers.1.self_attn.q_proj.weight"].shape == (4 * 32, 32)
    assert tensors["model.layers.1.self_attn.o_proj.weight"].shape == (32, 4 * 32)
    ids = tokens()
    assert (
        decilm_logits(tmp_path / "out", ids) - runtime_logits(ckpt, ids)
    ).abs().max().item() <= LOGITS_ATOL


def test_pad_head_dim_smaller_than_head_dim_is_refused(tmp_path):
    source = make_tiny("llama", tmp_path / "src", layers=2)
    with pytest.raises(SlimformerError, match="smaller than the model's head_dim 8"):
        export_vllm(source, tmp_path / "out", quiet=True, pad_head_dim=4)
    assert not (tmp_path / "out").exists()


# ---- refusals and what is not carried --------------------------------------------------------------------


def test_qwen3_is_refused_naming_the_qk_norms(tmp_path):
    source = make_tiny("qwen3", tmp_path / "src", layers=2)
    with pytest.raises(SlimformerError, match=r"q/k RMSNorms \(self_attn.q_norm / k_norm\)") as info:
        export_vllm(converted(source, tmp_path / "ckpt", drop_attention=[1]), tmp_path / "out", quiet=True)
    assert "Fix:" in info.value.message and "\n" not in info.value.message
    assert not (tmp_path / "out").exists()


def test_encoder_is_refused(tmp_path):
    source = make_tiny("bert", tmp_path / "src", layers=2)
    with pytest.raises(SlimformerError, match="is an encoder"):
        export_vllm(source, tmp_path / "out", quiet=True)


def test_sas_layers_are_refused_with_their_index(tmp_path):
    source = make_tiny("llama", tmp_path / "src", layers=4)
    graph = load_graph(resolve_source(source))
    graph.blocks[1].attention.details["form"] = "shaped"
    graph.blocks[3].attention.details["form"] = "sas"
    with pytest.raises(
        SlimformerError, match=r"layer\(s\) 1 \(shaped\), 3 \(sas\) are simplified \(SAS\) layers"
    ):
        check_exportable(graph)


def test_real_sas_conversion_is_refused(tmp_path):
    """A checkpoint the sas pass really wrote (approximate conversion of one layer, no healing)."""
    from slimformer.converter.conversion import ConvertOptions, convert
    from slimformer.converter.pipeline import PassSpec, PipelineSpec

    spec = PipelineSpec()
    spec.calibration.samples, spec.calibration.seq_len = 4, 64
    spec.passes.append(PassSpec("sas", {"layers": 1, "heal_steps": 0}))
    convert(TINY_LM, tmp_path / "sas", spec, ConvertOptions(quiet=True))
    shaped = [
        i
        for i, b in enumerate(json.loads((tmp_path / "sas" / "config.json").read_text())["block_configs"])
        if b["attention"].get("form") == "shaped"
    ]
    result = CliRunner().invoke(cli, ["export", "vllm", str(tmp_path / "sas"), "-o", str(tmp_path / "out")])
    assert isinstance(result.exception, SlimformerError)
    assert f"layer(s) {shaped[0]} (shaped) are simplified (SAS) layers" in result.exception.message
    assert not (tmp_path / "out").exists()


def test_a2sf_policy_is_not_carried_and_says_so(tmp_path, capsys):
    source = make_tiny("llama", tmp_path / "src", layers=2)
    policy = {"policy": "a2sf", "budget": 64, "alpha": 0.5}
    ckpt = converted(source, tmp_path / "ckpt", kv_cache=policy)
    metadata = export_vllm(ckpt, tmp_path / "out", quiet=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if "KV-cache policy" in line]
    assert len(lines) == 1 and "not carried" in lines[0]
    assert metadata["not_carried"][0]["what"] == "kv_cache policy"
    assert metadata["not_carried"][0]["policy"] == policy
    recorded = json.loads((tmp_path / "out" / METADATA_FILE).read_text())
    assert recorded["not_carried"] == metadata["not_carried"]
    assert "kv_cache" not in json.loads((tmp_path / "out" / "config.json").read_text())


# ---- output handling and the CLI ---------------------------------------------------------------------------


def test_output_is_atomic(tmp_path):
    source = make_tiny("llama", tmp_path / "src", layers=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SlimformerError, match="already exists"):
        export_vllm(source, out, quiet=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    qwen3 = make_tiny("qwen3", tmp_path / "qwen3", layers=2)
    with pytest.raises(SlimformerError):
        export_vllm(qwen3, out, overwrite=True, quiet=True)  # refused: the old output stays as it was
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    export_vllm(source, out, overwrite=True, quiet=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith(".")
    ] == []  # no temporary directories left


def test_cli_export_vllm(tmp_path):
    source = make_tiny("llama", tmp_path / "src", layers=2)
    ckpt = converted(source, tmp_path / "ckpt", drop_attention=[1])
    result = CliRunner().invoke(
        cli, ["export", "vllm", str(ckpt), "-o", str(tmp_path / "out"), "--pad-head-dim", "32"]
    )
    assert result.exit_code == 0, result.output
    assert "DeciLMForCausalLM, 2 layers, 1 with attention" in result.output
    assert "vllm serve" in result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["head_dim"] == 32
