"""Runtime of converted checkpoints. These files are also copied into every converted directory."""

from .configuration_slimformer import SlimformerConfig
from .modeling_slimformer import SlimformerEncoderModel, SlimformerForCausalLM, SlimformerModel

RUNTIME_FILES = (
    "configuration_slimformer.py", "modeling_slimformer.py", "attention_heads.py", "kv_cache.py", "sas.py", "rotary.py",
)

__all__ = ["RUNTIME_FILES", "SlimformerConfig", "SlimformerEncoderModel", "SlimformerForCausalLM", "SlimformerModel"]
