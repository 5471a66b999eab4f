"""SAS: shaped attention and block forms in the runtime, exact folds, and the approximate conversion pass."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import PYCODER, ROOT, STORIES, make_tiny, require
from safetensors import safe_open
from slimformer import load_model
from slimformer.converter.cli import cli
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import load_graph
from slimformer.converter.pipeline import CalibrationSpec, EvaluationSpec, PassContext
from slimformer.converter.runtime import SlimformerConfig, SlimformerForCausalLM
from slimformer.converter.runtime.configuration_slimformer import default_block_config
from slimformer.converter.runtime.masks import visible_keys
from slimformer.converter.runtime.sas import ShapedAttention, attention_branches, centering_matrix
from slimformer.converter.source import resolve_source
from slimformer.passes.sas.simplify import SasPass, fit_layers


@pytest.fixture(autouse=True)
def one_thread():
    # Two threads on a shared two-core machine spin against other jobs; one is steady and fast for tiny models.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sas_config(
    forms: list[str], *, kv_heads: int = 2, reparam: bool | str = False, tied: bool = True
) -> SlimformerConfig:
    """A tiny config whose layers have ``forms``; ``reparam``: value/proj ``alpha I + beta dW`` (True: both)."""
    configs = []
    for form in forms:
        config = default_block_config()
        if form != "standard":
            config["attention"]["form"] = form
            for kind in ("value", "proj"):
                if reparam is True or reparam == kind:
                    config["attention"][kind] = "reparam"
        configs.append(config)
    return SlimformerConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=len(forms),
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        block_configs=configs,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
    )


@torch.no_grad()
def perturbed(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every SAS parameter off its initial value, so no term of the computation is trivially zero."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if any(key in name for key in ("shaped_", "value.", "proj.", "mlp_gain", "norm")):
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def rotary(config: SlimformerConfig, length: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from slimformer.converter.runtime.rotary import RotaryEmbedding

    x = torch.zeros(1, length, config.hidden_size)
    return RotaryEmbedding(config)(x, torch.arange(offset, offset + length)[None])


# ---- C and shaped attention -----------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("past", [0, 3])
def test_centering_rows_sum_to_one_over_visible_keys(causal, padding, past):
    q = 5
    new_valid = torch.ones(2, q, dtype=torch.bool)
    past_valid = torch.ones(2, 1, past, dtype=torch.bool) if past else None
    if padding:
        new_valid[1, :2] = False  # left padding of the second row
        if past:
            past_valid[1, 0, :2] = False
    visible = visible_keys(new_valid, past_valid, q, past, causal=causal)
    if visible is None:  # plain causal without past or padding: C is the running mean, checked below
        visible = torch.ones(q, q, dtype=torch.bool).tril()[None, None]
    c = centering_matrix(visible)
    rows = visible.any(dim=-1)
    assert torch.allclose(c.sum(-1)[rows], torch.ones(()), atol=1e-6)
    assert torch.all(c.masked_select(~visible.expand_as(c) & rows[..., None].expand_as(c)) == 0)
    counts = visible.sum(-1, keepdim=True).clamp_min(1)
    assert torch.allclose(
        c.masked_select(visible.expand_as(c)), (1.0 / counts).expand_as(c).masked_select(visible.expand_as(c))
    )
    if causal and not padding:  # DESIGN.md: causal row i is 1/i on the first i positions (past counts too)
        assert torch.allclose(c[0, 0, :, 0], 1.0 / torch.arange(past + 1, past + q + 1))
    if not causal and not padding:
        assert torch.allclose(c, torch.full_like(c, 1.0 / (past + q)))


def test_causal_fast_path_equals_explicit_centering():
    torch.manual_seed(0)
    query, key, value = (torch.randn(2, 3, 7, 4) for _ in range(3))
    explicit_visible = torch.ones(7, 7, dtype=torch.bool).tril()[None, None]
    fast = attention_branches(query, key, value, None, 0.5)
    explicit = attention_branches(query, key, value, explicit_visible, 0.5)
    for a, b in zip(fast, explicit):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_shaped_attention_is_the_identity_at_initialisation(kv_heads):
    config = sas_config(["sas"], kv_heads=kv_heads)
    attention = ShapedAttention(config, 0, 0).eval()
    with torch.no_grad():
        attention.q_proj.weight.zero_()  # the paper's W_Q = 0; keys stay random
    torch.manual_seed(1)
    x = torch.randn(2, 9, 32)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        for attention_mask in (None, mask):
            out = attention(x, rotary(config, 9), attention_mask, None)
            assert torch.allclose(out, x, atol=1e-6)
        # Also through a KV cache: the identity term is the new token's own value, not a mis-sliced diagonal.
        model = SlimformerForCausalLM(config).eval()
        model.model.layers[0].self_attn.q_proj.weight.zero_()
        captured = {}
        model.model.layers[0].self_attn.register_forward_hook(
            lambda m, a, o: captured.update(inp=a[0], out=o)
        )
        cache = model(input_ids=torch.randint(0, 64, (2, 6)), use_cache=True).past_key_values
        model(input_ids=torch.randint(0, 64, (2, 1)), past_key_values=cache, use_cache=True)
        assert torch.allclose(captured["out"], captured["inp"], atol=1e-6)


# ---- the runtime: block forms and the KV cache -------------------------------------------------------------------


@pytest.mark.parametrize(
    "forms",
    [
        ["sas"] * 3,
        ["sas_p"] * 3,
        ["sas_p", "sas_p_nonorm", "sas_p_nonorm"],
        ["standard", "shaped", "standard"],
    ],
)
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_cached_decoding_equals_full_recomputation(forms, kv_heads):
    torch.manual_seed(2)
    model = perturbed(SlimformerForCausalLM(sas_config(forms, kv_heads=kv_heads, reparam="value")))
    ids = torch.randint(0, 64, (2, 14))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(6, 14):
            out = model(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits)
    incremental = torch.cat(steps, dim=1)
    valid = mask.bool()
    assert (incremental - full)[valid].abs().max() / full[valid].abs().max() <= 1e-5
    # The cache holds one identity value slice per query head, packed per KV head.
    sas_slot = next(i for i, f in enumerate(forms) if f != "standard")
    assert cache.layers[sas_slot].values.shape == (2, kv_heads, 14, 32 // kv_heads)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kwargs), model.generate(ids, use_cache=False, **kwargs))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sas_layers_run_with_an_evicting_cache(kv_heads):
    from slimformer.converter.runtime.kv_cache import EvictingCache

    model = perturbed(SlimformerForCausalLM(sas_config(["sas", "sas_p"], kv_heads=kv_heads)))
    ids = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(5))

    def decode(cache):
        with torch.no_grad():
            cache = model(input_ids=ids[:, :12], past_key_values=cache, use_cache=True).past_key_values
            return model(input_ids=ids[:, 12:], past_key_values=cache, use_cache=True).logits, cache

    # A budget above the sequence never evicts, so it must match the plain cache; a small one evicts per KV head,
    # each group's (wider) identity values together with its keys.
    roomy, _ = decode(EvictingCache({"policy": "a2sf", "budget": 64}))
    plain, _ = decode(None)
    assert torch.allclose(roomy, plain, atol=1e-6)
    logits, cache = decode(EvictingCache({"policy": "a2sf", "budget": 8, "alpha": 0.5}))
    assert torch.isfinite(logits).all() and cache.kept_lengths() == [8, 8]
    values = cache.layers[0].values  # the budget, plus the free slot a decode step writes into
    assert (
        values.shape[:2] == (1, kv_heads) and values.shape[2] in (8, 9) and values.shape[3] == 32 // kv_heads
    )


def test_block_forms_have_the_documented_tensors():
    names = set(
        SlimformerForCausalLM(
            sas_config(["sas", "sas_p", "sas_p_nonorm", "shaped"], reparam="value")
        ).state_dict()
    )
    layer = lambda i: {n.split(f"layers.{i}.", 1)[1] for n in names if f"layers.{i}." in n}  # noqa: E731
    shaped = {
        "self_attn.shaped_alpha",
        "self_attn.shaped_beta",
        "self_attn.shaped_gamma",
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
    }
    mlp = {"mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    value = {"self_attn.value.alpha", "self_attn.value.beta", "self_attn.value.delta"}
    assert layer(0) == shaped | mlp | value | {
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        "mlp_gain",
    }
    assert layer(1) == shaped | mlp | value | {"input_layernorm.weight", "mlp_gain"}
    assert layer(2) == shaped | mlp | value | {"mlp_gain"}
    assert layer(3) == shaped | mlp | value | {"input_layernorm.weight", "post_attention_layernorm.weight"}
    config = sas_config(["sas"])
    config.head_dim = 16
    with pytest.raises(ValueError, match="num_attention_heads \\* head_dim"):
        SlimformerForCausalLM(config)


# ---- exact folds -----------------------------------------------------------------------------------------------------


def train_tiny(model: SlimformerForCausalLM, steps: int = 60, seed: int = 0) -> SlimformerForCausalLM:
    """A few seconds of AdamW on a learnable toy language (each token is the previous plus a row-wise step)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        start = torch.randint(0, 64, (8, 1), generator=generator)
        step = torch.randint(1, 4, (8, 1), generator=generator)
        batch = (start + step * torch.arange(32)) % 64
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_exact_fold_is_lossless_on_a_trained_sas_model(tmp_path):
    # SAS-P without norms everywhere (untied, so the first value folds into the embeddings), reparameterised maps.
    torch.manual_seed(3)
    model = train_tiny(
        SlimformerForCausalLM(sas_config(["sas_p_nonorm"] * 3, kv_heads=4, reparam=True, tied=False))
    )
    with torch.no_grad():  # layer 2's value: a pure multiple of the identity, which folds into the head gains
        model.model.layers[2].self_attn.value.delta.zero_()
        model.model.layers[2].self_attn.value.alpha.fill_(1.7)
    model.save_pretrained(tmp_path / "trained")
    result = CliRunner().invoke(
        cli, ["convert", str(tmp_path / "trained"), "-o", str(tmp_path / "out"), "--sas", "layers=0", "-q"]
    )
    assert result.exit_code == 0, result.output
    fold = json.loads((tmp_path / "out" / "report.json").read_text())["passes"][0]["changes"]["fold"]
    folds = {(a["layer"], a["map"]): a["fold"] for a in fold["actions"]}
    assert folds[0, "value"] == "into the embeddings" and folds[2, "value"].startswith("identity")
    assert (1, "value") in folds or (0, "proj") in folds  # the Graef fold between layers 0 and 1
    assert fold["relative_logit_error"] <= 1e-4 and fold["params_removed"] >= 3 * 32 * 32
    saved = set(safe_open(str(tmp_path / "out" / "model.safetensors"), "pt").keys())
    assert not {f"model.layers.{i}.self_attn.value.delta" for i in (0, 2)} & saved
    assert {k["layer"] for k in fold["kept"] if k["map"] == "proj"} >= {2}  # the final norm reads layer 2's P
    folded = load_model(tmp_path / "out")
    ids = torch.randint(0, 64, (3, 40), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        reference, logits = model(input_ids=ids).logits, folded(input_ids=ids).logits
    assert (logits - reference).norm() / reference.norm() <= 1e-4
    assert sum(p.numel() for p in folded.parameters()) < sum(p.numel() for p in model.parameters())


def test_fold_refuses_a_lossy_result(tmp_path):
    model = train_tiny(SlimformerForCausalLM(sas_config(["sas"] * 2, kv_heads=4, reparam=True)), steps=30)
    model.save_pretrained(tmp_path / "trained")
    # identity_tol=1 calls every trained map "the identity": the verification must catch it.
    result = CliRunner().invoke(
        cli,
        ["convert", str(tmp_path / "trained"), "-o", str(tmp_path / "out"), "--sas", "identity-tol=1", "-q"],
    )
    assert isinstance(result.exception, SlimformerError) and "changed the logits" in str(result.exception)
    assert not (tmp_path / "out").exists()


# ---- the approximate conversion ------------------------------------------------------------------------------------


def context_with_windows(samples: int = 12, seq_len: int = 24, vocab: int = 96) -> PassContext:
    """A pass context whose calibration windows are seeded random tokens (the tiny checkpoints have no tokenizer)."""
    ctx = PassContext(
        tokenizer=object(),
        calibration=CalibrationSpec(samples=samples, seq_len=seq_len),
        evaluation=EvaluationSpec(),
        log=lambda message: None,
    )
    ctx._windows["stdlib:train"] = torch.randint(
        0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0)
    )
    return ctx


