"""Train a tiny Llama-architecture language model on the Python standard library, from scratch.

The result is a small, self-made checkpoint for examples and tests: it needs no download, its training data
is on every machine with Python, and it is fully reproducible from this script.

Steps, top to bottom:

1. read the CPython standard library's ``.py`` files, split into ``train``/``valid`` by
   :func:`converter.calibration.stdlib_files` (1 file in 10 is held out);
2. train a byte-level BPE tokenizer (``tokenizers``) on the train files and wrap it as a
   ``transformers.PreTrainedTokenizerFast`` (``<|endoftext|>`` is BOS and EOS, ``<|pad|>`` is padding);
3. tokenise each split and join its documents with EOS;
4. train a ``LlamaForCausalLM`` (GQA, RoPE, tied embeddings) with AdamW, linear warmup and cosine decay on
   random windows of the train stream;
5. measure the loss and perplexity on consecutive windows of the valid stream;
6. save model, tokenizer, generation config, ``training_log.json`` and a ``README.md`` model card.

Run from the repository root (with the package installed, e.g. ``pip install -e .``)::

    python examples/train_tiny_lm.py --out examples/models/tiny-stdlib-lm

Progress goes to stderr. The data depends on the Python version that runs the script (its standard
library), which ``training_log.json`` records.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import sys
import sysconfig
import time
from pathlib import Path

import tokenizers
import torch
import transformers
from slimformer.converter.calibration import stdlib_files
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MAX_POSITIONS = 512


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=Path("examples/models/tiny-stdlib-lm"), help="output directory"
    )
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps")
    parser.add_argument("--seq-len", type=int, default=256, help="training context length in tokens")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final learning rate / peak")
    parser.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices only)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and batch sampling")
    parser.add_argument("--layers", type=int, default=6, help="decoder layers")
    parser.add_argument("--hidden", type=int, default=128, help="hidden size")
    parser.add_argument("--heads", type=int, default=4, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    parser.add_argument("--intermediate", type=int, default=None, help="MLP size (default: ~2.75 x hidden)")
    parser.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary size, special tokens included"
    )
    parser.add_argument("--eval-windows", type=int, default=0, help="valid windows to score (0: all of them)")
    parser.add_argument("--log-every", type=int, default=25, help="print progress every N steps")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--max-size-mb", type=float, default=8.0, help="refuse a model whose weights exceed this"
    )
    return parser.parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    transformers.set_seed(seed)


# --- data and tokenizer -------------------------------------------------------------------------------


def read_documents(split: str) -> list[str]:
    """The non-empty standard-library source files of one split, in sorted path order."""
    texts = (path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files(split))
    return [text for text in texts if text.strip()]


def train_tokenizer(documents: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on ``documents``, wrapped for ``transformers``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> torch.Tensor:
    """All documents tokenised and concatenated, each followed by EOS, as one ``LongTensor``."""
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def check_round_trip(tokenizer: PreTrainedTokenizerFast, documents: list[str]) -> bool:
    """Whether decode(encode(text)) gives back each of a few documents exactly."""
    return all(
        tokenizer.decode(tokenizer.encode(doc, add_special_tokens=False, verbose=False)) == doc
        for doc in documents
    )


# --- model --------------------------------------------------------------------------------------------


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    intermediate = args.intermediate or 32 * round(2.75 * args.hidden / 32)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    return LlamaForCausalLM(config)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


# --- training -----------------------------------------------------------------------------------------


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW that decays weight matrices and leaves norms (1-D parameters) alone."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def sample_batch(
    stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len`` tokens from random offsets of ``stream``."""
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[start : start + seq_len] for start in starts.tolist()])


def consecutive_windows(stream: torch.Tensor, seq_len: int, limit: int = 0) -> torch.Tensor:
    """The stream cut into non-overlapping windows; ``limit`` > 0 keeps that many, evenly spaced."""
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    if 0 < limit < len(windows):
        windows = windows[torch.linspace(0, len(windows) - 1, limit).round().long()]
    return windows


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int) -> float:
    """Token-weighted mean next-token cross-entropy over ``windows`` (every window predicts seq_len - 1)."""
    model.eval()
    total = 0.0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        total += model(input_ids=batch, labels=batch).loss.item() * len(batch)
    model.train()
    return total / len(windows)


