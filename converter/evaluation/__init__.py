"""Measuring a model's quality and speed: perplexity, multiple-choice accuracy, prefill/decode throughput.

Every pass, the CLI and the benchmarks judge a model through these functions, so they work on *any*
Hugging Face causal LM -- anything called as ``model(input_ids=, attention_mask=, past_key_values=,
use_cache=)`` that returns ``.logits`` (and ``.past_key_values`` for :func:`speed_probe`) -- plus its
tokenizer. Nothing here depends on a particular architecture.

* :func:`perplexity` / :func:`perplexity_of_tokens` -- sliding-window perplexity of a text source (any
  spec :mod:`converter.calibration` understands) or of a token tensor.
* :func:`multiple_choice_accuracy` / :func:`loglikelihoods` -- zero-shot accuracy on an llm-foundry ICL
  ``.jsonl`` task, scored the way lm-evaluation-harness scores it.
* :func:`speed_probe` -- prefill and decode tokens/s from a hand-written greedy decode loop.
* :func:`eviction_perplexity` / :func:`eviction_perplexity_of_tokens` -- perplexity of continuations
  *decoded* after a prompt, so that a KV cache which evicts tokens after each forward really shapes the
  scores (see "Quality under KV-cache eviction" below); ``loglikelihoods`` / ``multiple_choice_accuracy``
  take ``decode_chunk=`` for the same protocol.

``cache_factory`` (everywhere): an optional callable returning a *fresh* ``past_key_values`` object
(e.g. an evicting KV cache) that is passed into every forward, so a cache op's effect on quality and
speed is measured by exactly the same code as the plain model. ``None`` passes no cache -- except in the
decode protocol (``eviction_perplexity*``, ``decode_chunk=``), which always runs with a cache: there
``None`` means the one the model builds itself with ``use_cache=True`` (for a slimformer checkpoint, the
policy stored in its ``config.kv_cache``).

Quality under KV-cache eviction: an evicting cache drops tokens *after* each forward. A sequence scored
in one forward therefore attends to every token and measures nothing of the eviction -- ``perplexity``
with an evicting ``cache_factory`` equals the plain number. The decode protocol measures it the way
``generate()`` meets it: the prompt is prefilled in one forward (the cache then evicts down to its
budget; a ``budget_ratio`` resolves against this prompt), and the continuation is teacher-forced
``chunk`` tokens per forward (1 = exactly token-by-token decoding; larger chunks are faster and let the
cache hold up to ``budget + chunk - 1`` tokens while a chunk is scored). The first continuation token is
predicted by the prefill forward, before anything is evicted, exactly as in ``generate()``.

All likelihood arithmetic is done in float64 on the scored positions, so a result does not depend on
the batch size beyond the model's own floating-point noise.
"""

from .eviction import EvictionPerplexityResult, eviction_perplexity, eviction_perplexity_of_tokens
from .multiple_choice import EVALS_DIR_ENV, MCResult, loglikelihoods, multiple_choice_accuracy
from .perplexity import PerplexityResult, perplexity, perplexity_of_tokens
from .speed import SpeedResult, speed_probe

__all__ = [
    "EVALS_DIR_ENV",
    "EvictionPerplexityResult",
    "MCResult",
    "PerplexityResult",
    "SpeedResult",
    "eviction_perplexity",
    "eviction_perplexity_of_tokens",
    "loglikelihoods",
    "multiple_choice_accuracy",
    "perplexity",
    "perplexity_of_tokens",
    "speed_probe",
]
