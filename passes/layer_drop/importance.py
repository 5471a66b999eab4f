"""Similarity-based importance of attention, MLP and whole-block sub-blocks ("What Matters in
Transformers? Not All Attention is Needed", He et al., arXiv 2406.15786).

A sub-block that barely turns the residual stream is a candidate for removal. For every layer and every
calibration token we compare ``X``, the hidden state entering the sub-block, with ``Y``, what leaves it:

* ``attention``: ``X`` = input of ``input_layernorm``, ``Y = X + self_attn(input_layernorm(X))``;
* ``mlp``: ``X`` = input of ``post_attention_layernorm``, ``Y = X + mlp(post_attention_layernorm(X))``;
* ``block``: ``X`` = the layer's input, ``Y`` = the layer's output.

The pre-norm belongs to the dropped unit (it goes with the sub-block), so ``X`` is taken *before* it --
the definition of the official code (CASE-Lab-UMD/LLM-Drop, ``layer_drop_norm=True``), which is the
default here. Two variants are switchable:

* ``compare="norm_output"``: ``X`` = the module's input (the norm's output), ``Y`` = the module's output
  without the residual (LLM-Drop's ``layer_drop_norm=False``). Block scores are unaffected.
* ``metric="angular"``: ``arccos(cos) / pi`` per token instead of ``1 - cos`` (Gromov et al.'s distance).

Per-token cosines are computed in float32 and averaged over every calibration token;
``importance = 1 - mean(cos)``. Lower importance = more redundant = dropped first.

BERT (post-norm) encoders have no pre-norm: ``X`` is the sub-block's input and ``Y`` its output *after*
the sub-block's own LayerNorm (``LayerNorm(X + f(X))``), because that LayerNorm goes with the sub-block
when it is dropped. Their ``norm_output`` variant compares ``X`` with the branch ``f(X)`` (the output
dense layer, before residual and LayerNorm).

Two ways to score, with equal results (same modules, same batches):

* :func:`score_model` -- one forward pass of the calibration set through a runtime model, with hooks on
  every layer, scores all layers and all three kinds at once;
* :func:`score_streaming` -- builds one runtime layer at a time from the graph's lazy tensors, runs the
  calibration hidden states through it and carries them on, so only one block's weights are resident
  (plus the hidden states, ``samples x seq_len x hidden`` at the working dtype, kept on the CPU). A
  model larger than RAM or accelerator memory can be scored this way.

:func:`compare_sources` measures how much the ranking depends on the calibration text (Spearman rank
correlation of the scores, Jaccard overlap of the modules each source would drop).
"""

from __future__ import annotations

import ctypes
import functools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import CheckpointGraph, _materialise_buffers
from torch import nn

KINDS = ("attention", "mlp", "block")
MODES = ("attention", "mlp", "block", "joint")  # joint = attention and MLP ranked together
METRICS = ("cosine", "angular")
COMPARES = ("residual", "norm_output")


# ---- results ---------------------------------------------------------------------------------------
@dataclass
class LayerScores:
    """Per-layer importance of each kind; ``None`` where the sub-block is already absent."""

    attention: list[float | None]
    mlp: list[float | None]
    block: list[float | None]
    n_tokens: int
    metric: str = "cosine"
    compare: str = "residual"
    source: str | None = None
    mode: str = "full"  # full | streaming
    seconds: float = 0.0
    peak_weight_bytes: int = 0  # largest set of weights resident at once while scoring

    def of(self, kind: str) -> list[float | None]:
        return getattr(self, kind)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = round(self.seconds, 4)
        return data


@dataclass(frozen=True)
class ScoredModule:
    kind: str  # attention | mlp | block
    layer: int
    score: float

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.layer}"


def rank_modules(scores: LayerScores, mode: str) -> list[ScoredModule]:
    """Modules that can still be dropped in ``mode``, least important first (ties: lower layer, attention first)."""
    if mode not in MODES:
        raise SlimformerError(f"unknown drop mode {mode!r}", fix=f"use one of {', '.join(MODES)}")
    kinds = ("attention", "mlp") if mode == "joint" else (mode,)
    modules = [
        ScoredModule(kind, layer, score)
        for kind in kinds
        for layer, score in enumerate(scores.of(kind))
        if score is not None
    ]
    return sorted(modules, key=lambda m: (m.score, m.layer, KINDS.index(m.kind)))


