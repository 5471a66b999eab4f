"""Layer drop ("What Matters in Transformers"): similarity-scored removal of attention / MLP sub-blocks.

``importance`` scores every sub-block (``1 - cos`` between its input and output); ``drop`` is the pass
that ranks and removes them.
"""

from .drop import DropSpec, LayerDrop, LayerDropConfig

__all__ = ["DropSpec", "LayerDrop", "LayerDropConfig"]
