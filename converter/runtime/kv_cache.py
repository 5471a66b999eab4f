"""KV caches of the slimformer runtime: the plain dynamic cache and the score-driven evicting cache.

``new_cache(config)`` returns the cache ``generate()`` uses by default: a plain ``DynamicCache`` with one
slot per layer that keeps attention, or -- when the checkpoint's ``kv_cache`` config names an evicting
policy -- an :class:`EvictingCache`. The attention module talks to any cache through functions defined
here, so it never needs to know which kind it has:

* ``past_key_validity(cache, slot, attention_mask, batch)`` -> which stored slots are real tokens,
  ``[B, 1 or H_kv, past]`` (or ``None`` = all), and the physical past length;
* ``wants_probabilities(cache, slot, q_len)`` -> whether the attention should hand over the softmax
  probabilities it computes (decode steps of a scoring policy: no second ``Q K^T``);
* ``observe_attention(cache, slot, query, bias, scaling, probs)`` -> lets a scoring cache see this step.

One eviction mechanism (:class:`EvictingLayer`) serves every policy; what differs between policies -- how a
stored token's score changes after a step -- lives in small classes in ``kv_policies.py`` (A2SF, H2O,
StreamingLLM, SnapKV, TOVA). After each forward step a layer keeps, per (batch row, KV head), the first
``sink`` real tokens, the last ``recent`` real tokens and the highest-scoring others, up to its budget.

Decode steps are cheap: once a slot is full, the token that leaves marks its storage slot free and the
next token is written into it -- no re-gathering of keys, values and bookkeeping. Attention does not care
about slot order once RoPE is applied; what the recent window needs is kept per slot (``ranks``: index of
the token among its row's real tokens). Eviction is position-safe because RoPE is applied before keys
are cached; ``get_seq_length()`` stays the LOGICAL number of tokens seen so RoPE positions stay right,
while the attention mask comes from the per-slot validity kept here.

Shipped inside converted checkpoints: imports only torch, transformers and the standard library.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .kv_policies import (
    DEFAULT_ALPHA,
    DEFAULT_RECENT_RATIO,
    DEFAULT_STREAMING_SINK,
    POLICY_CLASSES,
    KVPolicy,
    policy_class,
)
from .masks import grouped_probabilities

# transformers >= 5.24 calls the cache of model outputs (and the forward argument) ``cache``; earlier
# releases ``past_key_values``. The runtime accepts both and returns the installed release's name.
CACHE_FIELD = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"
)

POLICIES = tuple(POLICY_CLASSES)
EVICTING_POLICIES = tuple(name for name, cls in POLICY_CLASSES.items() if cls.evicts)
DEFAULT_CHUNK_SIZE = 128
__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_RECENT_RATIO",
    "DEFAULT_STREAMING_SINK",
    "EVICTING_POLICIES",
    "POLICIES",
    "CachePolicy",
    "EvictingCache",
    "EvictingLayer",
    "LayerLimits",
    "new_cache",
]


@dataclass(frozen=True)
class LayerLimits:
    """What one cache slot keeps: ``budget`` slots; the ``sink`` first and ``recent`` last real tokens are
    protected and the remaining ``budget - sink - recent`` go to the highest scores."""

    budget: int
    sink: int
    recent: int


@dataclass
class CachePolicy:
    """KV-cache policy of a checkpoint, stored as ``config.kv_cache`` (``to_dict()`` / ``from_dict()``).

    Fields (``None`` = the default described):

    * ``policy`` -- ``a2sf``, ``h2o`` (A2SF with alpha 1), ``streaming`` (sink + recent), ``snapkv`` (the
      prompt's last ``window`` queries vote once), ``tova`` (the last query's attention) or ``none``
      (see ``kv_policies.py``).
    * ``budget`` -- tokens kept per (sequence, KV head) in every cache slot; or
    * ``budget_ratio`` -- the budget as a fraction of the prompt length (the padded length of the first
      forward), resolved per slot at prefill, never below ``sink + recent``; or
    * ``layer_budgets`` -- one token budget per cache slot (slots = layers that keep attention).
    * ``alpha`` -- forgetting factor in (0, 1]; default 0.9 for a2sf (measured), always 1.0 for h2o.
    * ``recent`` / ``recent_ratio`` -- the protected recent window as a token count or as a fraction of the
      budget (default 0.75 of it). StreamingLLM's window is always ``budget - sink``.
    * ``sink`` -- first real tokens that are never evicted (default 0; 4 for streaming).
    * ``score_window`` -- with alpha < 1, score a multi-token step from its last W query rows only: each
      query head's score then errs by at most ``truncation_bound = alpha^W / (1 - alpha)``.
    * ``window`` -- snapkv's observation window (default 32 query rows).
    * ``chunk_size`` -- query rows scored at a time, so a prompt's L x L probabilities never exist at once.
    """

    policy: str = "a2sf"
    budget: int | None = None
    budget_ratio: float | None = None
    layer_budgets: list[int] | None = None
    alpha: float | None = None
    recent: int | None = None
    recent_ratio: float | None = None
    sink: int | None = None
    score_window: int | None = None
    window: int | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE

    # ---- (de)serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CachePolicy:
        """Read ``config.json["kv_cache"]``; checkpoints written before ``window`` existed read unchanged."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown kv_cache field(s) {unknown}; known fields: {sorted(names)}")
        policy = cls(**data)
        policy.validate()
        return policy

    @classmethod
    def parse(cls, text: str) -> CachePolicy:
        """Parse the CLI form ``"policy=a2sf,budget=256,alpha=0.5,recent=32,sink=4"``.

        ``layer_budgets`` separates its entries with ``:`` (``layer_budgets=64:64:32``); an empty string
        means ``policy=none``.
        """
        fields = {field.name: field for field in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or not raw:
                raise ValueError(f"kv-cache option {item!r} is not of the form key=value")
            if key not in fields:
                raise ValueError(f"unknown kv-cache option {key!r}; known options: {', '.join(fields)}")
            if key in values:
                raise ValueError(f"kv-cache option {key!r} is given twice")
            values[key] = _parse_value(key, raw)
        if not values:
            values["policy"] = "none"
        return cls.from_dict(values)

    # ---- what the policy class decides --------------------------------------------------------------

    @property
    def kind(self) -> KVPolicy:
        """The policy's class (``kv_policies.py``): its scoring rule, defaults and checks."""
        return policy_class(self.policy)

    @property
    def evicts(self) -> bool:
        return self.kind.evicts

    @property
    def scores_attention(self) -> bool:
        """Scoring policies rank tokens by attention; StreamingLLM keeps by position alone."""
        return self.kind.scores_attention

    @property
    def effective_alpha(self) -> float:
        return self.kind.alpha(self)

    @property
    def effective_sink(self) -> int:
        return self.sink if self.sink is not None else self.kind.default_sink

    @property
    def truncation_bound(self) -> float:
        """Largest error ``score_window`` can cause in one query head's score of a key (0 when exact)."""
        alpha = self.effective_alpha
        if self.score_window is None or alpha >= 1.0:
            return 0.0
        return alpha**self.score_window / (1.0 - alpha)

    # ---- validation and resolution ------------------------------------------------------------------

    def validate(self, num_slots: int | None = None) -> None:
        """Raise ``ValueError`` saying what is wrong and how to fix it.

        ``num_slots`` (the model's cache slots, when known) also checks the length of ``layer_budgets``.
        """
        _require(
            self.policy in POLICY_CLASSES,
            f"kv_cache policy {self.policy!r} is unknown; choose one of {POLICIES}",
        )
        for name in ("budget", "recent", "sink", "score_window", "window", "chunk_size"):
            value = getattr(self, name)
            _require(
                value is None or _is_count(value), f"kv_cache {name}={value!r} must be a non-negative integer"
            )
        for name in ("budget", "score_window", "window", "chunk_size"):
            _require(getattr(self, name) != 0, f"kv_cache {name} must be at least 1")
        _require(
            self.alpha is None or 0.0 < self.alpha <= 1.0,
            f"kv_cache alpha={self.alpha} must lie in (0, 1] (1 = H2O, towards 0 = recency)",
        )
        _require(
            self.budget_ratio is None or 0.0 < self.budget_ratio <= 1.0,
            f"kv_cache budget_ratio={self.budget_ratio} must lie in (0, 1] (a fraction of the prompt)",
        )
        _require(
            self.recent_ratio is None or 0.0 <= self.recent_ratio <= 1.0,
            f"kv_cache recent_ratio={self.recent_ratio} must lie in [0, 1] (a fraction of the budget)",
        )
        budgets = [
            name for name in ("budget", "budget_ratio", "layer_budgets") if getattr(self, name) is not None
        ]
        kind = self.kind
        if not kind.evicts:
            _require(
                not budgets,
                f"kv_cache policy 'none' never evicts; remove {budgets} or pick an evicting policy",
            )
            return
        _require(
            len(budgets) == 1,
            f"kv_cache policy {self.policy!r} needs exactly one of budget (tokens), budget_ratio (fraction of "
            f"the prompt) or layer_budgets (tokens per cache slot); got {budgets or 'none'}",
        )
        unused = [
            name
            for name in ("alpha", "recent", "recent_ratio", "sink", "score_window", "window")
            if getattr(self, name) is not None and name not in kind.fields
        ]
        _require(
            not unused,
            f"{kind.summary}; kv_cache policy {self.policy!r} does not use {unused}: remove them "
            f"(it reads {', '.join(kind.fields) or 'only a budget'})",
        )
        _require(
            self.recent is None or self.recent_ratio is None,
            "give the recent window either as recent (tokens) or as recent_ratio (fraction of the budget), not both",
        )
        kind.validate(self, _require)
        if self.layer_budgets is not None:
            _require(
                isinstance(self.layer_budgets, list) and len(self.layer_budgets) > 0,
                "kv_cache layer_budgets must be a non-empty list of token counts, one per cache slot",
            )
            _require(
                num_slots is None or len(self.layer_budgets) == num_slots,
                f"kv_cache layer_budgets has {len(self.layer_budgets)} entries but the model has {num_slots} cache slots",
            )
        for budget in self.layer_budgets or ([self.budget] if self.budget is not None else []):
            _require(
                _is_count(budget) and budget >= 1, f"kv_cache budget {budget!r} must be a positive integer"
            )
            sink, recent = self.effective_sink, kind.recent_window(self, budget)
            _require(
                budget >= sink + recent,
                f"kv_cache budget {budget} is smaller than sink {sink} + recent {recent}; raise it or shrink them",
            )

    def limits(self, slot: int, prompt_len: int) -> LayerLimits | None:
        """The budget of cache slot ``slot`` for a prompt of ``prompt_len`` tokens (``None``: never evict)."""
        if not self.evicts:
            return None
        if self.layer_budgets is not None:
            budget = self.layer_budgets[slot]
        elif self.budget is not None:
            budget = self.budget
        else:
            budget = max(1, math.ceil(self.budget_ratio * prompt_len))
        sink = self.effective_sink
        recent = self.kind.recent_window(self, budget)
        # A ratio budget on a short prompt may be smaller than the protected tokens: protect them all.
        return LayerLimits(budget=max(budget, sink + recent), sink=sink, recent=recent)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_value(key: str, raw: str) -> Any:
    try:
        if key == "policy":
            return raw
        if key == "layer_budgets":
            return [int(part) for part in raw.split(":")]
        if key in ("alpha", "budget_ratio", "recent_ratio"):
            return float(raw)
        return int(raw)
    except ValueError:
        kind = "a number" if key in ("alpha", "budget_ratio", "recent_ratio") else "an integer"
        if key == "layer_budgets":
            kind = "integers separated by ':'"
        raise ValueError(f"kv-cache option {key}={raw!r} must be {kind}") from None


class EvictingLayer(DynamicLayer):
    """One cache slot that keeps at most its budget of tokens per (batch row, KV head).

    Stored per slot, all ``[B, H_kv, P]`` beside keys/values ``[B, H_kv, P, D]``: ``scores`` (float32,
    the policy's score), ``valid`` (False = padding or a freed slot: never attended, free to overwrite),
    ``positions`` (logical index of the token, for inspection) and ``ranks`` (index of the token among its
    row's real tokens: what the sink and recent windows count). ``n_real`` ``[B]`` counts each row's real
    tokens, ``seen`` the logical tokens that went through the layer.

    Once full, a slot holds ``budget + 1`` storage slots of which one is free: a decode step writes its
    token into the free slot, attends, scores, and frees the slot of the token that leaves.
    """

    def __init__(self, policy: CachePolicy, slot: int) -> None:
        super().__init__()
        self.policy = policy
        self.slot = slot
        self._clear()

    def _clear(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.ranks: torch.Tensor | None = None
        self.n_real: torch.Tensor | None = None
        self.step_valid: torch.Tensor | None = None  # [B, H_kv, q]: this step's real query rows
        self.written_in_place = False
        # Steady state: every (row, head) holds exactly ``budget`` tokens plus the free slot ``free``
        # ``[B, H_kv, 1]``; a decode step then writes there and frees one slot, with no counting at all.
        self.steady = False
        self.free: torch.Tensor | None = None
        self.is_initialized = False
        self.seen = 0
        self.limits: LayerLimits | None = None

    # ---- storage --------------------------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, q_len, _ = key_states.shape
        device = key_states.device
        given = (cache_kwargs or {}).get("new_valid")
        new_valid = torch.ones(batch, q_len, dtype=torch.bool, device=device) if given is None else given
        new_valid = new_valid.to(device=device, dtype=torch.bool)
        steady_step = self.steady and q_len == 1 and (given is None or bool(new_valid.all()))
        if not self.is_initialized:
            self.n_real = torch.zeros(batch, dtype=torch.long, device=device)
        ranks = self.n_real[:, None] + new_valid.long().cumsum(dim=-1) - 1
        self.n_real = self.n_real + new_valid.sum(dim=-1)
        shape = (batch, heads, q_len)
        valid = new_valid[:, None, :].expand(shape)
        ranks = ranks[:, None, :].expand(shape)
        positions = torch.arange(self.seen, self.seen + q_len, device=device).expand(shape)
        scores = torch.zeros(shape, dtype=torch.float32, device=device)  # unseen tokens score 0
        self.step_valid = valid
        self.written_in_place = False
        if steady_step:
            self._write_in_place(self.free, key_states, value_states, valid, positions, ranks, scores)
        elif not self.is_initialized:
            self.dtype, self.device = key_states.dtype, device
            self.is_initialized = True
            # The first forward is the prompt: a ratio budget is resolved against its (padded) length.
            self.limits = self.policy.limits(self.slot, q_len)
            self.keys, self.values = key_states, value_states
            self.valid, self.positions, self.ranks, self.scores = (
                valid.clone(),
                positions.clone(),
                ranks.clone(),
                scores,
            )
        elif q_len == 1 and bool((~self.valid).any(dim=-1).all()):
            # Every (row, head) has a free slot (a token that left, or padding): write there, gather nothing.
            free = (~self.valid).int().argmax(dim=-1, keepdim=True)  # [B, H_kv, 1]
            self._write_in_place(free, key_states, value_states, valid, positions, ranks, scores)
        else:
            self.steady = False
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.valid = torch.cat([self.valid, valid], dim=-1)
            self.positions = torch.cat([self.positions, positions], dim=-1)
            self.ranks = torch.cat([self.ranks, ranks], dim=-1)
            self.scores = torch.cat([self.scores, scores], dim=-1)
        self.seen += q_len
        return self.keys, self.values

    def _write_in_place(self, free: torch.Tensor, *new: torch.Tensor) -> None:
        """Write a one-token step into storage slot ``free`` ``[B, H_kv, 1]`` of every (row, head)."""
        for name, tensor in zip(("keys", "values", "valid", "positions", "ranks", "scores"), new):
            stored = getattr(self, name)
            index = free[..., None].expand(-1, -1, -1, stored.shape[-1]) if stored.dim() == 4 else free
            stored.scatter_(2, index, tensor.to(stored.dtype))
        self.written_in_place = True

    def get_seq_length(self) -> int:
        """Logical tokens seen (what RoPE positions count), not the stored length."""
        return self.seen

    def physical_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def kept_length(self) -> int:
        """Most real tokens any (row, KV head) holds (the budget once eviction started)."""
        return int(self.valid.sum(dim=-1).max()) if self.is_initialized else 0

    def key_validity(self) -> torch.Tensor | None:
        """``[B, H_kv, P]``: which stored slots hold real tokens (``None`` before the first update)."""
        return self.valid

    def kept_positions(self) -> torch.Tensor | None:
        """``[B, H_kv, P]`` logical position of each stored token, -1 for padding and freed slots."""
        return None if self.positions is None else self.positions.masked_fill(~self.valid, -1)

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # As DynamicSlidingWindowLayer: the stored keys plus the query, offset by what left the cache. Exact
        # for masks that treat eviction as a shared prefix; the slimformer runtime masks by key_validity().
        # transformers 4.57 passes the query's cache_position tensor, transformers 5 its length.
        q_len = query if isinstance(query, int) else query.shape[0]
        physical = self.physical_length()
        return physical + q_len, self.seen - physical

    @property
    def is_croppable(self) -> bool:
        """transformers 5 asks before rolling a cache back: only possible while nothing was evicted."""
        return self.physical_length() == self.seen

    # ---- scoring and eviction ---------------------------------------------------------------------------

    def wants_probabilities(self, q_len: int) -> bool:
        """Whether this step's attention should hand over its softmax probabilities: short steps of a
        scoring policy (decode). Long prompts are scored in chunks instead (never the full L x L)."""
        return self.limits is not None and self.policy.scores_attention and q_len <= self.policy.chunk_size

    def observe(
        self,
        query: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        probs: torch.Tensor | None = None,
    ) -> None:
        """Score this step (``probs`` ``[B, H, q, P]`` from the attention itself, or recomputed from
        ``query`` in chunks), then evict down to the budget."""
        if self.limits is None:
            return
        if self.policy.scores_attention:
            self._accumulate(query, bias, scaling, probs)
        self._evict()

    def _accumulate(
        self, query: torch.Tensor, bias: torch.Tensor | None, scaling: float, probs: torch.Tensor | None
    ) -> None:
        """``scores <- decay^q * scores + sum_t w_t * S_t`` (kv_policies.py), per KV head."""
        q_len = query.shape[2]
        kind = self.policy.kind
        weights = kind.row_weights(self.policy, q_len, self.seen == q_len, query.device)  # [q]
        # Rows of padding tokens see no real key (their softmax spreads over masked slots): they score nothing.
        weights = self.step_valid.float() * weights
        if probs is not None:
            batch, heads, _, phys = probs.shape
            grouped = probs.float().view(batch, self.keys.shape[1], -1, q_len, phys).sum(dim=2)
            acc = torch.einsum("bhq,bhqp->bhp", weights, grouped)
        else:
            acc = self._chunked_scores(query, bias, scaling, weights)
        self.scores = kind.alpha(self.policy) ** q_len * self.scores + acc

    def _chunked_scores(
        self, query: torch.Tensor, bias: torch.Tensor | None, scaling: float, weights: torch.Tensor
    ) -> torch.Tensor:
        batch, kv_heads, phys = self.keys.shape[0], self.keys.shape[1], self.keys.shape[2]
        q_len = query.shape[2]
        nonzero = weights.reshape(-1, q_len).any(dim=0).nonzero()
        acc = torch.zeros(batch, kv_heads, phys, dtype=torch.float32, device=query.device)
        if nonzero.numel() == 0:
            return acc
        for start in range(int(nonzero[0]), q_len, self.policy.chunk_size):  # rows before weigh nothing
            stop = min(q_len, start + self.policy.chunk_size)
            probs = grouped_probabilities(query, self.keys, bias, scaling, start, stop).sum(dim=2)
            acc += torch.einsum("bhc,bhcp->bhp", weights[:, :, start:stop], probs)
        return acc

    def _evict(self) -> None:
        """Keep sink ∪ recent ∪ top-k by score, per (batch row, KV head)."""
        limits = self.limits
        valid = self.valid
        recent_from = self.n_real[:, None, None] - limits.recent
        if self.steady and self.written_in_place:
            # budget + 1 real tokens in every (row, head): free the lowest-priority unprotected one.
            protected = (self.ranks < limits.sink) | (self.ranks >= recent_from)
            self.free = self.scores.masked_fill(protected, float("inf")).argmin(dim=-1, keepdim=True)
            self.valid.scatter_(2, self.free, False)
            return
        count = valid.sum(dim=-1)  # [B, H_kv]
        if not bool((count > limits.budget).any()):
            return
        protected = valid & ((self.ranks < limits.sink) | (self.ranks >= recent_from))
        if int((count - limits.budget).max()) == 1 and self.physical_length() > limits.budget:
            # One token too many (a decode step): free the lowest-priority unprotected slot; nothing moves.
            priority = self.scores.masked_fill(protected | ~valid, float("inf"))
            victim = priority.argmin(dim=-1, keepdim=True)
            keep = (
                self.valid.gather(2, victim) & (count <= limits.budget)[..., None]
            )  # rows within budget keep it
            self.valid.scatter_(2, victim, keep)
            if bool((count == limits.budget + 1).all()):
                self.steady, self.free = True, victim
            return
        # A prompt or a chunk: keep the budget's worth of slots. Protected tokens outrank every score and
        # padding ranks below everything, so padding only fills slots that a row with fewer real tokens than
        # the budget cannot fill (and stays invalid there).
        priority = self.scores.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        keep = priority.topk(limits.budget, dim=-1).indices.sort(dim=-1).values
        self.steady = False
        self._gather(keep)

    def _gather(self, keep: torch.Tensor) -> None:
        # Values may be wider than keys (SAS identity values under GQA), so each gets its own index.
        self.keys = self.keys.gather(2, keep[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, keep[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        for name in ("scores", "valid", "positions", "ranks"):
            setattr(self, name, getattr(self, name).gather(2, keep))

    # ---- batch manipulation (generate(): sampling, beams, contrastive search) ---------------------------

    def _map_batch(self, fn: Any) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "scores", "valid", "positions", "ranks", "n_real", "free"):
                if getattr(self, name) is not None:
                    setattr(self, name, fn(getattr(self, name)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, max_length: int) -> None:
        # transformers 5 passes -(tokens to remove); 4.57 an absolute length or a negative count.
        if max_length < 0:
            max_length = self.seen - abs(max_length)
        if self.seen <= max_length:
            return
        if self.physical_length() != self.seen:
            raise ValueError(
                "cannot crop an evicting KV cache after it has evicted tokens (their keys and values are gone); "
                "use kv_cache policy 'none' with assisted generation or contrastive search"
            )
        for name in ("keys", "values"):
            setattr(self, name, getattr(self, name)[:, :, :max_length])
        for name in ("scores", "valid", "positions", "ranks"):
            setattr(self, name, getattr(self, name)[..., :max_length])
        self.n_real = self.valid[:, 0].sum(dim=-1)
        self.seen = max_length

    def reset(self) -> None:
        self._clear()


class EvictingCache(Cache):
    """A cache whose slots (created lazily, one per layer that keeps attention) evict by ``policy``."""

    def __init__(self, policy: CachePolicy | dict[str, Any], num_slots: int | None = None) -> None:
        if isinstance(policy, dict):
            policy = CachePolicy.from_dict(policy)
        policy.validate(num_slots)
        self.policy = policy
        # layers=[]: slots are appended in update(), where the slot index (for layer_budgets) is known.
        super().__init__(layers=[])

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        while len(self.layers) <= layer_idx:
            self.layers.append(EvictingLayer(self.policy, len(self.layers)))
        return self.layers[layer_idx].update(key_states, value_states, cache_kwargs)

    def wants_probabilities(self, slot: int, q_len: int) -> bool:
        return slot < len(self.layers) and self.layers[slot].wants_probabilities(q_len)

    def observe(
        self,
        slot: int,
        query: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        probs: torch.Tensor | None = None,
    ) -> None:
        self.layers[slot].observe(query, bias, scaling, probs)

    def physical_lengths(self) -> list[int]:
        """Storage slots per cache slot (the budget, plus the one free slot a decode step writes into)."""
        return [layer.physical_length() for layer in self.layers]

    def kept_lengths(self) -> list[int]:
        """Real tokens held per cache slot (at most the budget)."""
        return [layer.kept_length() for layer in self.layers]


def new_cache(config: Any) -> Cache:
    """The cache a model builds when its forward gets none (also inside ``generate()``)."""
    spec = getattr(config, "kv_cache", None)
    policy = (spec if isinstance(spec, CachePolicy) else CachePolicy.from_dict(spec)) if spec else None
    if policy is None or not policy.evicts:
        return DynamicCache()
    slots = getattr(config, "cache_layer_indices", None)
    return EvictingCache(policy, num_slots=len(slots) if slots is not None else None)


def returned_cache(outputs: Any) -> Cache | None:
    """The cache a model's forward returned, under either release's field name (no deprecation warning)."""
    return getattr(outputs, CACHE_FIELD, None)


def past_key_validity(
    cache: Cache, slot: int, attention_mask: torch.Tensor | None, batch: int
) -> tuple[torch.Tensor | None, int]:
    if slot >= len(cache.layers):
        return None, 0
    layer = cache.layers[slot]
    if hasattr(layer, "key_validity"):
        # The cache's own record: right after eviction and with left padding, unlike the logical 2-D mask.
        return layer.key_validity(), layer.physical_length()
    past_len = layer.get_seq_length() if layer.is_initialized else 0
    if attention_mask is None or past_len == 0 or attention_mask.shape[1] < past_len:
        return None, past_len
    return attention_mask[:, None, :past_len].bool(), past_len


def written_in_place(cache: Cache, slot: int) -> torch.Tensor | bool | None:
    """After ``update``: if the cache wrote a one-token step into a free storage slot (not appended), the
    validity ``[B, H_kv, P]`` the token attends with -- or ``True`` when every stored slot is valid (the
    steady state: no mask needed at all). ``None`` when the step was appended as usual."""
    layer = cache.layers[slot] if slot < len(cache.layers) else None
    if not getattr(layer, "written_in_place", False):
        return None
    return True if layer.steady else layer.valid


def wants_probabilities(cache: Cache | None, slot: int, q_len: int) -> bool:
    """Whether the attention should compute its probabilities explicitly and pass them to ``observe``."""
    wants = getattr(cache, "wants_probabilities", None)
    return wants is not None and wants(slot, q_len)


def observe_attention(
    cache: Cache,
    slot: int,
    query: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: float,
    probs: torch.Tensor | None = None,
) -> None:
    observe = getattr(cache, "observe", None)
    if observe is not None:
        if probs is None:
            observe(slot, query, bias, scaling)
        else:
            observe(slot, query, bias, scaling, probs)
