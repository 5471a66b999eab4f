"""ONNX export (``exporters/onnx.py``), the A2SF cache op (``exporters/onnx_cache_op.py``) and the ONNX
Runtime decode loop (``exporters/onnx_runtime.py``).

Every claim is checked against something the export does not share code with:

* the cache op against a per-(row, head) loop written from the A2SF formula here, and against the
  runtime's own ``EvictingLayer``;
* exported models against the PyTorch runtime's ``generate()`` (what ``slimformer generate`` runs): same
  tokens, greedy and sampled, and logits within 1e-4 at every step -- on tiny random models of every
  decoder family, and on the real stories260K and pycoder-8m, each (a) unconverted (identity
  conversion), (b) with attention layers dropped, (c) with A2SF eviction active (budget below the length).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PYCODER, STORIES, make_tiny, require

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from slimformer.converter.conversion import load_model  # noqa: E402
from slimformer.converter.errors import SlimformerError  # noqa: E402
from slimformer.converter.graph import DROPPED, load_graph  # noqa: E402
from slimformer.converter.outputs import atomic_output_dir
from slimformer.converter.runtime.kv_cache import CachePolicy, EvictingLayer  # noqa: E402
from slimformer.converter.runtime.masks import attention_bias  # noqa: E402
from slimformer.converter.source import resolve_source  # noqa: E402
from slimformer.converter.tokenizer import load_tokenizer
from slimformer.exporters import onnx_cache_op  # noqa: E402
from slimformer.exporters.onnx import OnnxExportOptions, export_onnx  # noqa: E402
from slimformer.exporters.onnx_runtime import GenerationResult, OnnxCausalLM, generate_text, load_metadata  # noqa: E402
from slimformer.exporters.safetensors import write_checkpoint  # noqa: E402

LOGITS_ATOL = 1e-4
NONE = {"policy": "none"}
THREADS = 1  # these models are tiny: more threads only contend with each other on shared CI cores


@pytest.fixture(autouse=True)
def single_thread():
    saved = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(saved)


# ---- helpers ---------------------------------------------------------------------------------------


def checkpoint(source: Path, out: Path, *, drop_attention=(), drop_mlp=(), kv_cache=None) -> Path:
    """A converted (slimformer-format) checkpoint of ``source`` with the given sub-blocks dropped."""
    graph = load_graph(resolve_source(source))
    for layer in drop_attention:
        graph.blocks[layer].attention.state = DROPPED
    for layer in drop_mlp:
        graph.blocks[layer].mlp.state = DROPPED
    graph.kv_cache = kv_cache
    with atomic_output_dir(out) as tmp:
        write_checkpoint(graph, tmp)
    return out


def export(ckpt: Path, out: Path, **options) -> Path:
    export_onnx(ckpt, out, OnnxExportOptions(quiet=True, **options))
    return out


def left_padded(vocab: int, lengths=(11, 7), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, max(lengths) - length :] = 1
    return ids * mask, mask


def assert_same_generation(
    ckpt: Path,
    onnx_dir: Path,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    kv_cache: dict | None = None,
    sample: bool = False,
    max_new_tokens: int = 24,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """ORT decoding of ``onnx_dir`` equals the PyTorch runtime's ``generate()`` on ``ckpt``: same tokens, logits
    within 1e-4 at every step. Returns the ORT result (its state shows what the cache kept)."""
    model = load_model(ckpt, kv_cache=kv_cache)
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    model.generation_config.eos_token_id = eos
    options = {"do_sample": True, "temperature": 0.8, "top_p": 0.9} if sample else {"do_sample": False}
    torch.manual_seed(7)
    with torch.inference_mode():
        expected = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
            **options,
        )
    lm = OnnxCausalLM(onnx_dir, kv_cache=kv_cache, threads=THREADS)
    got = lm.generate(
        ids.numpy(),
        mask.numpy(),
        max_new_tokens=max_new_tokens,
        sample=sample,
        temperature=0.8,
        top_p=0.9,
        seed=7,
        eos_token_id=eos,
        pad_token_id=0,
        output_logits=True,
    )
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy())
    assert len(got.logits) == len(expected.logits)
    worst = max(float(np.abs(a - b.numpy()).max()) for a, b in zip(got.logits, expected.logits))
    assert worst <= LOGITS_ATOL, f"logits differ by {worst:.3g}"
    return got


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---- the cache op ----------------------------------------------------------------------------------


def loop_reference(key, value, past_scores, probs, new_valid, alpha, limits):
    """The op's contract, one (row, KV head) at a time, in float64, straight from the A2SF formula."""
    budget, sink, recent, window = limits
    batch, heads, phys, _ = key.shape
    groups, q_len = probs.shape[1] // heads, probs.shape[2]
    kept = {}
    for b in range(batch):
        for h in range(heads):
            scores = [s * alpha**q_len if math.isfinite(s) else s for s in past_scores[b, h].tolist()]
            scores += [0.0 if new_valid[b, t] else -math.inf for t in range(q_len)]
            for t in range(q_len):
                if not new_valid[b, t] or (window and t < q_len - window):
                    continue
                for p in range(phys):
                    scores[p] += alpha ** (q_len - 1 - t) * float(
                        probs[b, h * groups : (h + 1) * groups, t, p].sum()
                    )
            real = [p for p in range(phys) if math.isfinite(scores[p])]
            protected = set(real[:sink]) | set(real[len(real) - recent :])
            others = sorted((p for p in real if p not in protected), key=lambda p: -scores[p])
            room = max(0, min(phys, budget) - len(protected))
            kept[b, h] = {p: scores[p] for p in sorted(protected | set(others[:room]))}
    return kept


