"""Simplified transformer blocks (He & Hofmann, "Simplifying Transformer Blocks", arXiv 2311.01906).

A layer whose block config names a ``form`` (``block_configs[i]["attention"]["form"]``) is built here
instead of as the standard pre-norm layer of ``modeling_slimformer.py``. With ``A`` shaped attention, ``N``
an RMSNorm and ``g`` the MLP branch gain:

* ``shaped``       -- ``h = x + A(N1 x)``, output ``h + MLP(N2 h)`` (the original block, attention replaced);
* ``sas``          -- ``h = A(N1 x)``, output ``h + g * MLP(N2 h)`` (SAS: no attention skip);
* ``sas_p``        -- ``A(N x) + g * MLP(N x)`` (SAS-P: parallel, one shared norm, no skips);
* ``sas_p_nonorm`` -- ``A(x) + g * MLP(x)`` (SAS-P without norms).

``g`` is beta_FF, a trainable scalar (``model.layers.{i}.mlp_gain``). ``shaped`` is what the approximate
conversion of a pretrained pre-norm checkpoint produces: its attention sub-block becomes a simplified one
but keeps its residual skip, because a pretrained residual stack cannot do without it. The other three are
the paper's SAS, SAS-P and SAS-P without norms, for models trained in that form (``examples/train_sas.py``).
The reference code keeps a norm in the first layer of a norm-free model; here that is simply a first layer
of form ``sas_p``. Of the reference code's block-level gains only beta_FF is kept: its attention branch gain
is redundant with the per-head gains, and its MLP skip gain is fixed at 1 here.

Shaped attention, per head ``h``::

    A_h = alpha_h * I + beta_h * softmax(Q_h K_h^T / sqrt(d) + M) - gamma_h * C

with trainable ``alpha``, ``beta``, ``gamma`` per head (``self_attn.shaped_alpha`` / ``_beta`` / ``_gamma``,
initialised to 1). ``C = softmax(M)`` is the attention matrix at zero logits under the *same* mask ``M``:
each query's row is uniform over the keys that query may see -- ``1/i`` on the first ``i`` positions for
causal attention, ``1/T`` for bidirectional attention, and padding, cached and evicted slots handled exactly
as the softmax handles them. So with ``W_Q = 0`` (the paper's initialisation) ``softmax = C`` and ``A = I``.
Three defects of the reference implementation do not exist here by construction:

* KV cache: the identity term is applied as ``alpha * v_t`` -- each query's *own* value, which is the new
  token's value whatever the cache length -- instead of slicing an identity matrix at the wrong offset;
* padding: ``C`` comes from the attention mask, so padded keys get no weight and rows still sum to one;
* device: there are no fixed tensors at all. ``C`` is derived from the mask on the input's device at every
  call, the identity is never materialised, and every parameter is in the state dict.

Values and projections are the identity by default: head ``h`` reads the slice ``[h*d, (h+1)*d)`` of its
input and the heads' outputs are concatenated with no projection, so a layer has no ``v_proj``/``o_proj``.
A block config may instead ask for ``"value": "reparam"`` / ``"proj": "reparam"``, the paper's trainable
``W = alpha * I + beta * dW`` (``self_attn.value.alpha``, ``.beta``, ``.delta``; ``dW`` starts at zero) --
the SAS recipe keeps the first layer's value trainable this way. ``passes/sas_fold.py`` turns such maps back
into identities where that is exact.

GQA. An identity value needs ``num_attention_heads * head_dim == hidden_size`` (refused otherwise): the
values are the input's slices, one per *query* head, so they cannot be shared by a group of query heads as
GQA shares keys. Keys keep their KV heads (queries and keys are unchanged); the cache stores each KV head's
values as the concatenated slices of its query heads, ``[B, H_kv, T, groups * head_dim]``, so a converted
GQA layer caches ``hidden_size`` values per token instead of ``H_kv * head_dim``, and a cache that evicts per
KV head keeps each group's values together. A cache that cannot hold values wider than keys is refused with
an error rather than used wrongly.

Shipped inside converted checkpoints: imports only torch, transformers and the sibling runtime files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers.cache_utils import Cache
from transformers.models.llama.modeling_llama import LlamaRMSNorm, repeat_kv

from .attention_heads import QueryKeyHeads
from .kv_cache import observe_attention
from .masks import additive_mask

STANDARD = "standard"
IDENTITY, REPARAM = "identity", "reparam"
DEFAULT_MLP_GAIN = 0.1  # beta_FF of the paper at 18 layers; it should scale as O(1/sqrt(depth))


@dataclass(frozen=True)
class BlockForm:
    """How a layer composes its sub-blocks (see the table in the module docstring)."""

    attention_skip: bool  # x + A(.) instead of A(.) alone
    parallel: bool  # attention and MLP read the same input and their outputs are summed
    attention_norm: bool  # a norm before the attention (shared with the MLP when parallel)
    mlp_norm: bool  # the MLP's own norm (serial forms only)
    mlp_gain: bool  # the MLP branch is scaled by a trainable beta_FF


FORMS: dict[str, BlockForm] = {
    "shaped": BlockForm(
        attention_skip=True, parallel=False, attention_norm=True, mlp_norm=True, mlp_gain=False
    ),
    "sas": BlockForm(attention_skip=False, parallel=False, attention_norm=True, mlp_norm=True, mlp_gain=True),
    "sas_p": BlockForm(
        attention_skip=False, parallel=True, attention_norm=True, mlp_norm=False, mlp_gain=True
    ),
    "sas_p_nonorm": BlockForm(
        attention_skip=False, parallel=True, attention_norm=False, mlp_norm=False, mlp_gain=True
    ),
}


def attention_form(config: Any, layer: int) -> str:
    """The layer's form: ``"standard"`` or a key of :data:`FORMS`."""
    form = config.block_configs[layer]["attention"].get("form", STANDARD)
    if form != STANDARD and form not in FORMS:
        raise ValueError(
            f"layer {layer}: unknown attention form {form!r}; known: {STANDARD}, {', '.join(FORMS)}"
        )
    return form


