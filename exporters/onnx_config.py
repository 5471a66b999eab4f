"""The signature of an exported slimformer decoder: input/output names, dynamic axes and dummy inputs.

``exporters.onnx`` hands these to ``torch.onnx.export`` (TorchScript exporter). The contract is the one
optimum-onnx's Llama export established, so ORT users see familiar names, with these differences:

* cache inputs/outputs exist only for layers that keep attention (compact slot indices ``j``; the
  slot -> layer mapping goes into the model's metadata);
* with the A2SF cache op each slot also carries ``.score`` and the graph takes ``cache_alpha`` and
  ``cache_limits``; each slot then has its own length axis, because per-slot budgets may differ;
* a slot's key and value widths may differ (a SAS layer caches each KV group's identity values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .onnx_runtime import cache_parts, past_name, present_name

# Dummy shapes for tracing: batch 2 (row 1 left-padded), 3 new tokens after 5 cached ones, so that every
# masking path (padding, past, causal block) is exercised by the trace.
DUMMY_BATCH, DUMMY_PAST, DUMMY_NEW, DUMMY_PADDING = 2, 5, 3, 2


@dataclass
class DecoderSignature:
    """What ``model.onnx`` takes and returns, for a model with ``len(cache_widths)`` cache slots.

    ``cache_widths``: (key, value) head sizes per cache slot.
    """

    config: Any
    evicting: bool
    cache_widths: list[tuple[int, int]]
    dtype: torch.dtype = torch.float32

    @property
    def num_slots(self) -> int:
        return len(self.cache_widths)

    def inputs(self) -> dict[str, dict[int, str]]:
        """Input names (in the order of ``OnnxDecoder.forward``'s flattened arguments) -> dynamic axes."""
        axes = {
            "input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
        }
        axes.update(self._cache_axes("inputs"))
        if self.evicting:
            axes["cache_alpha"] = {}
            axes["cache_limits"] = {}
        return axes

    def outputs(self) -> dict[str, dict[int, str]]:
        return {"logits": {0: "batch_size", 1: "sequence_length"}, **self._cache_axes("outputs")}

    def _cache_axes(self, direction: str) -> dict[str, dict[int, str]]:
        name = past_name if direction == "inputs" else present_name
        axes = {}
        for slot in range(self.num_slots):
            if self.evicting:
                length = f"past_length_{slot}" if direction == "inputs" else f"present_length_{slot}"
            else:
                length = (
                    "past_sequence_length"
                    if direction == "inputs"
                    else "past_sequence_length + sequence_length"
                )
            for part in cache_parts(self.evicting):
                axes[name(slot, part)] = {0: "batch_size", 2: length}
        return axes

    def dummy_inputs(self) -> dict[str, Any]:
        """Keyword arguments of ``OnnxDecoder.forward`` that take the runtime's general masking path."""
        generator = torch.Generator().manual_seed(0)
        total = DUMMY_PAST + DUMMY_NEW
        mask = torch.ones(DUMMY_BATCH, total, dtype=torch.int64)
        mask[1, :DUMMY_PADDING] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        lengths = (DUMMY_BATCH, self.config.num_key_value_heads, DUMMY_PAST)
        past = []
        for widths in self.cache_widths:
            slot = [torch.randn(*lengths, width, generator=generator).to(self.dtype) for width in widths]
            if self.evicting:
                scores = torch.rand(lengths, generator=generator)
                scores[1, :, :DUMMY_PADDING] = float("-inf")
                slot.append(scores)
            past.append(tuple(slot))
        inputs: dict[str, Any] = {
            "input_ids": torch.randint(
                0, self.config.vocab_size, (DUMMY_BATCH, DUMMY_NEW), generator=generator
            ),
            "attention_mask": mask,
            "position_ids": positions[:, DUMMY_PAST:],
            "past_key_values": past,
        }
        if self.evicting:
            inputs["cache_alpha"] = torch.tensor(0.5)
            limits = [DUMMY_PAST + 1, 1, 2, 0]  # evicts two of the eight slots
            inputs["cache_limits"] = torch.tensor([limits] * self.num_slots, dtype=torch.int64)
        return inputs
