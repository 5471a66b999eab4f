"""``slimformer eval CKPT --tasks ...``: zero-shot multiple-choice accuracy from the command line.

Self-contained: a tiny random Llama (conftest) with a character-level tokenizer saved beside it, and tiny
llm-foundry ICL ``.jsonl`` tasks written here. The CLI's numbers are checked against the library function
it wraps (``multiple_choice_accuracy``), under the full cache and under KV-cache eviction.
"""

from __future__ import annotations

import json
import os
import re
import string
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_tiny
from slimformer.converter import cli as cli_module
from slimformer.converter.cli import cli
from slimformer.converter.conversion import load_model
from slimformer.converter.errors import SlimformerError
from slimformer.converter.evaluation import EVALS_DIR_ENV, loglikelihoods, multiple_choice_accuracy
from slimformer.converter.runtime.kv_cache import CachePolicy
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

QA = [  # query / choices / gold: the queries are long enough (30+ characters = tokens) for eviction to bite
    {"query": "Question: which word names a colour?", "choices": ["red", "dog", "run"], "gold": 0},
    {"query": "Question: what do you drink when thirsty?", "choices": ["water", "sand"], "gold": 0},
    {"query": "The cat sat on the mat, therefore", "choices": ["it was comfy.", "it flew away."], "gold": 0},
    {"query": "Question: how many legs has a spider?", "choices": ["two", "eight", "six", "ten"], "gold": 1},
    {"query": "Question: what falls from clouds?\n", "choices": ["rain", "bricks"], "gold": 0},
]
WINO = [  # context_options / continuation / gold (Winogrande's partial scoring)
    {
        "context_options": ["Anna gave Beth a gift because Anna", "Anna gave Beth a gift because Beth"],
        "continuation": "was kind.",
        "gold": 0,
    },
    {
        "context_options": [
            "The ball broke the window so the ball",
            "The ball broke the window so the window",
        ],
        "continuation": "was fixed.",
        "gold": 1,
    },
    {
        "context_options": ["Tom is taller than Sam so Tom", "Tom is taller than Sam so Sam"],
        "continuation": "reached the shelf.",
        "gold": 0,
    },
]
TEXT = "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs!\n" * 8


def save_char_tokenizer(directory: Path) -> None:
    """One token per character; the ids fit the tiny model's 96-token vocabulary."""
    chars = ["<unk>", "<s>", "</s>", "<pad>"] + sorted(
        set(string.ascii_letters + string.digits + " .,;:!?'\"()-\n")
    )
    core = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    ).save_pretrained(directory)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-tasks")
    ckpt = make_tiny("llama", root / "ckpt", layers=2)
    save_char_tokenizer(ckpt)
    evals = root / "evals"
    evals.mkdir()
    write_jsonl(evals / "qa.jsonl", QA)
    write_jsonl(evals / "wino.jsonl", WINO)
    (root / "text.txt").write_text(TEXT)
    (root / "broken").mkdir()
    write_jsonl(root / "broken" / "bad.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 5}])
    return {"ckpt": ckpt, "evals": evals, "text": root / "text.txt", "root": root}


@pytest.fixture(scope="module")
def tokenizer(world):
    return PreTrainedTokenizerFast.from_pretrained(world["ckpt"])


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["eval", *args], env={EVALS_DIR_ENV: "", **(env or {})})


def ok(*args: str, env: dict[str, str] | None = None) -> list[str]:
    result = invoke(*args, env=env)
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout.strip().splitlines()


def parse_task_line(line: str) -> dict[str, float | str]:
    # "qa: acc 0.6000 ± 0.2449, acc_norm 0.4000 ± 0.2449 (n=5)"
    name, rest = line.split(": ", 1)
    acc, acc_norm = rest.split(" (n=")[0].split(", ")
    return {
        "task": name,
        "acc": float(acc.split()[1]),
        "acc_stderr": float(acc.split()[3]),
        "acc_norm": float(acc_norm.split()[1]),
        "acc_norm_stderr": float(acc_norm.split()[3]),
        "n": int(rest.split(" (n=")[1].rstrip(")")),
    }


