"""Zero-shot multiple-choice accuracy on llm-foundry ICL ``.jsonl`` tasks, scored as lm-evaluation-harness scores them."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from slimformer.converter.errors import SlimformerError

from .common import (
    CacheFactory,
    _evaluating,
    _logits,
    _max_positions,
    _model_device,
    _progress,
    _token_logprob_sum,
)
from .eviction import _decoded_logprobs

# Environment variable naming a directory of ICL ``.jsonl`` files, so tasks can be named ("copa").
EVALS_DIR_ENV = "SLIMFORMER_EVALS_DIR"


@dataclass(frozen=True)
class MCResult:
    """Zero-shot multiple-choice accuracy; the stderrs are lm-eval's (sample std of the mean)."""

    task: str
    source: str
    n: int
    acc: float
    acc_norm: float
    acc_stderr: float | None
    acc_norm_stderr: float | None
    # The choice ``acc`` picked for each example, in file order: two runs (say with and without KV-cache
    # eviction) can then be compared example by example, which still means something at chance accuracy.
    predictions: tuple[int, ...] = ()
    # The choice ``acc_norm`` picked, and the gold answer, per example: with them every per-example
    # correctness (for a paired comparison of two models, say) can be recomputed from a result alone.
    norm_predictions: tuple[int, ...] = ()
    golds: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Example:
    requests: list[tuple[str, str]]  # (context, continuation) per choice
    norm_lengths: list[int]  # characters each choice's score is divided by for acc_norm
    gold: int


def _join(context: str, text: str) -> str:
    """The continuation as appended to ``context``: one space between them unless either side already
    has whitespace there (piqa's queries end in a newline, for instance)."""
    if not context or context[-1].isspace() or text[:1].isspace():
        return text
    return " " + text


def _resolve_task(path_or_name: str, evals_dir: str | os.PathLike[str] | None) -> Path:
    path = Path(path_or_name).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise SlimformerError(
            "a multiple-choice task must be a .jsonl file, not a directory",
            where=str(path),
            fix="name one file in it",
        )
    # A bare name ("copa") is looked up in the evals directory, when one is configured.
    directory = evals_dir if evals_dir is not None else os.environ.get(EVALS_DIR_ENV)
    if directory and len(path.parts) == 1:
        candidate = Path(directory).expanduser() / (
            path.name if path.suffix == ".jsonl" else f"{path.name}.jsonl"
        )
        if candidate.is_file():
            return candidate
    raise SlimformerError(
        f"multiple-choice task {path_or_name!r} not found",
        where=str(directory) if directory else None,
        fix=f"give the path of an llm-foundry ICL .jsonl file, or a task name with {EVALS_DIR_ENV} (or evals_dir) set to its directory",
    )


def _parse_example(record: Any, where: str) -> _Example:
    fix = "each line must be {'query', 'choices', 'gold'} or {'context_options', 'continuation', 'gold'} (llm-foundry ICL format)"
    if not isinstance(record, dict):
        raise SlimformerError("a line is not a JSON object", where=where, fix=fix)
    if {"query", "choices", "gold"} <= record.keys():
        query, choices = record["query"], record["choices"]
        if (
            not isinstance(query, str)
            or not isinstance(choices, list)
            or not all(isinstance(c, str) for c in choices)
        ):
            raise SlimformerError(
                "'query' must be a string and 'choices' a list of strings", where=where, fix=fix
            )
        requests = [(query, _join(query, choice)) for choice in choices]
        norm_lengths = [len(choice) for choice in choices]
    elif {"context_options", "continuation", "gold"} <= record.keys():
        # Winogrande-style partial scoring: the options are contexts, the shared continuation is scored.
        options, continuation = record["context_options"], record["continuation"]
        if (
            not isinstance(continuation, str)
            or not isinstance(options, list)
            or not all(isinstance(o, str) for o in options)
        ):
            raise SlimformerError(
                "'context_options' must be a list of strings and 'continuation' a string",
                where=where,
                fix=fix,
            )
        requests = [(option, _join(option, continuation)) for option in options]
        norm_lengths = [len(continuation)] * len(options)
    else:
        raise SlimformerError(
            f"unknown multiple-choice format (keys: {sorted(record)})", where=where, fix=fix
        )
    gold = record["gold"]
    if len(requests) < 2:
        raise SlimformerError(
            f"an example needs at least 2 choices, this one has {len(requests)}", where=where, fix=fix
        )
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(requests):
        raise SlimformerError(
            f"'gold' must be a choice index in 0..{len(requests) - 1}, got {gold!r}", where=where, fix=fix
        )
    return _Example(requests=requests, norm_lengths=norm_lengths, gold=gold)


