"""Bad input, faults and interruptions, through the CLI (issue 16).

One table (``CASES``) of commands a user can get wrong: each runs as its own process through the
``slimformer`` entry point (``slimformer.converter.cli.main``) and must end with the expected exit code, exactly one
``error: ... Fix: ...`` line on stderr, no traceback, and no file left behind in its working directory.
The table also holds the commands that must now succeed (missing output parents, ``-q``, aliases,
help). Around it: replay from another directory, a changed data file, stale temporary outputs of dead
runs, SIGKILL at random points of a conversion and an export, a full disk (tmpfs, as root), plain
progress lines and the report fixes.

Why a fork server: every ``python -m slimformer`` spends several CPU seconds importing torch and
transformers before it reads its arguments, which for ~50 cases would dominate the suite on two cores. The
:class:`Cli` helper imports the CLI once in a subprocess and forks a fresh child per command; each child
is a real process running the real entry point with its own argv, cwd, environment, stdout and stderr,
and can be killed like any other. :func:`test_fork_server_matches_a_plain_subprocess` checks that a case
gives the same result as ``[sys.executable, "-m", "slimformer", ...]``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_LM, make_tiny, tiny_config

# The child side of the fork server: import the CLI once, then fork one process per command.
RUNNER = r"""
import json, os, sys, time, traceback
import slimformer.converter.cli

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(job["cwd"])
            os.environ.update(job["env"])
            for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
                os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.argv = ["slimformer", *job["argv"]]
            try:
                slimformer.converter.cli.main()
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()  # what an uncaught exception would print: the tests look for it
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    deadline = time.monotonic() + job["timeout"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            done, status = os.waitpid(pid, 0)
            break
        time.sleep(0.01)
    print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


class Cli:
    """``slimformer`` commands as forked child processes of one process that imported the CLI once."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT),
        }
        env.pop("SLIMFORMER_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.count = 0

    def start(
        self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
    ) -> int:
        """Start a command; returns the child's pid (call :meth:`wait` for the result)."""
        self.count += 1
        self.files = (self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err")
        job = {
            "argv": [str(a) for a in argv],
            "cwd": str(cwd),
            "env": env or {},
            "timeout": timeout,
            "stdout": str(self.files[0]),
            "stderr": str(self.files[1]),
        }
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["pid"]

    def wait(self) -> Result:
        code = json.loads(self.proc.stdout.readline())["returncode"]
        return Result(code, self.files[0].read_text(), self.files[1].read_text())

    def run(
        self, argv: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
    ) -> Result:
        self.start(argv, cwd, env, timeout)
        return self.wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


# ---- the models and files the cases use ----------------------------------------------------------------------


def tiny_lm(directory: Path, layers: int = 5) -> Path:
    """A random Llama with the embedded demo model's tokenizer (vocabulary 4096), so passes that read text run."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", layers)
    config.vocab_size = 4096
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(TINY_LM / name, directory / name)
    return directory


def convert_quietly(source: Path, out: Path, spec: dict) -> Path:
    from slimformer.converter.conversion import ConvertOptions, convert
    from slimformer.converter.pipeline import PipelineSpec

    convert(source, out, PipelineSpec.from_dict(spec), ConvertOptions(quiet=True))
    return out


SMALL_CALIBRATION = {"sources": ["stdlib:train"], "samples": 4, "seq_len": 32}
TEXT = (
    "Once upon a time there was a little robot who liked to count the stars. Every night it climbed the hill "
    "behind the house and wrote the numbers in a small blue book. "
) * 60


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Every input the cases need, made once (in this process, with the library, which is cheap)."""
    base = tmp_path_factory.mktemp("inputs")
    w: dict[str, Path] = {"lm5": tiny_lm(base / "lm5")}
    w["bert"] = make_tiny("bert", base / "bert")
    (base / "text.txt").write_text(TEXT)
    w["text"] = base / "text.txt"
    (base / "short.txt").write_text("a few words only\n")
    w["short"] = base / "short.txt"
    w["evicting"] = convert_quietly(w["lm5"], base / "evicting", {"passes": [{"name": "a2sf", "budget": 8}]})
    w["sas"] = convert_quietly(
        w["lm5"],
        base / "sas",
        {"calibration": SMALL_CALIBRATION, "passes": [{"name": "sas", "layers": 1, "heal_steps": 2}]},
    )
    # An `export onnx` output's layout; only its files matter to the error (no weights but model.onnx).
    w["onnx_dir"] = base / "onnx-dir"
    w["onnx_dir"].mkdir()
    shutil.copyfile(w["evicting"] / "config.json", w["onnx_dir"] / "config.json")
    (w["onnx_dir"] / "model.onnx").write_bytes(b"\x08\x0a")
    (w["onnx_dir"] / "slimformer_onnx.json").write_text("{}")

    def variant(name: str, change: Callable[[Path], None]) -> None:
        w[name] = base / name
        shutil.copytree(w["lm5"], w[name])
        change(w[name])

    weights = "model.safetensors"
    variant("truncated", lambda d: (d / weights).write_bytes((d / weights).read_bytes()[:1000]))
    variant(
        "bad_header",
        lambda d: (d / weights).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64)),
    )

    def pickled(d: Path) -> None:
        from safetensors.torch import load_file

        torch.save(load_file(d / weights), d / "pytorch_model.bin")
        (d / weights).unlink()

    variant("pickled", pickled)

    def remote_code(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
        (d / "config.json").write_text(json.dumps(config))
        (d / "modeling_evil.py").write_text("raise SystemExit('ran remote code')\n")

    variant("remote_code", remote_code)

    def unknown_family(d: Path) -> None:
        config = json.loads((d / "config.json").read_text())
        config["model_type"] = "gpt2"
        (d / "config.json").write_text(json.dumps(config))

    variant("gpt2", unknown_family)
    (base / "a-file").write_text("precious")
    w["file"] = base / "a-file"
    (base / "full").mkdir()
    (base / "full" / "keep.txt").write_text("old")
    w["full"] = base / "full"
    (base / "unknown-pass.toml").write_text('[[passes]]\nname = "no_such_pass"\n')
    w["unknown_pass"] = base / "unknown-pass.toml"
    (base / "broken.toml").write_text("[calibration\n")
    w["broken_toml"] = base / "broken.toml"
    return w


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    runner = Cli(tmp_path_factory.mktemp("cli-io"))
    yield runner
    runner.close()


# ---- the table ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    argv: list[str]  # "{name}" is replaced by the world's path of that name
    code: int = 2
    message: str | None = None  # regex the single error line must match (failures)
    stdout: str | None = None  # regex stdout must match
    creates: set[str] = field(default_factory=set)  # top-level names the command may leave in its directory
    env: dict[str, str] = field(default_factory=dict)
    check: Callable[[Result, Path, dict[str, Path]], None] | None = None  # extra assertions
    needs: str | None = None  # a module the case needs (an optional extra)


def _calibration_note(result: Result, cwd: Path, w: dict[str, Path]) -> None:
    assert result.lines == [line for line in result.lines if line.startswith("warning: no --calib given")]
    assert len(result.lines) == 1 and "stdlib:train (Python" in result.lines[0]
    report = json.loads((cwd / "out" / "report.json").read_text())
    assert any("stdlib:train (Python" in note for note in report["notes"])
    assert "stdlib:train (Python" in (cwd / "out" / "report.md").read_text()


def _parents_created(result: Result, cwd: Path, w: dict[str, Path]) -> None:
    assert (cwd / "new" / "dir" / "out" / "model.safetensors").is_file()
    assert result.stderr == "", "-q: nothing on stderr"


def _inspect_replaced(result: Result, cwd: Path, w: dict[str, Path]) -> None:
    converted = json.loads((w["sas"] / "report.json").read_text())["passes"][0]["changes"]["conversion"][
        "converted_layers"
    ]
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines() if ".attention" in line}
    assert converted and all(rows[f"{i}.attention"] == "replaced" for i in converted), result.stdout
    assert all(state == "kept" for key, state in rows.items() if int(key.split(".")[0]) not in converted)


