"""Run checkpoints in vLLM's real engine and write what it produced as JSON (greedy tokens, logprobs, KV-cache
capacity, generation throughput).

This script runs in the separate vLLM environment (``.ci/setup_vllm.sh`` creates ``.venv-vllm``), never in the
project's own: it imports only vLLM and the standard library. ``tests/test_vllm.py`` and
``benchmarks/vllm_throughput.py`` write a job file, run this script once for all their checkpoints (vLLM's
start-up costs ~20 s; each further model ~3-10 s in the same process) and compare the result with the slimformer
runtime::

    .venv-vllm/bin/python benchmarks/vllm_engine.py JOB.json RESULT.json

``JOB.json``::

    {"engine": {"dtype": "float32", "max_model_len": 256},          # LLM(...) keyword arguments
     "models": [{"name": "...", "path": "DIR", "engine": {...},                 # per-model overrides
                 "generate": {"prompts": [[token ids], ...], "max_tokens": 48},   # greedy + logprobs
                 "text_prompts": ["...", ...],                                     # tokenised by vLLM
                 "throughput": {"prompts": [[token ids], ...], "max_tokens": 128, "rounds": 3}}],
     "interleaved": [{"name": "...", "models": [model specs as above, without "throughput"],
                      "throughput": {"prompts": ..., "max_tokens": 128, "rounds": 6}}]}

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that its KV-cache figures can be
read from the config it resolved. Each entry of ``models`` is loaded, used and released in turn. The models
of an ``interleaved`` group are loaded together and timed in alternation, one round each in turn, so that
other work on a shared machine hits all of them alike (the result lists every round; compare rounds pairwise).
A model that fails is recorded with its error and the run goes on. KV-cache memory is
``VLLM_CPU_KVCACHE_SPACE`` GiB (default here: 1).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import re
import statistics
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

KV_LOG_LINE = re.compile(r"KV cache size: ([\d,]+) tokens")


class KvLogCapture(logging.Handler):
    """Keeps the token count of vLLM's own ``KV cache size: N tokens`` log line."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.tokens: int | None = None

    def emit(self, record: logging.LogRecord) -> None:
        match = KV_LOG_LINE.search(record.getMessage())
        if match:
            self.tokens = int(match.group(1).replace(",", ""))