def test_cli_matches_the_library_and_writes_json(world, tokenizer, tmp_path):
    out = tmp_path / "mc.json"
    lines = ok(
        str(world["ckpt"]), "--tasks", "qa,wino", "--evals-dir", str(world["evals"]), "--json", str(out), "-q"
    )
    assert len(lines) == 3 and lines[2].startswith("average over 2 tasks: acc ")
    model = load_model(world["ckpt"])
    record = json.loads(out.read_text())
    assert record["checkpoint"] == str(world["ckpt"]) and "perplexity" not in record
    block = record["multiple_choice"]
    assert block["protocol"] == "one forward" and block["decode_chunk"] is None and block["kv_cache"] is None
    assert block["limit"] is None and list(block["tasks"]) == ["qa", "wino"]
    for line, name, records in zip(lines, ("qa", "wino"), (QA, WINO)):
        expected = multiple_choice_accuracy(model, tokenizer, str(world["evals"] / f"{name}.jsonl"))
        printed = parse_task_line(line)
        assert printed["task"] == name and printed["n"] == len(records) == expected.n
        for key in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            assert printed[key] == pytest.approx(getattr(expected, key), abs=5e-5)
        # The JSON holds the whole result, per-example picks and golds included.
        assert block["tasks"][name] == json.loads(json.dumps(expected.to_dict()))
        assert block["tasks"][name]["golds"] == [r["gold"] for r in records]
    assert block["average"]["acc"] == pytest.approx(
        (block["tasks"]["qa"]["acc"] + block["tasks"]["wino"]["acc"]) / 2
    )
    # Winogrande's choices share one continuation, so acc_norm is acc.
    assert block["tasks"]["wino"]["acc_norm"] == block["tasks"]["wino"]["acc"]


def test_paths_env_dir_limit_and_perplexity_together(world, tmp_path):
    out = tmp_path / "both.json"
    path_task = str(world["evals"] / "qa.jsonl")
    lines = ok(
        str(world["ckpt"]),
        "--ppl",
        str(world["text"]),
        "--window",
        "32",
        "--tasks",
        f"{path_task},wino",
        "--limit",
        "2",
        "--json",
        str(out),
        "-q",
        env={EVALS_DIR_ENV: str(world["evals"])},  # a bare name is looked up in $SLIMFORMER_EVALS_DIR
    )
    assert lines[0].startswith("perplexity: ") and len(lines) == 4
    assert [parse_task_line(line)["n"] for line in lines[1:3]] == [2, 2]
    record = json.loads(out.read_text())
    assert record["perplexity"] == pytest.approx(float(lines[0].split(": ")[1]), abs=5e-5)
    assert record["window"] == 32 and record["multiple_choice"]["limit"] == 2
    assert record["multiple_choice"]["tasks"]["qa"]["source"] == path_task
    assert len(record["multiple_choice"]["tasks"]["wino"]["predictions"]) == 2


def test_eviction_scores_under_the_decode_protocol(world, tokenizer, tmp_path):
    out = tmp_path / "evicted.json"
    a2sf = "budget=6,recent=2"
    lines = ok(
        str(world["ckpt"]),
        "--tasks",
        "qa",
        "--evals-dir",
        str(world["evals"]),
        "--a2sf",
        a2sf,
        "--json",
        str(out),
        "-q",
    )
    assert len(lines) == 2
    assert lines[0].startswith("multiple choice under KV-cache eviction (policy=a2sf, budget=6, recent=2)")
    assert "decode protocol" in lines[0] and "1 token(s) per forward" in lines[0]
    block = json.loads(out.read_text())["multiple_choice"]
    assert block["protocol"] == "decode" and block["decode_chunk"] == 1
    assert block["kv_cache"]["budget"] == 6 and block["kv_cache"]["recent"] == 2

    # The same numbers as the library under the same policy and protocol ...
    policy = CachePolicy.parse(a2sf).to_dict()
    evicting = load_model(world["ckpt"], kv_cache=policy)
    expected = multiple_choice_accuracy(evicting, tokenizer, str(world["evals"] / "qa.jsonl"), decode_chunk=1)
    assert block["tasks"]["qa"] == json.loads(json.dumps(expected.to_dict()))
    assert parse_task_line(lines[1])["acc"] == pytest.approx(expected.acc, abs=5e-5)
    # ... and the eviction is real: a budget that keeps everything scores the choices differently.
    requests = [(QA[0]["query"], " " + choice) for choice in QA[0]["choices"]]
    tight = loglikelihoods(evicting, tokenizer, requests, decode_chunk=1)
    roomy = loglikelihoods(
        load_model(world["ckpt"], kv_cache={"budget": 256}), tokenizer, requests, decode_chunk=1
    )
    full = loglikelihoods(load_model(world["ckpt"]), tokenizer, requests)
    assert roomy == pytest.approx(full, rel=1e-5) and tight != pytest.approx(full, rel=1e-4)

    # policy=none: the full cache, scored in one forward, with no protocol line.
    plain = ok(
        str(world["ckpt"]), "--tasks", "qa", "--evals-dir", str(world["evals"]), "--a2sf", "policy=none", "-q"
    )
    assert len(plain) == 1 and plain[0].startswith("qa: acc ")


