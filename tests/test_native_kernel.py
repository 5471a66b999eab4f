"""Native kernels of the A2SF cache op (``exporters/native``) against the op's ONNX function body.

The function body (``exporters/onnx_cache_op.py``) is the reference: tests/test_onnx.py checks it against
the A2SF formula and the PyTorch runtime. Here the native CPU kernel must keep exactly the same slots
(keys and values gathered bit for bit, which also pins the kept indices: key[..., 0] holds the slot
number) with scores within 1e-6, for every policy the op covers; and full greedy generation must be
token-identical. The library is taken from ``make kernels`` when it is current, else built (CPU only,
a few seconds) into a temporary directory; without a compiler or the headers the tests skip with the
reason. CUDA tests are marked ``gpu`` and skip without a GPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import PYCODER, STORIES, TINY_LM, require

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from onnx import TensorProto  # noqa: E402
from slimformer.converter.errors import SlimformerError  # noqa: E402
from slimformer.converter.graph import load_graph  # noqa: E402
from slimformer.converter.outputs import atomic_output_dir  # noqa: E402
from slimformer.converter.source import resolve_source  # noqa: E402
from slimformer.exporters import native, onnx_cache_op  # noqa: E402
from slimformer.exporters.native import build as native_build  # noqa: E402
from slimformer.exporters.onnx_runtime import OnnxCausalLM  # noqa: E402
from slimformer.exporters.safetensors import write_checkpoint  # noqa: E402

THREADS = 1
SCORE_TOLERANCE = 1e-6
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


# ---- the library -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kernel_dir(tmp_path_factory) -> Path:
    """A directory holding a usable CPU library: the checkout's build when current, else a private one
    (so that this suite never changes what the rest of the suite's sessions pick up)."""
    if native.find_library("cpu").usable:
        return native_build.default_build_dir()
    directory = tmp_path_factory.mktemp("kernels")
    try:
        native_build.build(directory, cuda=False, log=lambda *_: None)
    except native_build.BuildError as exc:
        pytest.skip(f"the native kernel cannot be built here: {exc}")
    library = native.find_library("cpu", directory)
    assert library.usable, library.reason
    return directory


@pytest.fixture
def use_kernels(kernel_dir, monkeypatch) -> Path:
    """Point the loader (and so OnnxCausalLM) at ``kernel_dir``."""
    monkeypatch.setenv("SLIMFORMER_KERNELS_DIR", str(kernel_dir))
    return kernel_dir


def op_session(library: Path | None, dtype: int = TensorProto.FLOAT, provider: str = "CPUExecutionProvider"):
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    if library is not None:
        options.register_custom_ops_library(str(library))
    model = onnx_cache_op.standalone_model(dtype=dtype).SerializeToString()
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return ort.InferenceSession(model, options, providers=providers)


@pytest.fixture(scope="module")
def op_sessions(kernel_dir) -> dict[tuple[str, int], object]:
    cpu = native.find_library("cpu", kernel_dir).path
    return {
        (kind, dtype): op_session(cpu if kind == "native" else None, dtype)
        for kind in ("native", "function")
        for dtype in (TensorProto.FLOAT, TensorProto.FLOAT16)
    }


# ---- random inputs of the op -----------------------------------------------------------------------

# name: (batch, kv heads, groups, past, new, key dim, value dim, (budget, sink, recent, window), alpha,
#        padded slots of row 1)
CASES = {
    "prefill-evicts": (2, 2, 2, 0, 9, 4, 6, (5, 1, 2, 0), 0.5, 3),
    "prefill-keeps-all": (2, 2, 2, 0, 9, 4, 4, (onnx_cache_op.NO_BUDGET, 0, 0, 0), 0.5, 3),
    "decode-evicts-one": (2, 2, 2, 64, 1, 8, 8, (64, 4, 16, 0), 0.5, 5),
    "decode-under-budget": (2, 3, 1, 10, 1, 8, 8, (64, 1, 4, 0), 0.9, 2),
    "decode-budget-256": (1, 3, 3, 256, 1, 16, 16, (256, 4, 64, 0), 0.9, 0),
    "chunk-score-window": (2, 2, 3, 20, 5, 4, 4, (16, 0, 4, 2), 0.7, 2),
    "h2o-no-protection": (2, 2, 2, 30, 2, 4, 4, (12, 0, 0, 0), 1.0, 4),
    "streaming-sink-recent": (2, 2, 2, 30, 1, 4, 4, (10, 4, 6, 0), 0.9, 3),
    "protected-over-budget": (2, 2, 2, 30, 3, 4, 4, (8, 4, 10, 0), 0.5, 0),
    "gqa-4-wide-values": (2, 1, 4, 40, 3, 4, 12, (24, 2, 6, 0), 0.3, 7),
    "long-prompt-alpha-underflow": (1, 2, 2, 0, 400, 8, 8, (64, 4, 16, 0), 0.5, 0),
    "budget-zero": (2, 2, 2, 5, 1, 4, 4, (0, 0, 0, 0), 0.5, 1),
}
FLOAT16_CASES = ("prefill-evicts", "decode-evicts-one", "chunk-score-window", "gqa-4-wide-values")


def op_inputs(case: tuple, seed: int = 0, ties: bool = False) -> dict[str, np.ndarray]:
    batch, heads, groups, past, new, key_dim, value_dim, limits, alpha, padding = case
    phys = past + new
    rng = np.random.default_rng(seed)
    key = rng.standard_normal((batch, heads, phys, key_dim)).astype(np.float32)
    key[..., 0] = np.arange(phys)  # the slot number travels with the key: kept indices are visible
    value = rng.standard_normal((batch, heads, phys, value_dim)).astype(np.float32)
    past_scores = (rng.random((batch, heads, past)) * 4).astype(np.float32)
    new_valid = np.ones((batch, new), bool)
    probs = rng.random((batch, heads * groups, new, phys)).astype(np.float32) ** 4
    if ties:  # many equal scores: the order between equals must be ORT TopK's (lower slot first)
        past_scores = np.round(past_scores)
        probs = (probs > 0.5).astype(np.float32)
    # Row 1 is left-padded: empty slots carry -inf scores in the past, padding tokens are invalid now,
    # and nothing attends to either (probability 0), as the exported attention guarantees.
    pad_past = min(padding, past)
    past_scores[1:, :, :pad_past] = -np.inf
    new_valid[1:, : padding - pad_past] = False
    probs[1:, ..., :padding] = 0.0
    probs[~new_valid[:, None, :].repeat(heads * groups, 1)] = 0.0
    causal = np.arange(phys)[None, :] <= past + np.arange(new)[:, None]
    probs *= causal
    probs /= np.maximum(probs.sum(-1, keepdims=True), 1e-30)
    return dict(
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


def assert_same_update(got: list[np.ndarray], expected: list[np.ndarray]) -> float:
    """Identical keys and values (so identical kept slots), scores within SCORE_TOLERANCE; returns the
    largest score difference."""
    for name, a, b in zip(onnx_cache_op.OUTPUTS, got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(np.isneginf(got[2]), np.isneginf(expected[2]))
    finite = np.isfinite(expected[2])
    np.testing.assert_allclose(
        got[2][finite], expected[2][finite], rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE
    )
    return float(np.abs(got[2][finite] - expected[2][finite]).max(initial=0.0))


@pytest.mark.parametrize("name", CASES)
def test_native_op_matches_function_body(op_sessions, name):
    feeds = op_inputs(CASES[name])
    expected = op_sessions["function", TensorProto.FLOAT].run(None, feeds)
    got = op_sessions["native", TensorProto.FLOAT].run(None, feeds)
    assert got[0].shape[2] == min(CASES[name][3] + CASES[name][4], CASES[name][7][0])
    assert_same_update(got, expected)


@pytest.mark.parametrize("name", ["decode-evicts-one", "h2o-no-protection", "prefill-evicts"])
def test_ties_break_like_topk(op_sessions, name):
    feeds = op_inputs(CASES[name], seed=3, ties=True)
    got = op_sessions["native", TensorProto.FLOAT].run(None, feeds)
    assert_same_update(got, op_sessions["function", TensorProto.FLOAT].run(None, feeds))


@pytest.mark.parametrize("name", FLOAT16_CASES)
def test_native_op_float16(op_sessions, name):
    feeds = op_inputs(CASES[name], seed=1)
    feeds["key"], feeds["value"] = feeds["key"].astype(np.float16), feeds["value"].astype(np.float16)
    got = op_sessions["native", TensorProto.FLOAT16].run(None, feeds)
    assert got[0].dtype == np.float16
    assert_same_update(got, op_sessions["function", TensorProto.FLOAT16].run(None, feeds))


def test_decode_steps_chain_exactly(op_sessions):
    """Thirty decode steps feeding each step's output back, as a generation does: the two implementations
    never drift apart (for one-row steps the native scores are bit-identical to the body's)."""
    heads, groups, dim, limits = 2, 2, 8, np.asarray((16, 2, 4, 0), np.int64)
    states = {}
    for kind in ("function", "native"):
        key = np.zeros((1, heads, 0, dim), np.float32)
        value, scores = key.copy(), np.zeros((1, heads, 0), np.float32)
        step_rng = np.random.default_rng(5)
        for step in range(30):
            new_key = step_rng.standard_normal((1, heads, 1, dim)).astype(np.float32)
            new_key[..., 0] = step
            key, value = np.concatenate([key, new_key], 2), np.concatenate([value, new_key], 2)
            probs = step_rng.random((1, heads * groups, 1, key.shape[2])).astype(np.float32)
            probs /= probs.sum(-1, keepdims=True)
            feeds = dict(
                zip(
                    onnx_cache_op.INPUTS,
                    (key, value, scores, probs, np.ones((1, 1), bool), np.asarray(0.5, np.float32), limits),
                )
            )
            key, value, scores = op_sessions[kind, TensorProto.FLOAT].run(None, feeds)
        states[kind] = key, value, scores
    for a, b in zip(states["native"], states["function"]):
        np.testing.assert_array_equal(a, b)
    assert states["native"][0].shape[2] == 16


def test_bad_inputs_fail_with_a_clear_message(op_sessions):
    feeds = op_inputs(CASES["decode-evicts-one"])
    feeds["probs"] = feeds["probs"][:, :3]  # 3 query heads for 2 KV heads
    with pytest.raises(Exception, match="A2SFCacheUpdate: probs must be"):
        op_sessions["native", TensorProto.FLOAT].run(None, feeds)
    feeds = op_inputs(CASES["decode-evicts-one"])
    feeds["limits"] = np.asarray((-1, 0, 0, 0), np.int64)
    with pytest.raises(Exception, match="budget"):
        op_sessions["native", TensorProto.FLOAT].run(None, feeds)


# ---- the loader and the fallback -------------------------------------------------------------------


def test_find_library_says_why_not(kernel_dir, tmp_path, monkeypatch):
    assert "not built" in native.find_library("cpu", tmp_path).reason
    copy = tmp_path / "copy"
    shutil.copytree(kernel_dir, copy)
    assert native.find_library("cpu", copy).usable
    assert "CUDA" in native.find_library("cuda", copy).reason or native.find_library("cuda", copy).usable

    manifest = json.loads((copy / native_build.MANIFEST).read_text())
    stale = tmp_path / "stale"
    shutil.copytree(kernel_dir, stale)
    (stale / native_build.MANIFEST).write_text(json.dumps({**manifest, "sources_sha256": "0" * 64}))
    assert "other kernel sources" in native.find_library("cpu", stale).reason

    monkeypatch.setattr(ort, "__version__", "1.17.2")
    reason = native.find_library("cpu", copy).reason
    assert "needs onnxruntime >= 1.18" in reason and "1.17.2" in reason


def test_register_cache_kernel_choices(kernel_dir, tmp_path, monkeypatch, capsys):
    options = ort.SessionOptions()
    assert native.register_cache_kernel(options, "cpu", "native", has_op=False) == (None, None)
    assert native.register_cache_kernel(options, "cpu", "function") == ("function", None)
    monkeypatch.setenv("SLIMFORMER_KERNELS_DIR", str(kernel_dir))
    impl, path = native.register_cache_kernel(options, "cpu", "auto")
    assert impl == "native" and Path(path).parent == kernel_dir
    with pytest.raises(SlimformerError, match="unknown cache kernel"):
        native.register_cache_kernel(options, "cpu", "fast")

    monkeypatch.setenv("SLIMFORMER_KERNELS_DIR", str(tmp_path))  # nothing built there
    with pytest.raises(SlimformerError, match="cannot be used: the native kernel is not built"):
        native.register_cache_kernel(options, "cpu", "native")
    capsys.readouterr()
    monkeypatch.setattr(native, "_WARNED", set())
    for _ in range(3):  # one line, however many sessions
        assert native.register_cache_kernel(ort.SessionOptions(), "cpu", "auto") == ("function", None)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ONNX function body" in lines[0] and "make kernels" in lines[0]


def test_cuda_library_registers_and_runs_its_cpu_kernel():
    """The CUDA library also carries the CPU kernel (a CUDA session's CPU fallback); its registration
    can be tested without a GPU. Needs `make kernels` on a machine with nvcc."""
    library = native.find_library("cuda")
    if not library.usable:
        pytest.skip(f"no CUDA kernel library: {library.reason}")
    feeds = op_inputs(CASES["decode-evicts-one"])
    got = op_session(library.path).run(None, feeds)
    assert_same_update(got, op_session(None).run(None, feeds))


# ---- whole models ----------------------------------------------------------------------------------


def a2sf_export(source: Path, root: Path, kv_cache: dict, dtype: str = "float32") -> Path:
    from slimformer.exporters.onnx import OnnxExportOptions, export_onnx

    graph = load_graph(resolve_source(source))
    graph.kv_cache = kv_cache
    with atomic_output_dir(root / "ckpt") as tmp:
        write_checkpoint(graph, tmp)
    export_onnx(root / "ckpt", root / "onnx", OnnxExportOptions(quiet=True, dtype=dtype))
    return root / "onnx"


def prompts(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    tokenizer.padding_side = "left"
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    encoded = tokenizer(texts, return_tensors="np", padding=True, return_token_type_ids=False)
    return encoded["input_ids"], encoded["attention_mask"]


def assert_same_generation(
    onnx_dir: Path, ids: np.ndarray, mask: np.ndarray, kv_cache: dict | None, max_new_tokens: int = 32
) -> None:
    """Greedy generation with the native kernel equals the function body's: tokens, logits and caches."""
    runs = {}
    for kind in ("function", "native"):
        lm = OnnxCausalLM(onnx_dir, provider="cpu", kv_cache=kv_cache, threads=THREADS, cache_kernel=kind)
        assert lm.cache_kernel_impl == kind
        runs[kind] = lm.generate(ids, mask, max_new_tokens=max_new_tokens, output_logits=True)
    got, expected = runs["native"], runs["function"]
    np.testing.assert_array_equal(got.sequences, expected.sequences)
    for a, b in zip(got.logits, expected.logits):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert got.state.physical_lengths() == expected.state.physical_lengths()
    for parts_a, parts_b in zip(got.state.caches, expected.state.caches):
        for a, b in zip(parts_a, parts_b):
            np.testing.assert_allclose(a, b, rtol=SCORE_TOLERANCE, atol=SCORE_TOLERANCE)


TINY_A2SF = {"policy": "a2sf", "budget": 12, "alpha": 0.5, "sink": 1, "recent": 4}
TINY_POLICIES = {  # runtime overrides of the exported graph's policy
    "checkpoint-a2sf": None,
    "per-slot-budgets-window": {
        "policy": "a2sf",
        "layer_budgets": [6, 9, 12, 7, 10, 8],
        "alpha": 0.2,
        "recent": 2,
        "score_window": 2,
    },
    "h2o": {"policy": "h2o", "budget": 10, "recent": 3},
    "streaming": {"policy": "streaming", "budget": 8},
    "budget-over-length": {"policy": "a2sf", "budget": 200, "alpha": 0.5},
    "no-eviction": {"policy": "none"},
}


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, kernel_dir) -> Path:
    return a2sf_export(TINY_LM, tmp_path_factory.mktemp("native-tiny"), TINY_A2SF)


@pytest.mark.parametrize("policy", TINY_POLICIES)
def test_tiny_generation_native_equals_function_body(tiny_export, use_kernels, policy):
    from slimformer.converter.tokenizer import load_tokenizer

    ids, mask = prompts(load_tokenizer(TINY_LM), ["def parse(argv):\n    return", "import os\n"])
    assert_same_generation(tiny_export, ids, mask, TINY_POLICIES[policy], max_new_tokens=24)


def test_cli_generate_cache_kernel(tiny_export, use_kernels):
    from click.testing import CliRunner
    from slimformer.converter.cli import cli

    runner = CliRunner()
    common = [
        "generate",
        str(tiny_export),
        "--runtime",
        "onnx",
        "--prompt",
        "def main():",
        "--max-new-tokens",
        "24",
    ]
    texts = {}
    for kind in ("native", "function"):
        result = runner.invoke(cli, [*common, "--cache-kernel", kind])
        assert result.exit_code == 0, result.output
        assert ("native CPU kernel" if kind == "native" else "ONNX function body") in result.stderr
        texts[kind] = result.stdout
    assert texts["native"] == texts["function"] and len(texts["native"]) > 10
    result = runner.invoke(cli, ["generate", str(TINY_LM), "--prompt", "x", "--cache-kernel", "native"])
    assert result.exit_code != 0 and "--runtime onnx" in str(result.exception or result.output)


@pytest.mark.slow
def test_tiny_float16_generation(tmp_path, use_kernels):
    from slimformer.converter.tokenizer import load_tokenizer

    onnx_dir = a2sf_export(TINY_LM, tmp_path, TINY_A2SF, dtype="float16")
    ids, mask = prompts(load_tokenizer(TINY_LM), ["class Stack:\n", "for i in range("])
    assert_same_generation(onnx_dir, ids, mask, None, max_new_tokens=24)


REAL = {  # prompts; the budget is below prompt + 64 generated tokens, so eviction runs at every step
    "stories260K": (STORIES, ["Once upon a time, there was a little", "Tom and his dog"]),
    "pycoder-8m": (PYCODER, ["def parse_args(argv):\n    ", "import os\n"]),
}
REAL_POLICIES = [
    {"policy": "a2sf", "budget": 24, "alpha": 0.5, "sink": 1},
    {"policy": "h2o", "budget": 32, "recent": 8},
    {"policy": "streaming", "budget": 16},
]


@pytest.mark.slow
@pytest.mark.parametrize("name", REAL)
def test_real_model_generation_native_equals_function_body(tmp_path, use_kernels, name):
    from slimformer.converter.tokenizer import load_tokenizer

    source, texts = REAL[name]
    onnx_dir = a2sf_export(require(source), tmp_path, REAL_POLICIES[0])
    ids, mask = prompts(load_tokenizer(source), texts)
    for policy in REAL_POLICIES:
        assert_same_generation(onnx_dir, ids, mask, policy, max_new_tokens=64)


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------------


@pytest.fixture
def cuda_library() -> Path:
    if not HAS_CUDA:
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    library = native.find_library("cuda")
    if not library.usable:
        pytest.skip(f"no CUDA kernel library: {library.reason}")
    return library.path


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_op_matches_cpu_kernel(cuda_library, kernel_dir, name):
    feeds = op_inputs(CASES[name])
    got = op_session(cuda_library, provider="CUDAExecutionProvider").run(None, feeds)
    cpu = native.find_library("cpu", kernel_dir).path
    assert_same_update(got, op_session(cpu).run(None, feeds))
    assert_same_update(got, op_session(None).run(None, feeds))


@pytest.mark.gpu
@pytest.mark.parametrize("name", FLOAT16_CASES)
def test_cuda_op_float16(cuda_library, name):
    feeds = op_inputs(CASES[name], seed=1)
    feeds["key"], feeds["value"] = feeds["key"].astype(np.float16), feeds["value"].astype(np.float16)
    got = op_session(cuda_library, TensorProto.FLOAT16, "CUDAExecutionProvider").run(None, feeds)
    assert_same_update(got, op_session(None, TensorProto.FLOAT16).run(None, feeds))


@pytest.mark.gpu
def test_cuda_generation_native_equals_function_body(cuda_library, tiny_export):
    from slimformer.converter.tokenizer import load_tokenizer

    ids, mask = prompts(load_tokenizer(TINY_LM), ["def parse(argv):\n    return", "import os\n"])
    runs = {}
    for kind in ("function", "native"):
        lm = OnnxCausalLM(tiny_export, provider="cuda", cache_kernel=kind)
        assert lm.cache_kernel_impl == kind
        runs[kind] = lm.generate(ids, mask, max_new_tokens=24)
    np.testing.assert_array_equal(runs["native"].sequences, runs["function"].sequences)
