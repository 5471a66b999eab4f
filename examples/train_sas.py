"""Train Pre-LN, SAS and SAS-P decoders of equal depth and width from scratch, and compare them.

The setting of He & Hofmann ("Simplifying Transformer Blocks", arXiv 2311.01906), scaled to a CPU: causal
language modelling of code (here the Python standard library, split as in ``train_tiny_lm.py``), AdamW with
lr 1e-3 and weight decay 0.1, context 128, the same data order, schedule and seed for every model. All models
are the slimformer runtime (``converter/runtime``), so they differ only in their blocks:

* ``prenorm`` -- the standard pre-norm block (RMSNorm, RoPE attention, SwiGLU MLP), all skips;
* ``sas`` -- shaped attention with identity values/projection and no attention skip; the MLP keeps its skip
  and norm, its branch scaled by beta_FF; the first layer's value stays trainable (``alpha I + beta dW``);
* ``sas_p`` -- attention and MLP in parallel on one shared norm, no skips;
* ``sas_p_nonorm`` -- SAS-P without norms (the first layer keeps its norm, as in the reference code).

SAS models start as the paper prescribes: ``W_Q = 0`` (so every attention sub-block is the identity), shaped
gains ``alpha = beta = gamma = 1``, ``beta_FF = 0.1 * sqrt(18 / layers)`` (0.1 at 18 layers, O(1/sqrt(L))).
``--value-proj reparam`` makes every SAS layer's value and projection ``alpha I + beta dW`` instead of the
identity (the form ``slimformer convert --sas`` folds exactly where no skip or norm is in the way).

Outputs: ``OUT.json`` (settings, per-step training loss of every model, validation loss, parameter counts,
training throughput measured during training and again interleaved across models after it) and ``OUT.png``
(loss versus step). ``--save-dir`` keeps the trained checkpoints (loadable by ``slimformer``).
``--throughput-only`` skips training and times the models alone (``OUT_throughput.json``), with as many
interleaved rounds as ``--timing-rounds`` asks: on a shared machine, more rounds and the best round are the
steadier measure.

The defaults are the full run: 3,000 steps of 16 x 128 tokens, about 0.4 s per step on one core of this
project's machine, so about 20 minutes per model. The README's table comes from a 1,000-step run and a
separate throughput measurement:

    python examples/train_sas.py --models prenorm,sas,sas_p,sas_p_nonorm --steps 1000 --timing-rounds 0
    python examples/train_sas.py --models prenorm,sas,sas_p,sas_p_nonorm --throughput-only --timing-rounds 7

GPU: ``--device cuda`` (and larger ``--hidden``/``--layers``/``--steps``).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's data and optimiser helpers
from slimformer.converter.runtime import SlimformerConfig, SlimformerForCausalLM  # noqa: E402
from slimformer.converter.runtime.configuration_slimformer import default_block_config  # noqa: E402
from train_tiny_lm import (  # noqa: E402
    consecutive_windows,
    encode_documents,
    log,
    lr_factor,
    make_optimizer,
    read_documents,
    sample_batch,
    seed_everything,
    train_tokenizer,
)

KINDS = ("prenorm", "sas", "sas_p", "sas_p_nonorm")
LABELS = {"prenorm": "Pre-LN", "sas": "SAS", "sas_p": "SAS-P", "sas_p_nonorm": "SAS-P, no norm"}
PAPER = {
    "source": "He & Hofmann, arXiv 2311.01906 (DESIGN.md section 4)",
    "parameter_reduction": "13-16% fewer parameters (CodeParrot 167M -> 146M; BERT 120M -> 101M)",
    "loss": "per-step loss parity with Pre-LN on CodeParrot (18 layers, d=768, lr 1e-3, AdamW, wd 0.1, context 128)",
    "throughput": "1.09x (SAS), 1.16x (SAS-P), 1.20x (SAS-P no norm) training throughput vs Pre-LN (BERT, GPU)",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", default="prenorm,sas,sas_p", help=f"comma-separated, from {', '.join(KINDS)}"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/sas_training"),
        help="writes OUT.json and OUT.png",
    )
    parser.add_argument(
        "--save-dir", type=Path, default=None, help="also save each trained model under DIR/KIND"
    )
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per model")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument(
        "--intermediate", type=int, default=None, help="SwiGLU width (default ~2.75 x hidden)"
    )
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument(
        "--value-proj",
        choices=("identity", "reparam"),
        default="identity",
        help="SAS value/projection maps: the identity (first layer's value trainable) or alpha I + beta dW everywhere",
    )
    parser.add_argument(
        "--mlp-gain",
        type=float,
        default=None,
        help="beta_FF at initialisation (default 0.1 * sqrt(18 / layers))",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=2048, help="BPE vocabulary trained on the train split"
    )
    parser.add_argument(
        "--tokenizer", type=Path, default=None, help="use this tokenizer instead of training one"
    )
    parser.add_argument(
        "--max-files",
        type=int,
        default=0,
        help="use only this many files per split (0: all; for smoke tests)",
    )
    parser.add_argument(
        "--eval-windows", type=int, default=64, help="validation windows scored after training"
    )
    parser.add_argument(
        "--timing-rounds", type=int, default=3, help="interleaved throughput rounds after training (0: none)"
    )
    parser.add_argument(
        "--timing-steps", type=int, default=10, help="training steps timed per model and round"
    )
    parser.add_argument(
        "--throughput-only",
        action="store_true",
        help="only time training steps of freshly initialised models (interleaved); writes OUT_throughput.json",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is steadier on a shared machine)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-every", type=int, default=50)
    args = parser.parse_args(argv)
    args.models = [kind.strip() for kind in args.models.split(",") if kind.strip()]
    unknown = sorted(set(args.models) - set(KINDS))
    if unknown:
        parser.error(f"unknown model kind(s) {unknown}; choose from {', '.join(KINDS)}")
    return args


# ---- models ---------------------------------------------------------------------------------------------


def block_configs(kind: str, layers: int, value_proj: str = "identity") -> list[dict[str, Any]]:
    """The runtime's per-layer block configs for one model kind (see ``converter/runtime/sas.py``)."""
    configs = [default_block_config() for _ in range(layers)]
    if kind == "prenorm":
        return configs
    for i, config in enumerate(configs):
        attention = config["attention"]
        # SAS-P without norms keeps the first layer's norm (the embeddings have no controlled scale).
        attention["form"] = "sas_p" if kind == "sas_p_nonorm" and i == 0 else kind
        if value_proj == "reparam":
            attention["value"] = attention["proj"] = "reparam"
        elif i == 0:
            attention["value"] = "reparam"  # the SAS recipe keeps the first layer's value trainable
    return configs


