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
the token among its row's real tokens). Once every layer decodes in that steady state, a
:class:`SteadyGroup` books the new token and the next victim for all layers in one pass per step, so a
decode step of an evicting cache costs about what a plain one does. Eviction is position-safe because RoPE
is applied before keys are cached; ``get_seq_length()`` stays the LOGICAL number of tokens seen so RoPE
positions stay right, while the attention mask comes from the per-slot validity kept here.

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
# Bytes an evicting slot stores per token and KV head beside K and V: float32 score, bool validity, int64
# position and rank, and in a steady group the int64 protection count ``until``.
SLOT_BOOKKEEPING_BYTES = 4 + 1 + 8 + 8 + 8
# ``SteadyGroup.until`` of a sink token: a count of tokens no sequence reaches, so sinks never expire.
NEVER = torch.iinfo(torch.int64).max // 2
# Version of config.json's kv_cache table: 1 had no version field; 2 added it; 3 (2026-12-04) is written with
# the scoring defaults resolved (``with_defaults``), so a checkpoint keeps its meaning when a default changes.
KV_CACHE_FORMAT = 3
# What a format-2 table that left alpha / the recent split unset meant: the defaults it was written under.
FORMAT_2_DEFAULTS = {"alpha": 0.9, "recent_ratio": 0.75}
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
    "SLOT_BOOKKEEPING_BYTES",
    "SteadyGroup",
    "new_cache",
]


