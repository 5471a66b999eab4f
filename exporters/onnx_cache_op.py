"""The A2SF cache-update op of exported graphs: ``ai.slimformer::A2SFCacheUpdate`` (version 1).

One node per cache slot (layer that keeps attention) sits in ``model.onnx`` right after the attention of
that layer. It carries an ONNX *function body* of standard ops, so every ONNX Runtime build (CPU or CUDA
provider, no custom-op library) runs it by inlining the body; a native kernel registered for the same
(domain, op_type) later takes precedence without re-exporting (DESIGN.md §5).

Contract (a native kernel must reproduce it bit for bit up to float rounding)
-------------------------------------------------------------------------------

Inputs (``B`` batch, ``H`` KV heads, ``Hq = G * H`` query heads, ``P = P_past + Q`` stored slots after this
step's keys were appended, ``Q`` tokens in this step, ``D`` / ``Dv`` key / value head sizes, which differ
in SAS layers)::

    0 key          T[B, H, P, D]      past keys followed by this step's keys (RoPE already applied)
    1 value        T[B, H, P, Dv]     past values followed by this step's values
    2 past_scores  float[B, H, P_past]  accumulated scores of the past slots; -inf marks an empty slot
                                      (padding), which is never attended and ranks below every token
    3 probs        float[B, Hq, Q, P]  this step's softmax attention probabilities; query head ``i``
                                      belongs to KV head ``i // G`` (the transformers ``repeat_kv`` order)
    4 new_valid    bool[B, Q]         False for padding tokens of this step
    5 alpha        float[]            forgetting factor, (0, 1]; 1 is H2O
    6 limits       int64[4]           (budget, sink, recent, score_window); score_window 0 = all rows

    T is float or float16; scores and probabilities are always float32.

Outputs (``K = min(P, budget)``)::

    0 key_out      T[B, H, K, D]
    1 value_out    T[B, H, K, Dv]
    2 scores_out   float[B, H, K]

Semantics, per (batch row, KV head):

1. ``S_q = sum over the G query heads of probs`` -- the KV head's share of each query row (GQA).
2. ``w_t = alpha^(Q-1-t)`` for query row ``t``, 0 for padding rows and for rows older than
   ``score_window``.
3. ``scores = concat(alpha^Q * past_scores, 0 for each new token (-inf if padding)) + sum_t w_t S_t``,
   i.e. the recursion ``A_n = alpha * A_(n-1) + S_n`` applied to the ``Q`` rows of this step.
4. Protected = the first ``sink`` and the last ``recent`` real (finite-score) slots. Keep the ``K`` slots of
   highest priority (protected first, then by score, empty slots last), **in their original order**, and
   gather keys, values and scores with those indices. With ``P <= budget`` nothing is dropped (identity).

So once the budget is reached the slot's length stays ``budget``: every decode step appends one token and
drops one. This is ``EvictingLayer.observe`` of ``converter/runtime/kv_cache.py`` (accumulate, then evict
down to the budget); the one difference is that padding is carried as ``-inf`` scores instead of a
separate validity tensor. ``probs`` must come from the attention's own mask, so that masked slots have
probability 0; the exporter computes them in float32 from the step's queries and keys, as the runtime does.

Two implementations of the same contract live here: :func:`function_proto` (the ONNX body) and
:func:`reference_update` (torch, vectorised; it also gives the op its values while the graph is traced).
``tests/test_onnx.py`` checks the body against a per-(row, head) loop of the formula, against the torch
reference and against ``kv_cache.EvictingLayer``.
"""

from __future__ import annotations

from typing import Any

import onnx
import torch
from onnx import TensorProto, helper

DOMAIN = "ai.slimformer"
OP_TYPE = "A2SFCacheUpdate"
OP_VERSION = 1
INPUTS = ("key", "value", "past_scores", "probs", "new_valid", "alpha", "limits")
OUTPUTS = ("key_out", "value_out", "scores_out")
LIMIT_FIELDS = ("budget", "sink", "recent", "score_window")

# "Never evict": a budget no sequence reaches (int64 math inside the body stays far from overflow).
NO_BUDGET = 2**40
# The policies this op computes (A = alpha * A + S, sink + recent + top-k); kv_policies.py has more.
SUPPORTED_POLICIES = ("a2sf", "h2o", "streaming", "none")


def check_policy(policy: Any, where: str | None = None) -> None:
    """The one place the ONNX path refuses a cache policy its op does not compute."""
    from slimformer.converter.errors import SlimformerError

    if policy is not None and policy.policy not in SUPPORTED_POLICIES:
        raise SlimformerError(
            f"the ONNX cache op computes {', '.join(SUPPORTED_POLICIES[:3])}; policy {policy.policy!r} runs only "
            "in the PyTorch runtime",
            where=where,
            fix="use --a2sf policy=a2sf|h2o|streaming for ONNX, or `slimformer generate CKPT` (PyTorch) for this policy",
        )


# ---- torch reference (and tracing stand-in) ---------------------------------------------------------


