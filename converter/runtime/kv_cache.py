"""KV caches of the slimformer runtime: the plain dynamic cache and the score-driven evicting cache.

``new_cache(config)`` returns the cache ``generate()`` uses by default: a plain ``DynamicCache`` with one
slot per layer that keeps attention, or -- when the checkpoint's ``kv_cache`` config names an evicting
policy -- an :class:`EvictingCache`. The attention module talks to any cache through two functions
defined here, so it never needs to know which kind it has:

* ``past_key_validity(cache, slot, attention_mask, batch)`` -> which stored slots are real tokens,
  ``[B, 1 or H_kv, past]`` (or ``None`` = all), and the physical past length;
* ``observe_attention(cache, slot, query, bias, scaling)`` -> lets a scoring cache see this step's queries.

One eviction mechanism serves every policy (as in NVIDIA's kvpress, policies are configurations):

* A2SF (Jo & Shin, arXiv 2407.20485): score of a stored token after ``n`` queries is
  ``A[n, k] = sum_{t <= n} alpha^(n - t) * S[t, k]`` with ``S`` the softmax attention probabilities,
  summed over the query heads of each KV head (GQA), so evicting a slot really frees shared K/V.
* H2O is A2SF with ``alpha = 1``; StreamingLLM keeps only sink + recent tokens and needs no scores.
* After each forward step the layer keeps, per (batch row, KV head), the first ``sink`` real tokens, the
  last ``recent`` real tokens and the highest-scoring others, up to the layer's budget.

Eviction is position-safe because RoPE is applied before keys are cached; ``get_seq_length()`` stays the
LOGICAL number of tokens seen so ``cache_position`` and RoPE positions stay right, while the attention
mask comes from the per-slot validity kept here (the 2-D mask is in logical positions and is wrong once
slots have been evicted or with left padding).

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

# transformers >= 5.24 calls the cache of model outputs (and the forward argument) ``cache``; earlier
# releases ``past_key_values``. The runtime accepts both and returns the installed release's name.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"

POLICIES = ("a2sf", "h2o", "streaming", "none")
EVICTING_POLICIES = ("a2sf", "h2o", "streaming")

# Defaults, measured. DESIGN.md §3 (pycoder-8m, 384-token prompt in a 76-token budget) found a 75%
# recent window three times better than 25%, so the split is exposed and defaults to 75%. For alpha it
# reported 0.1 best with eviction during decoding, but our own benchmark (benchmarks/a2sf_quality.py:
# pycoder-8m, 384 prompt + 64 decoded tokens, budgets 10/20/50%, pycode and wikitext2) found alpha = 0.9
# best in 5 of 6 cells and 0.1 mid-pack, so the default follows our measurement.
DEFAULT_ALPHA = 0.9
DEFAULT_RECENT_RATIO = 0.75
# StreamingLLM's own choice: four attention-sink tokens. A2SF/H2O protect none by default (as measured):
# the first tokens collect attention from every query, so they tend to win on score anyway.
DEFAULT_STREAMING_SINK = 4
DEFAULT_CHUNK_SIZE = 128


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

    * ``policy`` -- ``a2sf``, ``h2o`` (A2SF with alpha 1), ``streaming`` (sink + recent) or ``none``.
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
    chunk_size: int = DEFAULT_CHUNK_SIZE

    # ---- (de)serialisation -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CachePolicy:
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

    # ---- validation and resolution ------------------------------------------------------------------

    @property
    def evicts(self) -> bool:
        return self.policy in EVICTING_POLICIES

    @property
    def scores_attention(self) -> bool:
        """A2SF and H2O rank tokens by accumulated attention; StreamingLLM keeps by position alone."""
        return self.policy in ("a2sf", "h2o")

    @property
    def effective_alpha(self) -> float:
        if self.policy == "h2o":
            return 1.0
        return DEFAULT_ALPHA if self.alpha is None else self.alpha

    @property
    def effective_sink(self) -> int:
        if self.sink is not None:
            return self.sink
        return DEFAULT_STREAMING_SINK if self.policy == "streaming" else 0

    @property
    def truncation_bound(self) -> float:
        """Largest error ``score_window`` can cause in one query head's score of a key (0 when exact)."""
        alpha = self.effective_alpha
        if self.score_window is None or alpha >= 1.0:
            return 0.0
        return alpha**self.score_window / (1.0 - alpha)

    def validate(self, num_slots: int | None = None) -> None:
        """Raise ``ValueError`` saying what is wrong and how to fix it.

        ``num_slots`` (the model's cache slots, when known) also checks the length of ``layer_budgets``.
        """
        _require(
            self.policy in POLICIES, f"kv_cache policy {self.policy!r} is unknown; choose one of {POLICIES}"
        )
        for name in ("budget", "recent", "sink", "score_window", "chunk_size"):
            value = getattr(self, name)
            _require(
                value is None or _is_count(value), f"kv_cache {name}={value!r} must be a non-negative integer"
            )
        for name in ("budget", "score_window", "chunk_size"):
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
        if not self.evicts:
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
        _require(
            self.policy != "h2o" or self.alpha in (None, 1.0),
            f"h2o is A2SF with alpha=1; use policy=a2sf for alpha={self.alpha}",
        )
        if self.policy == "streaming":
            extra = [
                name
                for name in ("alpha", "recent", "recent_ratio", "score_window")
                if getattr(self, name) is not None
            ]
            _require(
                not extra,
                f"streaming keeps sink + the last budget - sink tokens and scores nothing; remove {extra}",
            )
        _require(
            self.recent is None or self.recent_ratio is None,
            "give the recent window either as recent (tokens) or as recent_ratio (fraction of the budget), not both",
        )
        _require(
            self.score_window is None or self.effective_alpha < 1.0,
            "score_window needs alpha < 1: with alpha = 1 every query row counts fully",
        )
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
            sink, recent = self.effective_sink, self._recent_for(budget)
            _require(
                budget >= sink + recent,
                f"kv_cache budget {budget} is smaller than sink {sink} + recent {recent}; raise it or shrink them",
            )

    def _recent_for(self, budget: int) -> int:
        if self.policy == "streaming":
            return max(budget - self.effective_sink, 0)
        if self.recent is not None:
            return self.recent
        ratio = DEFAULT_RECENT_RATIO if self.recent_ratio is None else self.recent_ratio
        return math.floor(ratio * budget)

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
        recent = self._recent_for(budget)
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
    accumulated attention), ``valid`` (False = padding, never attended) and ``positions`` (logical index of
    the token, for inspection). ``seen`` counts the logical tokens that went through the layer.
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
        self.is_initialized = False
        self.seen = 0
        self.limits: LayerLimits | None = None

    # ---- storage --------------------------------------------------------------------------------------

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, cache_kwargs: dict[str, Any] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, heads, q_len, _ = key_states.shape
        device = key_states.device
        new_valid = (cache_kwargs or {}).get("new_valid")
        if new_valid is None:
            valid = torch.ones(batch, heads, q_len, dtype=torch.bool, device=device)
        else:
            valid = new_valid.to(device=device, dtype=torch.bool)[:, None, :].expand(batch, heads, q_len)
        positions = torch.arange(self.seen, self.seen + q_len, device=device).expand(batch, heads, q_len)
        scores = torch.zeros(batch, heads, q_len, dtype=torch.float32, device=device)  # unseen tokens score 0
        if not self.is_initialized:
            self.dtype, self.device = key_states.dtype, device
            self.is_initialized = True
            # The first forward is the prompt: a ratio budget is resolved against its (padded) length.
            self.limits = self.policy.limits(self.slot, q_len)
            self.keys, self.values = key_states, value_states
            self.valid, self.positions, self.scores = valid.clone(), positions.clone(), scores
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            self.valid = torch.cat([self.valid, valid], dim=-1)
            self.positions = torch.cat([self.positions, positions], dim=-1)
            self.scores = torch.cat([self.scores, scores], dim=-1)
        self.seen += q_len
        return self.keys, self.values

    def get_seq_length(self) -> int:
        """Logical tokens seen (what ``cache_position`` and RoPE count), not the stored length."""
        return self.seen

    def physical_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0

    def key_validity(self) -> torch.Tensor | None:
        """``[B, H_kv, P]``: which stored slots hold real tokens (``None`` before the first update)."""
        return self.valid

    def kept_positions(self) -> torch.Tensor | None:
        """``[B, H_kv, P]`` logical position of each stored token, -1 for padding slots."""
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

    def observe(self, query: torch.Tensor, bias: torch.Tensor | None, scaling: float) -> None:
        """Accumulate this step's attention probabilities, then evict down to the budget."""
        if self.limits is None:
            return
        if self.policy.scores_attention:
            self._accumulate(query, bias, scaling)
        if self.physical_length() > self.limits.budget:
            self._evict()

    def _accumulate(self, query: torch.Tensor, bias: torch.Tensor | None, scaling: float) -> None:
        """``A <- alpha^q * A + sum_t alpha^(q-1-t) * P_t`` over this step's q query rows, per KV head."""
        batch, n_heads, q_len, dim = query.shape
        kv_heads, phys = self.keys.shape[1], self.keys.shape[2]
        groups = n_heads // kv_heads
        alpha = self.policy.effective_alpha
        queries = query.float().view(batch, kv_heads, groups, q_len, dim)
        keys_t = self.keys.float().transpose(-1, -2)[:, :, None]  # [B, H_kv, 1, D, P]
        if bias is not None:
            # The attention's own bias, [B, 1 | H_kv | H, q, P] -> [B, 1 | H_kv, 1 | G, q, P].
            heads = bias.shape[1]
            bias = bias.float().reshape(
                bias.shape[0], heads // groups if heads == n_heads else heads, -1, q_len, phys
            )
        # Rows of padding tokens see no real key (their softmax spreads over masked slots): they score nothing.
        row_weight = self.valid[:, :, phys - q_len :].float()
        row_weight = row_weight * alpha ** torch.arange(
            q_len - 1, -1, -1, device=query.device, dtype=torch.float32
        )
        first = 0
        if self.policy.score_window is not None:
            first = max(0, q_len - self.policy.score_window)  # older rows weigh at most alpha^W each
        acc = torch.zeros(batch, kv_heads, phys, dtype=torch.float32, device=query.device)
        for start in range(first, q_len, self.policy.chunk_size):
            stop = min(q_len, start + self.policy.chunk_size)
            logits = queries[:, :, :, start:stop] @ keys_t * scaling  # [B, H_kv, G, c, P]
            if bias is None:
                # No bias means plain causal attention: query row t sees stored slots up to phys - q_len + t.
                rows = torch.arange(start, stop, device=query.device)[:, None] + (phys - q_len)
                future = torch.arange(phys, device=query.device)[None, :] > rows
                logits = logits.masked_fill(future, float("-inf"))
            else:
                logits = logits + bias[..., start:stop, :]
            probs = logits.softmax(dim=-1).sum(dim=2)  # GQA: the KV head's score is its group's sum
            acc += torch.einsum("bhc,bhcp->bhp", row_weight[:, :, start:stop], probs)
        self.scores = alpha**q_len * self.scores + acc

    def _evict(self) -> None:
        """Keep sink ∪ recent ∪ top-k by score, per (batch row, KV head), in their original order."""
        limits = self.limits
        valid = self.valid
        rank = valid.long().cumsum(dim=-1) - 1  # index of each slot among its row's real tokens
        n_real = valid.sum(dim=-1, keepdim=True)
        protected = valid & ((rank < limits.sink) | (rank >= n_real - limits.recent))
        # Protected tokens outrank every score and padding ranks below everything, so padding only fills
        # slots that a row with fewer real tokens than the budget cannot fill (and stays invalid there).
        priority = self.scores.masked_fill(protected, float("inf")).masked_fill(~valid, float("-inf"))
        keep = priority.topk(limits.budget, dim=-1).indices.sort(dim=-1).values
        self._gather(keep)

    def _gather(self, keep: torch.Tensor) -> None:
        # Values may be wider than keys (SAS identity values under GQA), so each gets its own index.
        self.keys = self.keys.gather(2, keep[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        self.values = self.values.gather(2, keep[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        self.scores = self.scores.gather(2, keep)
        self.valid = self.valid.gather(2, keep)
        self.positions = self.positions.gather(2, keep)

    # ---- batch manipulation (generate(): sampling, beams, contrastive search) ---------------------------

    def _map_batch(self, fn: Any) -> None:
        if self.is_initialized:
            for name in ("keys", "values", "scores", "valid", "positions"):
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
        for name in ("scores", "valid", "positions"):
            setattr(self, name, getattr(self, name)[..., :max_length])
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

    def observe(self, slot: int, query: torch.Tensor, bias: torch.Tensor | None, scaling: float) -> None:
        self.layers[slot].observe(query, bias, scaling)

    def physical_lengths(self) -> list[int]:
        return [layer.physical_length() for layer in self.layers]


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


def observe_attention(
    cache: Cache, slot: int, query: torch.Tensor, bias: torch.Tensor | None, scaling: float
) -> None:
    observe = getattr(cache, "observe", None)
    if observe is not None:
        observe(slot, query, bias, scaling)