def _load_examples(path: Path, limit: int | None) -> list[_Example]:
    examples: list[_Example] = []
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        raise SlimformerError(
            f"cannot read multiple-choice task: {exc}", where=str(path), fix="check the file is readable"
        ) from exc
    with handle:
        for line_number, line in enumerate(handle, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{line_number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimformerError(
                    f"invalid JSON: {exc.msg}", where=where, fix="each line must be one JSON object"
                ) from exc
            examples.append(_parse_example(record, where))
    if not examples:
        raise SlimformerError(
            "multiple-choice task has no examples", where=str(path), fix="point at a non-empty .jsonl file"
        )
    return examples


def _bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer's own convention puts BOS in front of a text (Llama-style), else ``[]``.

    Texts are encoded without special tokens and this prefix is added once, so no tokenizer that also
    appends EOS (``add_special_tokens=True``) can smuggle one between context and continuation.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [int(bos)] if probe[:1] == [bos] else []


def _encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) such that the continuation ids are exactly the ones scored.

    As lm-evaluation-harness does: trailing whitespace of the context moves into the continuation, the
    joined text is encoded once, and the continuation is the tail after the encoded context -- so the
    continuation is tokenised as it would appear in running text (encoding it alone would give a
    different first token for SentencePiece tokenizers). If the tokenizer merges across the boundary
    (the context's ids are not a prefix of the joined ids), the continuation is encoded on its own.
    """
    stripped = context.rstrip()
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    if whole_ids[: len(context_ids)] == context_ids:
        return context_ids, whole_ids[len(context_ids) :]
    return context_ids, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def loglikelihoods(
    model: torch.nn.Module,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    progress: bool = False,
    cache_factory: CacheFactory | None = None,
    decode_chunk: int | None = None,
) -> list[float]:
    """``log p(continuation | context)`` for each ``(context, continuation)`` pair, in float64.

    The continuation is *not* joined to the context here: pass it with its leading space if it needs
    one. Tokenisation follows :func:`_encode_pair` (lm-eval's recipe); the tokenizer's BOS is put in
    front when its convention is to add one (otherwise, for an empty context, EOS serves as the only
    context token, as in lm-eval). Sequences longer than the model's ``max_position_embeddings`` are cut
    from the left. Requests are batched longest first with right padding and an attention mask.

    ``decode_chunk`` switches to the decode protocol (module docstring), for quality under KV-cache
    eviction: the context is the prompt, prefilled in one forward, and the continuation is fed
    ``decode_chunk`` tokens per forward through the same cache (``cache_factory()``, or the model's own).
    Requests with the same context (one example's choices) share a batch; others run one at a time.
    """
    if decode_chunk is not None and decode_chunk < 1:
        raise SlimformerError(
            f"decode_chunk must be at least 1 (got {decode_chunk})", fix="use 1 for token-by-token decoding"
        )
    if batch_size < 1:
        raise SlimformerError(f"batch size must be at least 1 (got {batch_size})", fix="raise the batch size")
    prefix = _bos_prefix(tokenizer)
    max_positions = _max_positions(model)

    # Per request: the model input, and how many of its final positions are scored.
    inputs: list[list[int]] = []
    targets: list[list[int]] = []
    for context, continuation in requests:
        context_ids, continuation_ids = _encode_pair(tokenizer, context, continuation)
        context_ids = prefix + context_ids
        if not context_ids:
            fallback = getattr(tokenizer, "eos_token_id", None)
            if fallback is None:
                raise SlimformerError(
                    "empty context and the tokenizer has neither BOS nor EOS to condition on",
                    fix="give every request a non-empty context",
                )
            context_ids = [int(fallback)]
        whole = context_ids + continuation_ids
        if max_positions is not None:
            whole = whole[-(max_positions + 1) :]
        model_input = whole[:-1]
        n_scored = min(len(continuation_ids), len(model_input))
        inputs.append(model_input)
        targets.append(whole[len(whole) - n_scored :] if n_scored else [])

    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else int(pad_id)
    if decode_chunk is not None:
        return _decoded_loglikelihoods(
            model, inputs, targets, batch_size, progress, cache_factory, decode_chunk, pad_id
        )

    # Longest first: similar lengths share a batch (little padding), and an out-of-memory shows at once.
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    device = _model_device(model)

    results = [0.0] * len(requests)
    with _evaluating(model), _progress(len(batches), "loglikelihood", progress) as bar:
        for batch in batches:
            length = len(inputs[batch[0]])
            input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
            for row, index in enumerate(batch):
                input_ids[row, : len(inputs[index])] = torch.tensor(inputs[index])
                attention_mask[row, : len(inputs[index])] = 1
            logits = _logits(model, input_ids.to(device), attention_mask.to(device), cache_factory)
            for row, index in enumerate(batch):
                n_scored, end = len(targets[index]), len(inputs[index])
                if n_scored:
                    target = torch.tensor(targets[index], device=logits.device)
                    results[index] = _token_logprob_sum(logits[row, end - n_scored : end], target)
            bar.update(1)
    return results


def _decoded_loglikelihoods(
    model: torch.nn.Module,
    inputs: list[list[int]],
    targets: list[list[int]],
    batch_size: int,
    progress: bool,
    cache_factory: CacheFactory | None,
    chunk: int,
    pad_id: int,
) -> list[float]:
    """The decode protocol for :func:`loglikelihoods`: prompt = the model input minus the scored tail."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, (model_input, target) in enumerate(zip(inputs, targets)):
        if target:  # nothing to score: log p = 0
            prompt = tuple(model_input[: len(model_input) - len(target) + 1])
            groups.setdefault(prompt, []).append(index)
    # Same prompt, same batch: the rows differ only in their continuations, so no prompt padding is needed
    # (padding inside the prompt would shift what an evicting cache keeps).
    batches = [
        (prompt, members[i : i + batch_size])
        for prompt, members in groups.items()
        for i in range(0, len(members), batch_size)
    ]
    device = _model_device(model)
    results = [0.0] * len(inputs)
    with _evaluating(model), _progress(len(batches), "loglikelihood (decode)", progress) as bar:
        for prompt, batch in batches:
            width = max(len(targets[index]) for index in batch)
            continuation = torch.full((len(batch), width), pad_id, dtype=torch.long)
            for row, index in enumerate(batch):
                continuation[row, : len(targets[index])] = torch.tensor(targets[index])
            prompt_ids = torch.tensor(prompt, dtype=torch.long).expand(len(batch), -1)
            logprobs, _ = _decoded_logprobs(
                model, prompt_ids.to(device), continuation.to(device), cache_factory, chunk
            )
            for row, index in enumerate(batch):
                results[index] = float(logprobs[row, : len(targets[index])].sum())
            bar.update(1)
    return results


def _stderr(p: float, n: int) -> float | None:
    # lm-eval's stderr of a mean of 0/1 scores: sample standard deviation over sqrt(n).
    return math.sqrt(p * (1.0 - p) / (n - 1)) if n > 1 else None


def multiple_choice_accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    path_or_name: str,
    *,
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    cache_factory: CacheFactory | None = None,
    evals_dir: str | os.PathLike[str] | None = None,
    decode_chunk: int | None = None,
) -> MCResult:
    """Zero-shot accuracy on one llm-foundry ICL ``.jsonl`` task, scored as lm-evaluation-harness does.

    ``path_or_name`` is a file path, or a bare task name (``copa``) looked up as ``NAME.jsonl`` in
    ``evals_dir`` (default: the ``SLIMFORMER_EVALS_DIR`` environment variable). ``limit`` keeps the
    first N examples of the file. Two line formats are understood:

    * ``{"query", "choices", "gold"}``: context = the query, continuation = the choice, joined by one
      space unless the query already ends in whitespace (piqa's end in a newline) or the choice starts
      with it; no "Answer:" or other template is added.
    * ``{"context_options", "continuation", "gold"}`` (Winogrande): each option is a context and the
      shared continuation (after a space) is scored -- lm-eval's partial scoring.

    Each choice scores ``log p(continuation | context)`` (see :func:`loglikelihoods` for tokenisation,
    BOS and truncation). ``acc`` picks the highest score; ``acc_norm`` divides each score by the
    character length of the choice text (without the joining space), lm-eval's ``acc_norm``; for
    Winogrande all choices share one continuation so ``acc_norm == acc``. Ties go to the first choice.
    ``decode_chunk`` scores under the decode protocol (the context is the prompt; see :func:`loglikelihoods`),
    which is what makes an evicting cache matter.
    """
    if limit is not None and limit < 1:
        raise SlimformerError(
            f"limit must be at least 1 (got {limit})", fix="raise the limit or leave it unset"
        )
    path = _resolve_task(path_or_name, evals_dir)
    examples = _load_examples(path, limit)
    requests = [request for example in examples for request in example.requests]
    scores = loglikelihoods(
        model,
        tokenizer,
        requests,
        batch_size=batch_size,
        progress=progress,
        cache_factory=cache_factory,
        decode_chunk=decode_chunk,
    )

    correct = correct_norm = 0
    predictions, norm_predictions = [], []
    offset = 0
    for example in examples:
        own = scores[offset : offset + len(example.requests)]
        offset += len(example.requests)
        normalised = [score / max(length, 1) for score, length in zip(own, example.norm_lengths)]
        predictions.append(max(range(len(own)), key=own.__getitem__))
        norm_predictions.append(max(range(len(own)), key=normalised.__getitem__))
        correct += predictions[-1] == example.gold
        correct_norm += norm_predictions[-1] == example.gold

    n = len(examples)
    acc, acc_norm = correct / n, correct_norm / n
    return MCResult(
        task=path.name.removesuffix(".jsonl"),
        source=str(path),
        n=n,
        acc=acc,
        acc_norm=acc_norm,
        acc_stderr=_stderr(acc, n),
        acc_norm_stderr=_stderr(acc_norm, n),
        predictions=tuple(predictions),
        norm_predictions=tuple(norm_predictions),
        golds=tuple(example.gold for example in examples),
    )
