"""optimum-onnx's description of a slimformer decoder: inputs, outputs, dynamic axes and dummy inputs.

optimum exports through ``OnnxConfig`` classes keyed by ``model_type``; ``slimformer`` is not one of its
architectures, so ``exporters.onnx`` passes this config (and the export-time module of
``exporters.onnx.OnnxDecoder``) to optimum's ``export()``, which runs the TorchScript exporter
(``dynamo=False``). Differences from optimum's Llama config, and why:

* cache inputs/outputs exist only for layers that keep attention (compact slot indices ``j``; the
  slot -> layer mapping goes into the model's metadata), and the count comes from
  ``config.cache_layer_indices``, not ``num_hidden_layers``;
* with the A2SF cache op each slot also carries ``.score`` and the graph takes ``cache_alpha`` and
  ``cache_limits``; each slot then has its own length axis, because per-slot budgets may differ;
* optimum's patcher turns tuple caches into ``DynamicCache`` and trims them to (key, value); the
  export module takes plain tensors and returns named outputs, so the patcher calls it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from optimum.exporters.onnx.config import TextDecoderWithPositionIdsOnnxConfig
from optimum.exporters.onnx.model_patcher import ModelPatcher
from optimum.utils.normalized_config import NormalizedTextConfigWithGQA

from .onnx_runtime import cache_parts, past_name, present_name

# Dummy shapes for tracing: batch 2 (row 1 left-padded), 3 new tokens after 5 cached ones, so that every
# masking path (padding, past, causal block) is exercised by the trace.
DUMMY_BATCH, DUMMY_PAST, DUMMY_NEW, DUMMY_PADDING = 2, 5, 3, 2


class SlimformerModelPatcher(ModelPatcher):
    def __init__(self, config: Any, model: torch.nn.Module, model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__(config, model, model_kwargs=model_kwargs)
        self.patched_forward = self.orig_forward


class SlimformerOnnxConfig(TextDecoderWithPositionIdsOnnxConfig):
    NORMALIZED_CONFIG_CLASS = NormalizedTextConfigWithGQA
    DEFAULT_ONNX_OPSET = 18
    _MODEL_PATCHER = SlimformerModelPatcher

    def __init__(
        self, config: Any, *, evicting: bool, cache_widths: list[tuple[int, int]], float_dtype: str = "fp32"
    ) -> None:
        """``cache_widths``: (key, value) head sizes per cache slot -- a SAS layer caches wider values."""
        super().__init__(config, task="text-generation", float_dtype=float_dtype, use_past=True, use_past_in_inputs=True)
        self.evicting = evicting
        self.cache_widths = cache_widths
        self.num_slots = len(cache_widths)

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        axes = {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
        }
        self.add_past_key_values(axes, direction="inputs")
        if self.evicting:
            axes["cache_alpha"] = {}
            axes["cache_limits"] = {}
        return axes

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        axes = {"logits": {0: "batch_size", 1: "sequence_length"}}
        self.add_past_key_values(axes, direction="outputs")
        return axes

    def add_past_key_values(self, inputs_or_outputs: dict[str, dict[int, str]], direction: str) -> None:
        name = past_name if direction == "inputs" else present_name
        for slot in range(self.num_slots):
            if self.evicting:
                length = f"past_length_{slot}" if direction == "inputs" else f"present_length_{slot}"
            else:
                length = "past_sequence_length" if direction == "inputs" else "past_sequence_length + sequence_length"
            for part in cache_parts(self.evicting):
                inputs_or_outputs[name(slot, part)] = {0: "batch_size", 2: length}

    def generate_dummy_inputs(self, framework: str = "pt", **kwargs: Any) -> dict[str, Any]:
        if framework != "pt":
            raise ValueError("slimformer exports trace PyTorch modules only")
        config = self._config
        dtype = torch.float16 if self.float_dtype == "fp16" else torch.float32
        generator = torch.Generator().manual_seed(0)
        total = DUMMY_PAST + DUMMY_NEW
        mask = torch.ones(DUMMY_BATCH, total, dtype=torch.int64)
        mask[1, :DUMMY_PADDING] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        lengths = (DUMMY_BATCH, config.num_key_value_heads, DUMMY_PAST)
        past = []
        for widths in self.cache_widths:
            slot = [torch.randn(*lengths, width, generator=generator).to(dtype) for width in widths]
            if self.evicting:
                scores = torch.rand(lengths, generator=generator)
                scores[1, :, :DUMMY_PADDING] = float("-inf")
                slot.append(scores)
            past.append(tuple(slot))
        inputs: dict[str, Any] = {
            "input_ids": torch.randint(0, config.vocab_size, (DUMMY_BATCH, DUMMY_NEW), generator=generator),
            "attention_mask": mask,
            "position_ids": positions[:, DUMMY_PAST:],
            "past_key_values": past,
        }
        if self.evicting:
            inputs["cache_alpha"] = torch.tensor(0.5)
            limits = [DUMMY_PAST + 1, 1, 2, 0]  # evicts two of the eight slots
            inputs["cache_limits"] = torch.tensor([limits] * self.num_slots, dtype=torch.int64)
        return inputs
