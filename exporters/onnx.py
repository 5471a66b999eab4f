"""``slimformer export onnx``: a converted checkpoint -> a directory that runs in ONNX Runtime.

The directory holds ``model.onnx`` (external data beside it when large), ``config.json``, the tokenizer
and generation config of the checkpoint, and ``slimformer_onnx.json``: the cache slot -> layer mapping,
the cache policy, opset, dtype, the graph's inputs and outputs and the validation result. It is written
into a temporary sibling directory that is renamed into place only after validation passed, so a
failure never leaves a half-written output.

How the graph is made:

* :class:`OnnxDecoder` traces the runtime model itself (``graph.build_model``, eager attention), so
  whatever the runtime computes -- dropped attention or MLP sub-blocks, SAS forms, q/k norms, biases,
  sliding windows -- is what the graph computes. Only the cache is replaced, by :class:`TracedCache`: the
  runtime's cache contract over plain tensors. The dummy inputs have a past, left padding and several new
  tokens, so the trace takes the runtime's general masking path rather than a shortcut.
* ``torch.onnx.export`` traces it with the TorchScript exporter (``dynamo=False``) under the names and
  dynamic axes of :class:`exporters.onnx_config.DecoderSignature`. Why TorchScript and not dynamo: the
  cache op enters the graph through an ``autograd.Function.symbolic`` (a custom-domain node with a
  function body), and the runtime's masking takes Python branches on the inputs' shapes; tracing records
  exactly the general path the dummy inputs take, which validation then checks to ~1e-6 against the
  PyTorch runtime. optimum-onnx, which did the same call before, is no longer needed: it capped
  transformers below 4.58, and it added nothing the exporter does not do itself.
* Weights the model shares (a tied embedding and LM head) are stored once: constant folding writes the
  head's transposed copy as a second initializer, which :func:`_store_shared_weights_once` turns back
  into a ``Transpose`` of the embedding. The IR version is set explicitly (:data:`IR_VERSION`): onnx
  1.23 writes IR 14 by default, which onnxruntime 1.31 cannot read.
* With the A2SF cache op (default when the checkpoint's policy evicts, or ``--cache-op``), the runtime's
  ``observe_attention`` call after each attention becomes an ``ai.slimformer::A2SFCacheUpdate`` node
  (``exporters/onnx_cache_op.py``) whose outputs are the slot's present key/value/score; the op's
  function body is attached after the trace.
* Validation runs the export in ONNX Runtime and the PyTorch runtime (SDPA, the runtime's own
  ``EvictingCache``) on the same batch -- left padding, a prompt, decode steps and a multi-token chunk --
  and compares the logits of every real token; with the cache op it also runs a tight budget so that
  eviction happens during validation whatever the checkpoint's own budget is.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.runtime.masks import grouped_probabilities
from torch import nn

from . import onnx_cache_op
from .onnx_runtime import (
    METADATA_FILE,
    METADATA_FORMAT,
    MODEL_FILE,
    OnnxCausalLM,
    cache_parts,
    generate_text,
    past_name,
    position_ids,
    present_name,
)

__all__ = [
    "OnnxDecoder",
    "OnnxExportOptions",
    "TracedCache",
    "export_onnx",
    "generate_text",
    "validate_export",
]

MIN_OPSET, MAX_OPSET = 18, 20  # 18: the exporter's default; 20: the TorchScript exporter's newest
IR_VERSION = 10  # opset 18-20 need IR >= 8; onnxruntime 1.31 reads at most 13
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
# Logits tolerance of the validation: the 1e-4 for float32; float16 is compared against the
# float32 runtime, where half precision itself costs ~1e-3 relative, hence a bound relative to the logits.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
EXTERNAL_DATA_BYTES = 1 << 30  # protobuf's hard limit is 2 GiB; move weights out well before it
ONNX_DATA_FILE = MODEL_FILE + "_data"


# ---- the export-time forward ------------------------------------------------------------------------


class OnnxDecoder(nn.Module):
    """What ``model.onnx`` computes: the runtime model itself, traced with a cache made of plain tensors.

    ``past_key_values[j]`` is ``(key, value)`` or, with the cache op, ``(key, value, score)`` of cache slot
    ``j``; returns ``{"logits": float32 [B, q, V], "present.j.key": ..., ...}``. Tracing the runtime's own
    layers (standard, SAS forms, dropped sub-blocks) keeps the export faithful to whatever the runtime
    computes; only the cache is replaced, by :class:`TracedCache`.
    """

    def __init__(self, model: nn.Module, *, evicting: bool) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.evicting = evicting

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past_key_values: list[tuple[torch.Tensor, ...]],
        cache_alpha: torch.Tensor | None = None,
        cache_limits: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        cache = TracedCache(self.config, past_key_values, self.evicting, cache_alpha, cache_limits)
        logits = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
        ).logits
        outputs = {"logits": logits.float()}
        for slot, layer in enumerate(cache.layers):
            for part, tensor in zip(cache_parts(self.evicting), layer.tensors()):
                outputs[present_name(slot, part)] = tensor
        return outputs


class TracedSlot:
    """One cache slot while tracing: holds the past tensors, then (after ``update``) the present ones.

    The runtime asks a slot for its length and, through ``past_key_validity``, for the validity of its past
    keys: a plain slot answers from the 2-D mask (it has no ``key_validity``); an evicting one from its
    scores (``-inf`` = empty), because eviction keeps different tokens per KV head.
    """

    is_initialized = True

    def __init__(self, parts: tuple[torch.Tensor, ...]) -> None:
        self.keys, self.values = parts[0], parts[1]
        self.scores = parts[2] if len(parts) > 2 else None

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.keys, self.values) if self.scores is None else (self.keys, self.values, self.scores)


class EvictingTracedSlot(TracedSlot):
    def physical_length(self) -> int:
        return self.keys.shape[-2]

    def key_validity(self) -> torch.Tensor:
        return self.scores > float("-inf")


class TracedCache:
    """The runtime's cache contract (``kv_cache.py``) over graph inputs, for tracing.

    ``update`` appends the step's keys and values. With the cache op, the attention computes its float32
    probabilities explicitly (``wants_probabilities``) and hands them to ``observe`` -- called after it
    attended, as ``EvictingLayer.observe`` is -- which replaces the slot's tensors with the outputs of an
    ``ai.slimformer::A2SFCacheUpdate`` node fed with those same probabilities.
    """

    def __init__(
        self,
        config: Any,
        past: list[tuple[torch.Tensor, ...]],
        evicting: bool,
        alpha: torch.Tensor | None,
        limits: torch.Tensor | None,
    ) -> None:
        slot_class = EvictingTracedSlot if evicting else TracedSlot
        self.layers = [slot_class(parts) for parts in past]
        self.alpha, self.limits = alpha, limits
        self.new_valid: dict[int, torch.Tensor] = {}
        self.evicting = evicting
        if evicting:
            self.observe = self._observe  # the runtime calls observe() only on caches that have it

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[0].get_seq_length() if self.layers else 0

    def update(
        self, key: torch.Tensor, value: torch.Tensor, slot: int, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.layers[slot]
        new_valid = (cache_kwargs or {}).get("new_valid")
        self.new_valid[slot] = (
            new_valid if new_valid is not None else torch.ones(key.shape[0], key.shape[2], dtype=torch.bool)
        )
        layer.keys = torch.cat([layer.keys, key], dim=2)
        layer.values = torch.cat([layer.values, value], dim=2)
        return layer.keys, layer.values

    def wants_probabilities(self, slot: int, q_len: int) -> bool:
        """With the cache op, the attention hands over its own float32 softmax: one ``Q K^T`` and one softmax
        per layer in the exported graph serve the attention and the op alike (recomputing them for the op
        cost about 34 extra nodes per layer, more than the native kernel saved at short contexts)."""
        return self.evicting

    def _observe(
        self,
        slot: int,
        query: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        probs: torch.Tensor | None = None,
    ) -> None:
        layer = self.layers[slot]
        if probs is None:
            # The runtime's own helper (converter/runtime/masks.py), ungrouped to the op's [B, H, q, P].
            batch, heads, q_len, _ = query.shape
            probs = grouped_probabilities(query, layer.keys, bias, scaling).reshape(
                batch, heads, q_len, layer.keys.shape[2]
            )
        layer.keys, layer.values, layer.scores = onnx_cache_op.A2SFCacheUpdate.apply(
            layer.keys, layer.values, layer.scores, probs, self.new_valid[slot], self.alpha, self.limits[slot]
        )


# ---- export -----------------------------------------------------------------------------------------


@dataclass
class OnnxExportOptions:
    opset: int = 18
    dtype: str = "float32"
    cache_op: bool | None = None  # None: include the A2SF op when the checkpoint's policy evicts
    validate: bool = True
    overwrite: bool = False
    quiet: bool = False


def export_onnx(
    ckpt: str | Path, out: str | Path, options: OnnxExportOptions | None = None
) -> dict[str, Any]:
    """Export the converted checkpoint ``ckpt`` into the directory ``out``; returns the metadata written."""
    from slimformer.converter.graph import load_graph
    from slimformer.converter.outputs import atomic_output_dir, check_output_location
    from slimformer.converter.runtime.kv_cache import CachePolicy
    from slimformer.converter.source import resolve_source

    options = options or OnnxExportOptions()
    log = _logger(options.quiet)
    _check_options(options)
    check_output_location(out, overwrite=options.overwrite)
    source = resolve_source(ckpt)
    if source.config.get("model_type") != "slimformer":
        raise SlimformerError(
            f"not a converted checkpoint (model_type {source.config.get('model_type')!r})",
            where=str(source.path),
            fix=f"convert it first: `slimformer convert {ckpt} -o CONVERTED` (no passes = identity), then export that",
        )
    graph = load_graph(source)
    if graph.is_encoder:
        raise SlimformerError(
            "ONNX export supports decoders (causal LMs); this checkpoint is an encoder",
            where=str(source.path),
        )

    config = graph.runtime_config()
    try:
        policy = CachePolicy.from_dict(dict(graph.kv_cache)) if graph.kv_cache else None
    except ValueError as exc:
        raise SlimformerError(
            f"the checkpoint's kv_cache config is invalid: {exc}",
            where=str(source.path / "config.json"),
            fix="re-run the conversion, or fix kv_cache in config.json",
        ) from exc
    onnx_cache_op.check_policy(policy, str(source.path / "config.json"))
    evicting = (policy is not None and policy.evicts) if options.cache_op is None else options.cache_op
    slots = config.cache_layer_indices
    if evicting and not slots:
        if options.cache_op:
            raise SlimformerError(
                "--cache-op needs a layer that keeps attention; this model has none", where=str(source.path)
            )
        evicting = False
    if policy is not None and policy.evicts and not evicting:
        log("[slimformer] exporting without the cache op: the graph keeps every token (no eviction)")
        policy = None

    dtype = EXPORT_DTYPES[options.dtype]
    model = graph.build_model(dtype=dtype, attn_implementation="eager")
    started = time.perf_counter()
    with atomic_output_dir(out, overwrite=options.overwrite) as tmp:
        log(
            f"[slimformer] exporting {len(config.block_configs)} layers ({len(slots)} cache slots"
            f"{', A2SF cache op' if evicting else ''}) to ONNX opset {options.opset}, {options.dtype} ..."
        )
        names = _export_graph(
            OnnxDecoder(model, evicting=evicting),
            tmp,
            options.opset,
            dtype,
            {"cache_layers": slots, "kv_cache": policy.to_dict() if policy else None},
        )
        for file in source.tokenizer_files + source.carried_files + [source.path / "config.json"]:
            shutil.copyfile(file, tmp / file.name)
        metadata = {
            "format": METADATA_FORMAT,
            "model_file": MODEL_FILE,
            "external_data": (tmp / ONNX_DATA_FILE).is_file(),
            "opset": options.opset,
            "dtype": options.dtype,
            "evicting": evicting,
            "cache_layers": slots,
            "cache_shapes": _cache_shapes(tmp / MODEL_FILE, len(slots)),
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            "kv_cache": policy.to_dict() if policy else None,
            "cache_op": _op_description() if evicting else None,
            "inputs": names[0],
            "outputs": names[1],
            "source": str(source.path),
            "versions": _versions(),
            "validation": None,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if options.validate:
            log("[slimformer] validating ONNX Runtime against the PyTorch runtime ...")
            reference = graph.build_model(dtype=torch.float32, attn_implementation="sdpa")
            metadata["validation"] = validate_export(tmp, reference, policy, options.dtype)
            worst = max(run["max_abs_diff"] for run in metadata["validation"]["runs"])
            log(f"[slimformer] validation passed: max |logits difference| {worst:.2e}")
        metadata["duration_s"] = round(time.perf_counter() - started, 3)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    log(f"[slimformer] wrote {out}")
    return metadata


def _check_options(options: OnnxExportOptions) -> None:
    if not isinstance(options.opset, int) or not MIN_OPSET <= options.opset <= MAX_OPSET:
        raise SlimformerError(
            f"opset {options.opset} is not supported", fix=f"use --opset {MIN_OPSET}..{MAX_OPSET}"
        )
    if options.dtype not in EXPORT_DTYPES:
        raise SlimformerError(
            f"unsupported ONNX dtype {options.dtype!r}", fix=f"use one of {', '.join(EXPORT_DTYPES)}"
        )


def _export_graph(
    module: OnnxDecoder, directory: Path, opset: int, dtype: torch.dtype, properties: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """Trace ``module`` into ``directory/model.onnx``; attach the op body and metadata."""
    import onnx

    from .onnx_config import DecoderSignature

    signature = DecoderSignature(module.config, module.evicting, _cache_widths(module.model), dtype)
    inputs, outputs = signature.inputs(), signature.outputs()
    dummy = signature.dummy_inputs()
    args = tuple(dummy[name] for name in ("input_ids", "attention_mask", "position_ids", "past_key_values"))
    if module.evicting:
        args += (dummy["cache_alpha"], dummy["cache_limits"])
    path = directory / MODEL_FILE
    with tempfile.TemporaryDirectory(dir=directory) as scratch, warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter warns about every traced Python int; keep the terminal readable.
        warnings.simplefilter("ignore")
        # Trace into a scratch directory: a large model's weights may be written as external data beside it.
        traced = Path(scratch) / MODEL_FILE
        torch.onnx.export(
            module,
            args,
            str(traced),
            dynamo=False,
            opset_version=opset,
            do_constant_folding=True,
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes={**inputs, **outputs},
            custom_opsets={onnx_cache_op.DOMAIN: onnx_cache_op.OP_VERSION} if module.evicting else None,
        )
        model = onnx.load(str(traced))
    model.ir_version = IR_VERSION
    _store_shared_weights_once(model)
    if module.evicting:
        onnx_cache_op.attach(model)
    props = {entry.key: entry.value for entry in model.metadata_props}
    props.update({f"slimformer.{key}": json.dumps(value) for key, value in properties.items()})
    onnx.helper.set_model_props(model, props)
    large = model.ByteSize() > EXTERNAL_DATA_BYTES
    onnx.save_model(
        model, str(path), save_as_external_data=large, all_tensors_to_one_file=True, location=ONNX_DATA_FILE
    )
    onnx.checker.check_model(str(path))
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _store_shared_weights_once(model: Any) -> None:
    """Replace initializers that repeat another one (exactly, or as its 2-D transpose) by a node reading
    the original, so that a tied embedding / LM head is stored once. Small tensors are left alone."""
    from onnx import helper, numpy_helper

    graph = model.graph
    originals: dict[bytes, tuple[str, bool]] = {}  # digest -> (name, is the transpose of that name)
    duplicates: list[tuple[Any, str, bool]] = []
    for init in graph.initializer:
        array = numpy_helper.to_array(init)
        if array.size < 4096:
            continue
        digest = _digest(array)
        if digest in originals:
            source, transposed = originals[digest]
            duplicates.append((init, source, transposed))
            continue
        originals[digest] = (init.name, False)
        if array.ndim == 2:
            originals.setdefault(_digest(np.ascontiguousarray(array.T)), (init.name, True))
    for init, source, transposed in duplicates:
        graph.initializer.remove(init)
        op = (
            helper.make_node("Transpose", [source], [init.name], perm=[1, 0])
            if transposed
            else helper.make_node("Identity", [source], [init.name])
        )
        graph.node.insert(0, op)


def _digest(array: np.ndarray) -> bytes:
    import hashlib

    return hashlib.blake2b(
        array.dtype.str.encode() + str(array.shape).encode() + array.tobytes(), digest_size=16
    ).digest()


def _cache_widths(model: nn.Module) -> list[tuple[int, int]]:
    """(key, value) head sizes per cache slot, from one token through the runtime: a layer's form decides
    what it caches (a SAS layer stores each KV group's identity values, wider than its keys)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long), past_key_values=cache, use_cache=True)
    return [(layer.keys.shape[-1], layer.values.shape[-1]) for layer in cache.layers]


def _cache_shapes(path: Path, slots: int) -> list[dict[str, list[int]]]:
    """Per slot ``{"key": [H_kv, D], "value": [H_kv, D_v]}``: a SAS layer caches wider values than keys."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    return [
        {part: [dims[past_name(slot, part)][1], dims[past_name(slot, part)][3]] for part in ("key", "value")}
        for slot in range(slots)
    ]


def _op_description() -> dict[str, Any]:
    return {
        "domain": onnx_cache_op.DOMAIN,
        "op_type": onnx_cache_op.OP_TYPE,
        "version": onnx_cache_op.OP_VERSION,
        "inputs": list(onnx_cache_op.INPUTS),
        "outputs": list(onnx_cache_op.OUTPUTS),
        "limits": list(onnx_cache_op.LIMIT_FIELDS),
        "contract": "exporters/onnx_cache_op.py",
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime-gpu"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def _logger(quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    return log


# ---- validation -------------------------------------------------------------------------------------

# The validation batch: row 1 left-padded; the prompt, then decode steps with one 3-token chunk.
VALIDATION_PROMPT, VALIDATION_PADDING, VALIDATION_STEPS = 10, 3, (1, 1, 3, 1, 1, 1)
# A budget that the validation sequence exceeds, so that the cache op evicts during validation.
TIGHT_POLICY = {"policy": "a2sf", "budget": 6, "sink": 1, "recent": 2}


def validate_export(
    directory: Path, reference: nn.Module, policy: Any, dtype: str = "float32", provider: str = "cpu"
) -> dict[str, Any]:
    """Compare ONNX Runtime with the PyTorch runtime on the same inputs; raise if they disagree."""
    policies: list[tuple[str, dict[str, Any] | None]] = [("checkpoint", policy.to_dict() if policy else None)]
    lm = OnnxCausalLM(directory, provider=provider, threads=1)  # a few tiny steps: threads would only contend
    if lm.evicting:
        alpha = policy.effective_alpha if policy is not None and policy.scores_attention else 0.5
        policies.append(("tight", {**TIGHT_POLICY, "alpha": alpha}))
    runs = []
    for label, spec in policies:
        lm.use_policy(spec)
        diff, scale, evicted = _compare_runs(lm, reference, spec)
        tolerance = TOLERANCE[dtype] * (max(1.0, scale) if dtype != "float32" else 1.0)
        runs.append(
            {
                "policy": label,
                "kv_cache": spec,
                "max_abs_diff": diff,
                "tolerance": tolerance,
                "evicted": evicted,
            }
        )
        if not diff <= tolerance:
            raise SlimformerError(
                f"validation failed: ONNX Runtime logits differ from the PyTorch runtime by {diff:.3g} "
                f"(tolerance {tolerance:.1g}, cache policy {label})",
                where=str(directory),
                fix="report this as a bug; `--no-validate` skips the check",
            )
    return {
        "provider": lm.provider,
        "batch": 2,
        "padding": VALIDATION_PADDING,
        "prompt": VALIDATION_PROMPT,
        "steps": list(VALIDATION_STEPS),
        "runs": runs,
    }


def _compare_runs(
    lm: OnnxCausalLM, reference: nn.Module, spec: dict[str, Any] | None
) -> tuple[float, float, bool]:
    from slimformer.converter.runtime.kv_cache import new_cache

    config = reference.config
    generator = torch.Generator().manual_seed(0)
    lengths = (VALIDATION_PROMPT, *VALIDATION_STEPS)
    tokens = torch.randint(0, config.vocab_size, (2, sum(lengths)), generator=generator)
    mask = torch.ones_like(tokens)
    mask[1, :VALIDATION_PADDING] = 0
    cache = new_cache(SimpleNamespace(kv_cache=spec, cache_layer_indices=config.cache_layer_indices))
    state = lm.start(batch=2)
    worst, scale, start = 0.0, 0.0, 0
    for length in lengths:
        stop = start + length
        step_ids, step_mask = tokens[:, start:stop], mask[:, :stop]
        with torch.inference_mode():
            expected = (
                reference(
                    input_ids=step_ids,
                    attention_mask=step_mask,
                    past_key_values=cache,
                    use_cache=True,
                    position_ids=torch.from_numpy(position_ids(step_mask.numpy(), length)),
                )
                .logits.float()
                .numpy()
            )
        got = lm.forward(step_ids.numpy(), step_mask[:, start:].numpy(), state)
        real = step_mask[:, start:].numpy().astype(bool)
        worst = max(worst, float(np.abs(got - expected)[real].max()))
        scale = max(scale, float(np.abs(expected[real]).max()))
        start = stop
    evicted = any(length < start for length in state.physical_lengths())
    return worst, scale, evicted
