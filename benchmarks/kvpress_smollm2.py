"""NVIDIA kvpress 0.5.5's presses on SmolLM2-135M-Instruct, on the windows of ``a2sf_smollm2.py``.

Runs in its own environment (kvpress 0.5.5 needs transformers >= 4.56, < 5.3)::

    .ci/setup_kvpress.sh                                        # -> .venv-kvpress
    .venv/bin/python benchmarks/a2sf_smollm2.py windows         # the shared windows (token ids)
    .venv-kvpress/bin/python benchmarks/kvpress_smollm2.py      # -> benchmarks/results/kvpress_smollm2.json

Protocol, as kvpress's own pipeline uses a press: the prompt is prefilled under ``with press(model):`` into a
``DynamicCache`` (compressed layer by layer by the press's forward hook), then the continuation is scored in
one forward outside the press, with explicit ``position_ids`` (the cache is shorter than the positions seen).
Budget b keeps ``compute_n_kept(P, 1 - b)`` prompt tokens per KV head and layer (kvpress rounds down; the
slimformer runtime rounds up: 204 vs 205 tokens at 20% of 1,024).

Each window is prefilled once: the press hooks receive what the attention layers gave them (hidden states,
position embeddings, attention weights -- eager attention, which ObservedAttention needs), recorded, and each
press's own ``forward_hook`` is called on a cache holding the full prompt, layer by layer as during a real
prefill. A layer's output does not depend on the compression of its own cache, so this is the same
computation; ``self_check`` runs two presses the ordinary way on the first window and records the difference.

The decode-time press (``PrefillDecodingPress``: ExpectedAttention at prefill, ``DecodingPress`` with
ExpectedAttention re-scoring every ``--interval`` decoded tokens down to the budget) is run the ordinary way,
token by token, teacher-forced.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from kvpress import (
    DecodingPress,
    ExpectedAttentionPress,
    KnormPress,
    ObservedAttentionPress,
    PrefillDecodingPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import AutoModelForCausalLM, DynamicCache

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
FULL = "full cache"
RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
# Each press with kvpress's own defaults; compression_ratio = 1 - budget.
PRESSES = {
    "StreamingLLM": StreamingLLMPress,
    "SnapKV": SnapKVPress,
    "ObservedAttention": ObservedAttentionPress,
    "TOVA": TOVAPress,
    "Knorm": KnormPress,
    "ExpectedAttention": ExpectedAttentionPress,
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.double(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class Recording:
    """One prompt's prefill: per attention layer the hook's kwargs and output, and the full cache."""

    def __init__(self, model: torch.nn.Module, prompt: torch.Tensor) -> None:
        self.calls: dict[int, tuple[dict[str, Any], Any]] = {}
        layers = model.model.layers
        hooks = [layer.self_attn.register_forward_hook(self._hook, with_kwargs=True) for layer in layers]
        cache = DynamicCache()
        try:
            with torch.inference_mode():
                out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        finally:
            for hook in hooks:
                hook.remove()
        self.last_logits = out.logits[:, -1:]
        self.keys = [layer.keys for layer in cache.layers]
        self.values = [layer.values for layer in cache.layers]

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        self.calls[module.layer_idx] = ({k: v for k, v in kwargs.items() if k != "past_key_values"}, output)

    def full_cache(self) -> DynamicCache:
        cache = DynamicCache()
        for idx, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k, v, idx)
        return cache

    def compressed(self, model: torch.nn.Module, press: Any) -> DynamicCache:
        """The cache ``press`` leaves after the prompt: its own forward hook, layer by layer."""
        cache = self.full_cache()
        layers = model.model.layers
        with press(model), torch.inference_mode():  # the context also runs post_init_from_model
            for idx in range(len(layers)):
                kwargs, output = self.calls[idx]
                press.forward_hook(layers[idx].self_attn, (), {**kwargs, "past_key_values": cache}, output)
        return cache


def continuation_logprobs(
    model: torch.nn.Module,
    last_logits: torch.Tensor,
    cache: DynamicCache,
    cont: torch.Tensor,
    prompt_len: int,
) -> torch.Tensor:
    """Continuation scored in one forward after the (compressed) prompt; positions continue the prompt's."""
    positions = torch.arange(prompt_len, prompt_len + cont.shape[1] - 1)[None]
    with torch.inference_mode():
        out = model(input_ids=cont[:, :-1], past_key_values=cache, position_ids=positions, use_cache=True)
    return torch.cat(
        [token_logprobs(last_logits, cont[:, :1]), token_logprobs(out.logits, cont[:, 1:])], dim=1
    )


