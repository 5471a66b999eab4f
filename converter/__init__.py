"""The checkpoint graph, the pass pipeline, calibration, evaluation, the report, the CLI and the runtime that
converted checkpoints ship. The public API is :mod:`slimformer`."""

from slimformer import __version__

from .errors import SlimformerError

__all__ = ["SlimformerError", "__version__"]
