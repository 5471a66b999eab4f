"""The device and dtype names a user gives (``--device``, ``--dtype``), checked before any work."""

from __future__ import annotations

import torch

from .errors import SlimformerError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise SlimformerError(f"unknown dtype {name!r}", fix=f"use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def check_device(device: str) -> str:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SlimformerError(
            f"device {device!r} requested but CUDA is not available", fix="use --device cpu"
        )
    if not (device == "cpu" or device.startswith("cuda") or device == "mps"):
        raise SlimformerError(f"unknown device {device!r}", fix="use cpu, cuda or cuda:N")
    return device