# ---- centering ---------------------------------------------------------------------------------------


def centering_matrix(visible: torch.Tensor) -> torch.Tensor:
    """``C = softmax(M)``: each row uniform over that query's visible keys (float32, the shape of ``visible``).

    A row with no visible key (a padding query under left padding) is uniform over all keys, exactly what the
    softmax of an all-masked row gives, so ``beta * softmax - gamma * C`` still vanishes at ``W_Q = 0``.
    """
    weights = visible.float()
    empty = weights.sum(dim=-1, keepdim=True) == 0
    weights = torch.where(empty, torch.ones_like(weights), weights)
    return weights / weights.sum(dim=-1, keepdim=True)


def shaped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    own_value: torch.Tensor,
    visible: torch.Tensor | None,
    scaling: float,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:
    """``alpha * v_self + beta * softmax(q k^T * scaling + M) V - gamma * C V`` for every query head.

    ``query`` ``[B, H, q, D]``; ``key``/``value`` ``[B, H, K, D]`` (cache included); ``own_value`` ``[B, H, q, D]``
    is each query's own value -- ``I V`` with the identity on the diagonal shifted by the cache length;
    ``visible`` as from :func:`visible_keys` (``None``: causal, no past); gains ``[H]``.
    """
    soft, centred = attention_branches(query, key, value, visible, scaling)
    return _per_head(alpha) * own_value + _per_head(beta) * soft - _per_head(gamma) * centred


