"""Decode speed and KV memory of the evicting cache vs the plain cache, against context length.

Run from the repository root (about 2 minutes on one CPU core; ``--render`` redraws from the JSON)::

    .venv/bin/python benchmarks/a2sf_speed.py
    .venv/bin/python benchmarks/a2sf_speed.py --contexts 256,512 --repeats 2

Writes ``benchmarks/results/a2sf_speed.json`` and ``a2sf_speed.png`` and prints the README table.

For each context length L a random prompt of L tokens is prefilled and ``--new-tokens`` tokens are
decoded greedily, with ``converter.evaluation.speed_probe`` (medians over ``--repeats`` runs after one
warm-up; batch 1; one thread). Caches: the plain ``DynamicCache`` and ``EvictingCache`` with a fixed
token budget (A2SF, and StreamingLLM, which scores nothing, to separate the cost of scoring from the
cost of evicting). Memory is the bytes of every tensor the cache holds after the last decode step
(keys and values, plus an evicting cache's scores, validity flags and positions), read from the cache
itself. A process-wide figure (RSS) is not reported: it is dominated by the runtime and by the prefill's
transient activations, and would not say what the cache keeps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from a2sf_common import MODELS, RESULTS, cache_factory, environment, log, single_thread, write_json
from slimformer.converter.conversion import load_model
from slimformer.converter.evaluation import speed_probe
from slimformer.converter.tokenizer import load_tokenizer

PLAIN = "plain (DynamicCache)"


def caches(budget: int) -> dict[str, dict[str, Any] | None]:
    return {
        PLAIN: None,
        f"a2sf a=0.1, budget {budget}": {"policy": "a2sf", "alpha": 0.1, "budget": budget},
        f"streaming, budget {budget}": {"policy": "streaming", "budget": budget},
    }


def cache_bytes(cache: Any) -> int:
    """Bytes of all tensors held by the cache's layers (whatever the cache class keeps per layer)."""
    return sum(
        value.numel() * value.element_size()
        for layer in cache.layers
        for value in vars(layer).values()
        if isinstance(value, torch.Tensor)
    )


def held_after_decode(model: torch.nn.Module, context: int, new_tokens: int, factory: Any) -> dict[str, int]:
    """Prefill ``context`` tokens, decode ``new_tokens`` greedily; what the cache holds at the end."""
    prompt = torch.randint(
        10, model.config.vocab_size - 10, (1, context), generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True, **({"past_key_values": factory()} if factory else {}))
        cache = out.past_key_values
        for _ in range(new_tokens):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    stored = max(layer.keys.shape[-2] for layer in cache.layers)
    return {"bytes": cache_bytes(cache), "tokens_per_slot": stored, "tokens_seen": cache.get_seq_length()}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    # Distinct markers and dashes: both evicting caches hold the same bytes, and one line would hide the other.
    styles = [("o", "-"), ("s", "--"), ("^", ":")]
    for (name, rows), (marker, dashes) in zip(data["results"].items(), styles):
        contexts = [row["context"] for row in rows]
        left.plot(
            contexts, [row["decode_ms_per_token"] for row in rows], marker=marker, ls=dashes, label=name
        )
        right.plot(
            contexts, [row["cache_bytes"] / 2**20 for row in rows], marker=marker, ls=dashes, label=name
        )
    left.set(title=f"{data['model']}: decode time per token", xlabel="context (tokens)", ylabel="ms / token")
    right.set(title="KV cache held after decoding", xlabel="context (tokens)", ylabel="MiB")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def markdown(data: dict[str, Any]) -> str:
    contexts = [row["context"] for row in next(iter(data["results"].values()))]
    lines = ["| cache | " + " | ".join(f"L={c}" for c in contexts) + " |", "|---|" + "---:|" * len(contexts)]
    for name, rows in data["results"].items():
        lines.append(
            f"| {name}: decode ms/token | "
            + " | ".join(f"{r['decode_ms_per_token']:.1f}" for r in rows)
            + " |"
        )
    for name, rows in data["results"].items():
        lines.append(f"| {name}: prefill ms | " + " | ".join(f"{r['prefill_ms']:.0f}" for r in rows) + " |")
    for name, rows in data["results"].items():
        lines.append(
            f"| {name}: KV held (KiB) | " + " | ".join(f"{r['cache_bytes'] / 1024:,.0f}" for r in rows) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pycoder-8m", choices=sorted(MODELS))
    parser.add_argument("--contexts", default="256,512,1024,1536")
    parser.add_argument("--budget", type=int, default=128, help="tokens the evicting caches keep per slot")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--render", action="store_true", help="only redraw the plot and table from the JSON in --out"
    )
    args = parser.parse_args()
    if args.render:
        data = json.loads((args.out / "a2sf_speed.json").read_text())
        plot(data, args.out / "a2sf_speed.png")
        print(markdown(data))
        return
    single_thread()

    path = MODELS[args.model]
    model, tokenizer = load_model(path), load_tokenizer(path)
    contexts = [int(c) for c in args.contexts.split(",")]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in caches(args.budget)}
    # Contexts outermost, caches inner: drifting load on a shared machine then hits every cache alike.
    for context in contexts:
        for name, fields in caches(args.budget).items():
            factory = cache_factory(fields) if fields else None
            speed = speed_probe(
                model,
                tokenizer,
                prompt_len=context,
                new_tokens=args.new_tokens,
                repeats=args.repeats,
                cache_factory=factory,
            )
            held = held_after_decode(model, context, args.new_tokens, factory)
            row = {
                "context": context,
                "decode_ms_per_token": 1000 * speed.decode_s_per_token,
                "prefill_ms": 1000 * speed.prefill_s,
                "cache_bytes": held["bytes"],
                "cache_tokens_per_slot": held["tokens_per_slot"],
                "tokens_seen": held["tokens_seen"],
            }
            results[name].append(row)
            log(
                f"L={context:>5} {name:<28} decode {row['decode_ms_per_token']:6.2f} ms/token, prefill "
                f"{row['prefill_ms']:7.1f} ms, cache {row['cache_bytes'] / 1024:8.1f} KiB ({row['cache_tokens_per_slot']} tokens/slot)"
            )
    data = {
        "environment": environment(),
        "model": args.model,
        "budget": args.budget,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "batch_size": 1,
        "results": results,
    }
    write_json(args.out / "a2sf_speed.json", data)
    plot(data, args.out / "a2sf_speed.png")
    print(markdown(data))


if __name__ == "__main__":
    main()