def build_model(
    kind: str, args: argparse.Namespace, vocab_size: int, eos_id: int, pad_id: int
) -> SlimformerForCausalLM:
    """A freshly initialised model of ``kind``; every kind has the same depth, width, heads and MLP."""
    intermediate = args.intermediate or 32 * round(2.75 * args.hidden / 32)
    config = SlimformerConfig(
        base_model_type="llama",
        block_configs=block_configs(kind, args.layers, args.value_proj),
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(512, args.seq_len),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    torch.manual_seed(args.seed)
    model = SlimformerForCausalLM(config)
    if kind != "prenorm":
        initialise_sas(
            model, args.mlp_gain if args.mlp_gain is not None else 0.1 * math.sqrt(18 / args.layers)
        )
    return model


@torch.no_grad()
def initialise_sas(model: SlimformerForCausalLM, mlp_gain: float) -> None:
    """The paper's start: ``W_Q = 0`` makes each shaped attention the identity; beta_FF = ``mlp_gain``."""
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.zero_()
        if layer.mlp_gain is not None:
            layer.mlp_gain.fill_(mlp_gain)


def parameter_counts(model: SlimformerForCausalLM) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())  # the tied head counts once
    embedding = model.model.embed_tokens.weight.numel()
    return {"total": total, "non_embedding": total - embedding}


