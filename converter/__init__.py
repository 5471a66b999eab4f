"""slimformer: convert Hugging Face checkpoints into smaller, faster models, with the cost measured."""

from .errors import SlimformerError

__all__ = ["SlimformerError", "convert", "load_model"]
__version__ = "0.2.0"
from .conversion import convert, load_model