# ---- the per-token statistic -----------------------------------------------------------------------
class _RunningMean:
    """Mean over tokens of ``1 - cos(X, Y)`` (or the angular distance), accumulated batch by batch."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.total = 0.0
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # float32 per token, as LLM-Drop does; the sum is kept in float64 so many batches lose nothing.
        cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
        value = torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi if self.metric == "angular" else 1.0 - cos
        self.total += float(value.double().sum())
        self.count += value.numel()

    def value(self) -> float | None:
        return self.total / self.count if self.count else None


# ---- hooks on one runtime layer ---------------------------------------------------------------------
class _LayerProbe:
    """Forward hooks on one runtime layer (decoder or BERT encoder) feeding its three running means."""

    def __init__(self, layer: nn.Module, metric: str, compare: str) -> None:
        self.stats = {kind: _RunningMean(metric) for kind in KINDS}
        self.compare = compare
        self._handles: list[Any] = []
        self._saved: dict[str, torch.Tensor] = {}
        self._save_input(layer, "block")
        self._hook(layer, lambda args, out: self.stats["block"].add(self._saved.pop("block"), out))
        if hasattr(layer, "self_attn"):
            self._decoder(layer)
            self.empty = layer.self_attn is None and layer.mlp is None
        else:
            self._encoder(layer)
            self.empty = layer.attention is None and layer.output is None

    def _save_input(self, module: nn.Module, key: str) -> None:
        def hook(_module: nn.Module, args: tuple) -> None:
            self._saved[key] = args[0]

        self._handles.append(module.register_forward_pre_hook(hook))

    def _hook(self, module: nn.Module, fn: Callable[[tuple, Any], None]) -> None:
        self._handles.append(module.register_forward_hook(lambda _module, args, out: fn(args, out)))

    def _decoder(self, layer: nn.Module) -> None:
        # Pre-norm: X enters the norm; the module sees norm(X) and its output is added back to X.
        for kind, norm, module in (
            ("attention", "input_layernorm", "self_attn"),
            ("mlp", "post_attention_layernorm", "mlp"),
        ):
            if getattr(layer, module) is None:
                continue
            if self.compare == "residual":
                self._save_input(getattr(layer, norm), kind)
                self._hook(getattr(layer, module), lambda args, out, k=kind: self._add_residual(k, out))
            else:
                self._hook(getattr(layer, module), lambda args, out, k=kind: self.stats[k].add(args[0], out))

    def _add_residual(self, kind: str, out: torch.Tensor) -> None:
        x = self._saved.pop(kind)
        self.stats[kind].add(x, x + out)  # the same sum the layer forms next

    def _encoder(self, layer: nn.Module) -> None:
        # Post-norm: BertSelfOutput / BertOutput compute LayerNorm(dense(h) + X) from (h, X).
        for kind, output in (("attention", getattr(layer.attention, "output", None)), ("mlp", layer.output)):
            if output is None:
                continue
            if self.compare == "residual":
                self._hook(output, lambda args, out, k=kind: self.stats[k].add(args[1], out))
            else:
                self._hook(output.dense, lambda args, out, k=kind: self._saved.__setitem__(k, out))
                self._hook(output, lambda args, out, k=kind: self.stats[k].add(args[1], self._saved.pop(k)))

    def values(self) -> dict[str, float | None]:
        values = {kind: stat.value() for kind, stat in self.stats.items()}
        if self.empty:  # a layer with nothing left is no block to drop
            values["block"] = None
        return values

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _check_options(metric: str, compare: str, windows: torch.Tensor, batch_size: int) -> None:
    if metric not in METRICS:
        raise SlimformerError(f"unknown importance metric {metric!r}", fix=f"use one of {', '.join(METRICS)}")
    if compare not in COMPARES:
        raise SlimformerError(f"unknown comparison {compare!r}", fix=f"use one of {', '.join(COMPARES)}")
    if windows.dim() != 2 or windows.numel() == 0:
        raise SlimformerError(
            "calibration windows must be a non-empty [samples, seq_len] token tensor",
            fix="use converter.calibration.sample_windows",
        )
    if batch_size < 1:
        raise SlimformerError(f"batch size must be at least 1 (got {batch_size})", fix="raise the batch size")


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    # A bar on a terminal, plain lines in a log (see slimformer.converter.progress).
    from slimformer.converter.progress import progress_bar

    return progress_bar(total, desc, enabled, unit="window" if desc == "scoring" else "layer")


def _runtime_layers(model: nn.Module) -> nn.ModuleList:
    if hasattr(model, "model"):
        return model.model.layers
    if hasattr(model, "encoder"):
        return model.encoder.layer
    return model.layers


def _collect(probes: list[_LayerProbe]) -> dict[str, list[float | None]]:
    values = [probe.values() for probe in probes]
    return {kind: [v[kind] for v in values] for kind in KINDS}


# ---- full-model scoring ------------------------------------------------------------------------------
@torch.no_grad()
def score_model(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    metric: str = "cosine",
    compare: str = "residual",
    batch_size: int = 8,
    progress: bool = False,
    source: str | None = None,
) -> LayerScores:
    """Score every layer of a slimformer runtime model in one pass over ``windows`` ``[samples, seq_len]``."""
    _check_options(metric, compare, windows, batch_size)
    model.eval()
    device = next(model.parameters()).device
    probes = [_LayerProbe(layer, metric, compare) for layer in _runtime_layers(model)]
    start = time.perf_counter()
    try:
        with _progress(windows.shape[0], "scoring", progress) as bar:
            for rows in _batches(windows.shape[0], batch_size):
                ids = windows[rows].to(device)
                if hasattr(model, "model"):  # decoder: the trunk is enough, the LM head is not needed
                    model.model(input_ids=ids, use_cache=False)
                else:
                    model(input_ids=ids)
                bar.update(ids.shape[0])
    finally:
        for probe in probes:
            probe.remove()
    seconds = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return LayerScores(
        **_collect(probes),
        n_tokens=windows.numel(),
        metric=metric,
        compare=compare,
        source=source,
        mode="full",
        seconds=seconds,
        peak_weight_bytes=weight_bytes,
    )


# ---- streaming (memory-bounded) scoring --------------------------------------------------------------
def _load_module(module: nn.Module, graph_tensors: dict[str, torch.Tensor], prefix: str, where: str) -> None:
    state = {name[len(prefix) :]: tensor for name, tensor in graph_tensors.items()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise SlimformerError(
            f"weights of {prefix.rstrip('.')} do not match its structure: {exc}",
            where=where,
            fix="the checkpoint is incomplete or its config does not describe its weights",
        ) from exc


def _block_tensors(graph: CheckpointGraph, index: int) -> dict[str, torch.Tensor]:
    block = graph.blocks[index]
    return {
        ref.name: ref.load()
        for node in (block.attention, block.mlp)
        if node.kept
        for ref in node.tensors.values()
    }


@functools.cache
def _glibc_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not Linux/glibc: nothing to do
        return None


def _return_freed_memory_to_the_os() -> None:
    """Give the weights of the block just freed back to the operating system (glibc only).

    glibc raises its mmap threshold after a large block is freed, so the next blocks' tensors come from the
    heap, and freed heap memory stays in the process: measured on a 24-layer, 1.1 GB model, streaming's
    resident memory grew by ~15 MB per layer without this (peak 120-460 MB, varying run to run) and stays
    at one block's weights plus activations with it (~115 MB).
    """
    trim = _glibc_malloc_trim()
    if trim is not None:
        trim(0)


def _nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.parameters())


@torch.no_grad()
def score_streaming(
    graph: CheckpointGraph,
    windows: torch.Tensor,
    *,
    metric: str = "cosine",
    compare: str = "residual",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    progress: bool = False,
    source: str | None = None,
) -> LayerScores:
    """Score ``graph`` one layer at a time: only one block's weights are ever loaded (read lazily from the
    safetensors files), and the calibration hidden states are carried from layer to layer on the CPU."""
    from slimformer.converter.runtime.modeling_slimformer import SlimformerEncoderModel, SlimformerForCausalLM

    _check_options(metric, compare, windows, batch_size)
    samples, seq_len = windows.shape
    where = str(graph.source.path)
    start = time.perf_counter()
    # The whole runtime model on the meta device costs no memory; each piece gets real weights only while
    # it runs and goes back to meta afterwards. Using the runtime's own modules keeps the maths identical.
    model_class = SlimformerEncoderModel if graph.is_encoder else SlimformerForCausalLM
    with torch.device("meta"):
        skeleton = model_class._from_config(graph.runtime_config(), attn_implementation=attn_implementation)
    trunk = skeleton if graph.is_encoder else skeleton.model

    # Embeddings: the only non-block weights scoring needs (the final norm and head play no part).
    embed, prefix = (
        (trunk.embeddings, "embeddings.") if graph.is_encoder else (trunk.embed_tokens, "model.embed_tokens.")
    )
    _load_module(embed, {r.name: r.load() for r in graph.embeddings.tensors.values()}, prefix, where)
    _materialise_buffers(embed, device)
    embed.to(device=device, dtype=dtype).eval()
    peak = _nbytes(embed)
    hidden = torch.empty(samples, seq_len, skeleton.config.hidden_size, dtype=dtype)
    for rows in _batches(samples, batch_size):
        hidden[rows] = embed(windows[rows].to(device)).cpu()
    embed.to_empty(device="meta")
    _return_freed_memory_to_the_os()

    if not graph.is_encoder:
        # RoPE and positions exactly as the decoder trunk computes them for an unpadded window without cache.
        _materialise_buffers(trunk.rotary_emb, device)
        positions = torch.arange(seq_len, device=device)[None]
        position_embeddings = trunk.rotary_emb(
            torch.empty(1, seq_len, 0, dtype=dtype, device=device), positions
        )

    probes = []
    layers = _runtime_layers(skeleton)
    with _progress(len(layers), "scoring (streaming)", progress) as bar:
        for i, layer in enumerate(layers):
            prefix = f"encoder.layer.{i}." if graph.is_encoder else f"model.layers.{i}."
            _load_module(layer, _block_tensors(graph, i), prefix, where)
            layer.to(device=device, dtype=dtype).eval()
            peak = max(peak, _nbytes(layer))
            probe = _LayerProbe(layer, metric, compare)
            for rows in _batches(samples, batch_size):
                h = hidden[rows].to(device)
                out = layer(h, None) if graph.is_encoder else layer(h, position_embeddings, None, None)
                hidden[rows] = out.cpu()
            probe.remove()
            probes.append(probe)
            layer.to_empty(device="meta")  # frees this block's weights before the next is read
            _return_freed_memory_to_the_os()
            bar.update(1)
    seconds = time.perf_counter() - start
    return LayerScores(
        **_collect(probes),
        n_tokens=windows.numel(),
        metric=metric,
        compare=compare,
        source=source,
        mode="streaming",
        seconds=seconds,
        peak_weight_bytes=peak,
    )


def score_graph(
    graph: CheckpointGraph,
    windows: torch.Tensor,
    *,
    streaming: bool = False,
    metric: str = "cosine",
    compare: str = "residual",
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    source: str | None = None,
) -> LayerScores:
    """Importance of every sub-block of the graph's current state (dropped ones score ``None``)."""
    if streaming:
        return score_streaming(
            graph,
            windows,
            metric=metric,
            compare=compare,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            progress=progress,
            source=source,
        )
    _check_options(metric, compare, windows, batch_size)
    start = time.perf_counter()
    model = graph.build_model(dtype=dtype, device=device)
    scores = score_model(
        model,
        windows,
        metric=metric,
        compare=compare,
        batch_size=batch_size,
        progress=progress,
        source=source,
    )
    scores.seconds = time.perf_counter() - start  # building the model is part of the cost, as in streaming
    return scores


