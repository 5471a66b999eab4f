"""Tests for converter.evaluation: perplexity, multiple-choice accuracy and the speed probe.

Everything but the last test is self-contained: a tiny random Llama and a character-level tokenizer
built in memory, with independent reference computations written out here.
"""

from __future__ import annotations

import json
import math
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.evaluation import (
    loglikelihoods,
    multiple_choice_accuracy,
    perplexity,
    perplexity_of_tokens,
    speed_probe,
)
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.modeling_outputs import CausalLMOutputWithPast

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
VOCAB = 128
SHARED = Path("/work/shared")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII + newline), BOS prepended the way Llama tokenizers do."""
    chars = SPECIALS + sorted(set(string.printable) - set("\t\r\x0b\x0c"))
    assert len(chars) <= VOCAB
    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    # Default init gives near-uniform predictions; larger weights make the likelihoods context-dependent,
    # so a wrong window or an off-by-one in the scored positions cannot go unnoticed.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(8.0)
    return model


class NextTokenOracle(torch.nn.Module):
    """A "model" whose next-token prediction is a fixed function of the current token, with a huge logit.

    Tokens missing from ``table`` get uniform predictions. Enough of the HF causal-LM interface for the
    scoring code: ``config``, a parameter (for the device) and ``.logits`` out.
    """

    def __init__(self, table: dict[int, int], vocab: int = VOCAB, confidence: float = 60.0) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=4096)
        weights = torch.zeros(vocab, vocab)
        for current, following in table.items():
            weights[current, following] = confidence
        self.table = torch.nn.Parameter(weights, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None, **_):
        return CausalLMOutputWithPast(logits=self.table[input_ids], past_key_values=past_key_values)


def reference_window_nll(model, window_ids: torch.Tensor, n_scored: int) -> float:
    """Sum of -log p over the last ``n_scored`` tokens of one window, batch 1, float64."""
    with torch.no_grad():
        logits = model(input_ids=window_ids[None]).logits[0].double()
    logprobs = torch.log_softmax(logits[:-1], dim=-1).gather(-1, window_ids[1:, None])[:, 0]
    return -float(logprobs[-n_scored:].sum())


def write_text(tmp_path: Path, text: str, name: str = "source.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. " * 12 + "Pack my box with five dozen liquor jugs!\n" * 8
)


def test_disjoint_windows_match_direct_nll(llama, tokenizer, tmp_path):
    spec = write_text(tmp_path, SAMPLE_TEXT)
    ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    window = 64
    result = perplexity(llama, tokenizer, spec, window=window, batch_size=3, max_tokens=None)

    # Independent: each disjoint chunk on its own, every token but the chunk's first scored.
    ids_t = torch.tensor(ids)
    chunks = [ids_t[i : i + window] for i in range(0, len(ids), window)]
    total = sum(reference_window_nll(llama, c, len(c) - 1) for c in chunks if len(c) > 1)
    count = sum(len(c) - 1 for c in chunks)
    assert result.n_tokens == count == len(ids) - len(chunks)
    assert result.perplexity == pytest.approx(math.exp(total / count), rel=1e-6)
    assert result.nll == pytest.approx(total / count, rel=1e-6)
    assert (result.window, result.stride, result.source) == (window, window, spec)
    assert set(result.to_dict()) == {"perplexity", "nll", "n_tokens", "window", "stride", "source"}


def test_strided_windows_score_each_token_once_with_context(llama, tokenizer):
    ids = torch.tensor(tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"][:300])
    window, stride = 64, 24
    result = perplexity_of_tokens(llama, ids, window=window, stride=stride, batch_size=4)
    assert result.n_tokens == len(ids) - 1

    # Independent, token by token: token t >= window is scored in the window that starts at the
    # smallest multiple of the stride whose window reaches past t; earlier tokens in the first window.
    total = 0.0
    window_logprobs: dict[int, torch.Tensor] = {}  # one forward per window start, not per token
    for t in range(1, len(ids)):
        begin = 0 if t < window else ((t - window) // stride + 1) * stride
        if begin not in window_logprobs:
            with torch.no_grad():
                logits = llama(input_ids=ids[None, begin : begin + window]).logits[0].double()
            window_logprobs[begin] = torch.log_softmax(logits, -1)
        total -= float(window_logprobs[begin][t - begin - 1, ids[t]])
    assert result.nll == pytest.approx(total / (len(ids) - 1), rel=1e-6)
    # And it really differs from disjoint windows (context matters for this model).
    disjoint = perplexity_of_tokens(llama, ids, window=window)
    assert abs(disjoint.nll - result.nll) > 1e-4


def test_rows_are_independent_streams(llama, tokenizer):
    ids = torch.tensor(tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"][:192]).view(3, 64)
    result = perplexity_of_tokens(llama, ids, window=64)
    total = sum(reference_window_nll(llama, row, 63) for row in ids)
    assert result.n_tokens == 3 * 63
    assert result.nll == pytest.approx(total / (3 * 63), rel=1e-6)


def test_perfect_model_has_perplexity_one(tokenizer, tmp_path):
    # Every character occurs once, so the next token is a function of the current one (a bigram oracle).
    text = string.ascii_letters + string.digits
    spec = write_text(tmp_path, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    table = dict(zip(ids[:-1], ids[1:]))
    result = perplexity(NextTokenOracle(table), tokenizer, spec, window=32, stride=16)
    assert result.n_tokens == len(ids) - 1
    assert result.perplexity == pytest.approx(1.0, abs=1e-9)


def test_cache_factory_is_called_per_forward(llama, tokenizer):
    from transformers import DynamicCache

    made = []

    def factory():
        made.append(DynamicCache())
        return made[-1]

    ids = torch.tensor(tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"][:130])
    plain = perplexity_of_tokens(llama, ids, window=64, batch_size=2)
    cached = perplexity_of_tokens(llama, ids, window=64, batch_size=2, cache_factory=factory)
    assert len(made) == 2  # windows of 64, 64 (one batch) and 2 (a second batch)
    assert cached.nll == pytest.approx(plain.nll, rel=1e-6)


def test_perplexity_errors(llama, tokenizer, tmp_path):
    empty = write_text(tmp_path, "", "empty.txt")
    with pytest.raises(SlimformerError):
        perplexity(llama, tokenizer, empty)
    with pytest.raises(SlimformerError, match="at least 2"):
        perplexity(llama, tokenizer, write_text(tmp_path, "hello"), max_tokens=1)
    with pytest.raises(SlimformerError):
        perplexity(llama, tokenizer, str(tmp_path / "missing.txt"))
    with pytest.raises(SlimformerError, match="stride"):
        perplexity_of_tokens(llama, torch.arange(10), window=8, stride=9)
    with pytest.raises(SlimformerError, match="positions"):
        perplexity_of_tokens(llama, torch.arange(10), window=1024)


def test_speed_probe(llama, tokenizer):
    result = speed_probe(llama, tokenizer, prompt_len=16, new_tokens=4, batch_size=2, repeats=2, warmup=1)
    for value in (
        result.prefill_tokens_per_s,
        result.decode_tokens_per_s,
        result.prefill_s,
        result.decode_s_per_token,
    ):
        assert math.isfinite(value) and value > 0
    assert (result.prompt_len, result.new_tokens, result.batch_size, result.repeats) == (16, 4, 2, 2)
    assert result.device == "cpu" and result.dtype == "float32" and result.num_threads >= 1
    assert result.peak_memory_bytes is None
    assert result.to_dict()["decode_tokens_per_s"] == result.decode_tokens_per_s
    assert llama.training is False
    with pytest.raises(SlimformerError, match="positions"):
        speed_probe(llama, prompt_len=250, new_tokens=10)


def test_speed_probe_uses_cache_factory(llama):
    from transformers import DynamicCache

    made = []

    def factory():
        made.append(DynamicCache())
        return made[-1]

    speed_probe(llama, prompt_len=8, new_tokens=3, repeats=2, warmup=1, cache_factory=factory)
    assert len(made) == 3  # one fresh cache per run, warmup included
    assert made[-1].get_seq_length() == 8 + 3  # the decode loop fed the cache back


def write_jsonl(tmp_path: Path, records: list[dict], name: str = "task.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_multiple_choice_with_an_oracle(tokenizer, tmp_path):
    tid = tokenizer.convert_tokens_to_ids
    # '?' -> ' ' -> 'x' -> 'x' ...: choice "xxx" is certain, the others improbable. For the Winogrande
    # lines, 'a' -> ' ' so the option ending in "a" makes the shared continuation " xx" certain.
    oracle = NextTokenOracle({tid("?"): tid(" "), tid(" "): tid("x"), tid("x"): tid("x"), tid("a"): tid(" ")})
    records = [
        {"query": "Which?", "choices": ["xxx", "yyy", "zzz"], "gold": 0},
        {"query": "Which?", "choices": ["yyy", "xxx"], "gold": 1},
        {"query": "Which?", "choices": ["zzz", "yyy", "xxx", "yzy"], "gold": 2},
        {"context_options": ["Sam saw a", "Sam saw b"], "continuation": "xx", "gold": 0},
        {"context_options": ["Sam saw b", "Sam saw a"], "continuation": "xx", "gold": 1},
    ]
    path = write_jsonl(tmp_path, records)
    result = multiple_choice_accuracy(oracle, tokenizer, str(path), batch_size=3)
    assert (result.task, result.n, result.acc, result.acc_norm) == ("task", 5, 1.0, 1.0)
    assert result.to_dict()["source"] == str(path)

    limited = multiple_choice_accuracy(oracle, tokenizer, str(path), limit=2)
    assert limited.n == 2

    # A bare name resolves through the evals directory.
    by_name = multiple_choice_accuracy(oracle, tokenizer, "task", evals_dir=tmp_path)
    assert by_name.n == 5


def test_multiple_choice_matches_independent_logliks(llama, tokenizer, tmp_path):
    records = [
        {"query": "The cat sat on the", "choices": ["mat.", "dog, quietly.", "moon"], "gold": 0},
        {"query": "Question: Is it raining?\n", "choices": ["yes", "no"], "gold": 1},
        {"query": "Pick one:", "choices": ["blue sky", "green grass", "red", "a"], "gold": 3},
        {
            "context_options": ["Ann beat Bo so Ann", "Ann beat Bo so Bo"],
            "continuation": "was sad.",
            "gold": 1,
        },
    ]
    path = write_jsonl(tmp_path, records)

    def reference(context: str, continuation: str) -> float:
        # BOS + context + continuation, one character per token; score the continuation's tokens. As in
        # lm-eval, whitespace ending the context (piqa-style "\n") is scored as part of the continuation.
        stripped = context.rstrip()
        continuation = context[len(stripped) :] + continuation
        ctx = [tokenizer.bos_token_id] + tokenizer(stripped, add_special_tokens=False)["input_ids"]
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ctx + cont)
        with torch.no_grad():
            logits = llama(input_ids=ids[None]).logits[0].double()
        logprobs = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None])[:, 0]
        return float(logprobs[-len(cont) :].sum())

    pairs, golds, lengths = [], [], []
    for r in records:
        if "query" in r:
            sep = "" if r["query"][-1].isspace() else " "
            pairs.append([(r["query"], sep + c) for c in r["choices"]])
            lengths.append([len(c) for c in r["choices"]])
        else:
            pairs.append([(o, " " + r["continuation"]) for o in r["context_options"]])
            lengths.append([len(r["continuation"])] * 2)
        golds.append(r["gold"])
    expected = [[reference(c, k) for c, k in example] for example in pairs]

    flat = [pair for example in pairs for pair in example]
    got = loglikelihoods(llama, tokenizer, flat, batch_size=3)
    assert got == pytest.approx([s for example in expected for s in example], rel=1e-5, abs=1e-6)

    def accuracy(scores: list[list[float]]) -> float:
        return sum(max(range(len(s)), key=s.__getitem__) == g for s, g in zip(scores, golds)) / len(golds)

    result = multiple_choice_accuracy(llama, tokenizer, str(path), batch_size=2)
    assert result.acc == accuracy(expected)
    assert result.acc_norm == accuracy([[s / n for s, n in zip(e, ls)] for e, ls in zip(expected, lengths)])
    assert result.acc_stderr == pytest.approx(math.sqrt(result.acc * (1 - result.acc) / 3))


def test_loglikelihood_truncates_from_the_left(llama, tokenizer):
    context = "abcdefghij" * 40  # 400 characters, longer than the model's 256 positions
    got = loglikelihoods(llama, tokenizer, [(context, " xyz")])[0]
    ids = torch.tensor(tokenizer(context + " xyz", add_special_tokens=False)["input_ids"][-257:])
    with torch.no_grad():
        logits = llama(input_ids=ids[None, :-1]).logits[0].double()
    expected = float(torch.log_softmax(logits[-4:], -1).gather(-1, ids[-4:, None]).sum())
    assert got == pytest.approx(expected, rel=1e-5)


def test_multiple_choice_errors(llama, tokenizer, tmp_path):
    with pytest.raises(SlimformerError, match="not found"):
        multiple_choice_accuracy(llama, tokenizer, str(tmp_path / "nope.jsonl"))
    with pytest.raises(SlimformerError, match="unknown multiple-choice format"):
        multiple_choice_accuracy(llama, tokenizer, str(write_jsonl(tmp_path, [{"text": "hi"}], "a.jsonl")))
    with pytest.raises(SlimformerError, match="gold"):
        bad_gold = [{"query": "q", "choices": ["a", "b"], "gold": 2}]
        multiple_choice_accuracy(llama, tokenizer, str(write_jsonl(tmp_path, bad_gold, "b.jsonl")))
    with pytest.raises(SlimformerError, match="no examples"):
        multiple_choice_accuracy(llama, tokenizer, str(write_jsonl(tmp_path, [], "c.jsonl")))
    (tmp_path / "d.jsonl").write_text("{not json\n")
    with pytest.raises(SlimformerError, match="invalid JSON"):
        multiple_choice_accuracy(llama, tokenizer, str(tmp_path / "d.jsonl"))


@pytest.mark.slow
@pytest.mark.skipif(
    not (SHARED / "models/stories260K").is_dir(),
    reason="needs the shared real model at /work/shared/models/stories260K",
)
def test_real_model_perplexity_and_copa():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = SHARED / "models/stories260K"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)

    ppl = perplexity(model, tok, str(SHARED / "data/wikitext2/wiki.test.raw"), max_tokens=4096, window=256)
    print(f"stories260K wikitext2 perplexity (first 4096 tokens, window 256): {ppl.perplexity:.2f}")
    assert ppl.n_tokens == 4096 - 4096 // 256
    assert 50 < ppl.perplexity < 300

    copa = multiple_choice_accuracy(model, tok, str(SHARED / "data/evals/copa.jsonl"), limit=20)
    print(f"stories260K copa (20 examples): acc={copa.acc:.2f} acc_norm={copa.acc_norm:.2f}")
    assert copa.n == 20 and 0.0 <= copa.acc <= 1.0 and 0.0 <= copa.acc_norm <= 1.0