def _help_lists_pass_options(result: Result, cwd: Path, w: dict[str, Path]) -> None:
    from slimformer.converter.pipeline import available_passes, option_rows

    text = " ".join(result.stdout.split())  # undo the wrapping
    for name, cls in available_passes().items():
        assert f"{name} (" in text
        for key, default, _ in option_rows(cls.config_class):
            assert re.search(rf"\b{key}\b", text) and f"(default: {default})" in text, (name, key)
    assert "heal_steps distillation steps" in text and "(default: 100)" in text and "heal-steps=" not in text
    for flag in ("--eval-ppl, --ppl", "--window", "--max-tokens", "--quiet"):
        assert flag in text


def _ppl_alias(result: Result, cwd: Path, w: dict[str, Path]) -> None:
    report = json.loads((cwd / "out" / "report.json").read_text())
    assert report["evaluation"]["window"] == 32 and report["evaluation"]["max_tokens"] == 256
    assert "perplexity of the weights" in result.stdout


def _debug_traceback(result: Result, cwd: Path, w: dict[str, Path]) -> None:
    assert "Traceback (most recent call last)" in result.stderr
    assert result.lines[-1].startswith("error: checkpoint directory") and "Fix: " in result.lines[-1]


CASES = [
    # -- checked against the graph before any work (issue table rows 1-2), and the dry run's other checks
    Case(
        "drop-more-than-exist",
        ["convert", "{lm5}", "-o", "out", "--drop", "attn:999", "--eval-ppl", "{text}", "--window", "32"],
        message=r"asks for 999 attention module\(s\) but only 5 can be dropped.*Fix: ask for at most 5",
    ),
    Case(
        "drop-then-sas-too-many",
        ["convert", "{lm5}", "-o", "out", "--drop", "attn:2", "--sas", "layers=4"],
        message=r"sas layers=4 but only 3 of 5 layers .*\(after layer_drop drops 2 attention.*Fix: use layers=3 or fewer",
    ),
    Case(
        "drop-all-attention-then-a2sf",
        ["convert", "{lm5}", "-o", "out", "--drop", "attn:5", "--a2sf", "budget=8"],
        message=r"no layer keeps attention \(after layer_drop drops 5 attention",
    ),
    Case(
        "a2sf-layer-budgets-after-drop",
        ["convert", "{lm5}", "-o", "out", "--drop", "attn:2", "--a2sf", "layer_budgets=8:8:8:8:8"],
        message=r"layer_budgets has 5 entries but the model has 3 cache slots",
    ),
    Case("sas-on-encoder", ["convert", "{bert}", "-o", "out", "--sas", "layers=1"], message=r"encoder"),
    Case(
        "eval-ppl-on-encoder",
        ["convert", "{bert}", "-o", "out", "--eval-ppl", "{text}"],
        message=r"perplexity needs a causal language model",
    ),
    Case(
        "quality-target-without-eval",
        ["convert", "{lm5}", "-o", "out", "--max-ppl-increase", "5"],
        message=r"needs a held-out evaluation source.*Fix: add --eval-ppl",
    ),
    Case(
        "streaming-without-drop",
        ["convert", "{lm5}", "-o", "out", "--streaming"],
        message=r"--streaming applies",
    ),
    Case(
        "bad-drop-spec",
        ["convert", "{lm5}", "-o", "out", "--drop", "bogus:1"],
        message=r"unknown drop kind 'bogus'",
    ),
    Case(
        "bad-a2sf-budget",
        ["convert", "{lm5}", "-o", "out", "--a2sf", "budget=4,recent=4,sink=2"],
        message=r"budget 4 is smaller than sink 2 \+ recent 4",
    ),
    Case(
        "unknown-sas-key",
        ["convert", "{lm5}", "-o", "out", "--sas", "heal-stepz=3"],
        message=r"unknown option\(s\) \['heal_stepz'\] for pass 'sas'.*heal_steps",
    ),
    Case(
        "sas-key-one-spelling",
        ["convert", "{lm5}", "-o", "out", "--sas", "layers=1,heal-steps=-1"],
        message=r"heal_steps=-1 must be a non-negative integer.*Fix: heal_steps is distillation steps.*default 100",
        check=lambda r, c, w: None if "heal-steps" not in r.stderr else pytest.fail("two spellings"),
    ),
    Case(
        "missing-calib-file",
        ["convert", "{lm5}", "-o", "out", "--drop", "attn:1", "--calib", "missing.txt"],
        message=r"--calib source '\S*missing.txt' does not exist",
    ),
    Case(
        "too-little-calibration-text",
        [
            "convert",
            "{lm5}",
            "-o",
            "out",
            "--drop",
            "attn:1",
            "--calib",
            "{short}",
            "--calib-samples",
            "1000",
        ],
        message=r"fewer than the 1000 x 256",
    ),
    Case(
        "missing-eval-file",
        ["convert", "{lm5}", "-o", "out", "--eval-ppl", "nope.txt"],
        message=r"--eval-ppl source '\S*nope.txt' does not exist",
    ),
    Case(
        "window-longer-than-model",
        ["convert", "{lm5}", "-o", "out", "--eval-ppl", "{text}", "--window", "100000"],
        message=r"window 100000 is longer than the model's 128 positions",
    ),
    Case(
        "window-without-eval",
        ["convert", "{lm5}", "-o", "out", "--window", "64"],
        message=r"--window and --max-tokens set the perplexity evaluation",
    ),
    # -- sources and outputs (already one line before issue 16; kept so they stay that way)
    Case("missing-source", ["convert", "./no-such-dir", "-o", "out"], message=r"does not exist"),
    Case("truncated-safetensors", ["convert", "{truncated}", "-o", "out"], message=r"truncated or corrupt"),
    Case(
        "corrupt-safetensors-header",
        ["convert", "{bad_header}", "-o", "out"],
        message=r"truncated or corrupt",
    ),
    Case(
        "unknown-family",
        ["convert", "{gpt2}", "-o", "out"],
        message=r"'gpt2' is not supported.*bert, llama, mistral, qwen2, qwen3",
    ),
    Case("pickle-refused", ["convert", "{pickled}", "-o", "out"], message=r"pickled weights.*--allow-pickle"),
    Case(
        "remote-code-refused",
        ["convert", "{remote_code}", "-o", "out"],
        message=r"ships its own code.*--trust-remote-code",
    ),
    Case(
        "output-is-a-file", ["convert", "{lm5}", "-o", "{file}"], message=r"output path is an existing file"
    ),
    Case(
        "output-exists",
        ["convert", "{lm5}", "-o", "{full}"],
        message=r"already exists and is not empty.*--overwrite",
    ),
    Case("read-only-output", ["convert", "{lm5}", "-o", "/proc/slimformer-out"], message=r"not writable"),
    Case(
        "unknown-pass-in-pipeline",
        ["convert", "{lm5}", "-o", "out", "--pipeline", "{unknown_pass}"],
        message=r"unknown pass 'no_such_pass'.*available passes: a2sf, layer_drop, sas",
    ),
    Case(
        "broken-pipeline-file",
        ["convert", "{lm5}", "-o", "out", "--pipeline", "{broken_toml}"],
        message=r"cannot parse",
    ),
    Case("report-of-a-source", ["report", "{lm5}"], message=r"no report.json"),
    # -- usage errors: click's usage block becomes one line with the fix
    Case(
        "unknown-option",
        ["convert", "{lm5}", "-o", "out", "--bogus"],
        message=r"No such option '--bogus'\. Fix: see `slimformer convert --help`",
    ),
    Case(
        "missing-prompt",
        ["generate", "{evicting}"],
        message=r"Missing option '--prompt'\. Fix: see `slimformer generate",
    ),
    Case(
        "not-a-number",
        ["eval", "{evicting}", "--ppl", "{text}", "--window", "many"],
        message=r"'many' is not a valid integer",
    ),
    # -- generation and evaluation arguments (issue table rows 4-6)
    Case(
        "generate-negative-tokens",
        ["generate", "{evicting}", "--prompt", "hi", "--max-new-tokens", "-5"],
        message=r"--max-new-tokens must be at least 1 \(got -5\)",
    ),
    Case(
        "generate-sample-temperature-0",
        ["generate", "{evicting}", "--prompt", "hi", "--sample", "--temperature", "0"],
        message=r"--sample needs --temperature > 0.*drop --sample",
    ),
    Case(
        "generate-top-p-0",
        ["generate", "{evicting}", "--prompt", "hi", "--sample", "--top-p", "0"],
        message=r"--top-p must lie in \(0, 1\]",
    ),
    Case(
        "generate-onnx-dir-without-runtime",
        ["generate", "{onnx_dir}", "--prompt", "hi"],
        message=r"ONNX export \(model.onnx\).*Fix: .*--runtime onnx",
    ),
    Case("generate-encoder", ["generate", "{bert}", "--prompt", "hi"], message=r"encoder"),
    Case(
        "eval-negative-window-evicting",
        ["eval", "{evicting}", "--ppl", "{text}", "--window", "-3"],
        message=r"--window must be at least 2 tokens \(got -3\)",
    ),
    Case(
        "eval-continuation-too-long",
        ["eval", "{evicting}", "--ppl", "{text}", "--window", "16", "--continuation", "16"],
        message=r"--continuation must be between 1 and the window - 1 = 15",
    ),
    Case(
        "eval-stride-0",
        ["eval", "{lm5}", "--ppl", "{text}", "--stride", "0"],
        message=r"--stride must be between 1",
    ),
    Case(
        "eval-json-unwritable",
        ["eval", "{lm5}", "--ppl", "{text}", "--json", "/proc/slimformer.json"],
        message=r"cannot write --json there",
    ),
    Case(
        "eval-missing-text",
        ["eval", "{lm5}", "--ppl", "nope.txt"],
        message=r"--ppl source 'nope.txt' does not exist",
    ),
    Case(
        "export-onnx-of-an-original",
        ["export", "onnx", "{lm5}", "-o", "out"],
        message=r"not a converted checkpoint",
        needs="onnx",
    ),
    Case(
        "generate-checkpoint-as-onnx",
        ["generate", "{evicting}", "--runtime", "onnx", "--prompt", "hi"],
        message=r"not an ONNX export.*export onnx",
        needs="onnxruntime",
    ),
    # -- --debug / SLIMFORMER_DEBUG show the traceback, then the same line
    Case("debug-flag", ["--debug", "convert", "./no-such-dir", "-o", "out"], check=_debug_traceback),
    Case(
        "debug-env",
        ["convert", "./no-such-dir", "-o", "out"],
        env={"SLIMFORMER_DEBUG": "1"},
        check=_debug_traceback,
    ),
    # -- what must work now (issue table: parents, -q, default calibration, inspect, help, aliases)
    Case(
        "output-parents-created",
        ["convert", "{lm5}", "-o", "new/dir/out", "-q"],
        code=0,
        creates={"new"},
        stdout=r"converted .* -> .*new/dir/out\n(.*\n)*full report: slimformer report",
        check=_parents_created,
    ),
    Case(
        "default-calibration-said",
        [
            "convert",
            "{lm5}",
            "-o",
            "out",
            "--drop",
            "attn:1",
            "--calib-samples",
            "2",
            "--calib-seq-len",
            "16",
            "-q",
        ],
        code=0,
        creates={"out"},
        check=_calibration_note,
    ),
    Case(
        "ppl-and-window-on-convert",
        ["convert", "{lm5}", "-o", "out", "--ppl", "{text}", "--window", "32", "--max-tokens", "256", "-q"],
        code=0,
        creates={"out"},
        check=_ppl_alias,
    ),
    Case(
        "eval-ppl-alias-on-eval",
        ["eval", "{lm5}", "--eval-ppl", "{text}", "--window", "32", "--max-tokens", "256", "-q"],
        code=0,
        stdout=r"^perplexity: \d+\.\d+\n$",
    ),
    Case("inspect-after-sas", ["inspect", "{sas}"], code=0, check=_inspect_replaced),
    Case("help-lists-pass-options", ["convert", "--help"], code=0, check=_help_lists_pass_options),
]