def run_op(session, key, value, past_scores, probs, new_valid, alpha, limits):
    feeds = dict(
        zip(
            onnx_cache_op.INPUTS,
            (
                key,
                value,
                past_scores,
                probs,
                new_valid,
                np.asarray(alpha, np.float32),
                np.asarray(limits, np.int64),
            ),
        )
    )
    return session.run(None, feeds)


def op_session():
    return ort.InferenceSession(
        onnx_cache_op.standalone_model().SerializeToString(), providers=["CPUExecutionProvider"]
    )


OP_CASES = {  # past length, new tokens, limits (budget, sink, recent, window), alpha, padded prefix of row 1
    "prefill-evicts": (0, 9, (5, 1, 2, 0), 0.5, 3),
    "decode": (6, 1, (6, 1, 2, 0), 0.1, 2),
    "chunk-window": (6, 3, (6, 0, 2, 2), 0.7, 2),
    "h2o-no-protection": (5, 2, (4, 0, 0, 0), 1.0, 0),
    "under-budget": (3, 2, (16, 1, 1, 0), 0.5, 1),
}


@pytest.mark.parametrize("case", OP_CASES.values(), ids=OP_CASES.keys())
def test_cache_op_matches_loop_reference(case):
    past, new, limits, alpha, padding = case
    batch, heads, groups, dim = 2, 2, 3, 4
    phys = past + new
    rng = np.random.default_rng(0)
    key = rng.standard_normal((batch, heads, phys, dim)).astype(np.float32)
    key[..., 0] = np.arange(phys)  # identifies each slot in the output
    value = rng.standard_normal((batch, heads, phys, dim + 2)).astype(np.float32)  # wider values (SAS layers)
    past_scores = rng.random((batch, heads, past)).astype(np.float32)
    new_valid = np.ones((batch, new), bool)
    if past:
        past_scores[1, :, :padding] = -np.inf
    else:
        new_valid[1, :padding] = False
    probs = rng.random((batch, heads * groups, new, phys)).astype(np.float32)
    probs /= probs.sum(-1, keepdims=True)

    key_out, value_out, scores_out = run_op(
        op_session(), key, value, past_scores, probs, new_valid, alpha, limits
    )
    expected = loop_reference(key, value, past_scores, probs, new_valid, alpha, limits)
    assert key_out.shape[2] == min(phys, limits[0]) == scores_out.shape[2]
    for (b, h), kept in expected.items():
        real = np.isfinite(scores_out[b, h])
        slots = key_out[b, h, real, 0].astype(int).tolist()
        assert slots == list(kept), f"row {b} head {h}"
        np.testing.assert_allclose(scores_out[b, h, real], list(kept.values()), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(value_out[b, h, real], value[b, h, slots])
    torch_out = onnx_cache_op.reference_update(
        *map(torch.from_numpy, (key, value, past_scores, probs, new_valid)), alpha, list(limits)
    )
    np.testing.assert_allclose(scores_out, torch_out[2].numpy(), rtol=1e-5, atol=1e-6)


def test_cache_op_matches_runtime_evicting_layer():
    """Prefill over budget, then decode steps and a chunk: the op keeps what ``kv_cache.EvictingLayer`` keeps.

    Each runs on its own state (the runtime writes decode tokens into freed slots, the op keeps slots in
    order), so the kept keys and their scores are compared per (row, KV head) as sets.
    """
    batch, heads, groups, dim, prompt = 2, 2, 2, 8, 10
    policy = CachePolicy("a2sf", budget=6, alpha=0.5, recent=2, sink=1)
    layer = EvictingLayer(policy, slot=0)
    session = op_session()
    scaling = dim**-0.5
    limits = (6, 1, 2, 0)
    generator = torch.Generator().manual_seed(0)
    valid = torch.ones(batch, prompt, dtype=torch.bool)
    valid[1, :3] = False
    state = None  # the op's (keys, values, scores)

    def step_bias(past_valid, new_valid, q_len, past_len):
        bias = attention_bias(
            past_valid, new_valid, q_len, past_len, torch.float32, torch.device("cpu"), implicit_causal=False
        )
        return bias if bias is not None else torch.zeros(batch, 1, q_len, past_len + q_len)

    for step, q_len in enumerate((prompt, 1, 1, 3, 1)):
        new_valid = valid if step == 0 else torch.ones(batch, q_len, dtype=torch.bool)
        key = torch.randn(batch, heads, q_len, dim, generator=generator)
        value = torch.randn(batch, heads, q_len, dim, generator=generator)
        query = torch.randn(batch, heads * groups, q_len, dim, generator=generator)
        # The runtime layer, as the attention drives it (a token written in place sees every valid slot).
        past = (layer.key_validity(), layer.physical_length()) if step else (None, 0)
        layer.update(key, value, {"new_valid": new_valid})
        bias = (
            torch.zeros(batch, 1, 1, layer.physical_length()).masked_fill(
                ~layer.valid[:, :, None], float("-inf")
            )
            if layer.written_in_place
            else step_bias(*past[:1], new_valid, q_len, past[1])
        )
        layer.observe(query, bias.repeat_interleave(groups, dim=1) if bias.shape[1] > 1 else bias, scaling)
        # The op on its own state.
        op_past = np.zeros((batch, heads, 0), np.float32) if state is None else state[2]
        keys = key if state is None else torch.cat([torch.from_numpy(state[0]), key], dim=2)
        values = value if state is None else torch.cat([torch.from_numpy(state[1]), value], dim=2)
        op_bias = step_bias(
            torch.from_numpy(np.isfinite(op_past)) if step else None, new_valid, q_len, op_past.shape[2]
        )
        logits = query.view(batch, heads, groups, q_len, dim) @ keys[:, :, None].transpose(-1, -2) * scaling
        probs = (logits + op_bias[:, :, None]).softmax(-1).reshape(batch, heads * groups, q_len, -1)
        state = run_op(
            session, keys.numpy(), values.numpy(), op_past, probs.numpy(), new_valid.numpy(), 0.5, limits
        )
        for b in range(batch):
            for h in range(heads):
                ours = layer.valid[b, h].numpy()
                theirs = np.isfinite(state[2][b, h])
                mine_keys, op_keys = layer.keys[b, h].numpy()[ours], state[0][b, h][theirs]
                mine_order, op_order = np.lexsort(mine_keys.T), np.lexsort(op_keys.T)
                np.testing.assert_allclose(op_keys[op_order], mine_keys[mine_order], atol=1e-6)
                np.testing.assert_allclose(
                    state[2][b, h][theirs][op_order],
                    layer.scores[b, h].numpy()[ours][mine_order],
                    rtol=1e-5,
                    atol=1e-6,
                )
    assert state[0].shape[2] == 6 and layer.kept_length() == 6


def test_cache_op_body_is_standard_onnx():
    function = onnx_cache_op.function_proto(18)
    assert {node.domain for node in function.node} <= {""}
    assert list(function.input) == list(onnx_cache_op.INPUTS) and list(function.output) == list(
        onnx_cache_op.OUTPUTS
    )
    onnx.checker.check_model(onnx_cache_op.standalone_model(), full_check=True)


# ---- tiny random models ----------------------------------------------------------------------------

A2SF = {"policy": "a2sf", "budget": 8, "alpha": 0.5, "sink": 1}
TINY_CASES = {  # family, dropped attention, dropped MLP, checkpoint cache policy, export options
    "llama-plain": ("llama", (), (), None, {}),
    "qwen3-dropped-a2sf": ("qwen3", (1,), (2,), A2SF, {}),
    "mistral-h2o-ratio": (
        "mistral",
        (0,),
        (),
        {"policy": "h2o", "budget_ratio": 0.5, "recent": 2},
        {"opset": 20},
    ),
    "qwen2-cache-op-no-policy": ("qwen2", (), (), None, {"cache_op": True}),
}


@pytest.fixture(scope="module")
def tiny_exports(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("onnx-tiny")
    built = {}
    for name, (family, attention, mlp, kv_cache, options) in TINY_CASES.items():
        source = make_tiny(family, root / f"{name}-src", layers=4)
        ckpt = checkpoint(
            source, root / f"{name}-ckpt", drop_attention=attention, drop_mlp=mlp, kv_cache=kv_cache
        )
        built[name] = ckpt, export(ckpt, root / f"{name}-onnx", **options)
    return built


@pytest.mark.parametrize("name", TINY_CASES)
def test_tiny_export_structure_and_validation(tiny_exports, name):
    family, attention, _, kv_cache, options = TINY_CASES[name]
    ckpt, onnx_dir = tiny_exports[name]
    metadata = load_metadata(onnx_dir)
    slots = [layer for layer in range(4) if layer not in attention]
    evicting = bool(kv_cache) or options.get("cache_op", False)
    assert metadata["cache_layers"] == slots and metadata["evicting"] == evicting
    assert metadata["opset"] == options.get("opset", 18)
    assert all(run["max_abs_diff"] <= LOGITS_ATOL for run in metadata["validation"]["runs"])
    if evicting:
        assert any(run["evicted"] for run in metadata["validation"]["runs"])

    model = onnx.load(str(onnx_dir / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["slimformer.cache_layers"]) == slots
    cache_inputs = [i.name for i in model.graph.input if i.name.startswith("past_key_values")]
    parts = ("key", "value", "score") if evicting else ("key", "value")
    assert cache_inputs == [f"past_key_values.{j}.{p}" for j in range(len(slots)) for p in parts]
    ops = [node for node in model.graph.node if node.domain == onnx_cache_op.DOMAIN]
    assert len(ops) == (len(slots) if evicting else 0)
    assert [f.name for f in model.functions] == ([onnx_cache_op.OP_TYPE] if evicting else [])
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    assert dims["input_ids"] == ["batch_size", "sequence_length"]


@pytest.mark.parametrize("name", TINY_CASES)
def test_tiny_greedy_matches_torch_runtime(tiny_exports, name):
    ckpt, onnx_dir = tiny_exports[name]
    kv_cache = TINY_CASES[name][3]
    ids, mask = left_padded(96)
    result = assert_same_generation(ckpt, onnx_dir, ids, mask, stop_at_eos=False)
    if kv_cache and kv_cache.get("budget"):
        # The checkpoint's budget is below prompt + 24 tokens: eviction ran, and the shapes stopped growing.
        assert result.state.physical_lengths() == [kv_cache["budget"]] * len(
            load_metadata(onnx_dir)["cache_layers"]
        )


def test_tiny_sampling_and_policy_override_match_torch_runtime(tiny_exports):
    ckpt, onnx_dir = tiny_exports["qwen3-dropped-a2sf"]
    ids, mask = left_padded(96, seed=1)
    assert_same_generation(ckpt, onnx_dir, ids, mask, sample=True, stop_at_eos=False)
    override = {"policy": "a2sf", "layer_budgets": [5, 7, 9], "alpha": 0.2, "recent": 2, "score_window": 2}
    assert_same_generation(ckpt, onnx_dir, ids, mask, kv_cache=override, stop_at_eos=False)
    assert_same_generation(ckpt, onnx_dir, ids, mask, kv_cache={"policy": "streaming", "budget": 6})
    assert_same_generation(ckpt, onnx_dir, ids, mask, kv_cache=NONE)


def test_io_binding_path_gives_the_same_tokens(tiny_exports):
    _, onnx_dir = tiny_exports["qwen3-dropped-a2sf"]
    ids, mask = left_padded(96)
    runs = [
        OnnxCausalLM(onnx_dir, io_binding=binding, threads=THREADS).generate(
            ids.numpy(), mask.numpy(), max_new_tokens=12, output_logits=True
        )
        for binding in (False, True)
    ]
    np.testing.assert_array_equal(runs[0].sequences, runs[1].sequences)
    np.testing.assert_array_equal(np.stack(runs[0].logits), np.stack(runs[1].logits))


def test_float16_export(tmp_path):
    ckpt = checkpoint(
        make_tiny("llama", tmp_path / "src"), tmp_path / "ckpt", drop_attention=(1,), kv_cache=A2SF
    )
    onnx_dir = export(ckpt, tmp_path / "onnx", dtype="float16", opset=19)
    metadata = load_metadata(onnx_dir)
    assert metadata["dtype"] == "float16" and metadata["evicting"]
    assert all(run["max_abs_diff"] <= run["tolerance"] for run in metadata["validation"]["runs"])
    lm = OnnxCausalLM(onnx_dir, threads=THREADS)
    result = lm.generate(*[t.numpy() for t in left_padded(96)], max_new_tokens=16)
    assert result.sequences.shape[1] <= 11 + 16
    assert {str(t.dtype) for parts in result.state.caches for t in parts[:2]} == {"float16"}


@pytest.mark.parametrize(
    "forms,kv_heads,cache_op",
    [
        (
            ("standard", "sas", "sas_p", "sas_p_nonorm"),
            2,
            False,
        ),  # GQA: SAS layers cache values wider than keys
        (("shaped", "sas"), 4, True),
    ],
)
def test_sas_forms_export_and_match_torch_runtime(tmp_path, forms, kv_heads, cache_op):
    from slimformer.converter.runtime import SlimformerForCausalLM
    from test_sas import perturbed, sas_config

    torch.manual_seed(0)
    perturbed(
        SlimformerForCausalLM(sas_config(list(forms), kv_heads=kv_heads, reparam="value"))
    ).save_pretrained(tmp_path / "sas")
    onnx_dir = export(tmp_path / "sas", tmp_path / "onnx", cache_op=cache_op)
    metadata = load_metadata(onnx_dir)
    assert all(run["max_abs_diff"] <= LOGITS_ATOL for run in metadata["validation"]["runs"])
    widths = [shape["value"][1] for shape in metadata["cache_shapes"]]
    assert widths == [8 if form == "standard" else 8 * 4 // kv_heads for form in forms]
    ids, mask = left_padded(64)
    assert_same_generation(
        tmp_path / "sas", onnx_dir, ids, mask, kv_cache=A2SF if cache_op else None, stop_at_eos=False
    )


def test_bad_inputs_fail_cleanly(tmp_path, tiny_exports):
    raw = make_tiny("llama", tmp_path / "raw")
    ckpt, onnx_dir = tiny_exports["llama-plain"]
    out = tmp_path / "out"
    with pytest.raises(SlimformerError, match="not a converted checkpoint"):
        export_onnx(raw, out)
    with pytest.raises(SlimformerError, match="opset 17 is not supported"):
        export_onnx(ckpt, out, OnnxExportOptions(opset=17))
    with pytest.raises(SlimformerError, match="unsupported ONNX dtype"):
        export_onnx(ckpt, out, OnnxExportOptions(dtype="bfloat16"))
    with pytest.raises(SlimformerError, match="already exists"):
        export_onnx(ckpt, onnx_dir)
    corrupt = checkpoint(raw, tmp_path / "corrupt")
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SlimformerError, match="corrupt|truncated"):
        export_onnx(corrupt, out, OnnxExportOptions(quiet=True))
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(SlimformerError, match="no cache op"):
        OnnxCausalLM(onnx_dir, kv_cache={"policy": "a2sf", "budget": 4})
    with pytest.raises(SlimformerError, match="not an ONNX export"):
        generate_text(ckpt, "hello")


def test_failed_validation_leaves_nothing(tmp_path, monkeypatch):
    import slimformer.exporters.onnx as onnx_export

    ckpt = checkpoint(make_tiny("llama", tmp_path / "src"), tmp_path / "ckpt")
    monkeypatch.setattr(onnx_export, "_compare_runs", lambda *args: (1.0, 1.0, False))
    with pytest.raises(SlimformerError, match="validation failed"):
        export_onnx(ckpt, tmp_path / "out", OnnxExportOptions(quiet=True))
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a GPU"
)
def test_cuda_provider_matches_cpu(tiny_exports):
    _, onnx_dir = tiny_exports["qwen3-dropped-a2sf"]
    ids, mask = (t.numpy() for t in left_padded(96))
    cpu = OnnxCausalLM(onnx_dir, provider="cpu").generate(ids, mask, max_new_tokens=16, output_logits=True)
    cuda = OnnxCausalLM(onnx_dir, provider="cuda").generate(ids, mask, max_new_tokens=16, output_logits=True)
    assert cuda.state.caches[0][0].device_name() == "cuda"  # IO binding kept the cache on the GPU
    np.testing.assert_array_equal(cpu.sequences, cuda.sequences)
    assert max(float(np.abs(a - b).max()) for a, b in zip(cpu.logits, cuda.logits)) <= 1e-3


# ---- real models -----------------------------------------------------------------------------------

REAL = {  # attention layers to drop (those that score least on each model) and prompts
    "stories260K": (STORIES, (2, 4), ["Once upon a time, there was a little", "Tom and his dog"]),
    "pycoder-8m": (PYCODER, (3, 5), ["def parse_args(argv):\n    ", "import os\n"]),
}
REAL_A2SF = {"policy": "a2sf", "budget": 24, "alpha": 0.5, "sink": 1}  # below prompt + 64 generated tokens


def real_parity(name: str, root: Path) -> None:
    path, dropped, prompts = REAL[name]
    source = require(path)
    tokenizer = load_tokenizer(source)
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, return_token_type_ids=False)
    ids, mask = encoded["input_ids"], encoded["attention_mask"]

    identity = checkpoint(source, root / "identity")
    plain = export(identity, root / "identity-onnx", validate=False)
    assert_same_generation(identity, plain, ids, mask, max_new_tokens=64, stop_at_eos=False)  # (a)

    # One export serves (b) and (c): the checkpoint keeps its A2SF policy, the graph holds the cache op.
    slim = checkpoint(source, root / "slim", drop_attention=dropped, kv_cache=REAL_A2SF)
    evicting = export(slim, root / "slim-onnx")
    assert load_metadata(evicting)["cache_layers"] == [
        i for i in range(len(load_graph(resolve_source(source)).blocks)) if i not in dropped
    ]
    assert_same_generation(
        slim, evicting, ids, mask, kv_cache=NONE, max_new_tokens=64, stop_at_eos=False
    )  # (b)
    result = assert_same_generation(
        slim, evicting, ids, mask, max_new_tokens=64, stop_at_eos=False
    )  # (b) + (c)
    assert set(result.state.physical_lengths()) == {REAL_A2SF["budget"]}
    full = checkpoint(source, root / "a2sf", kv_cache=REAL_A2SF)
    assert_same_generation(
        full,
        export(full, root / "a2sf-onnx", validate=False),
        ids,
        mask,
        max_new_tokens=64,
        stop_at_eos=False,
    )  # (c) alone


def test_stories260k_parity(tmp_path):
    real_parity("stories260K", tmp_path)


@pytest.mark.slow
def test_pycoder_parity(tmp_path):
    real_parity("pycoder-8m", tmp_path)


def test_cli_export_and_generate_match_torch_runtime(tmp_path):
    from click.testing import CliRunner
    from slimformer.converter.cli import cli

    ckpt = checkpoint(require(STORIES), tmp_path / "ckpt", drop_attention=(2,))
    runner = CliRunner()
    result = runner.invoke(cli, ["export", "onnx", str(ckpt), "-o", str(tmp_path / "onnx"), "-q"])
    assert result.exit_code == 0, result.output
    assert {"model.onnx", "slimformer_onnx.json", "tokenizer.json", "config.json"} <= set(
        os.listdir(tmp_path / "onnx")
    )
    for extra in ([], ["--a2sf", "budget=8,alpha=0.5"]):
        common = ["--prompt", "Once upon a time", "--max-new-tokens", "40", *extra]
        torch_text = runner.invoke(cli, ["generate", str(ckpt), *common])
        onnx_extra = ["--cache-op"] if extra else []
        target = tmp_path / ("onnx-op" if extra else "onnx")
        if extra:
            runner.invoke(
                cli, ["export", "onnx", str(ckpt), "-o", str(target), "-q", "--no-validate", *onnx_extra]
            )
        onnx_text = runner.invoke(cli, ["generate", str(target), "--runtime", "onnx", *common])
        assert torch_text.exit_code == 0 and onnx_text.exit_code == 0, onnx_text.output
        # stdout only: Click >= 8.2's .output also holds stderr, where the kernel fallback line may go.
        assert onnx_text.stdout == torch_text.stdout and len(onnx_text.stdout) > 20
    again = runner.invoke(cli, ["export", "onnx", str(ckpt), "-o", str(tmp_path / "onnx")])
    assert again.exit_code != 0 and "already exists" in str(again.exception or again.output)


@pytest.mark.parametrize("policy", ["tova", "snapkv"])
def test_policies_without_an_onnx_op_are_refused_in_one_place(tmp_path, tiny_exports, policy):
    """Runtime-only policies (kv_policies.py) get the one refusal of ``onnx_cache_op.check_policy``, both when
    exporting a checkpoint that stores them and when overriding an exported model's policy."""
    ckpt = checkpoint(
        make_tiny("llama", tmp_path / "src"), tmp_path / "ckpt", kv_cache={"policy": policy, "budget": 16}
    )
    with pytest.raises(SlimformerError, match=f"policy '{policy}' runs only in the PyTorch runtime"):
        export(ckpt, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _, evicting = tiny_exports["qwen3-dropped-a2sf"]
    with pytest.raises(SlimformerError, match=f"policy '{policy}' runs only in the PyTorch runtime"):
        OnnxCausalLM(evicting, threads=THREADS).use_policy({"policy": policy, "budget": 16})