# ---- training ----------------------------------------------------------------------------------------------


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def train(
    model: SlimformerForCausalLM, stream: torch.Tensor, args: argparse.Namespace, label: str
) -> dict[str, Any]:
    """Train with the shared schedule and batch order; returns the per-step losses and timing."""
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, args.warmup, args.steps, args.min_lr_ratio)
    )
    generator = torch.Generator().manual_seed(
        args.seed
    )  # the same batches, in the same order, for every model
    losses: list[float] = []
    model.train()
    skip = min(5, args.steps - 1)  # the first steps include allocator and kernel warm-up
    started = timed_from = time.perf_counter()
    for step in range(1, args.steps + 1):
        if step == skip + 1:
            timed_from = time.perf_counter()
        losses.append(
            train_step(
                model,
                optimizer,
                sample_batch(stream, args.batch_size, args.seq_len, generator).to(args.device),
            )
        )
        schedule.step()
        if step % args.log_every == 0 or step == args.steps:
            elapsed = time.perf_counter() - started
            recent = losses[-args.log_every :]
            log(
                f"{label:>14} step {step:5d}/{args.steps}  loss {sum(recent) / len(recent):.4f}  {elapsed:.0f}s"
            )
    seconds = time.perf_counter() - timed_from
    return {
        "loss_per_step": [round(loss, 5) for loss in losses],
        "train_seconds": round(time.perf_counter() - started, 2),
        "tokens_per_s_during_training": (args.steps - skip) * args.batch_size * args.seq_len / seconds,
    }


@torch.no_grad()
def validation_loss(
    model: SlimformerForCausalLM, windows: torch.Tensor, batch_size: int, device: str
) -> float:
    model.eval()
    total = sum(
        model(
            input_ids=windows[i : i + batch_size].to(device), labels=windows[i : i + batch_size].to(device)
        ).loss.item()
        * len(windows[i : i + batch_size])
        for i in range(0, len(windows), batch_size)
    )
    model.train()
    return total / len(windows)