def train(
    model: LlamaForCausalLM, stream: torch.Tensor, args: argparse.Namespace
) -> tuple[list[dict[str, float]], float]:
    """Run the optimisation loop; returns the logged history and the training wall time in seconds."""
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args.warmup, args.steps, args.min_lr_ratio)
    )
    generator = torch.Generator().manual_seed(args.seed)
    history: list[dict[str, float]] = []
    recent: list[float] = []
    model.train()
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = sample_batch(stream, args.batch_size, args.seq_len, generator)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        optimizer.step()
        schedule.step()
        recent.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            entry = {
                "step": step,
                "loss": sum(recent) / len(recent),
                "lr": optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "elapsed_s": round(elapsed, 1),
            }
            history.append(entry)
            recent.clear()
            tokens_per_s = step * args.batch_size * args.seq_len / elapsed
            log(
                f"step {step:5d}/{args.steps}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  "
                f"grad {grad_norm:.2f}  {tokens_per_s:,.0f} tok/s  {elapsed:.0f}s"
            )
    return history, time.perf_counter() - started


# --- outputs ------------------------------------------------------------------------------------------


def directory_size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.iterdir() if file.is_file())


def write_model_card(out: Path, record: dict) -> None:
    """A short ``README.md``: what the model is, how it was trained, how well it does."""
    config, data, valid, schedule = (
        record["model_config"],
        record["data"],
        record["valid"],
        record["lr_schedule"],
    )
    epochs = record["tokens_seen"] / data["train_tokens"]
    card = f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [llama, tiny, python, code, slimformer]
---

# tiny-stdlib-lm