def load_model(
    spec: dict[str, Any], engine: dict[str, Any], capture: KvLogCapture
) -> tuple[Any, dict[str, Any]]:
    """``LLM(...)`` for one model spec, and its record: load time and the KV-cache capacity vLLM resolved."""
    from vllm import LLM

    capture.tokens = None
    start = time.perf_counter()
    llm = LLM(model=spec["path"], trust_remote_code=True, **{**engine, **spec.get("engine", {})})
    cache = llm.llm_engine.vllm_config.cache_config
    record = {
        "name": spec["name"],
        "path": spec["path"],
        "load_s": round(time.perf_counter() - start, 2),
        "kv_cache": {
            "blocks": cache.num_gpu_blocks,
            "block_size": cache.block_size,
            "tokens": cache.num_gpu_blocks * cache.block_size if cache.num_gpu_blocks else None,
            "reported_tokens": getattr(cache, "kv_cache_size_tokens", None),  # what vLLM's log line prints
            "log_line_tokens": capture.tokens,  # None when vLLM logged the same line already (info_once)
            "space_gib": float(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
        },
    }
    return llm, record


def use_model(llm: Any, spec: dict[str, Any], record: dict[str, Any]) -> None:
    """Greedy generation with logprobs, and vLLM's own tokenisation of text prompts, as the spec asks."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    if "generate" in spec:
        job = spec["generate"]
        params = SamplingParams(
            temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True, logprobs=0, prompt_logprobs=0
        )
        outputs = llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], params, use_tqdm=False
        )
        record["generations"] = [_generation(output) for output in outputs]
    if "text_prompts" in spec:
        tokenizer = llm.get_tokenizer()
        record["text_encodings"] = [tokenizer.encode(text) for text in spec["text_prompts"]]


def run_model(spec: dict[str, Any], engine: dict[str, Any], capture: KvLogCapture) -> dict[str, Any]:
    llm, record = load_model(spec, engine, capture)
    try:
        use_model(llm, spec, record)
        if "throughput" in spec:
            record["throughput"] = _throughput([llm], spec["throughput"])[0]
    finally:
        del llm
        gc.collect()
    return record


def run_group(group: dict[str, Any], engine: dict[str, Any], capture: KvLogCapture) -> list[dict[str, Any]]:
    """Load every model of the group, then time them in alternation (see the module docstring)."""
    llms, records = [], []
    try:
        for spec in group["models"]:
            print(
                f"[vllm_engine] {group['name']}: {spec['name']}: {spec['path']}", file=sys.stderr, flush=True
            )
            llm, record = load_model(spec, engine, capture)
            llms.append(llm)
            records.append(record)
            use_model(llm, spec, record)
        for record, timing in zip(records, _throughput(llms, group["throughput"])):
            record["throughput"] = timing
    finally:
        del llms
        gc.collect()
    return records


def _generation(output: Any) -> dict[str, Any]:
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    # prompt_logprobs[0] is None (nothing predicts the first token); each entry maps token id -> Logprob.
    prompt_ids = list(output.prompt_token_ids)
    prompt_logprobs = [None] + [
        entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], prompt_ids[1:])
    ]
    token_logprobs = [entry[token].logprob for entry, token in zip(completion.logprobs, tokens)]
    return {"tokens": tokens, "token_logprobs": token_logprobs, "prompt_logprobs": prompt_logprobs}


def _throughput(llms: list[Any], job: dict[str, Any]) -> list[dict[str, Any]]:
    """Generation tokens/s of one batch (all prompts submitted together) per model, after a warm-up.

    With several models, round ``r`` of every model runs before round ``r + 1`` of any.
    """
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    for llm in llms:
        llm.generate(
            prompts[:2], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False
        )
    seconds: list[list[float]] = [[] for _ in llms]
    cpu_seconds: list[list[float]] = [[] for _ in llms]
    loads: list[list[float]] = [[] for _ in llms]
    generated = [0 for _ in llms]
    for _ in range(job.get("rounds", 3)):
        for i, llm in enumerate(llms):
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            seconds[i].append(round(time.perf_counter() - start, 3))
            # CPU time of this process (all its threads): what the round cost, whatever else the machine ran.
            cpu_seconds[i].append(round(time.process_time() - cpu_start, 3))
            loads[i].append(round(os.getloadavg()[0], 2))  # other work on this machine during the round
            generated[i] = sum(len(output.outputs[0].token_ids) for output in outputs)
    return [
        {
            "batch": len(prompts),
            "prompt_tokens": sum(len(p) for p in job["prompts"]),
            "generated_tokens": generated[i],
            "seconds": seconds[i],
            "load_average_1min": loads[i],
            "median_s": round(statistics.median(seconds[i]), 3),
            "tokens_per_s": round(generated[i] / statistics.median(seconds[i]), 1),
            "best_tokens_per_s": round(generated[i] / min(seconds[i]), 1),
            "cpu_seconds": cpu_seconds[i],
            "tokens_per_cpu_s": round(generated[i] / statistics.median(cpu_seconds[i]), 1),
        }
        for i in range(len(llms))
    ]


def main() -> None:
    job_path, out_path = sys.argv[1], sys.argv[2]
    with open(job_path) as handle:
        job = json.load(handle)
    import torch
    import transformers
    import vllm

    capture = KvLogCapture()
    logging.getLogger("vllm").addHandler(capture)
    results: dict[str, Any] = {
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "env": {
            key: os.environ.get(key)
            for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS")
        },
        "models": [],
    }
    engine = {
        "dtype": "float32",
        "max_model_len": 256,
        "enforce_eager": True,
        "seed": 0,
        **job.get("engine", {}),
    }
    for spec in job["models"]:
        print(f"[vllm_engine] {spec['name']}: {spec['path']}", file=sys.stderr, flush=True)
        try:
            record = run_model(spec, engine, capture)
        except Exception as exc:  # one broken export must not hide the results of the others
            record = {
                "name": spec["name"],
                "path": spec["path"],
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc()[-4000:],
            }
        results["models"].append(record)
        with open(out_path, "w") as handle:  # after every model, so a crash later keeps what was measured
            json.dump(results, handle, indent=1)
    for group in job.get("interleaved", []):
        try:
            records = run_group(group, engine, capture)
        except Exception as exc:
            records = [
                {
                    "name": group["name"],
                    "error": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc()[-4000:],
                }
            ]
        results["models"].extend(records)
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":  # vLLM may spawn processes that import this module
    main()
