"""Perplexity per evaluation window, and paired-bootstrap confidence intervals over those windows.

A perplexity is ``exp(sum of token NLLs / tokens)`` over disjoint windows. Two models scored on the same
windows are compared by resampling the windows with replacement (the same resample for both: paired) and
recomputing the ratio of their perplexities; the 2.5th and 97.5th percentiles of the ratios are the 95%
interval. A claim "B is better than A" is made only when the whole interval lies below 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from slimformer.converter.evaluation import perplexity_of_tokens


@dataclass(frozen=True)
class WindowNLL:
    """Summed next-token NLL (nats) and scored token count of each evaluation window."""

    nll: tuple[float, ...]
    tokens: tuple[int, ...]

    @property
    def perplexity(self) -> float:
        return math.exp(sum(self.nll) / sum(self.tokens))

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity": self.perplexity,
            "window_nll": list(self.nll),
            "window_tokens": list(self.tokens),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowNLL:
        return cls(tuple(data["window_nll"]), tuple(data["window_tokens"]))


def window_nll(model: torch.nn.Module, windows: torch.Tensor) -> WindowNLL:
    """Score each row of ``windows`` (``LongTensor[n, T]``) on its own: every token but the row's first.

    The sum over rows equals what :func:`perplexity_of_tokens` gives for the same tokens as one stream cut
    into disjoint windows of ``T`` (the converter's ``--eval-ppl`` measurement with ``--window T``)."""
    nll, tokens = [], []
    for row in windows:
        result = perplexity_of_tokens(model, row, window=windows.shape[1])
        nll.append(result.nll * result.n_tokens)
        tokens.append(result.n_tokens)
    return WindowNLL(tuple(nll), tuple(tokens))


def _resamples(n: int, samples: int, seed: int) -> torch.Tensor:
    return torch.randint(0, n, (samples, n), generator=torch.Generator().manual_seed(seed))


def perplexity_interval(a: WindowNLL, samples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of one perplexity (windows resampled)."""
    nll, tokens = torch.tensor(a.nll, dtype=torch.float64), torch.tensor(a.tokens, dtype=torch.float64)
    idx = _resamples(len(a.nll), samples, seed)
    values = torch.exp(nll[idx].sum(1) / tokens[idx].sum(1))
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return low, high


def compare(a: WindowNLL, b: WindowNLL, samples: int = 10000, seed: int = 0) -> dict[str, Any]:
    """Perplexity of ``b`` relative to ``a`` on the same windows: the ratio, its paired 95% interval, and the
    change in percent with its interval. ``b_better`` / ``b_worse`` only when the interval excludes 1."""
    if a.tokens != b.tokens:
        raise ValueError("a paired comparison needs the same evaluation windows for both models")
    diff = torch.tensor(b.nll, dtype=torch.float64) - torch.tensor(a.nll, dtype=torch.float64)
    tokens = torch.tensor(a.tokens, dtype=torch.float64)
    idx = _resamples(len(a.nll), samples, seed)
    ratios = torch.exp(diff[idx].sum(1) / tokens[idx].sum(1))
    low, high = torch.quantile(ratios, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    ratio = b.perplexity / a.perplexity
    return {
        "ratio": ratio,
        "ci95": [low, high],
        "change_pct": 100 * (ratio - 1),
        "change_pct_ci95": [100 * (low - 1), 100 * (high - 1)],
        "b_better": high < 1.0,
        "b_worse": low > 1.0,
        "windows": len(a.nll),
        "bootstrap_samples": samples,
    }