# ---- stability across calibration sources ------------------------------------------------------------
def _ranks(values: list[float]) -> list[float]:
    """Ranks 1..n, ties sharing their average rank (as Spearman's coefficient requires)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: list[float | None], b: list[float | None]) -> float | None:
    """Spearman rank correlation over the positions scored in both lists; ``None`` if undefined."""
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 2:
        return None
    ra, rb = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    var_a, var_b = sum((x - mean_a) ** 2 for x in ra), sum((y - mean_b) ** 2 for y in rb)
    if var_a == 0 or var_b == 0:
        return None
    return cov / math.sqrt(var_a * var_b)


def jaccard(a: set[Any], b: set[Any]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


@dataclass
class Stability:
    """How the ranking and the chosen drop set change with the calibration source."""

    mode: str
    n: int
    drop_sets: dict[str, list[str]]
    pairs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def min_jaccard(self) -> float:
        return min((p["jaccard"] for p in self.pairs), default=1.0)

    @property
    def stable(self) -> bool:
        return self.min_jaccard == 1.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "min_jaccard": self.min_jaccard, "stable": self.stable}

    def describe(self) -> list[str]:
        lines = []
        for pair in self.pairs:
            rho = ", ".join(
                f"{k} {v:.2f}" if v is not None else f"{k} n/a" for k, v in pair["spearman"].items()
            )
            lines.append(
                f"calibration {pair['sources'][0]} vs {pair['sources'][1]}: Spearman {rho}; "
                f"overlap of the {self.n} {self.mode} module(s) each would drop (Jaccard) {pair['jaccard']:.2f}"
            )
        return lines

    def warning(self) -> str | None:
        if self.stable:
            return None
        sets = "; ".join(f"{src} -> {', '.join(mods) or 'nothing'}" for src, mods in self.drop_sets.items())
        return (
            f"the {self.mode} drop set depends on the calibration source (Jaccard down to {self.min_jaccard:.2f}): "
            f"{sets}. Calibrate on text like the deployment's, or compare quality on each."
        )


def compare_sources(scores: dict[str, LayerScores], mode: str, n: int) -> Stability:
    """Spearman correlation of every kind's scores and Jaccard overlap of the ``n`` least important
    ``mode`` modules, for every pair of calibration sources."""
    sources = list(scores)
    drop_sets = {src: [m.label for m in rank_modules(scores[src], mode)[:n]] for src in sources}
    stability = Stability(mode, n, drop_sets)
    for i, a in enumerate(sources):
        for b in sources[i + 1 :]:
            rho = {kind: spearman(scores[a].of(kind), scores[b].of(kind)) for kind in KINDS}
            stability.pairs.append(
                {"sources": [a, b], "spearman": rho, "jaccard": jaccard(set(drop_sets[a]), set(drop_sets[b]))}
            )
    return stability


def format_table(scores: LayerScores, dropped: set[str] | None = None) -> str:
    """The per-layer table printed by ``slimformer score``; ``*`` marks modules in ``dropped``."""
    dropped = dropped or set()

    def cell(kind: str, layer: int) -> str:
        value = scores.of(kind)[layer]
        text = "dropped" if value is None else f"{value:.5f}"
        return text + ("*" if f"{kind}:{layer}" in dropped else " ")

    name = "1 - cos" if scores.metric == "cosine" else "angular distance"
    lines = [
        f"importance ({name}, {scores.compare}) on {scores.source or 'calibration'}: {scores.n_tokens:,} tokens, "
        f"{scores.mode} mode, {scores.seconds:.2f}s",
        f"{'layer':>5}  {'attention':>10}  {'mlp':>10}  {'block':>10}",
    ]
    for layer in range(len(scores.attention)):
        lines.append(
            f"{layer:>5}  {cell('attention', layer):>10}  {cell('mlp', layer):>10}  {cell('block', layer):>10}"
        )
    return "\n".join(lines)


def score(
    source: str,
    calib: str = "stdlib:train",
    *,
    samples: int = 32,
    seq_len: int = 256,
    seed: int = 0,
    streaming: bool = False,
    metric: str = "cosine",
    compare: str = "residual",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> LayerScores:
    """Importance of every sub-block of the checkpoint ``source`` on calibration text ``calib``
    (``slimformer score`` as a function): the scores the layer-drop pass would rank."""
    from slimformer.converter.calibration import sample_windows
    from slimformer.converter.graph import load_graph
    from slimformer.converter.source import resolve_source
    from slimformer.converter.tokenizer import load_tokenizer

    src = resolve_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(src.path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise SlimformerError(
            "scoring needs calibration text, but the checkpoint has no tokenizer",
            where=source,
            fix="add tokenizer files (tokenizer.json / tokenizer_config.json)",
        )
    windows = sample_windows(tokenizer, calib, samples, seq_len, seed)
    return score_graph(
        load_graph(src),
        windows,
        streaming=streaming,
        metric=metric,
        compare=compare,
        device=device,
        dtype=dtype,
        progress=progress,
        source=calib,
    )