def attention_branches(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor | None, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T * scaling + M) V`` and ``C V``, each ``[B, H, q, D]``."""
    if visible is None:
        soft = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        # C V for plain causal attention is the running mean of the values: O(T d) instead of a T x T matrix.
        positions = torch.arange(1, value.shape[-2] + 1, device=value.device, dtype=torch.float32)[:, None]
        centred = (value.float().cumsum(dim=-2) / positions).to(value.dtype)
        return soft, centred
    heads = query.shape[1]
    if 1 < visible.shape[1] < heads:  # per-KV-head validity (an evicting cache): one row per query head
        visible = visible.repeat_interleave(heads // visible.shape[1], dim=1)
    soft = F.scaled_dot_product_attention(
        query, key, value, attn_mask=additive_mask(visible, query.dtype), scale=scaling
    )
    centred = centering_matrix(visible).to(value.dtype) @ value
    return soft, centred


def _per_head(gain: torch.Tensor) -> torch.Tensor:
    return gain.view(1, -1, 1, 1)


# ---- modules -----------------------------------------------------------------------------------------


class IdentityPlusDelta(nn.Module):
    """``y = alpha * x + beta * dW x`` (the paper's reparameterised value/projection; ``dW`` starts at zero)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.beta = nn.Parameter(torch.ones(1))
        self.delta = nn.Parameter(torch.zeros(width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta * F.linear(x, self.delta)


class ShapedAttention(QueryKeyHeads):
    """Shaped attention with identity (or reparameterised) values and projection; Llama-family queries/keys.

    Queries, keys and the cache step come from :class:`QueryKeyHeads`, as for standard attention (same names,
    GQA, RoPE, optional q/k bias and q/k norms), so a converted layer keeps its trained ``q_proj``/``k_proj``;
    see the module docstring for the value layout in the cache.
    """

    def __init__(self, config: Any, layer_idx: int, cache_idx: int) -> None:
        hidden = config.hidden_size
        if config.num_attention_heads * config.head_dim != hidden:
            raise ValueError(
                f"layer {layer_idx}: shaped attention with identity values needs num_attention_heads * head_dim == "
                f"hidden_size, got {config.num_attention_heads} * {config.head_dim} != {hidden}"
            )
        super().__init__(config, layer_idx, cache_idx)
        spec = config.block_configs[layer_idx]["attention"]
        self.shaped_alpha = nn.Parameter(torch.ones(self.num_heads))
        self.shaped_beta = nn.Parameter(torch.ones(self.num_heads))
        self.shaped_gamma = nn.Parameter(torch.ones(self.num_heads))
        self.value = _linear_map(spec.get("value", IDENTITY), hidden, layer_idx)
        self.proj = _linear_map(spec.get("proj", IDENTITY), hidden, layer_idx)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H * D]`` -> ``[B, H, T, D]``: head ``h`` is the input's slice ``[h*D, (h+1)*D)``."""
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        batch, q_len, _ = hidden_states.shape
        query, key = self.queries_keys(hidden_states, position_embeddings)
        value = self.value(hidden_states) if self.value is not None else hidden_states
        group_width = self.num_key_value_groups * self.head_dim
        values = value.view(batch, q_len, self.num_key_value_heads, group_width).transpose(1, 2)

        step = self.cache_step(key, values, attention_mask, past_key_values)
        key, values = step.key, step.value
        if past_key_values is not None:
            if values.shape[-1] != group_width:
                raise RuntimeError(
                    f"layer {self.layer_idx}: the KV cache returned values of width {values.shape[-1]}, expected "
                    f"{group_width} (a SAS layer caches one identity value slice per query head); this cache "
                    "cannot hold values wider than keys -- use the plain dynamic cache for this model"
                )
        visible = step.visible(q_len, self.config.sliding_window, query.device)
        # [B, H_kv, K, G * D] -> [B, H, K, D]: query head j * G + g reads slice g of KV head j's values.
        k_len = values.shape[-2]
        values = values.view(batch, self.num_key_value_heads, k_len, self.num_key_value_groups, self.head_dim)
        values = values.transpose(2, 3).reshape(batch, self.num_heads, k_len, self.head_dim)
        keys = repeat_kv(key, self.num_key_value_groups)
        mixed = shaped_attention(
            query,
            keys,
            values,
            self.heads(value),
            visible,
            self.scaling,
            self.shaped_alpha,
            self.shaped_beta,
            self.shaped_gamma,
        )
        if past_key_values is not None:
            # Score-driven caches accumulate the softmax probabilities, as with standard attention.
            bias = None if visible is None else additive_mask(visible, query.dtype)
            observe_attention(past_key_values, self.cache_idx, query, bias, self.scaling)
        output = mixed.transpose(1, 2).reshape(batch, q_len, -1)
        return self.proj(output) if self.proj is not None else output


def _linear_map(kind: str, width: int, layer_idx: int) -> IdentityPlusDelta | None:
    if kind == IDENTITY:
        return None
    if kind == REPARAM:
        return IdentityPlusDelta(width)
    raise ValueError(f"layer {layer_idx}: value/proj must be {IDENTITY!r} or {REPARAM!r}, got {kind!r}")


class SasDecoderLayer(nn.Module):
    """A decoder layer of one of the :data:`FORMS`; ``mlp`` is the runtime's MLP (``None`` if dropped).

    Tensor names follow the standard layer: ``input_layernorm`` (the shared norm of the parallel forms),
    ``self_attn.*``, ``post_attention_layernorm``, ``mlp.*``, plus ``mlp_gain`` (beta_FF).
    """

    def __init__(self, config: Any, layer_idx: int, cache_idx: int | None, mlp: nn.Module | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        name = attention_form(config, layer_idx)
        if cache_idx is None:
            raise ValueError(
                f"layer {layer_idx}: form {name!r} needs its attention sub-block, which is dropped"
            )
        self.form = FORMS[name]
        norm = lambda: LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)  # noqa: E731
        self.input_layernorm = norm() if self.form.attention_norm else None
        self.self_attn = ShapedAttention(config, layer_idx, cache_idx)
        self.mlp = mlp
        self.post_attention_layernorm = norm() if mlp is not None and self.form.mlp_norm else None
        self.mlp_gain = (
            nn.Parameter(torch.full((1,), DEFAULT_MLP_GAIN))
            if mlp is not None and self.form.mlp_gain
            else None
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states) if self.input_layernorm is not None else hidden_states
        attended = self.self_attn(normed, position_embeddings, attention_mask, past_key_values)
        if self.form.attention_skip:
            attended = hidden_states + attended
        if self.mlp is None:
            return attended
        if self.form.parallel:
            return attended + self._mlp_branch(normed)
        return attended + self._mlp_branch(
            self.post_attention_layernorm(attended) if self.post_attention_layernorm is not None else attended
        )

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        return self.mlp_gain * out if self.mlp_gain is not None else out