def test_fit_recovers_an_attention_that_is_already_shaped(tmp_path):
    # With V = O = I, standard attention is shaped attention with alpha = gamma = 0, beta = 1: a perfect fit, and
    # converting that layer without healing changes nothing.
    from transformers import Qwen2Config, Qwen2ForCausalLM  # q/k/v biases; MHA so that V can be the identity

    torch.manual_seed(4)
    source = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    with torch.no_grad():
        attention = source.model.layers[1].self_attn
        attention.v_proj.weight.copy_(torch.eye(32))
        attention.v_proj.bias.zero_()
        attention.o_proj.weight.copy_(torch.eye(32))
    source.save_pretrained(tmp_path / "src")
    graph = load_graph(resolve_source(tmp_path / "src"))
    model = graph.build_model()
    windows = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    fit = fit_layers(model, windows, [1])[0]
    assert fit.fit_error < 1e-5 and torch.allclose(
        fit.gains, torch.tensor([[0.0], [1.0], [0.0]]).expand(3, 4), atol=1e-4
    )
    ctx = context_with_windows()
    report = SasPass.from_params({"layers": 1, "heal_steps": 0}).run(graph, ctx).data["conversion"]
    assert report["converted_layers"] == [1]
    assert report["perplexity"]["after_conversion"] == pytest.approx(report["perplexity"]["before"], rel=1e-5)