def reference_update(
    key: torch.Tensor,
    value: torch.Tensor,
    past_scores: torch.Tensor,
    probs: torch.Tensor,
    new_valid: torch.Tensor,
    alpha: torch.Tensor | float,
    limits: torch.Tensor | list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op's contract in torch; see the module docstring for shapes."""
    batch, heads = key.shape[:2]
    q_len, phys = probs.shape[-2:]
    budget, sink, recent, window = (int(x) for x in torch.as_tensor(limits).tolist())
    alpha = float(alpha)
    per_kv_head = probs.float().reshape(batch, heads, -1, q_len, phys).sum(dim=2)  # [B, H, Q, P]
    rows = torch.arange(q_len, device=key.device)
    weight = alpha ** (q_len - 1 - rows).to(torch.float32)
    if window:
        weight = torch.where(rows >= q_len - window, weight, torch.zeros_like(weight))
    weight = new_valid.float() * weight  # [B, Q]
    gained = torch.einsum("bq,bhqp->bhp", weight, per_kv_head)
    empty = torch.isneginf(past_scores)
    decayed = torch.where(empty, past_scores, past_scores * alpha**q_len)
    fresh = torch.zeros(batch, q_len, device=key.device).masked_fill(~new_valid.bool(), float("-inf"))
    scores = torch.cat([decayed, fresh[:, None, :].expand(batch, heads, q_len)], dim=-1) + gained

    valid = ~torch.isneginf(scores)
    rank = valid.long().cumsum(dim=-1) - 1
    n_real = valid.sum(dim=-1, keepdim=True)
    protected = valid & ((rank < sink) | (rank >= n_real - recent))
    priority = scores.masked_fill(protected, float("inf"))
    keep = priority.topk(min(budget, phys), dim=-1).indices.sort(dim=-1).values
    index = keep[..., None].expand(-1, -1, -1, key.shape[-1])
    return key.gather(2, index), value.gather(2, index), scores.gather(2, keep)


class A2SFCacheUpdate(torch.autograd.Function):
    """Puts the op into a TorchScript-exported graph (``symbolic``); computes the reference while tracing."""

    @staticmethod
    def forward(ctx: Any, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return reference_update(*inputs)

    @staticmethod
    def symbolic(
        g: Any, key: Any, value: Any, past_scores: Any, probs: Any, new_valid: Any, alpha: Any, limits: Any
    ) -> tuple:
        """Graph values in, the custom-domain node's three outputs out (TorchScript exporter)."""
        outputs = g.op(
            f"{DOMAIN}::{OP_TYPE}", key, value, past_scores, probs, new_valid, alpha, limits, outputs=3
        )
        # Types for the exporter's shape pass: heads and head sizes are static, batch and length dynamic.
        for output, source in zip(outputs, (key, value, past_scores)):
            sizes = source.type().varyingSizes() or []
            static = [size if axis in (1, 3) else None for axis, size in enumerate(sizes)]
            output.setType(source.type().with_sizes(static or None))
        return tuple(outputs)


# ---- the ONNX function body -------------------------------------------------------------------------


class _Body:
    """Tiny builder: ``b.op("Add", x, y)`` appends a node and returns its output name."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, outputs: int = 1, **attrs) -> str | list[str]:
        names = [f"{op_type.lower()}_{self._count}_{i}" for i in range(outputs)]
        self._count += 1
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value: float | int | list[int], dtype: int = TensorProto.INT64) -> str:
        dims = [len(value)] if isinstance(value, list) else []
        values = value if isinstance(value, list) else [value]
        return self.op("Constant", value=helper.make_tensor("c", dtype, dims, values))

    def output(self, op_type: str, name: str, *inputs: str, **attrs) -> None:
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))


def function_proto(opset: int) -> onnx.FunctionProto:
    """The op's body in standard ops of ``opset`` (must be the model's default-domain opset)."""
    b = _Body()
    f32 = TensorProto.FLOAT
    key, value, past_scores, probs, new_valid, alpha, limits = INPUTS

    def limit(i: int) -> str:  # scalar int64
        return b.op("Gather", limits, b.const(i), axis=0)

    budget, sink, recent, window = (limit(i) for i in range(4))

    # 1. GQA: [B, Hq, Q, P] -> [B, H, G, Q, P] -> sum over G.
    batch_heads = b.op("Shape", key, start=0, end=2)
    q_and_p = b.op("Shape", probs, start=2, end=4)
    grouped = b.op("Reshape", probs, b.op("Concat", batch_heads, b.const([-1]), q_and_p, axis=0))
    per_kv_head = b.op("ReduceSum", grouped, b.const([2]), keepdims=0)  # [B, H, Q, P]

    # 2. Row weights alpha^(Q-1-t), zero outside the score window and for padding rows.
    q_len_1d = b.op("Shape", probs, start=2, end=3)
    q_len = b.op("Squeeze", q_len_1d)
    rows = b.op("Range", b.const(0), q_len, b.const(1))
    age = b.op("Cast", b.op("Sub", b.op("Sub", q_len, b.const(1)), rows), to=f32)
    weight = b.op("Pow", alpha, age)
    in_window = b.op(
        "Or", b.op("Equal", window, b.const(0)), b.op("GreaterOrEqual", rows, b.op("Sub", q_len, window))
    )
    weight = b.op("Where", in_window, weight, b.const(0.0, f32))
    row_weight = b.op("Mul", b.op("Cast", new_valid, to=f32), weight)  # [B, Q]
    row_weight = b.op("Unsqueeze", row_weight, b.const([1, 2]))  # [B, 1, 1, Q]
    gained = b.op("Squeeze", b.op("MatMul", row_weight, per_kv_head), b.const([2]))  # [B, H, P]

    # 3. Decay the past (an empty slot stays -inf even when alpha^Q underflows to 0), append new tokens.
    decay = b.op("Pow", alpha, b.op("Cast", q_len, to=f32))
    empty = b.op("IsInf", past_scores, detect_positive=0, detect_negative=1)
    decayed = b.op("Where", empty, past_scores, b.op("Mul", past_scores, decay))
    fresh = b.op("Where", new_valid, b.const(0.0, f32), b.const(float("-inf"), f32))  # [B, Q]
    fresh = b.op(
        "Expand", b.op("Unsqueeze", fresh, b.const([1])), b.op("Concat", batch_heads, q_len_1d, axis=0)
    )
    scores = b.op("Add", b.op("Concat", decayed, fresh, axis=2), gained)

    # 4. Protected slots: the first `sink` and last `recent` real slots.
    valid = b.op("Not", b.op("IsInf", scores, detect_positive=0, detect_negative=1))
    valid_count = b.op("Cast", valid, to=TensorProto.INT64)
    rank = b.op("Sub", b.op("CumSum", valid_count, b.const(2)), b.const(1))
    n_real = b.op("ReduceSum", valid_count, b.const([2]), keepdims=1)
    protected = b.op(
        "And",
        valid,
        b.op("Or", b.op("Less", rank, sink), b.op("GreaterOrEqual", rank, b.op("Sub", n_real, recent))),
    )
    priority = b.op("Where", protected, b.const(float("inf"), f32), scores)

    # 5. Keep min(P, budget) slots by priority, restore their order, gather.
    phys = b.op("Shape", key, start=2, end=3)
    kept = b.op("Min", phys, b.op("Unsqueeze", budget, b.const([0])))
    _, chosen = b.op("TopK", priority, kept, axis=-1, largest=1, sorted=0, outputs=2)
    keep, _ = b.op("TopK", chosen, kept, axis=-1, largest=0, sorted=1, outputs=2)  # ascending slot index
    index = b.op("Unsqueeze", keep, b.const([3]))
    key_index = b.op(
        "Expand", index, b.op("Concat", b.op("Shape", keep), b.op("Shape", key, start=3), axis=0)
    )
    value_index = b.op(
        "Expand", index, b.op("Concat", b.op("Shape", keep), b.op("Shape", value, start=3), axis=0)
    )
    b.output("GatherElements", OUTPUTS[0], key, key_index, axis=2)
    b.output("GatherElements", OUTPUTS[1], value, value_index, axis=2)
    b.output("GatherElements", OUTPUTS[2], scores, keep, axis=2)

    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        list(INPUTS),
        list(OUTPUTS),
        b.nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        doc_string=__doc__.split("\n\n")[0],
    )


def attach(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give ``model`` the op's function body (once) and the ``ai.slimformer`` opset import."""
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if not any(f.domain == DOMAIN and f.name == OP_TYPE for f in model.functions):
        model.functions.append(function_proto(opset))
    for entry in model.opset_import:
        if entry.domain == DOMAIN:
            entry.version = OP_VERSION
            break
    else:
        model.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    return model


def standalone_model(opset: int = 18, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """A one-node model of the op alone (tests, and a template for testing a native kernel)."""
    dims = {
        "key": ["B", "H", "P", "D"],
        "value": ["B", "H", "P", "D"],
        "past_scores": ["B", "H", "Pp"],
        "probs": ["B", "Hq", "Q", "P"],
        "new_valid": ["B", "Q"],
        "alpha": [],
        "limits": [4],
    }
    types = {"key": dtype, "value": dtype, "new_valid": TensorProto.BOOL, "limits": TensorProto.INT64}
    inputs = [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), dims[n]) for n in INPUTS]
    outputs = [
        helper.make_tensor_value_info(OUTPUTS[0], dtype, ["B", "H", "K", "D"]),
        helper.make_tensor_value_info(OUTPUTS[1], dtype, ["B", "H", "K", "D"]),
        helper.make_tensor_value_info(OUTPUTS[2], TensorProto.FLOAT, ["B", "H", "K"]),
    ]
    node = helper.make_node(OP_TYPE, list(INPUTS), list(OUTPUTS), domain=DOMAIN)
    graph = helper.make_graph([node], "a2sf_cache_update", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    return attach(model)