def test_progress_goes_to_stderr_unless_quiet(world):
    result = invoke(str(world["ckpt"]), "--tasks", "qa", "--evals-dir", str(world["evals"]), "--limit", "1")
    assert result.exit_code == 0, result.output
    assert "[slimformer] qa: scoring" in result.stderr
    assert result.stdout.strip().startswith("qa: acc ") and "[slimformer]" not in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        ([], r"needs something to measure: --ppl, --tasks, or both.*Fix: add --ppl SOURCE"),
        (
            ["--tasks", "nope", "--evals-dir", "{evals}"],
            r"unknown task 'nope': no nope\.jsonl.*tasks there: qa, wino.*\(at .*evals\).*--evals-dir",
        ),
        (
            ["--tasks", "qa"],
            r"task 'qa' is not a file, and no tasks directory is set.*--evals-dir DIR \(or set SLIMFORMER_EVALS_DIR\)",
        ),
        (
            ["--tasks", "qa", "--evals-dir", "{root}/missing"],
            r"tasks directory \(--evals-dir\) does not exist",
        ),
        (["--tasks", "{root}/absent.jsonl"], r"task file not found"),
        (["--tasks", "{evals}"], r"not a directory.*--evals-dir"),
        (["--tasks", " , "], r"--tasks is empty"),
        (
            ["--tasks", "qa", "--evals-dir", "{evals}", "--limit", "0"],
            r"--limit must be at least 1 \(got 0\)",
        ),
        (
            ["--tasks", "qa", "--evals-dir", "{evals}", "--limit", "-3"],
            r"--limit must be at least 1 \(got -3\)",
        ),
        (["--limit", "5", "--ppl", "{text}"], r"--limit apply to --tasks, and no --tasks was given"),
        (
            ["--tasks", "qa", "--evals-dir", "{evals}", "--window", "32"],
            r"--window set the perplexity measurement, and no --ppl",
        ),
        (
            ["--tasks", "qa,{root}/broken/bad.jsonl", "--evals-dir", "{evals}"],
            r"'gold' must be a choice index.*bad\.jsonl:1",
        ),
        (["--tasks", "qa", "--evals-dir", "{evals}", "--a2sf", "alpha=3"], r"bad --a2sf value"),
        (["--tasks", "qa", "--evals-dir", "{evals}", "--chunk", "0"], r"--chunk must be at least 1"),
    ],
)
def test_bad_arguments_fail_before_the_model_loads(world, monkeypatch, args, message):
    def no_loading(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(cli_module, "_load", no_loading)
    filled = [a.format(evals=world["evals"], root=world["root"], text=world["text"]) for a in args]
    result = invoke(str(world["ckpt"]), *filled)
    assert isinstance(result.exception, SlimformerError), (result.output, result.exception)
    assert result.exit_code != 0
    assert re.search(message, str(result.exception), re.S), str(result.exception)


def test_error_is_one_line_on_stderr(world):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "slimformer",
            "eval",
            str(world["ckpt"]),
            "--tasks",
            "nope",
            "--evals-dir",
            str(world["evals"]),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", EVALS_DIR_ENV: ""},
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown task 'nope'") and "Fix: " in lines[0]


def test_the_cli_names_the_librarys_variable():
    assert cli_module.EVALS_DIR_ENV == EVALS_DIR_ENV