def direct(model: torch.nn.Module, press: Any, prompt: torch.Tensor, cont: torch.Tensor) -> torch.Tensor:
    """The ordinary way: prefill under the press, then the continuation outside it."""
    cache = DynamicCache()
    with press(model), torch.inference_mode():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
    return continuation_logprobs(model, out.logits[:, -1:], cache, cont, prompt.shape[1])


def decoded(
    model: torch.nn.Module, press: Any, prompt: torch.Tensor, cont: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Prefill and decode token by token under a decode-time press; also the mean cache length while decoding."""
    cache = DynamicCache()
    prompt_len = prompt.shape[1]
    pieces, lengths = [], []
    with press(model), torch.inference_mode():
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        pieces.append(token_logprobs(out.logits[:, -1:], cont[:, :1]))
        for step in range(cont.shape[1] - 1):
            lengths.append(cache.get_seq_length())
            out = model(
                input_ids=cont[:, step : step + 1],
                past_key_values=cache,
                position_ids=torch.tensor([[prompt_len + step]]),
                use_cache=True,
            )
            pieces.append(token_logprobs(out.logits, cont[:, step + 1 : step + 2]))
    return torch.cat(pieces, dim=1), sum(lengths) / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=int, default=16, help="DecodingPress compression_interval")
    parser.add_argument("--decode-ratio", type=float, default=0.2, help="budget of the decode-time press")
    parser.add_argument("--windows", type=int, default=None, help="first N windows only")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="where the windows are and the JSON goes"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = json.loads((args.results / "a2sf_smollm2_windows.json").read_text())
    out_file = args.results / "kvpress_smollm2.json"
    model = AutoModelForCausalLM.from_pretrained(
        spec["model"], dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    windows = torch.tensor(spec["test"])[: args.windows]
    prompt_len = spec["prompt"]
    start = time.process_time()
    data: dict[str, Any] = {
        "environment": {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": platform.machine(),
            "torch_threads": torch.get_num_threads(),
            "kvpress": version("kvpress"),
            "transformers": version("transformers"),
            "torch": torch.__version__,
        },
        "protocol": {
            "windows": int(windows.shape[0]),
            "prompt": prompt_len,
            "continuation": spec["continuation"],
            "source": spec["test_source"],
            "attention": "eager",
            "budgets": list(RATIOS),
            "decoding_press": {
                "prefilling": f"ExpectedAttentionPress(compression_ratio={1 - args.decode_ratio:g})",
                "decoding": f"DecodingPress(ExpectedAttentionPress(), compression_interval={args.interval}, "
                f"target_size=ceil({args.decode_ratio:g} x prompt))",
            },
        },
        "presses": list(PRESSES),
        "nll": {FULL: []},
        "kept_tokens": {},
    }
    decode_key = f"decoding ExpectedAttention interval {args.interval} | {args.decode_ratio:.0%}"
    for index in range(windows.shape[0]):
        row = windows[index : index + 1]
        prompt, cont = row[:, :prompt_len], row[:, prompt_len:]
        log(f"window {index}: prefill")
        rec = Recording(model, prompt)
        full = continuation_logprobs(model, rec.last_logits, rec.full_cache(), cont, prompt_len)
        data["nll"][FULL].append(float(-full.mean()))
        for name, press_class in PRESSES.items():
            for ratio in RATIOS:
                press = press_class(compression_ratio=1.0 - ratio)
                cache = rec.compressed(model, press)
                key = f"{name} | {ratio:.0%}"
                data["kept_tokens"][key] = cache.get_seq_length()
                logprobs = continuation_logprobs(model, rec.last_logits, cache, cont, prompt_len)
                data["nll"].setdefault(key, []).append(float(-logprobs.mean()))
                if index == 0 and ratio == 0.2 and name in ("SnapKV", "ObservedAttention"):
                    reference = direct(model, press_class(compression_ratio=1.0 - ratio), prompt, cont)
                    gap = float((reference - logprobs).abs().max())
                    data.setdefault("self_check", {})[key] = f"max |replay - direct| log-prob {gap:.1e}"
        del rec
        budget = math.ceil(args.decode_ratio * prompt_len)
        press = PrefillDecodingPress(
            prefilling_press=ExpectedAttentionPress(compression_ratio=1.0 - args.decode_ratio),
            decoding_press=DecodingPress(
                base_press=ExpectedAttentionPress(), compression_interval=args.interval, target_size=budget
            ),
        )
        logprobs, mean_len = decoded(model, press, prompt, cont)
        data["nll"].setdefault(decode_key, []).append(float(-logprobs.mean()))
        data.setdefault("decoding_mean_cache_tokens", []).append(mean_len)
        data["cpu_seconds"] = time.process_time() - start
        out_file.write_text(json.dumps(data, indent=2) + "\n")
        log(f"  done; cpu so far {data['cpu_seconds']:.0f} s")
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