def test_approximate_conversion_heals_and_exports(tmp_path):
    from slimformer.exporters.safetensors import write_checkpoint

    graph = load_graph(resolve_source(make_tiny("llama", tmp_path / "src", layers=4)))
    params_before = graph.num_params()
    result = SasPass.from_params({"layers": 2, "heal_steps": 4, "hidden_mse": 0.5}).run(
        graph, context_with_windows()
    )
    report = result.data["conversion"]
    # The report rows: perplexity before, after conversion and after healing, on the same windows.
    assert [row.after for row in result.rows] == [
        report["perplexity"]["after_conversion"],
        report["perplexity"]["after_healing"],
    ]
    assert report["approximate"] is True and "APPROXIMATE" in report["note"]
    scores = {s["layer"]: s["fit_error"] for s in report["layer_scores"]}
    assert report["converted_layers"] == sorted(sorted(scores, key=scores.get)[:2])
    ppl = report["perplexity"]
    assert (
        all(ppl[k] > 0 for k in ("before", "after_conversion", "after_healing"))
        and "held-out" in ppl["source"]
    )
    # v_proj (16 x 32 + 16) and o_proj (32 x 32 + 32) go, three gains per head (4 heads) come.
    assert (
        report["params_removed"]
        == params_before - graph.num_params()
        == 2 * (16 * 32 + 16 + 32 * 32 + 32 - 3 * 4)
    )
    # A short run logs every step, so its healing plot is a curve, not one dot.
    assert report["heal"]["steps"] == 4 and [h["step"] for h in report["heal"]["history"]] == [1, 2, 3, 4]
    for layer in report["converted_layers"]:
        assert graph.blocks[layer].attention.details == {"form": "shaped"}
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(graph, out)
    saved = set(safe_open(str(out / "model.safetensors"), "pt").keys())
    assert not any(
        ".v_proj." in n or ".o_proj." in n for n in saved if f"layers.{report['converted_layers'][0]}." in n
    )
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert torch.allclose(
            load_model(out)(input_ids=ids).logits, graph.build_model()(input_ids=ids).logits, atol=1e-6
        )
    # The shipped runtime (sas.py included) loads as remote code.
    from transformers import AutoModelForCausalLM

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.allclose(
            remote(input_ids=ids).logits, graph.build_model()(input_ids=ids).logits, atol=1e-6
        )


