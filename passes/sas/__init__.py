"""SAS ("Simplifying Transformer Blocks"): value/projection reparameterisation to identity.

``simplify`` is the pass (exact folding of identity maps, or approximate conversion fitted by least
squares and healed by distillation); ``fold`` holds the exact, function-preserving folds.
"""

from .simplify import SasConfig, SasPass

__all__ = ["SasConfig", "SasPass"]
