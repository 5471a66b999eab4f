"""Runtime of converted checkpoints. These files are also copied into every converted directory."""

from pathlib import Path

from .configuration_slimformer import SlimformerConfig
from .modeling_slimformer import SlimformerEncoderModel, SlimformerForCausalLM, SlimformerModel

# Every module of this folder ships (so a new one cannot be forgotten); this file is slimformer's own.
RUNTIME_FILES = tuple(sorted(p.name for p in Path(__file__).parent.glob("*.py") if p.name != "__init__.py"))

__all__ = [
    "RUNTIME_FILES",
    "SlimformerConfig",
    "SlimformerEncoderModel",
    "SlimformerForCausalLM",
    "SlimformerModel",
]
