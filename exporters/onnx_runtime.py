"""Run an exported slimformer directory in ONNX Runtime: sessions, cache state and the decode loop.

``slimformer export onnx`` writes ``model.onnx`` whose inputs are ``input_ids``, ``attention_mask``,
``position_ids`` and, per cache slot ``j`` (layer ``cache_layers[j]``), ``past_key_values.j.key`` /
``.value`` -- plus ``.score``, ``cache_alpha`` and ``cache_limits`` when the graph holds the A2SF cache op
(``exporters/onnx_cache_op.py``). ``ORTModelForCausalLM.generate`` assumes uniform, growing caches, so
an evicting graph needs the loop written here; it serves plain graphs too, so both share one path.

What the loop feeds, and why it is exact (DESIGN.md §5):

* ``position_ids`` are ABSOLUTE positions from the logical 2-D mask (``cumsum - 1``, as transformers'
  ``generate`` computes them), so RoPE is right after eviction and with left padding.
* ``attention_mask`` has the PHYSICAL length ``past + q``. For a plain graph that is the logical mask. An
  evicting graph reads only its last ``q`` columns: which stored slots hold tokens is carried by each
  slot's scores (``-inf`` = empty), because eviction keeps different tokens per layer and KV head.
* ``cache_limits[j] = (budget, sink, recent, score_window)`` is resolved at the prompt, like
  ``EvictingLayer`` does (a ``budget_ratio`` is a fraction of the padded prompt length).

Greedy and sampling decoding reproduce ``transformers``' ``generate`` (the PyTorch runtime's path):
the same warpers (temperature, top-k from the generation config's default, top-p) and the same
``torch.multinomial`` draw from a generator seeded with ``seed``, so equal logits give equal tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from slimformer.converter.errors import SlimformerError

from .native import register_cache_kernel
from .onnx_cache_op import NO_BUDGET, check_policy

MODEL_FILE = "model.onnx"
METADATA_FILE = "slimformer_onnx.json"
METADATA_FORMAT = 1
CACHE_PARTS = ("key", "value", "score")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}


def cache_parts(evicting: bool) -> tuple[str, ...]:
    return CACHE_PARTS if evicting else CACHE_PARTS[:2]


def past_name(slot: int, part: str) -> str:
    return f"past_key_values.{slot}.{part}"


def present_name(slot: int, part: str) -> str:
    return f"present.{slot}.{part}"


def load_metadata(directory: str | Path) -> dict[str, Any]:
    """``slimformer_onnx.json`` of an export, with a clear error for anything else."""
    directory = Path(directory)
    path = directory / METADATA_FILE
    if not path.is_file():
        hint = (
            "it looks like a checkpoint; run `slimformer export onnx` on it first"
            if (directory / "config.json").is_file()
            else "give the directory written by `slimformer export onnx`"
        )
        raise SlimformerError("not an ONNX export (no slimformer_onnx.json)", where=str(directory), fix=hint)
    try:
        metadata = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlimformerError(
            f"cannot read {METADATA_FILE}: {exc}", where=str(path), fix="export again"
        ) from exc
    if (
        metadata.get("format") != METADATA_FORMAT
        or not (directory / metadata.get("model_file", MODEL_FILE)).is_file()
    ):
        raise SlimformerError(
            "the ONNX export is incomplete or from another version",
            where=str(directory),
            fix="export the checkpoint again with this slimformer",
        )
    return metadata


def position_ids(mask: np.ndarray, q_len: int) -> np.ndarray:
    """Absolute positions of the last ``q_len`` tokens of a logical mask (transformers' own formula)."""
    positions = np.cumsum(mask, axis=-1) - 1
    positions[mask == 0] = 1
    return positions[:, -q_len:].astype(np.int64)


@dataclass
class CacheState:
    """Everything carried between forward calls of one batch of sequences."""

    mask: np.ndarray  # [B, tokens seen]: the LOGICAL attention mask (1 = real token)
    caches: list[list[Any]]  # per slot: key, value (, score) as numpy arrays or OrtValues
    limits: np.ndarray | None = None  # [slots, 4] int64, resolved at the first forward (the prompt)

    @property
    def seen(self) -> int:
        return self.mask.shape[1]

    def physical_lengths(self) -> list[int]:
        return [int(_shape(parts[0])[2]) for parts in self.caches]

    def nbytes(self) -> int:
        """Bytes held by the cache tensors (keys, values and scores)."""
        return sum(_nbytes(tensor) for parts in self.caches for tensor in parts)


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape() if callable(getattr(tensor, "shape", None)) else tensor.shape)