A {record["parameters"] / 1e6:.2f}M-parameter Llama-architecture causal language model trained from scratch \
by the slimformer project on the Python {record["python_version"]} standard library's own source code. It \
is a small, self-made, reproducible checkpoint for slimformer's examples and tests: it writes \
Python-looking code, but it is not a useful code model.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("examples/models/tiny-stdlib-lm")
model = AutoModelForCausalLM.from_pretrained("examples/models/tiny-stdlib-lm")
ids = tokenizer("def get_", return_tensors="pt").input_ids
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))
```

End prompts without a trailing space: like GPT-2's, the tokenizer attaches a space to the word \
after it, so a prompt ending in a space is out of distribution (`"def "` drifts; `"def"` does not).

## Model

- `LlamaForCausalLM`: {config["num_hidden_layers"]} layers, hidden size {config["hidden_size"]}, \
MLP size {config["intermediate_size"]}, {config["num_attention_heads"]} query heads and \
{config["num_key_value_heads"]} key/value heads (GQA), RoPE (theta {config["rope_theta"]:g}), RMSNorm, SiLU, \
tied input/output embeddings, {config["max_position_embeddings"]} positions, float32 safetensors.
- Tokenizer: byte-level BPE with {record["tokenizer"]["vocab_size"]} tokens trained on the train files. \
`{EOS_TOKEN}` is both BOS and EOS (it separates files), `{PAD_TOKEN}` is padding; no BOS is added on encode.

## Training

- Data: the `.py` files of the CPython standard library (without `test`, `idlelib`, `lib2to3`, \
`tkinter`, `turtledemo` and `site-packages`), split by a hash of each file's relative path with \
`converter.calibration.stdlib_files`: {data["train_files"]} train files ({data["train_tokens"]:,} tokens) \
and {data["valid_files"]} valid files ({data["valid_tokens"]:,} tokens), joined with EOS.
- {record["steps"]} AdamW steps of {record["batch_size"]} random windows x {record["seq_len"]} tokens \
({record["tokens_seen"] / 1e6:.1f}M tokens, {epochs:.1f} epochs); peak learning rate {schedule["peak_lr"]:g}, \
{schedule["warmup_steps"]} warmup steps, then cosine decay to {schedule["min_lr"]:g}; weight decay \
{record["weight_decay"]}, gradient clipping 1.0, seed {record["seed"]}; {record["threads"]} CPU threads, \
{record["train_wall_s"] / 60:.1f} minutes of training.

Reproduce from the repository root (the same Python version gives the same data):

```
{record["command"]}
```

## Evaluation

On {valid["windows"]} non-overlapping {record["seq_len"]}-token windows of the held-out valid files \
({valid["tokens_scored"]:,} predicted tokens): \
**loss {valid["loss"]:.3f}, perplexity {valid["perplexity"]:.1f}** (uniform guessing: \
{record["tokenizer"]["vocab_size"]}). Train loss over the last logged steps: {record["final_train_loss"]:.3f}.

## Licence and data

The training data is the CPython standard library, copyright the Python Software Foundation, under the \
PSF License Version 2. The model was trained by the slimformer project with \
`examples/train_tiny_lm.py`; `training_log.json` holds the full configuration and loss history.
"""
    (out / "README.md").write_text(card, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    script_started = time.perf_counter()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))  # tokenizers' thread pool
    seed_everything(args.seed)

    train_docs, valid_docs = read_documents("train"), read_documents("valid")
    log(f"stdlib {sysconfig.get_paths()['stdlib']}: {len(train_docs)} train / {len(valid_docs)} valid files")

    tokenizer = train_tokenizer(train_docs, args.vocab_size)
    round_trip = check_round_trip(tokenizer, valid_docs[:20])
    log(f"tokenizer: {len(tokenizer)} tokens, exact round trip on valid files: {round_trip}")
    train_stream = encode_documents(tokenizer, train_docs)
    valid_stream = encode_documents(tokenizer, valid_docs)
    chars_per_token = sum(map(len, train_docs)) / len(train_stream)
    log(
        f"tokens: {len(train_stream):,} train, {len(valid_stream):,} valid ({chars_per_token:.2f} chars/token)"
    )

    model = build_model(args, tokenizer)
    params = parameter_count(model)
    size_mb = params * 4 / 1e6
    log(f"model: {params:,} parameters, ~{size_mb:.2f} MB in float32")
    if size_mb > args.max_size_mb:
        sys.exit(f"model weights would take {size_mb:.2f} MB > --max-size-mb {args.max_size_mb}; shrink it")

    history, train_wall = train(model, train_stream, args)

    valid_windows = consecutive_windows(valid_stream, args.seq_len, args.eval_windows)
    valid_loss = mean_loss(model, valid_windows, args.batch_size)
    train_eval_loss = mean_loss(model, consecutive_windows(train_stream, args.seq_len, 256), args.batch_size)
    log(
        f"valid: loss {valid_loss:.4f}, perplexity {math.exp(valid_loss):.2f} on {len(valid_windows)} windows"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=128,
        do_sample=False,
    )
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)

    record = {
        "description": "tiny Llama-architecture LM trained from scratch on the CPython standard library",
        "command": shlex.join(["python", *sys.argv])
        if argv is None
        else shlex.join(["python", sys.argv[0], *argv]),
        "model_config": model.config.to_diff_dict() | {"rope_theta": model.config.rope_theta},
        "parameters": params,
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)",
            "vocab_size": len(tokenizer),
            "bos_token": EOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
            "exact_round_trip_on_20_valid_files": round_trip,
            "train_chars_per_token": round(chars_per_token, 3),
        },
        "data": {
            "source": "converter.calibration.stdlib_files('train' / 'valid')",
            "stdlib_root": sysconfig.get_paths()["stdlib"],
            "train_files": len(train_docs),
            "valid_files": len(valid_docs),
            "train_tokens": len(train_stream),
            "valid_tokens": len(valid_stream),
            "document_separator": EOS_TOKEN,
        },
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-8), grad clip 1.0",
        "weight_decay": args.weight_decay,
        "lr_schedule": {
            "type": "linear warmup + cosine decay",
            "peak_lr": args.lr,
            "warmup_steps": args.warmup,
            "min_lr": args.lr * args.min_lr_ratio,
        },
        "seed": args.seed,
        "threads": args.threads,
        "final_train_loss": history[-1]["loss"],
        "train_eval_loss_256_windows": train_eval_loss,
        "valid": {
            "windows": len(valid_windows),
            "tokens_scored": len(valid_windows) * (args.seq_len - 1),
            "loss": valid_loss,
            "perplexity": math.exp(valid_loss),
        },
        "train_wall_s": round(train_wall, 1),
        "total_wall_s": None,
        "history": history,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "python_version": platform.python_version(),
    }
    record["total_wall_s"] = round(time.perf_counter() - script_started, 1)
    write_model_card(args.out, record)
    (args.out / "training_log.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    total_mb = directory_size(args.out) / 1e6
    log(f"saved {args.out} ({total_mb:.2f} MB) in {record['total_wall_s']:.0f}s total")
    if total_mb > args.max_size_mb:
        log(f"warning: {args.out} is {total_mb:.2f} MB, over --max-size-mb {args.max_size_mb}")


if __name__ == "__main__":
    main()
