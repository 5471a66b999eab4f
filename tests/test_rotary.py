"""The runtime's own RoPE equals the installed transformers' LlamaRotaryEmbedding for every RoPE type it
supports, whichever release (4.57 or 5.x) is installed, and reads either release's config fields."""

from __future__ import annotations

import pytest
import torch
from slimformer.converter.runtime.configuration_slimformer import SlimformerConfig
from slimformer.converter.runtime.rotary import RotaryEmbedding, normalise_rope
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


@pytest.mark.parametrize("kind", sorted(SCALINGS))
def test_runtime_rope_equals_transformers(kind):
    common = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=512)
    scaling = SCALINGS[kind]
    theta = 50000.0
    hf_config = LlamaConfig(**common, rope_theta=theta, rope_scaling=dict(scaling) if scaling else None)
    ours = SlimformerConfig(**common, rope_theta=theta, rope_scaling=dict(scaling) if scaling else None)
    positions = torch.arange(0, 300, 7)[None]
    x = torch.zeros(1, positions.shape[1], 64)
    expected = LlamaRotaryEmbedding(config=hf_config)(x, positions)
    got = RotaryEmbedding(ours)(x, positions)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_both_releases_config_spellings_give_one_description():
    v4 = normalise_rope(None, 1e6, {"type": "linear", "factor": 2.0})
    v5 = normalise_rope({"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0})
    assert v4 == v5 == {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}
    assert normalise_rope(None) == {"rope_type": "default", "rope_theta": 10000.0}


def test_unsupported_rope_type_is_refused_by_name():
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        normalise_rope({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