def _nbytes(tensor: Any) -> int:
    if isinstance(tensor, np.ndarray):
        return tensor.nbytes
    return int(tensor.tensor_size_in_bytes())


@dataclass
class GenerationResult:
    sequences: np.ndarray  # [B, prompt + generated]
    logits: list[np.ndarray]  # per generated token: [B, vocab] float32 (when asked for)
    state: CacheState


class OnnxCausalLM:
    """An exported directory loaded into an ONNX Runtime session.

    ``provider``: ``"auto"`` (CUDA when onnxruntime-gpu sees a GPU, else CPU), ``"cpu"`` or ``"cuda"``.
    ``kv_cache`` overrides the exported cache policy (a ``CachePolicy`` dict); an evicting policy needs a
    graph exported with the cache op. ``io_binding`` (default: on for CUDA) keeps cache tensors on the
    device between steps instead of copying them to the host and back.

    ``cache_kernel`` chooses what runs the graph's ``A2SFCacheUpdate`` nodes: ``native`` registers the
    compiled kernel library of the provider (``make kernels``, ``exporters/native``) and fails when it
    cannot be used; ``function`` inlines the op's ONNX function body; ``auto`` (default) is native when
    usable, else the function body with one line on stderr saying why. The choice made is in
    ``cache_kernel_impl`` (``"native"``, ``"function"``, or ``None`` for a graph without the op) and
    ``cache_kernel_library`` (the registered library's path).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        provider: str = "auto",
        kv_cache: dict[str, Any] | None = None,
        io_binding: bool | None = None,
        threads: int | None = None,
        cache_kernel: str = "auto",
    ) -> None:
        import onnxruntime as ort

        self.directory = Path(directory)
        self.metadata = load_metadata(self.directory)
        self.provider, self.device_id = _choose_provider(provider, ort.get_available_providers())
        self.device = "cuda" if self.provider == PROVIDERS["cuda"] else "cpu"
        self.io_binding = self.device == "cuda" if io_binding is None else io_binding
        self.evicting = bool(self.metadata["evicting"])
        self.num_slots = len(self.metadata["cache_layers"])
        self.use_policy(kv_cache if kv_cache is not None else self.metadata.get("kv_cache"))

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.cache_kernel_impl, self.cache_kernel_library = register_cache_kernel(
            options, self.device, cache_kernel, has_op=self.evicting, where=str(self.directory)
        )
        model_path = str(self.directory / self.metadata["model_file"])
        if self.device == "cuda":
            # CPU stays registered as the fallback for any node the CUDA provider has no kernel for.
            providers, provider_options = (
                [self.provider, PROVIDERS["cpu"]],
                [{"device_id": self.device_id}, {}],
            )
        else:
            providers, provider_options = [self.provider], None
        self.session = ort.InferenceSession(
            model_path, options, providers=providers, provider_options=provider_options
        )
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.dtype = NUMPY_DTYPES[self.metadata["dtype"]]

    @property
    def cache_kernel_description(self) -> str:
        """What runs the cache op, in words (``slimformer generate --cache-kernel`` prints it)."""
        if self.cache_kernel_impl is None:
            return "no A2SF cache op in this graph"
        if self.cache_kernel_impl == "function":
            return "A2SF cache op: ONNX function body"
        return f"A2SF cache op: native {self.device.upper()} kernel ({self.cache_kernel_library})"

    # ---- policy -------------------------------------------------------------------------------------

    def use_policy(self, spec: dict[str, Any] | None) -> None:
        """Run later sequences with the cache policy ``spec`` (``None``: the graph keeps every token)."""
        self.policy = self._resolve_policy(spec)

    def _resolve_policy(self, spec: dict[str, Any] | None) -> Any:
        from slimformer.converter.runtime.kv_cache import CachePolicy

        if not spec:
            return None
        try:
            policy = CachePolicy.from_dict(dict(spec))
            policy.validate(self.num_slots)
        except ValueError as exc:
            raise SlimformerError(f"bad kv-cache policy: {exc}", where=str(self.directory)) from exc
        check_policy(policy, str(self.directory))
        if policy.evicts and not self.evicting:
            raise SlimformerError(
                f"this ONNX export has no cache op, so it cannot run the evicting policy {policy.policy!r}",
                where=str(self.directory),
                fix="export with `slimformer export onnx CKPT -o DIR --cache-op`, or drop --a2sf",
            )
        return policy if policy.evicts else None

    def _limits(self, prompt_len: int) -> np.ndarray:
        rows = []
        for slot in range(self.num_slots):
            limits = self.policy.limits(slot, prompt_len) if self.policy is not None else None
            if limits is None:
                rows.append((NO_BUDGET, 0, 0, 0))
            else:
                rows.append((limits.budget, limits.sink, limits.recent, self.policy.score_window or 0))
        return np.asarray(rows, dtype=np.int64).reshape(self.num_slots, 4)

    @property
    def alpha(self) -> float:
        return self.policy.effective_alpha if self.policy is not None else 1.0

    # ---- state and one forward ----------------------------------------------------------------------

    def start(self, batch: int) -> CacheState:
        """Empty caches for ``batch`` sequences (the policy's limits are fixed by the first forward)."""
        parts = []
        for shapes in self.metadata["cache_shapes"]:
            (kv_heads, key_dim), (_, value_dim) = shapes["key"], shapes["value"]
            slot = [np.zeros((batch, kv_heads, 0, dim), dtype=self.dtype) for dim in (key_dim, value_dim)]
            if self.evicting:
                slot.append(np.zeros((batch, kv_heads, 0), dtype=np.float32))
            parts.append(slot)
        return CacheState(mask=np.zeros((batch, 0), dtype=np.int64), caches=parts)

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray | None, state: CacheState
    ) -> np.ndarray:
        """Run ``input_ids`` ``[B, q]`` (mask ``[B, q]`` of the NEW tokens, ``None`` = all real); returns
        float32 logits ``[B, q, vocab]`` and advances ``state``."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, q_len = input_ids.shape
        new_mask = (
            np.ones((batch, q_len), np.int64)
            if attention_mask is None
            else np.asarray(attention_mask, np.int64)
        )
        if state.limits is None:
            state.limits = self._limits(q_len)
        state.mask = np.concatenate([state.mask, new_mask], axis=1)

        feeds: dict[str, np.ndarray] = {
            "input_ids": input_ids,
            "attention_mask": self._physical_mask(state, new_mask),
            "position_ids": position_ids(state.mask, q_len),
        }
        if self.evicting:
            feeds["cache_alpha"] = np.asarray(self.alpha, dtype=np.float32)
            feeds["cache_limits"] = state.limits
        feeds = {name: value for name, value in feeds.items() if name in self.input_names}
        caches = {
            past_name(slot, part): tensor
            for slot, parts in enumerate(state.caches)
            for part, tensor in zip(cache_parts(self.evicting), parts)
        }
        outputs = self._run_bound(feeds, caches) if self.io_binding else self._run(feeds, caches)
        logits = outputs.pop("logits")
        state.caches = [
            [outputs[present_name(slot, part)] for part in cache_parts(self.evicting)]
            for slot in range(self.num_slots)
        ]
        return logits

    def _physical_mask(self, state: CacheState, new_mask: np.ndarray) -> np.ndarray:
        if not self.evicting or not state.caches:
            return state.mask
        # The graph reads only the last q columns (past validity is in the scores, which may live on the
        # GPU); the past part just gives the input its documented length.
        past = np.ones((new_mask.shape[0], state.physical_lengths()[0]), dtype=np.int64)
        return np.concatenate([past, new_mask], axis=1)

    def _run(self, feeds: dict[str, np.ndarray], caches: dict[str, Any]) -> dict[str, Any]:
        values = self.session.run(self.output_names, {**feeds, **caches})
        return dict(zip(self.output_names, values))

    def _run_bound(self, feeds: dict[str, np.ndarray], caches: dict[str, Any]) -> dict[str, Any]:
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in caches.items():
            if isinstance(value, np.ndarray):  # the empty caches of a new sequence
                binding.bind_cpu_input(name, value)
            else:  # a present tensor of the previous step, still on the device
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            # Logits come back to the host for decoding; the caches stay where the provider computed them.
            if name == "logits":
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        outputs = dict(zip(self.output_names, values))
        outputs["logits"] = outputs["logits"].numpy()
        return outputs

    # ---- decoding -----------------------------------------------------------------------------------

    def generate(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        max_new_tokens: int = 64,
        sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        seed: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        output_logits: bool = False,
    ) -> GenerationResult:
        """Greedy or sampled continuation of a left-padded batch, stopping like ``generate()``: a row that
        produced an EOS token is padded with ``pad_token_id`` and the loop ends when every row has."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim != 2 or input_ids.shape[1] == 0:
            raise SlimformerError("input_ids must be a non-empty [batch, length] array")
        eos = [] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist()
        if eos and pad_token_id is None:
            pad_token_id = eos[0]
        chooser = _TokenChooser(sample, temperature, top_p, top_k, seed)
        state = self.start(input_ids.shape[0])
        logits = self.forward(input_ids, attention_mask, state)
        sequences = input_ids
        unfinished = np.ones(input_ids.shape[0], dtype=bool)
        kept_logits: list[np.ndarray] = []
        for step in range(max_new_tokens):
            last = np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)
            if output_logits:
                kept_logits.append(last)
            tokens = chooser(last)
            if eos:
                tokens = np.where(unfinished, tokens, pad_token_id)
                unfinished &= ~np.isin(tokens, eos)
            sequences = np.concatenate([sequences, tokens[:, None]], axis=1)
            if not unfinished.any() or step == max_new_tokens - 1:
                break
            logits = self.forward(tokens[:, None], None, state)
        return GenerationResult(sequences, kept_logits, state)


