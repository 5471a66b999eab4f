"""What the A2SF benchmarks (``a2sf_quality.py``, ``a2sf_speed.py``) share: subjects, policies, plumbing."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from slimformer.converter.report import versions
from slimformer.converter.runtime.kv_cache import CachePolicy, EvictingCache

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SLIMFORMER_SHARED", ROOT.parent / "shared"))
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"pycoder-8m": SHARED / "models" / "pycoder-8m", "stories260K": SHARED / "models" / "stories260K"}

# The policies compared, as CachePolicy fields (the budget is added per run). Every scoring policy uses the
# library's default split -- 75% of the budget as recent window, no sinks -- so a2sf and h2o differ only
# in alpha; StreamingLLM keeps its own 4 sinks + the most recent tokens.
POLICIES: dict[str, dict[str, Any]] = {
    "a2sf a=0.1": {"policy": "a2sf", "alpha": 0.1},
    "a2sf a=0.5": {"policy": "a2sf", "alpha": 0.5},
    "a2sf a=0.9": {"policy": "a2sf", "alpha": 0.9},
    "h2o": {"policy": "h2o"},
    "streaming": {"policy": "streaming"},
}
FULL = "full cache"


def cache_factory(fields: dict[str, Any]) -> Callable[[], EvictingCache]:
    policy = CachePolicy.from_dict(fields)  # validates once, up front
    return lambda: EvictingCache(policy)


def single_thread() -> None:
    """One intra-op thread: on a shared 2-core machine more threads oversubscribe and timings collapse."""
    torch.set_num_threads(1)


def environment() -> dict[str, Any]:
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "versions": versions(),
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
