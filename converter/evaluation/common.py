"""Model plumbing every evaluation shares: device and dtype, eval mode, batched logits, float64
log-probabilities."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from slimformer.converter.progress import progress_bar

CacheFactory = Callable[[], Any]


def _model_device(model: torch.nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    for param in model.parameters():
        return param.dtype
    return torch.get_default_dtype()


def _max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model was built for, from its config, or ``None`` if it does not say."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module) -> Iterator[None]:
    """``eval()`` + ``inference_mode`` for the duration, then the caller's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def _logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    cache_factory: CacheFactory | None,
) -> torch.Tensor:
    """One scoring forward. A cache only goes in when the caller supplies one: that is how a cache op
    (e.g. eviction during prefill) takes part in the measurement; otherwise no cache is built at all."""
    if cache_factory is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache_factory(),
            use_cache=True,
        )
    return out.logits


def _sync(device: torch.device) -> None:
    # Kernels run asynchronously on accelerators; without a sync the clock would measure launch time.
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` per position, float64: ``logits [..., vocab]`` and ``targets [...]``."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _token_logprob_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum of ``log p(target_i)`` for rows ``logits[i]`` (shape ``[n, vocab]``), computed in float64."""
    return float(_token_logprobs(logits, targets).sum())


def _progress(total: int, desc: str, enabled: bool) -> Any:
    return progress_bar(total, desc, enabled)