def _default_top_k() -> int | None:
    """The top-k that ``generate(do_sample=True)`` applies when nobody set one: transformers 4.57 keeps it on
    ``GenerationConfig()``, transformers 5 in ``_get_default_generation_params()`` (both 50)."""
    from transformers import GenerationConfig

    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    return defaults().get("top_k") if defaults is not None else GenerationConfig().top_k


class _TokenChooser:
    """Greedy argmax, or transformers' sampling warpers + ``torch.multinomial`` with a seeded generator."""

    def __init__(self, sample: bool, temperature: float, top_p: float, top_k: int | None, seed: int) -> None:
        self.sample = sample
        if not sample:
            return
        import torch
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        if not (temperature > 0 and math.isfinite(temperature)):
            raise SlimformerError(f"temperature {temperature} must be a positive number")
        if not 0 < top_p <= 1:
            raise SlimformerError(f"top_p {top_p} must lie in (0, 1]")
        # The same defaults and order as GenerationMixin._get_logits_processor for do_sample=True.
        top_k = _default_top_k() if top_k is None else top_k
        self.warpers = LogitsProcessorList()
        if temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k))
        if top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p))
        self.generator = torch.Generator().manual_seed(seed)
        self.torch = torch

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if not self.sample:
            return logits.argmax(axis=-1).astype(np.int64)
        torch = self.torch
        # One row per sequence is far too little work for torch's thread pool, whose hand-offs cost
        # milliseconds per call on a busy machine; the draw is the same with any thread count.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            scores = self.warpers(None, torch.from_numpy(logits))
            probs = scores.softmax(dim=-1)
            tokens = torch.multinomial(probs, num_samples=1, generator=self.generator).squeeze(1)
        finally:
            torch.set_num_threads(threads)
        return tokens.numpy().astype(np.int64)