@pytest.mark.parametrize(
    "family,params,match",
    [
        ("bert", {"layers": 1}, "encoder"),
        ("llama", {"layers": 9}, "only 3 layer"),
        ("llama", {}, "nothing to do"),
    ],
)
def test_refusals(tmp_path, family, params, match):
    graph = load_graph(resolve_source(make_tiny(family, tmp_path / family)))
    with pytest.raises(SlimformerError, match=match):
        SasPass.from_params(params).run(graph, context_with_windows())


def test_refuses_heads_that_do_not_tile_the_hidden_size(tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    Qwen3ForCausalLM(config).save_pretrained(tmp_path / "qwen3")
    graph = load_graph(resolve_source(tmp_path / "qwen3"))
    with pytest.raises(SlimformerError, match="4 \\* 16 != 32"):
        SasPass.from_params({"layers": 1}).run(graph, context_with_windows())
    with pytest.raises(SlimformerError, match="heal_params"):
        SasPass.from_params({"layers": 1, "heal_params": "everything"})


def test_cli_sas_on_stories260k(tmp_path):
    source = require(STORIES)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(source),
            "-o",
            str(out),
            "--sas",
            "layers=1,heal-steps=3",
            "--calib-samples",
            "9",
            "--calib-seq-len",
            "64",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    conversion = report["passes"][0]["changes"]["conversion"]
    assert report["pipeline"]["passes"][0] == {"name": "sas", "layers": 1, "heal_steps": 3}
    assert conversion["approximate"] and len(conversion["converted_layers"]) == 1
    # GQA (8 query / 4 KV heads): the converted layer caches hidden_size values per token instead of 4 x 8.
    assert report["kv_bytes_per_token_after"] == report["kv_bytes_per_token_before"] + 4 * (64 - 32)
    assert (out / "sas.py").is_file() and (out / "sas_healing.png").is_file()


# ---- the training script and the real model ------------------------------------------------------------------------


def test_train_sas_script_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("train_sas", ROOT / "examples" / "train_sas.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_sas"] = module
    spec.loader.exec_module(module)
    record = module.main(
        [
            "--models",
            "prenorm,sas,sas_p",
            "--steps",
            "3",
            "--layers",
            "2",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--max-files",
            "12",
            "--vocab-size",
            "300",
            "--eval-windows",
            "2",
            "--timing-rounds",
            "1",
            "--timing-steps",
            "1",
            "--log-every",
            "3",
            "--out",
            str(tmp_path / "curves"),
            "--save-dir",
            str(tmp_path / "models"),
        ]
    )
    assert (tmp_path / "curves.json").is_file() and (tmp_path / "curves.png").is_file()
    assert record["models"]["sas"]["params"]["total"] < record["models"]["prenorm"]["params"]["total"]
    assert len(record["models"]["sas_p"]["loss_per_step"]) == 3
    assert set(record["comparison_vs_prenorm"]) == {"sas", "sas_p"}
    assert (
        load_graph(resolve_source(tmp_path / "models" / "sas")).blocks[1].attention.details["form"] == "sas"
    )


@pytest.mark.slow
def test_pycoder_conversion_costs_perplexity_and_healing_does_not_add_to_it(tmp_path):
    source = require(PYCODER)
    result = CliRunner().invoke(
        cli,
        [
            "convert",
            str(source),
            "-o",
            str(tmp_path / "out"),
            "--sas",
            "layers=2,heal-steps=30",
            "--calib-samples",
            "128",
            "--eval-ppl",
            "stdlib:valid",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    ppl = json.loads((tmp_path / "out" / "report.json").read_text())["passes"][0]["changes"]["conversion"][
        "perplexity"
    ]
    assert ppl["before"] < ppl["after_conversion"] and ppl["after_healing"] <= 1.005 * ppl["after_conversion"]
