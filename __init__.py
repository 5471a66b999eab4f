"""slimformer: convert Hugging Face checkpoints into smaller, faster models, with the quality cost measured.

The public API, loaded on first use so that ``import slimformer`` (and the CLI's quick errors) stay cheap::

    import slimformer

    report = slimformer.convert("../shared/models/stories260K", "out", ["layer_drop:drop=attn:1"])
    model = slimformer.load_model("out")
    scores = slimformer.score("../shared/models/stories260K", calib="stdlib:train")
    slimformer.export_onnx("out", "out-onnx")

Subpackages: ``slimformer.converter`` (checkpoint graph, pipeline, evaluation, report, CLI, runtime),
``slimformer.passes`` (one folder or module per pass) and ``slimformer.exporters`` (safetensors, ONNX, vLLM).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

# public name -> "module:attribute"
_API = {
    "convert": "slimformer.converter.conversion:convert",
    "load_model": "slimformer.converter.conversion:load_model",
    "score": "slimformer.passes.layer_drop.importance:score",
    "export_onnx": "slimformer.exporters.onnx:export_onnx",
    "export_vllm": "slimformer.exporters.vllm:export_vllm",
    "ConvertOptions": "slimformer.converter.conversion:ConvertOptions",
    "OnnxExportOptions": "slimformer.exporters.onnx:OnnxExportOptions",
    "PipelineSpec": "slimformer.converter.pipeline:PipelineSpec",
    "PassSpec": "slimformer.converter.pipeline:PassSpec",
    "PassResult": "slimformer.passes.base:PassResult",
    "LayerDropConfig": "slimformer.passes.layer_drop.drop:LayerDropConfig",
    "SasConfig": "slimformer.passes.sas.simplify:SasConfig",
    "A2SFConfig": "slimformer.passes.a2sf:A2SFConfig",
    "SlimformerError": "slimformer.converter.errors:SlimformerError",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'slimformer' has no attribute {name!r}")
    module, attribute = _API[name].split(":")
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