def _choose_provider(provider: str, available: list[str]) -> tuple[str, int]:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> (ONNX Runtime provider, device id)."""
    if provider == "auto":
        return (PROVIDERS["cuda"] if PROVIDERS["cuda"] in available else PROVIDERS["cpu"]), 0
    name, _, index = provider.partition(":")
    if name not in PROVIDERS or (index and not index.isdigit()):
        raise SlimformerError(
            f"unknown ONNX Runtime device {provider!r}", fix="use cpu, cuda, cuda:N or auto"
        )
    if PROVIDERS[name] not in available:
        raise SlimformerError(
            f"ONNX Runtime has no {PROVIDERS[name]} here (available: {', '.join(available)})",
            fix="install the onnx-gpu extra (onnxruntime-gpu) on a CUDA machine, or use --device cpu",
        )
    return PROVIDERS[name], int(index or 0)


def generate_text(
    ckpt: str | Path,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    a2sf: dict[str, Any] | None = None,
    device: str = "auto",
    cache_kernel: str = "auto",
    report: Callable[[str], None] | None = None,
) -> str:
    """The text ``slimformer generate DIR --runtime onnx`` prints: same tokenisation, stopping and decoding
    as the PyTorch runtime's command. ``report``, when given, receives one line saying what runs the cache
    op (``OnnxCausalLM.cache_kernel_description``)."""
    from slimformer.converter.tokenizer import load_tokenizer

    lm = OnnxCausalLM(ckpt, provider=device, kv_cache=a2sf, cache_kernel=cache_kernel)
    if report is not None:
        report(lm.cache_kernel_description)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer is None:
        raise SlimformerError(
            "the ONNX export has no tokenizer files", where=str(ckpt), fix="export the checkpoint again"
        )
    inputs = tokenizer(prompt, return_tensors="np")
    eos = lm.metadata.get("eos_token_id")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = lm.generate(
        inputs["input_ids"],
        inputs["attention_mask"],
        max_new_tokens=max_new_tokens,
        sample=sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return tokenizer.decode(result.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
