"""Exact folds of the value/projection maps of SAS-form checkpoints (the lossless half of the ``sas`` pass).

A SAS-form layer (``converter/runtime/sas.py``) may carry reparameterised maps ``W = alpha * I + beta * dW``
for its values (``self_attn.value.*``) and projection (``self_attn.proj.*``), e.g. the trainable first-layer
value of the SAS recipe, or every layer's when ``examples/train_sas.py --value-proj reparam`` trained them.
Two rewrites remove such maps without changing the function:

1. **Identity fold.** When ``W`` is a multiple of the identity up to a relative Frobenius deviation
   ``||W - cI|| / ||cI|| <= identity_tol`` (``c = trace(W) / n``), the map becomes the exact identity and ``c``
   moves into the shaped-attention gains: attention is linear in its values and the heads' outputs, so
   scaling ``alpha``, ``beta`` and ``gamma`` of every head by ``c`` is the same function. With the default
   tolerance (1e-6) only maps that are the identity in all but rounding are folded; each deviation is reported.

2. **Graef fold** (Graef, "Transformer tricks: removing weights for skipless transformers", arXiv
   2404.12362). Where a residual stream ``x`` is written only by linear maps and read only by linear maps --
   no skip and no norm between them -- it can be reparameterised as ``x' = T x`` for any invertible ``T``:
   the writers become ``T W`` and the readers ``R T^-1``. That is the case between a parallel block without a
   skip (``sas_p`` or ``sas_p_nonorm``: ``x = P a + g * D m``) and a following ``sas_p_nonorm`` block (read by
   ``Q``, ``K``, ``V``, the MLP's gate and up maps), and between the embeddings and a first ``sas_p_nonorm``
   block. Choosing ``T = V`` folds the next block's value into the previous maps (``V`` becomes the identity);
   ``T = P^-1`` folds the projection into the next maps (``P`` becomes the identity). Each removes one
   ``n x n`` matrix where both ``P`` and ``V`` are non-identity (and ``V`` at the embeddings, which are a full
   matrix anyway); the better-conditioned of the two is inverted. Blocks with a norm or a skip between
   ``P`` and the next maps (``sas``, ``shaped``, a following ``sas_p``) are left alone and reported: no exact
   fold exists there.

All arithmetic is done in float64 and cast back to the stored dtype. The pass verifies the result on real
inputs (relative logit error, :func:`verify`) and refuses it above ``max_error``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from slimformer.converter.graph import Block, CheckpointGraph, Node, TensorRef
from slimformer.converter.runtime.sas import IDENTITY, REPARAM, STANDARD

# Forms whose output is a plain sum of linear maps (no skip), and the form read only by linear maps (no norm).
SKIPLESS_WRITERS = ("sas_p", "sas_p_nonorm")
NORMLESS_READER = "sas_p_nonorm"
MAX_CONDITION = 1e6  # never invert a worse-conditioned map: float32 weights would lose the fold's exactness


@dataclass
class FoldReport:
    actions: list[dict[str, Any]]  # folds done
    kept: list[
        dict[str, Any]
    ]  # reparameterised maps left in place, each with the reason no exact fold applies
    params_removed: int

    def to_dict(self) -> dict[str, Any]:
        return {"actions": self.actions, "kept": self.kept, "params_removed": self.params_removed}


def form(block: Block) -> str:
    return block.attention.details.get("form", STANDARD)


def is_reparam(block: Block, kind: str) -> bool:
    return block.attention.kept and block.attention.details.get(kind) == REPARAM


def has_reparam_maps(graph: CheckpointGraph) -> bool:
    return any(is_reparam(block, kind) for block in graph.blocks for kind in ("value", "proj"))


def fold(graph: CheckpointGraph, identity_tol: float) -> FoldReport:
    """Apply every exact fold to ``graph`` in place; returns what was done and what had to stay."""
    before = graph.num_params()
    actions = [*_identity_folds(graph, identity_tol), *_graef_folds(graph)]
    kept = [
        {
            "layer": block.index,
            "map": kind,
            "deviation": _deviation(_map_matrix(block, kind))[0],
            "reason": _why_kept(graph, block, kind),
        }
        for block in graph.blocks
        for kind in ("value", "proj")
        if is_reparam(block, kind)
    ]
    return FoldReport(actions, kept, before - graph.num_params())


# ---- 1. identity folds ----------------------------------------------------------------------------------


def _deviation(matrix: torch.Tensor) -> tuple[float, float]:
    """``||W - cI|| / ||cI||`` and ``c = trace(W) / n``: how far ``W`` is from a multiple of the identity."""
    scale = float(matrix.diagonal().mean())
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return (
        float((matrix - scale * eye).norm() / (abs(scale) * eye.norm())) if scale else float("inf")
    ), scale


def _identity_folds(graph: CheckpointGraph, tol: float) -> Iterator[dict[str, Any]]:
    for block in graph.blocks:
        for kind in ("value", "proj"):
            if not is_reparam(block, kind):
                continue
            deviation, scale = _deviation(_map_matrix(block, kind))
            if deviation > tol:
                continue
            _set_identity(block, kind)
            for gain in ("alpha", "beta", "gamma"):
                name = _attn(block, f"shaped_{gain}")
                _put(block.attention, name, _get(block.attention, name) * scale)
            yield {
                "layer": block.index,
                "map": kind,
                "fold": "identity (scale into the head gains)",
                "deviation": deviation,
                "scale": scale,
            }


# ---- 2. Graef folds -------------------------------------------------------------------------------------


def _graef_folds(graph: CheckpointGraph) -> Iterator[dict[str, Any]]:
    """One fold per stream that only linear maps write and read and that carries a non-identity value map."""
    for block in graph.blocks:
        i = block.index
        if not (is_reparam(block, "value") and _stream_is_linear(graph, i)):
            continue
        value = _map_matrix(block, "value")
        cond_v = float(torch.linalg.cond(value))
        if i == 0:
            if cond_v <= MAX_CONDITION:
                _transform_stream(graph, 0, value, torch.linalg.inv(value), cleared="value")
                yield {"layer": 0, "map": "value", "fold": "into the embeddings", "condition": cond_v}
            continue
        if not is_reparam(graph.blocks[i - 1], "proj"):
            continue  # P is already the identity: folding V into it would move the matrix, not remove it
        proj = _map_matrix(graph.blocks[i - 1], "proj")
        cond_p = float(torch.linalg.cond(proj))
        if min(cond_v, cond_p) > MAX_CONDITION:
            continue
        if cond_v <= cond_p:  # x' = V x: V becomes I, layer i-1's writers absorb V
            _transform_stream(graph, i, value, torch.linalg.inv(value), cleared="value")
            yield {
                "layer": i,
                "map": "value",
                "fold": f"into layer {i - 1} (projection, MLP down)",
                "condition": cond_v,
            }
        else:  # x' = P^-1 x: P becomes I, layer i's readers absorb P
            _transform_stream(graph, i, torch.linalg.inv(proj), proj, cleared="proj")
            yield {
                "layer": i - 1,
                "map": "proj",
                "fold": f"into layer {i} (q, k, value, MLP gate/up)",
                "condition": cond_p,
            }


def _stream_is_linear(graph: CheckpointGraph, layer: int) -> bool:
    """Whether the stream entering ``layer`` is written and read by linear maps only (no skip, no norm)."""
    if form(graph.blocks[layer]) != NORMLESS_READER:
        return False
    if layer == 0:
        return not graph.base_config.get("tie_word_embeddings")  # a tied head reads the embeddings too
    return form(graph.blocks[layer - 1]) in SKIPLESS_WRITERS


def _why_kept(graph: CheckpointGraph, block: Block, kind: str) -> str:
    i = block.index
    if kind == "value":
        if form(block) != NORMLESS_READER:
            return f"a norm precedes the attention (form {form(block)})"
        if i == 0:
            return (
                "tied embeddings (the output head reads them too)"
                if graph.base_config.get("tie_word_embeddings")
                else "ill-conditioned"
            )
        if not _stream_is_linear(graph, i):
            return f"layer {i - 1} ({form(graph.blocks[i - 1])}) adds a skip or norm to its projection"
        if not is_reparam(graph.blocks[i - 1], "proj"):
            return f"layer {i - 1}'s projection is the identity: a fold would move this matrix there, not remove it"
        return "ill-conditioned"
    if form(block) not in SKIPLESS_WRITERS:
        return f"the block's own skip and MLP norm read the projection (form {form(block)})"
    if i + 1 == len(graph.blocks):
        return "the final norm reads the last projection"
    if not _stream_is_linear(graph, i + 1):
        return f"layer {i + 1} normalises its input (form {form(graph.blocks[i + 1])})"
    if not is_reparam(graph.blocks[i + 1], "value"):
        return f"layer {i + 1}'s value is the identity: a fold would move this matrix there, not remove it"
    return "ill-conditioned"


def _transform_stream(
    graph: CheckpointGraph, layer: int, t: torch.Tensor, t_inv: torch.Tensor, *, cleared: str
) -> None:
    """Reparameterise the stream entering ``layer`` as ``x' = T x``: writers ``W -> T W``, readers ``R -> R T^-1``.

    ``cleared`` names the map that becomes exactly the identity (layer's value for ``T = V``, the previous
    layer's projection for ``T = P^-1``); it is set, not computed, so no rounding is left in it.
    """
    block = graph.blocks[layer]
    if layer == 0:
        name = "model.embed_tokens.weight"  # rows are the tokens' vectors: x' = T x  <=>  E' = E T^T
        _put(graph.embeddings, name, _get(graph.embeddings, name) @ t.T)
    else:
        previous = graph.blocks[layer - 1]
        if cleared == "proj":
            _set_identity(previous, "proj")
        else:
            _set_map(previous, "proj", t @ _map_matrix(previous, "proj"))
        for suffix in ("mlp.down_proj.weight", "mlp.down_proj.bias"):
            name = f"model.layers.{layer - 1}.{suffix}"
            if name in previous.mlp.tensors:
                _put(previous.mlp, name, t @ _get(previous.mlp, name))
    if cleared == "value":
        _set_identity(block, "value")
    else:
        _set_map(block, "value", _map_matrix(block, "value") @ t_inv)
    readers = [(block.attention, _attn(block, f"{p}_proj.weight")) for p in ("q", "k")]
    readers += [(block.mlp, f"model.layers.{layer}.mlp.{p}_proj.weight") for p in ("gate", "up")]
    for node, name in readers:
        if name in node.tensors:
            _put(node, name, _get(node, name) @ t_inv)


# ---- graph access ----------------------------------------------------------------------------------------


def _attn(block: Block, suffix: str) -> str:
    return f"model.layers.{block.index}.self_attn.{suffix}"


def _get(node: Node, name: str) -> torch.Tensor:
    return node.tensors[name].load().double()


def _put(node: Node, name: str, value: torch.Tensor) -> None:
    """Store ``value`` under ``name``, in the dtype the tensor had (float32 for a new one)."""
    old = node.tensors.get(name)
    dtype = old.load().dtype if old is not None else torch.float32
    node.tensors[name] = TensorRef.from_tensor(name, value.to(dtype).contiguous())


def _map_matrix(block: Block, kind: str) -> torch.Tensor:
    """``alpha * I + beta * dW`` of a layer's value or projection map (float64); the identity if it has none."""
    if block.attention.details.get(kind, IDENTITY) == IDENTITY:
        n = block.attention.tensors[_attn(block, "q_proj.weight")].shape[1]
        return torch.eye(n, dtype=torch.float64)
    alpha, beta, delta = (
        _get(block.attention, _attn(block, f"{kind}.{p}")) for p in ("alpha", "beta", "delta")
    )
    return alpha * torch.eye(delta.shape[0], dtype=delta.dtype) + beta * delta


def _set_map(block: Block, kind: str, matrix: torch.Tensor) -> None:
    """Store ``matrix`` as ``c * I + 1 * (matrix - c I)`` with ``c`` its mean diagonal (keeps dW small)."""
    scale = matrix.diagonal().mean()
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    block.attention.details[kind] = REPARAM
    for part, value in (
        ("alpha", scale.reshape(1)),
        ("beta", torch.ones(1, dtype=matrix.dtype)),
        ("delta", matrix - scale * eye),
    ):
        _put(block.attention, _attn(block, f"{kind}.{part}"), value)


def _set_identity(block: Block, kind: str) -> None:
    block.attention.details[kind] = IDENTITY
    for part in ("alpha", "beta", "delta"):
        block.attention.tensors.pop(_attn(block, f"{kind}.{part}"), None)


# ---- verification ------------------------------------------------------------------------------------------


@torch.no_grad()
def logits_of(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(input_ids=windows[i : i + batch_size].to(device), use_cache=False).logits.float().cpu()
            for i in range(0, len(windows), batch_size)
        ]
    )


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``||other - reference|| / ||reference||`` over all positions and the vocabulary."""
    return float((other - reference).norm() / reference.norm())
