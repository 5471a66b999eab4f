"""The installed stack: supported version ranges, optional extras, and the checkpoint format version.

Checked before any work, so that an unsupported environment gets one line naming what is installed,
what is supported and the fix -- not a traceback from deep inside transformers. Versions are read from
package metadata (``importlib.metadata``), which imports nothing heavy.

``SUPPORTED`` must equal the ranges in ``pyproject.toml`` (a test compares them).
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .errors import SlimformerError

#: Ranges of the libraries whose APIs slimformer's code touches directly; tested at both ends of
#: transformers' range (constraints-legacy.txt: 4.57, constraints.txt: the newest 5.x).
SUPPORTED = {
    "torch": ">=2.13,<3",
    "transformers": ">=4.57,<6",
    "huggingface-hub": ">=0.34,<3",
    "safetensors": ">=0.4.3,<1",
}

#: Optional features -> (pip extra, import names it needs).
EXTRAS = {
    "onnx": ("onnx", ("onnx", "onnxruntime")),
    "gguf": ("gguf", ("gguf", "accelerate")),
    "hub datasets": ("hub", ("datasets",)),
}

#: Version of the converted-checkpoint format (``config.json["slimformer_format"]``). 1: slimformer 0.1
#: (no field); 2: ``rope_parameters``, mapping ``_tied_weights_keys``, loads under transformers 4.57 and 5.
CHECKPOINT_FORMAT = 2


def installed(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def check_stack() -> None:
    """Raise :class:`SlimformerError` if an installed core library is outside the supported range."""
    for package, spec in SUPPORTED.items():
        found = installed(package)
        if found is None:
            raise SlimformerError(f"{package} is not installed", fix=f"pip install '{package}{spec}'")
        # Local builds (2.13.0+cpu) and pre-releases of a supported line count as that line.
        if Version(Version(found).base_version) not in SpecifierSet(spec):
            raise SlimformerError(
                f"{package} {found} is installed, but slimformer supports {package}{spec}",
                fix=f"pip install '{package}{spec}' (the tested pins are in constraints.txt)",
            )


def require_extra(feature: str, command: str) -> None:
    """Raise a one-line :class:`SlimformerError` naming the pip extra when ``feature``'s modules are absent."""
    extra, modules = EXTRAS[feature]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise SlimformerError(
            f"{command} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed",
            fix=f"pip install 'slimformer[{extra}]'",
        )


def check_checkpoint_format(config: dict, where: str) -> None:
    """Refuse a converted checkpoint written by a newer slimformer, naming the version that wrote it."""
    written = config.get("slimformer_format", 1)
    if isinstance(written, int) and written > CHECKPOINT_FORMAT:
        from . import __version__

        writer = config.get("slimformer_version", "a newer release")
        raise SlimformerError(
            f"this checkpoint was written by slimformer {writer} (format {written}); slimformer {__version__} "
            f"reads formats up to {CHECKPOINT_FORMAT}",
            where=where,
            fix="upgrade slimformer (pip install -U slimformer), or load it without slimformer: "
            "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) runs the code it ships",
        )
