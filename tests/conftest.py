"""Shared fixtures: tiny random checkpoints of every supported family, written with the real
``save_pretrained``, and paths to the real models in ``../shared`` (tests skip when it is absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SLIMFORMER_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"
PYCODER = SHARED / "models" / "pycoder-8m"
TINY_LM = ROOT / "examples" / "models" / "tiny-stdlib-lm"

DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
FAMILIES = DECODER_FAMILIES + ("bert",)


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the real models live in ../shared, which only this workplace has)")
    return path


def tiny_config(family: str, layers: int = 3):
    from transformers import BertConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=128,
    )
    if family == "bert":
        return BertConfig(**common, type_vocab_size=2)
    decoder = dict(common, num_key_value_heads=2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    return {
        "llama": lambda: LlamaConfig(**decoder, attention_bias=True),
        "mistral": lambda: MistralConfig(**decoder, sliding_window=None),
        "qwen2": lambda: Qwen2Config(**decoder),
        "qwen3": lambda: Qwen3Config(**decoder, head_dim=8),
    }[family]()


def make_tiny(family: str, directory: Path, *, layers: int = 3, seed: int = 0, **save_kwargs) -> Path:
    """A random model of ``family`` saved as safetensors (with biases/norms perturbed so they matter)."""
    from transformers import AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(family, layers)
    model = (AutoModel if family == "bert" else AutoModelForCausalLM).from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower():
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    return directory


@pytest.fixture(params=FAMILIES)
def tiny_checkpoint(request, tmp_path) -> tuple[str, Path]:
    return request.param, make_tiny(request.param, tmp_path / f"tiny-{request.param}")


@pytest.fixture
def tiny_llama(tmp_path) -> Path:
    return make_tiny("llama", tmp_path / "tiny-llama", layers=4)