def interleaved_throughput(
    models: dict[str, SlimformerForCausalLM], stream: torch.Tensor, args: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """Training tokens/s of each model, timed in alternation so that load on a shared machine affects all models
    alike: per round, ``--timing-steps`` real optimizer steps per model (after one warm-up step). Returns the
    median and the best round per model, and every round. The steps use a negligible learning rate."""
    generator = torch.Generator().manual_seed(args.seed + 1)
    optimizers = {kind: make_optimizer(model, 1e-9, 0.0) for kind, model in models.items()}
    tokens = args.timing_steps * args.batch_size * args.seq_len
    rounds: dict[str, list[float]] = {kind: [] for kind in models}
    for _ in range(args.timing_rounds):
        for kind, model in models.items():
            batches = [
                sample_batch(stream, args.batch_size, args.seq_len, generator).to(args.device)
                for _ in range(args.timing_steps + 1)
            ]
            train_step(model, optimizers[kind], batches[0])  # warm-up
            _sync(args.device)
            started = time.perf_counter()
            for batch in batches[1:]:
                train_step(model, optimizers[kind], batch)
            _sync(args.device)
            rounds[kind].append(tokens / (time.perf_counter() - started))
    return {
        kind: {"median": statistics.median(values), "best": max(values), "rounds": [round(v) for v in values]}
        for kind, values in rounds.items()
    }


def throughput_only(args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved throughput of freshly initialised models (speed does not depend on the weights) on random tokens."""
    stream = torch.randint(0, args.vocab_size, (200_000,), generator=torch.Generator().manual_seed(args.seed))
    models = {kind: build_model(kind, args, args.vocab_size, 0, 1).to(args.device) for kind in args.models}
    measured = interleaved_throughput(models, stream, args)
    base = measured.get("prenorm")
    record = {
        "description": "training throughput of Pre-LN and SAS blocks, interleaved timing (examples/train_sas.py --throughput-only)",
        "command": shlex.join(["python", "examples/train_sas.py", *sys.argv[1:]]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(args),
        "tokens_per_s": measured,
        "params": {kind: parameter_counts(model) for kind, model in models.items()},
        "ratio_vs_prenorm": {
            kind: {"median": m["median"] / base["median"], "best": m["best"] / base["best"]}
            for kind, m in measured.items()
            if base and kind != "prenorm"
        },
    }
    path = args.out.with_name(args.out.name + "_throughput.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {path}")
    return record


def environment(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "device": args.device,
        "processor": platform.processor() or platform.machine(),
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- outputs -------------------------------------------------------------------------------------------------


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    out, avg = [], values[0]
    for value in values:
        avg = weight * avg + (1 - weight) * value
        out.append(avg)
    return out


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for kind, result in record["models"].items():
        losses = result["loss_per_step"]
        steps = range(1, len(losses) + 1)
        line = ax.plot(
            steps, smooth(losses), label=f"{LABELS[kind]} ({result['params']['total'] / 1e6:.2f}M params)"
        )
        ax.plot(steps, losses, color=line[0].get_color(), alpha=0.15, linewidth=0.8)
    s = record["settings"]
    ax.set_title(
        f"{s['layers']} layers, d={s['hidden']}, context {s['seq_len']}, batch {s['batch_size']}, lr {s['lr']:g}"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (EMA 0.9; raw faint)")
    low = min(min(r["loss_per_step"]) for r in record["models"].values())
    ax.set_ylim(low - 0.2, low + 4.0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def comparison(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each SAS kind against Pre-LN: parameter reduction, throughput ratios, loss gaps."""
    if "prenorm" not in models:
        return {}
    base = models["prenorm"]
    rows = {}
    for kind, result in models.items():
        if kind == "prenorm":
            continue
        tail = max(1, len(result["loss_per_step"]) // 10)
        rows[kind] = {
            "param_reduction_total": 1 - result["params"]["total"] / base["params"]["total"],
            "param_reduction_non_embedding": 1
            - result["params"]["non_embedding"] / base["params"]["non_embedding"],
            "throughput_ratio_interleaved": (
                result["tokens_per_s_interleaved"]["median"] / base["tokens_per_s_interleaved"]["median"]
                if result.get("tokens_per_s_interleaved")
                else None
            ),
            "throughput_ratio_during_training": result["tokens_per_s_during_training"]
            / base["tokens_per_s_during_training"],
            "final_train_loss_gap": statistics.mean(result["loss_per_step"][-tail:])
            - statistics.mean(base["loss_per_step"][-tail:]),
            "valid_loss_gap": result["valid_loss"] - base["valid_loss"],
        }
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if args.throughput_only:
        return throughput_only(args)
    started = time.perf_counter()
    train_docs, valid_docs = read_documents("train"), read_documents("valid")
    if args.max_files:
        train_docs, valid_docs = train_docs[: args.max_files], valid_docs[: max(1, args.max_files // 10)]
    if args.tokenizer is not None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = train_tokenizer(train_docs, args.vocab_size)
    train_stream, valid_stream = (
        encode_documents(tokenizer, train_docs),
        encode_documents(tokenizer, valid_docs),
    )
    valid_windows = consecutive_windows(valid_stream, args.seq_len, args.eval_windows)
    log(
        f"data: {len(train_stream):,} train / {len(valid_stream):,} valid tokens, vocabulary {len(tokenizer)}"
    )

    models: dict[str, SlimformerForCausalLM] = {}
    results: dict[str, dict[str, Any]] = {}
    for kind in args.models:
        model = build_model(kind, args, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id).to(
            args.device
        )
        params = parameter_counts(model)
        log(
            f"{LABELS[kind]}: {params['total']:,} parameters ({params['non_embedding']:,} outside the embeddings)"
        )
        result = {"params": params, **train(model, train_stream, args, LABELS[kind])}
        result["valid_loss"] = validation_loss(model, valid_windows, args.batch_size, args.device)
        log(
            f"{LABELS[kind]}: valid loss {result['valid_loss']:.4f}, {result['tokens_per_s_during_training']:,.0f} tok/s"
        )
        models[kind], results[kind] = model, result
        if args.save_dir is not None:
            model.save_pretrained(args.save_dir / kind, safe_serialization=True)
            tokenizer.save_pretrained(args.save_dir / kind)
    if args.timing_rounds:
        for kind, measured in interleaved_throughput(models, train_stream, args).items():
            results[kind]["tokens_per_s_interleaved"] = measured

    record = {
        "description": "Pre-LN vs simplified transformer blocks trained from scratch on the stdlib corpus (examples/train_sas.py)",
        "command": shlex.join(["python", "examples/train_sas.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": {
            "train_tokens": len(train_stream),
            "valid_tokens": len(valid_stream),
            "vocab_size": len(tokenizer),
            "valid_windows": len(valid_windows),
        },
        "environment": environment(args),
        "models": results,
        "comparison_vs_prenorm": comparison(results),
        "paper": PAPER,
        "wall_s": None,
    }
    record["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    plot(record, args.out.with_suffix(".png"))
    log(f"wrote {args.out.with_suffix('.json')} and .png in {record['wall_s']:.0f}s")
    return record


if __name__ == "__main__":
    main()