def _listing(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _fill(argv: list[str], world: dict[str, Path]) -> list[str]:
    return [str(world[a[1:-1]]) if a.startswith("{") and a.endswith("}") else a for a in argv]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_case(case: Case, cli: Cli, world: dict[str, Path], tmp_path: Path) -> None:
    if case.needs:
        pytest.importorskip(case.needs)
    inputs_before = {name: _listing(path.parent) for name, path in world.items()}
    result = cli.run(_fill(case.argv, world), cwd=tmp_path, env=case.env)
    # With -s, the table's outcomes: `pytest -s -k test_cli_case tests/test_bad_input.py`.
    print(
        f"\n[case] {case.id} | slimformer {' '.join(case.argv)} | exit {result.returncode} | "
        f"{result.lines[-1] if result.lines else result.stdout.splitlines()[0] if result.stdout else ''}"
    )
    assert result.returncode == case.code, (result.returncode, result.stderr[-3000:])
    if case.check is not _debug_traceback:
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if case.message is not None:
        assert len(result.lines) == 1, f"one line on stderr, got:\n{result.stderr}"
        line = result.lines[0]
        assert line.startswith("error: ") and "Fix: " in line, line
        assert re.search(case.message, line), line
        assert result.stdout == "", "a failed command prints no result"
    if case.stdout is not None:
        assert re.search(case.stdout, result.stdout), result.stdout
    if case.check is not None:
        case.check(result, tmp_path, world)
    # Nothing left behind: in the command's directory only what it was meant to create, and beside the
    # inputs (where -o points for some cases) nothing new.
    assert _listing(tmp_path) <= case.creates, _listing(tmp_path)
    for name, path in world.items():
        assert _listing(path.parent) == inputs_before[name], (
            name,
            _listing(path.parent) ^ inputs_before[name],
        )
    assert not Path("/proc/slimformer-out").exists()


def test_fork_server_matches_a_plain_subprocess(cli: Cli, world: dict[str, Path], tmp_path: Path) -> None:
    """The table's fork server gives what `python -m slimformer` gives (exit code, stderr, stdout)."""
    argv = _fill(["convert", "{lm5}", "-o", "out", "--drop", "attn:2", "--sas", "layers=4"], world)
    forked = cli.run(argv, cwd=tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("SLIMFORMER_DEBUG", None)
    plain = subprocess.run(
        [sys.executable, "-m", "slimformer", *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert (forked.returncode, forked.stdout) == (plain.returncode, plain.stdout) == (2, "")
    assert forked.stderr.replace("slimformer", "") == plain.stderr.replace("slimformer", "")
    assert _listing(tmp_path) == set()


# ---- replay from anywhere ----------------------------------------------------------------------------------------


def test_replay_from_another_directory_and_changed_data(
    cli: Cli, world: dict[str, Path], tmp_path: Path
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    shutil.copyfile(world["text"], first / "calib.txt")
    argv = [
        "convert",
        world["lm5"],
        "-o",
        "out",
        "--drop",
        "attn:2",
        "--calib",
        "calib.txt",
        "--calib-samples",
        "4",
        "--calib-seq-len",
        "32",
        "-q",
    ]
    result = cli.run(argv, cwd=first)  # a relative data path, as a user types it
    assert result.returncode == 0 and result.stderr == "", result.stderr
    pipeline = (first / "out" / "pipeline.toml").read_text()
    assert f'sources = ["{first / "calib.txt"}"]' in pipeline and "sha256:" in pipeline

    replay = ["convert", world["lm5"], "-o", "again", "--pipeline", first / "out" / "pipeline.toml", "-q"]
    result = cli.run(replay, cwd=second)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    original = json.loads((first / "out" / "report.json").read_text())
    again = json.loads((second / "again" / "report.json").read_text())
    assert again["layers"] == original["layers"] and again["pipeline"] == original["pipeline"]
    scores = [
        {k: v for k, v in r["passes"][0]["changes"]["scores"].items() if k != "seconds"}
        for r in (original, again)
    ]
    assert scores[0] == scores[1]

    with open(first / "calib.txt", "a") as handle:
        handle.write("A changed line.\n")
    result = cli.run([*replay[:3], "third", *replay[4:]], cwd=second)
    assert result.returncode == 0
    assert len(result.lines) == 1 and result.lines[0].startswith(
        f"warning: data file {first / 'calib.txt'} changed"
    ), result.stderr


def test_pipeline_file_paths_are_relative_to_the_file(
    cli: Cli, world: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "spec").mkdir()
    shutil.copyfile(world["text"], tmp_path / "spec" / "valid.txt")
    (tmp_path / "spec" / "p.toml").write_text(
        '[evaluation]\nppl = "valid.txt"\nwindow = 32\nmax_tokens = 128\n'
    )
    result = cli.run(
        ["convert", world["lm5"], "-o", tmp_path / "out", "--pipeline", "spec/p.toml", "-q"], cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"]["source"] == str(
        tmp_path / "spec" / "valid.txt"
    )


# ---- nothing left behind ------------------------------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_outputs_of_dead_runs_are_removed(
    cli: Cli, world: dict[str, Path], tmp_path: Path
) -> None:
    from slimformer.converter.outputs import OWNER_FILE

    dead = _dead_pid()
    stale = tmp_path / f".old-run.slimformer-tmp-{dead}-abcd1234"  # another output's, left by a killed run
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    (stale / OWNER_FILE).write_text(json.dumps({"pid": dead, "host": os.uname().nodename}))
    live = tmp_path / f".busy.slimformer-tmp-{os.getpid()}-efgh5678"  # a running process's work: left alone
    live.mkdir()
    swapped = (
        tmp_path / f".kept.slimformer-old-{dead}-ijkl9012"
    )  # killed between the two renames of --overwrite
    swapped.mkdir()
    (swapped / "config.json").write_text("{}")
    result = cli.run(["convert", world["lm5"], "-o", "out", "-q"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not stale.exists() and live.is_dir() and (tmp_path / "kept" / "config.json").is_file()
    assert f"note: removed stale temporary output {stale}" in result.stderr
    assert f"left by slimformer pid {dead}, which is no longer running" in result.stderr
    assert f"note: restored {tmp_path / 'kept'}" in result.stderr


def _partial_outputs(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".slimformer-" in p.name)


def test_sigkill_at_random_points_leaves_nothing_the_next_run_does_not_clean(
    cli: Cli, world: dict[str, Path], tmp_path: Path
) -> None:
    """SIGKILL a conversion and an export at random moments after they started writing; whatever they
    leave, the next run beside it removes (and says so), and every finished output is complete."""
    seed = int(os.environ.get("SLIMFORMER_KILL_SEED", time.time_ns() % 10_000))
    rng = random.Random(seed)
    # The first kill comes the moment the temporary output appears, so at least one lands mid-write.
    convert = ["convert", world["lm5"], "-o", "out", "-q"]
    jobs = [(convert, (0.0, 0.0), "model.safetensors")] + [(convert, (0.0, 0.4), "model.safetensors")] * 2
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")):
        jobs += [(["export", "onnx", world["evicting"], "-o", "out", "-q"], (0.0, 4.0), "model.onnx")] * 2
    outcomes = []
    for i, (argv, (low, high), product) in enumerate(jobs):
        work = tmp_path / f"kill-{i}"
        work.mkdir()
        pid = cli.start(argv, cwd=work)
        deadline = time.monotonic() + 120
        while not _partial_outputs(work) and not (work / "out").exists() and time.monotonic() < deadline:
            time.sleep(0.005)  # wait until it is writing, then kill it somewhere in that window
        delay = rng.uniform(low, high)
        time.sleep(delay)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # already done
        result = cli.wait()
        left = _partial_outputs(work)
        outcomes.append(
            f"{argv[0]} killed {delay:.2f}s into writing: exit {result.returncode}, left {left or 'nothing'}"
        )
        if (work / "out").exists():  # the rename happened: then the output is complete
            assert (work / "out" / product).is_file() and (work / "out" / "config.json").is_file(), outcomes[
                -1
            ]
        assert all(p.startswith(".out.slimformer-") for p in left), outcomes[-1]
        after = cli.run(["convert", world["lm5"], "-o", "next", "-q"], cwd=work)
        assert after.returncode == 0, after.stderr
        assert _partial_outputs(work) == [], (seed, outcomes[-1], _partial_outputs(work))
        for name in left:
            assert f"note: removed stale temporary output {work / name}" in after.stderr, (seed, after.stderr)
    print(f"SIGKILL seed {seed}:\n  " + "\n  ".join(outcomes))
    assert any("left ['" in o for o in outcomes), f"no kill landed while writing (seed {seed}): {outcomes}"


def test_sigterm_removes_its_own_temporary_output(cli: Cli, world: dict[str, Path], tmp_path: Path) -> None:
    """SIGTERM (what `kill`, systemd and CI runners send) ends a run like Ctrl-C: one line, exit 143, clean."""
    onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
    argv = (
        ["export", "onnx", world["evicting"], "-o", "out"] if onnx else ["convert", world["lm5"], "-o", "out"]
    )
    pid = cli.start(argv, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not _partial_outputs(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(pid, signal.SIGTERM)
    result = cli.wait()
    if (tmp_path / "out").exists():
        pytest.skip("the run finished before SIGTERM arrived")
    assert result.returncode == 143, result.stderr[-3000:]
    assert result.lines[-1].startswith("error: terminated (SIGTERM)") and "Traceback" not in result.stderr
    assert _listing(tmp_path) == set()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("command", ["convert", "export onnx"])
def test_disk_full_is_one_line_and_leaves_nothing(
    command: str, cli: Cli, world: dict[str, Path], tmp_path: Path
) -> None:
    if command == "export onnx":
        pytest.importorskip("onnx")
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        source = world["lm5"] if command == "convert" else convert_quietly(TINY_LM, tmp_path / "big", {})
        result = cli.run([*command.split(), source, "-o", mount / "out", "-q"], cwd=tmp_path)
        assert result.returncode == 2, result.stderr[-3000:]
        assert len(result.lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert re.match(
            rf"error: cannot write the output {mount / 'out'}: no space left on the device .*Fix: free space",
            result.lines[0],
        ), result.lines[0]
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# ---- progress and report ---------------------------------------------------------------------------------------


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(capsys) -> None:
    from slimformer.converter.progress import LineProgress, progress_bar

    with progress_bar(4, "silent", False) as bar:
        bar.update(4)
    assert capsys.readouterr().err == ""
    bar = progress_bar(3, "healing", True, unit="step")  # pytest's stderr is not a terminal
    assert isinstance(bar, LineProgress)
    bar.interval = 0.0
    with bar:
        for _ in range(3):
            bar.set_postfix_str("KL 0.5")
            bar.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines() == [
        f"[slimformer] healing: {i}/3 step ({100 * i / 3:.0f}%), 0s, KL 0.5" for i in (1, 2, 3)
    ]


def test_report_names_the_output_and_labels_both_perplexities(world: dict[str, Path], tmp_path: Path) -> None:
    from slimformer.converter.report import render_terminal

    out = convert_quietly(
        world["lm5"],
        tmp_path / "out",
        {
            "calibration": SMALL_CALIBRATION,
            "evaluation": {"ppl": str(world["text"]), "window": 32, "max_tokens": 256},
            "passes": [{"name": "sas", "layers": 1, "heal_steps": 6}, {"name": "a2sf", "budget": 8}],
        },
    )
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()
    assert markdown.startswith(f"# slimformer report: {out} (converted from {world['lm5']})")
    assert "| perplexity of the weights (" in markdown
    # The passes' own measurements: SAS before/after conversion and healing, and eviction (full vs evicting cache).
    measured = markdown.split("Measured by the passes:")[1].split("## Passes")[0]
    assert "| sas | perplexity on " in measured and "healing" in measured
    eviction = next(line for line in measured.splitlines() if line.startswith("| a2sf |"))
    assert "| full cache " in eviction and "| evicting cache " in eviction
    terminal = render_terminal(report)
    assert str(out) in terminal.splitlines()[0] and "full cache" in terminal and "evicting cache" in terminal
    assert report["plots"][0] == "layers.png" and set(report["plots"]) == {"layers.png", "sas_healing.png"}
    assert all((out / name).is_file() for name in report["plots"])
    history = report["passes"][0]["changes"]["conversion"]["heal"]["history"]
    assert [h["step"] for h in history] == list(range(1, 7)), "every step of a short healing run is plotted"


def test_every_option_has_help_and_perplexity_flags_match() -> None:
    import click
    from slimformer.converter.cli import cli as group

    def commands(command: click.Command, path: str):
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from commands(sub, f"{path} {name}")

    found = dict(commands(group, "slimformer"))
    missing = [
        f"{path} {p.opts[0]}"
        for path, command in found.items()
        for p in command.params
        if isinstance(p, click.Option) and not p.help
    ]
    assert not missing, f"options without help: {missing}"
    for path in ("slimformer convert", "slimformer eval"):
        names = {opt for p in found[path].params for opt in p.opts}
        assert {"--ppl", "--eval-ppl", "--window", "--max-tokens", "-q"} <= names, (path, names)
