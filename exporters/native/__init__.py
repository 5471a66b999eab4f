"""Native ONNX Runtime kernels for the A2SF cache op (``ai.slimformer::A2SFCacheUpdate``): find them.

``make kernels`` (``exporters/native/build.py``) compiles ``libslimformer_a2sf.so`` (CPU) and, where
nvcc exists, ``libslimformer_a2sf_cuda.so`` (CUDA + CPU). A session that registers one of them with
``SessionOptions.register_custom_ops_library`` runs the op natively instead of inlining its ONNX function
body; the exported model is the same either way. ``find_library`` says whether a built library can be
used here and, when not, why -- so that callers can fall back to the function body with a clear reason::

    from slimformer.exporters.native import find_library
    library = find_library("cpu")
    if library.usable:
        options.register_custom_ops_library(str(library.path))
    else:
        print(library.reason)
"""

from __future__ import annotations

import ctypes
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimformer.converter.errors import SlimformerError

from .build import LIBRARIES, default_build_dir, read_manifest, sources_digest

__all__ = ["CACHE_KERNELS", "LIBRARIES", "KernelLibrary", "find_library", "register_cache_kernel"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
CACHE_KERNELS = ("auto", "native", "function")
HOW_TO_BUILD = "run `make kernels`"


@dataclass(frozen=True)
class KernelLibrary:
    """A native kernel library for one device, or the reason there is none that works here."""

    device: str  # "cpu" or "cuda"
    path: Path | None = None  # set when usable
    reason: str = ""  # why it cannot be used ("" when usable)
    info: dict[str, Any] = field(default_factory=dict)  # what the library reports about itself

    @property
    def usable(self) -> bool:
        return self.path is not None


def find_library(device: str = "cpu", directory: str | Path | None = None) -> KernelLibrary:
    """The built library for ``device`` (``cpu`` / ``cuda``) in ``directory`` (default: the build
    directory, ``$SLIMFORMER_KERNELS_DIR`` or ``exporters/native/build``), checked against this checkout's
    sources and the installed onnxruntime."""
    if device not in LIBRARIES:
        raise ValueError(f"unknown device {device!r}; expected one of {sorted(LIBRARIES)}")
    directory = Path(directory) if directory is not None else default_build_dir()
    manifest = read_manifest(directory)
    entry = (manifest or {}).get("libraries", {}).get(device)
    path = directory / LIBRARIES[device]
    if manifest is None or entry is None or not path.is_file():
        missing = (
            "the CUDA kernel library is not built" if device == "cuda" else "the native kernel is not built"
        )
        skipped = (manifest or {}).get("cuda_skipped") if device == "cuda" else None
        return KernelLibrary(device, reason=f"{missing} ({f'{skipped}; ' if skipped else ''}{HOW_TO_BUILD})")
    try:
        current = sources_digest()
    except OSError:  # an installed package without the kernel sources: trust the manifest
        current = manifest["sources_sha256"]
    if manifest.get("sources_sha256") != current:
        return KernelLibrary(
            device,
            reason=f"{path.name} was built from other kernel sources than these ({HOW_TO_BUILD} again)",
        )

    try:
        info = _library_info(path)
    except (OSError, AttributeError, ValueError) as exc:
        return KernelLibrary(device, reason=f"{path.name} cannot be loaded: {exc}")
    import onnxruntime as ort

    available = _runtime_api_version(ort.__version__)
    required = int(info.get("api_version_required", 0))
    if available is not None and available < required:
        return KernelLibrary(
            device,
            reason=f"{path.name} needs onnxruntime >= 1.{required} (C API {required}); "
            f"this is onnxruntime {ort.__version__}",
            info=info,
        )
    if PROVIDERS[device] not in info.get("providers", []):
        return KernelLibrary(device, reason=f"{path.name} has no {PROVIDERS[device]} kernel", info=info)
    return KernelLibrary(device, path=path, info=info)


def _library_info(path: Path) -> dict[str, Any]:
    """The JSON the library reports (``SlimformerA2SFInfo``). Loading it runs no ORT or CUDA code; the
    dynamic loader keeps it mapped, so ORT's own ``dlopen`` later finds the same image."""
    library = ctypes.CDLL(str(path))
    library.SlimformerA2SFInfo.restype = ctypes.c_char_p
    return json.loads(library.SlimformerA2SFInfo().decode())


def _runtime_api_version(version: str) -> int | None:
    """onnxruntime 1.N serves C API versions 1..N (ORT_API_VERSION tracks the minor version)."""
    parts = version.split(".")
    if len(parts) < 2 or parts[0] != "1" or not parts[1].isdigit():
        return None  # an unfamiliar scheme: let the registration itself decide
    return int(parts[1])


def register_cache_kernel(
    options: Any, device: str, choice: str = "auto", *, has_op: bool = True, where: str | None = None
) -> tuple[str | None, str | None]:
    """Decide what runs a graph's A2SF cache op and register the native library on ``options`` (an
    ``onnxruntime.SessionOptions``) when that is the choice. Returns ``(implementation, library path)``:
    ``("native", path)``, ``("function", None)`` or ``(None, None)`` when the graph has no such op.

    ``choice``: ``native`` (the library must work here, else ``SlimformerError``), ``function`` (the ONNX
    function body) or ``auto`` (native when usable, else the body with one stderr line saying why).
    ``device`` is the session's provider (``cpu`` / ``cuda``): only that provider's library is taken,
    since a CPU kernel in a CUDA session would pull every cache tensor through the host.
    """
    if choice not in CACHE_KERNELS:
        raise SlimformerError(
            f"unknown cache kernel {choice!r}", fix=f"use one of {', '.join(CACHE_KERNELS)}"
        )
    if not has_op:
        return None, None
    if choice == "function":
        return "function", None
    library = find_library(device)
    reason = library.reason
    if library.usable:
        try:
            options.register_custom_ops_library(str(library.path))
            return "native", str(library.path)
        except Exception as exc:  # onnxruntime raises its own exception types; each means "not usable"
            reason = f"onnxruntime refused {library.path.name}: {exc}"
    if choice == "native":
        raise SlimformerError(
            f"the native A2SF cache kernel cannot be used: {reason}",
            where=where,
            fix="build it with `make kernels`, or run with --cache-kernel auto / function",
        )
    _warn_once(f"slimformer: the A2SF cache op runs as its ONNX function body (slower), because {reason}")
    return "function", None


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One stderr line per distinct message and process (a benchmark or a test suite builds many sessions)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr)