@dataclass(frozen=True)
class LayerLimits:
    """What one cache slot keeps: ``budget`` slots; the ``sink`` first and ``recent`` last real tokens are
    protected and the remaining ``budget - sink - recent`` go to the highest scores."""

    budget: int
    sink: int
    recent: int

    def describe(self) -> str:
        """In words, e.g. ``20 tokens = 4 sink + 16 recent + 0 by score``."""
        rest = self.budget - self.sink - self.recent
        return f"{self.budget} tokens = {self.sink} sink + {self.recent} recent + {rest} by score"


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
        return {"format": KV_CACHE_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CachePolicy:
        """Read ``config.json["kv_cache"]``; checkpoints written before ``window`` or ``format`` existed read
        unchanged, and a policy from a newer format is refused by name instead of misread."""
        data = dict(data)
        written = data.pop("format", 1)
        if not isinstance(written, int) or written > KV_CACHE_FORMAT:
            raise ValueError(
                f"kv_cache format {written!r} is newer than this runtime reads ({KV_CACHE_FORMAT}); "
                "upgrade slimformer or re-convert the checkpoint"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown kv_cache field(s) {unknown}; known fields: {sorted(names)}")
        policy = cls(**data)
        if written == 2:
            policy = policy.with_defaults(**FORMAT_2_DEFAULTS)
        policy.validate()
        return policy

    def with_defaults(
        self, alpha: float = DEFAULT_ALPHA, recent_ratio: float = DEFAULT_RECENT_RATIO
    ) -> CachePolicy:
        """This policy with its unset scoring options filled in: ``alpha`` for a2sf, the recent split for the
        policies that protect one. The a2sf pass stores this form, so a stored policy does not depend on the
        defaults of the runtime that later reads it."""
        fields = self.kind.fields
        changes: dict[str, Any] = {}
        if "alpha" in fields and self.alpha is None and self.policy == "a2sf":
            changes["alpha"] = alpha
        if "recent_ratio" in fields and self.recent is None and self.recent_ratio is None:
            changes["recent_ratio"] = recent_ratio
        return dataclasses.replace(self, **changes) if changes else self

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
            # A token budget is kept as given, so protected windows that do not fit are refused, not widened.
            sink, recent = self.effective_sink, kind.recent_window(self, budget, self.effective_sink)
            _require(budget >= sink + recent, self._too_small(budget, sink, recent))

    def limits(self, slot: int, prompt_len: int) -> LayerLimits | None:
        """The budget of cache slot ``slot`` for a prompt of ``prompt_len`` tokens (``None``: never evict).

        A token budget (``budget``, ``layer_budgets``) is what it says; validation refused any smaller than
        its sink + recent. A ``budget_ratio`` resolves to ``floor(ratio * prompt_len)`` tokens -- never more
        than asked; at least 1, the one token a decode step writes -- and the protected windows shrink to fit
        inside it instead of raising it: the sink keeps at most ``budget - 1`` tokens (room for the newest
        token), the recent window at most what the sink leaves. ``budget_ratio=0.2,recent=57,sink=4`` on a
        100-token prompt keeps 20 tokens: 4 sink + 16 recent.
        """
        if not self.evicts:
            return None
        if self.budget_ratio is None:
            budget = self.layer_budgets[slot] if self.layer_budgets is not None else self.budget
            sink = self.effective_sink
            return LayerLimits(budget=budget, sink=sink, recent=self.kind.recent_window(self, budget, sink))
        # The epsilon keeps float error from losing a token (0.29 * 100 = 28.999999999999996).
        budget = max(1, math.floor(self.budget_ratio * prompt_len + 1e-9))
        sink = min(self.effective_sink, budget - 1)
        recent = min(self.kind.recent_window(self, budget, sink), budget - sink)
        return LayerLimits(budget=budget, sink=sink, recent=recent)

    def _too_small(self, budget: int, sink: int, recent: int) -> str:
        """The refusal of a token budget below its protected windows, naming the smallest budget that fits
        (a ratio recent window grows with the budget, so that is searched, not sink + recent)."""
        candidates = range(budget + 1, 4 * (sink + recent) + 2)
        fits = next((b for b in candidates if b >= sink + self.kind.recent_window(self, b, sink)), None)
        change = f"raise budget to at least {fits}" if fits is not None else "raise budget"
        if "recent" in self.kind.fields:
            change += f", or lower sink or {'recent' if self.recent is not None else 'recent_ratio'}"
        else:
            change += ", or lower sink"
        return f"kv_cache budget {budget} is smaller than sink {sink} + recent {recent}; {change}"


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
    token into the free slot, attends, scores, and frees the slot of the token that leaves. When every
    (row, head) holds exactly ``budget + 1`` real tokens after such a step the layer is ``ready`` and its
    cache moves it into a :class:`SteadyGroup`, which does the bookkeeping of all its layers at once.
    """

    def __init__(self, policy: CachePolicy, slot: int) -> None:
        super().__init__()
        self.policy = policy
        self.slot = slot
        self.group: SteadyGroup | None = None
        self._clear()

    def _clear(self) -> None:
        if self.group is not None:
            self.group.dissolve()
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None
        self.ranks: torch.Tensor | None = None
        self.n_real: torch.Tensor | None = None
        self.step_valid: torch.Tensor | None = None  # [B, H_kv, q]: this step's real query rows
        self.written_in_place = False
        # After a decode step that left every (row, head) with ``budget`` real tokens and one free slot
        # ``free`` ``[B, H_kv, 1]``: the layer can join a steady group (until the next general step).
        self.ready = False
        self.free: torch.Tensor | None = None
        self.is_initialized = False
        self.seen = 0
        self.limits: LayerLimits | None = None
        self._rules: tuple[CachePolicy, float, float] | None = None  # see decode_rules

    @property
    def decode_rules(self) -> tuple[float, float]:
        """``(decay, weight)`` of a decode step: how old scores decay per query row, and what the step's one
        query row weighs (0 for SnapKV: decode steps add no votes). Read every step, so resolved once per
        policy object (the policy may be swapped, e.g. by the budget tuning of ``passes/kv_tuning.py``)."""
        if self._rules is None or self._rules[0] is not self.policy:
            kind = self.policy.kind
            weight = float(kind.row_weights(self.policy, 1, False, torch.device("cpu"))[0])
            self._rules = (self.policy, kind.alpha(self.policy), weight)
        return self._rules[1], self._rules[2]

    @property
    def steady(self) -> bool:
        """In a steady group: decode steps write into the free slot with no mask and no per-layer bookkeeping."""
        return self.group is not None

    # ---- storage --------------------------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.group is not None:
            if self.group.write(self, key_states, value_states):
                return self.keys, self.values
            self.group.dissolve()  # not the decode step the group opened: back to the general path
        batch, heads, q_len, _ = key_states.shape
        device = key_states.device
        given = (cache_kwargs or {}).get("new_valid")
        new_valid = torch.ones(batch, q_len, dtype=torch.bool, device=device) if given is None else given
        new_valid = new_valid.to(device=device, dtype=torch.bool)
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
        self.ready = False
        if not self.is_initialized:
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
        if self.steady and q_len == 1:
            return self.decode_rules[1] != 0.0  # a steady decode step that adds no score needs none
        return self.limits is not None and self.policy.scores_attention and q_len <= self.policy.chunk_size

    def observe(
        self,
        query: torch.Tensor,
        bias: torch.Tensor | None,
        scaling: float,
        probs: torch.Tensor | None = None,
    ) -> None:
        """Score this step (``probs`` ``[B, H, q, P]`` from the attention itself, or recomputed from
        ``query`` in chunks), then evict down to the budget -- in a steady group, the group evicts for all
        its layers after the last one was scored (``SteadyGroup.close``)."""
        if self.limits is None:
            return
        if torch.is_grad_enabled():
            # Scores are bookkeeping, never differentiated: with autograd on, detached inputs keep every
            # step's graph out of them (and the steady in-place update legal).
            query, probs = query.detach(), None if probs is None else probs.detach()
        if self.steady:
            if self.policy.scores_attention:
                self._accumulate_decode(query, bias, scaling, probs)
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
        self.scores = self.decode_rules[0] ** q_len * self.scores + acc

    def _accumulate_decode(
        self, query: torch.Tensor, bias: torch.Tensor | None, scaling: float, probs: torch.Tensor | None
    ) -> None:
        """:meth:`_accumulate` for a steady decode step (one real query row), in place: ``scores`` is a view
        into the group's storage."""
        decay, weight = self.decode_rules
        if weight == 0.0:
            if decay != 1.0:
                self.scores.mul_(decay)
            return
        if probs is None:
            probs = grouped_probabilities(query, self.keys, bias, scaling)
        batch, kv_heads, phys = self.scores.shape
        step = probs.float().reshape(batch, kv_heads, -1, phys).sum(dim=2)  # the KV head's query heads
        if weight != 1.0:
            step.mul_(weight)
        torch.add(step, self.scores, alpha=decay, out=self.scores)  # decay * scores + weight * S, one op

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
        count = valid.sum(dim=-1)  # [B, H_kv]
        if not bool((count > limits.budget).any()):
            return
        recent_from = self.n_real[:, None, None] - limits.recent
        protected = valid & ((self.ranks < limits.sink) | (self.ranks >= recent_from))
        if int((count - limits.budget).max()) == 1 and self.physical_length() > limits.budget:
            # One token too many (a decode step): free the lowest-priority unprotected slot; nothing moves.
            priority = self.scores.masked_fill(protected | ~valid, float("inf"))
            victim = priority.argmin(dim=-1, keepdim=True)
            keep = (
                self.valid.gather(2, victim) & (count <= limits.budget)[..., None]
            )  # rows within budget keep it
            self.valid.scatter_(2, victim, keep)
            # If every storage slot but the victim's holds a real token, a steady group can take over.
            self.free = victim
            self.ready = self.physical_length() == limits.budget + 1 and bool(
                (count == limits.budget + 1).all()
            )
            return
        # A prompt or a chunk: keep the budget's worth of slots. Protected tokens outrank every score and
        # padding ranks below everything, so padding only fills slots that a row with fewer real tokens than
        # the budget cannot fill (and stays invalid there).
        priority = self.scores.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        keep = priority.topk(limits.budget, dim=-1).indices.sort(dim=-1).values
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
            if self.group is not None:
                self.group.dissolve()  # its bookkeeping is per row; the next decode steps rebuild it
            self.ready = False
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


class SteadyGroup:
    """The steady decode state of cache slots with equal shapes and limits, booked for all of them at once.

    Steady: every (row, head) of every member holds ``budget + 1`` storage slots, all real but the free one,
    and each decode token is real. A step then needs, per layer, only its two key/value writes and its score
    update (:meth:`EvictingLayer._accumulate_decode`); the rest -- marking the new token in ``valid``,
    ``positions``, ``scores``, and choosing and freeing each slot's victim -- runs once per step over
    ``[S, B, H_kv, P]`` tensors whose slices ``[s]`` the members hold as their own. That is what makes an
    evicting decode step cost about what a plain one does: per-layer bookkeeping was a dozen small tensor ops.

    ``ranks`` and ``n_real`` are not maintained here; ``until`` replaces them: the ``seen`` count up to which
    a token stays protected. While steady each row's real-token count is ``seen - pads`` with ``pads``
    fixed, so the rank test ``rank >= n_real - recent`` is ``until >= seen`` with
    ``until = rank + pads + recent`` -- one comparison with a Python int -- and every new token's ``until``
    is the same Python int. Sinks never expire (:data:`NEVER`). :meth:`dissolve` rebuilds ``ranks`` and
    ``n_real`` from it exactly, when a step is not a steady decode step (a chunk, padding, reordering).

    The cache drives it: :meth:`open` at the first member's update, :meth:`write` per member, :meth:`close`
    after the last member's observe. Members must be updated in order, once each per step.
    """

    def __init__(self, members: list[EvictingLayer]) -> None:
        self.members = members
        first = members[0]
        self.limits = first.limits
        for layer in members:
            layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()  # flat-index writes
        self.valid = torch.stack([layer.valid for layer in members])  # [S, B, H_kv, P]
        self.positions = torch.stack([layer.positions for layer in members])
        self.scores = torch.stack([layer.scores for layer in members])
        ranks = torch.stack([layer.ranks for layer in members])
        # [S, B, 1, 1]: padding tokens each row has seen, fixed while steady (every decode token is real).
        self.pads = torch.stack([(layer.seen - layer.n_real).view(-1, 1, 1) for layer in members])
        self.until = torch.where(ranks < self.limits.sink, NEVER, ranks + self.pads + self.limits.recent)
        for s, layer in enumerate(members):
            layer.valid, layer.positions, layer.scores = self.valid[s], self.positions[s], self.scores[s]
            layer.ready, layer.group = False, self
        slots, batch, heads, phys = self.valid.shape
        # Flat index of (slot s, row b, head h, storage slot p) in a member's [B * H_kv * P] keys and in the
        # group's [S * B * H_kv * P] bookkeeping.
        self.member_offsets = torch.arange(batch * heads, device=first.valid.device) * phys
        self.group_offsets = torch.arange(slots * batch * heads, device=first.valid.device) * phys
        self._set_free(torch.stack([layer.free for layer in members]))
        self.written = -1  # members written in the open step; -1: no step open

    def _set_free(self, free: torch.Tensor) -> None:
        """``free`` ``[S, B, H_kv, 1]``: where each member's next token goes."""
        self.free = free
        self.flat = free.view(-1) + self.group_offsets
        self.member_flat = (free.view(len(self.members), -1) + self.member_offsets).unbind(0)

    def open(self, q_len: int, new_valid: torch.Tensor | None) -> bool:
        """Start a step if it is a steady decode step (one real token per row); mark the new token in every
        member's bookkeeping. False: not one, the caller dissolves the group."""
        if self.written >= 0 or q_len != 1 or (new_valid is not None and not bool(new_valid.all())):
            return False  # the last step was not closed, or this one is not a steady decode step
        seen = self.members[0].seen
        self.valid.view(-1).index_fill_(0, self.flat, True)
        self.positions.view(-1).index_fill_(0, self.flat, seen)
        self.until.view(-1).index_fill_(0, self.flat, seen + self.limits.recent)
        self.scores.view(-1).index_fill_(0, self.flat, 0.0)  # unseen tokens score 0
        self.written = 0
        return True

    def write(self, layer: EvictingLayer, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """Write ``layer``'s decode token into its free slot; False if that is not this step's next write."""
        member = self.written
        if member < 0 or member >= len(self.members) or self.members[member] is not layer:
            return False
        flat = self.member_flat[member]
        for stored, new in ((layer.keys, key_states), (layer.values, value_states)):
            width = stored.shape[-1]
            stored.view(-1, width).index_copy_(0, flat, new.reshape(-1, width).to(stored.dtype))
        layer.written_in_place = True
        layer.seen += 1
        self.written = member + 1
        return True

    def close(self) -> None:
        """After the last member's scores: free every member's lowest-scoring unprotected slot at once."""
        if self.written != len(self.members):
            self.dissolve()  # a member was skipped: do not evict on partial information
            return
        seen = self.members[0].seen
        priority = self.scores.masked_fill(self.until >= seen, float("inf"))
        self._set_free(priority.argmin(dim=-1, keepdim=True))
        self.valid.view(-1).index_fill_(0, self.flat, False)
        self.written = -1

    def dissolve(self) -> None:
        """Hand every member back to the general bookkeeping (ranks, n_real, free rebuilt exactly)."""
        if self.written >= 0:
            # A step is open: members not written yet were marked as holding the new token; unmark them.
            for member in range(self.written, len(self.members)):
                self.valid[member].view(-1).index_fill_(0, self.member_flat[member], False)
        recent = self.limits.recent
        for s, layer in enumerate(self.members):
            layer.ranks = torch.where(
                self.until[s] >= NEVER, layer.ranks, self.until[s] - recent - self.pads[s]
            )
            layer.n_real = layer.seen - self.pads[s].view(-1)
            layer.free = self.free[s]
            layer.group = None
        self.members = []


class EvictingCache(Cache):
    """A cache whose slots (created lazily, one per layer that keeps attention) evict by ``policy``.

    It also drives the steady groups (:class:`SteadyGroup`): a group's step opens at its first member's
    update and closes after its last member's observe; after the last slot's observe, slots that became
    ready join new groups.
    """

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
        layer = self.layers[layer_idx]
        group = layer.group
        if group is not None and group.members[0] is layer:
            new_valid = (cache_kwargs or {}).get("new_valid")
            if not group.open(key_states.shape[-2], new_valid):
                group.dissolve()
        return layer.update(key_states, value_states, cache_kwargs)

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
        layer = self.layers[slot]
        layer.observe(query, bias, scaling, probs)
        group = layer.group
        if group is not None and group.members[-1] is layer:
            group.close()
        if slot == len(self.layers) - 1:
            self._form_groups()

    def _form_groups(self) -> None:
        """Slots that are ready (``EvictingLayer.ready``) join steady groups, one per shape and limits."""
        ready: dict[tuple[Any, ...], list[EvictingLayer]] = {}
        for layer in self.layers:
            if layer.ready and layer.group is None:
                key = (layer.limits, tuple(layer.valid.shape), layer.valid.device)
                ready.setdefault(key, []).append(layer)
        for members in ready.values():
            SteadyGroup(members)

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
