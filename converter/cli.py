"""The ``slimformer`` command line.

Results go to stdout, diagnostics and progress to stderr. Every failure is one line on stderr,
``error: WHAT (at WHERE). Fix: HOW``, never a traceback: exit 2 for bad input or environment (a
:class:`SlimformerError`, a usage error, a full disk, a permission), 130 for Ctrl-C, 143 for SIGTERM, and 1
for a bug in slimformer (``internal error``). ``slimformer --debug ...`` or ``SLIMFORMER_DEBUG=1`` prints
the traceback as well, for bug reports. ``-q`` silences progress and log lines only: results still go to
stdout, warnings still to stderr.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .environment import require_extra
from .errors import SlimformerError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}

# Options shared by several commands: one wording everywhere.
DEVICE_HELP = "cpu, cuda or cuda:N."
DTYPE_HELP = "Working precision: float32, float16 or bfloat16."
PICKLE_HELP = "Allow reading .bin/.pt weights (unpickling). Only for files you trust."
REMOTE_CODE_HELP = "Allow a checkpoint that ships its own code (auto_map)."
QUIET_HELP = "No progress or log lines on stderr; results still go to stdout and warnings to stderr."
WINDOW_HELP = "Tokens per perplexity window."
MAX_TOKENS_HELP = "Evaluate at most this many tokens of the perplexity source."
PPL_HELP = "Perplexity text source: file, directory, 'stdlib[:valid]' or 'hf:NAME[:CONFIG][:SPLIT]'."
# The directory `eval --tasks` looks task names up in by default; the same variable as
# converter.evaluation.EVALS_DIR_ENV (named here too, so that --help does not import torch).
EVALS_DIR_ENV = "SLIMFORMER_EVALS_DIR"
DEBUG = {"on": False}  # tracebacks too: SLIMFORMER_DEBUG=1 (read by main()) or --debug


def _options(*options: Callable[[Callable], Callable]) -> Callable[[Callable], Callable]:
    """Several click options as one decorator, listed in --help in the order given."""

    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


# The option groups several commands share, defined once so that their names, defaults and wording agree.
source_safety_options = _options(
    click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP),
    click.option("--trust-remote-code", is_flag=True, help=REMOTE_CODE_HELP),
)


output_dir_option = click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Output directory (must not exist unless --overwrite).",
)


def compute_options(device_note: str = "", dtype_note: str = "") -> Callable[[Callable], Callable]:
    return _options(
        click.option("--device", default="cpu", show_default=True, help=DEVICE_HELP + device_note),
        click.option("--dtype", default="float32", show_default=True, help=DTYPE_HELP + dtype_note),
    )


def quiet_option(note: str = "") -> Callable[[Callable], Callable]:
    return click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP + note)


def output_options(quiet_note: str = "") -> Callable[[Callable], Callable]:
    return _options(
        click.option("--overwrite", is_flag=True, help="Replace an existing output directory (atomically)."),
        quiet_option(quiet_note),
    )


def parse_options(text: str, flag: str) -> dict[str, Any]:
    """``"budget=256,alpha=0.5,policy=h2o"`` -> ``{"budget": 256, "alpha": 0.5, "policy": "h2o"}``."""
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SlimformerError(
                f"malformed {flag} item {item!r}", fix=f"write {flag} key=value[,key=value...]"
            )
        options[key.strip().replace("-", "_")] = _coerce(
            value.strip()
        )  # one spelling: heal-steps is heal_steps
    return options


class PassOptionsCommand(click.Command):
    """``convert``: its help ends with every pass's option keys, defaults and meanings, read from the pass
    config dataclasses when help is asked for (so it cannot drift, and plain runs do not import the passes)."""

    FLAGS = {
        "layer_drop": "--drop KIND:N, --iterative, --max-ppl-increase PCT, --streaming, --heal-steps N",
        "sas": "--sas key=value,...",
        "a2sf": "--a2sf key=value,...",
    }

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from .pipeline import available_passes, option_rows

        super().format_epilog(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text(
            "Pass options: --sas and --a2sf take key=value[,key=value...]; a pipeline file's [[passes]] "
            "table takes the same keys. Keys are written with '_' ('heal-steps' is read as "
            "'heal_steps')."
        )
        for name, cls in sorted(
            available_passes().items(),
            key=lambda item: list(self.FLAGS).index(item[0]) if item[0] in self.FLAGS else len(self.FLAGS),
        ):
            with formatter.section(f"{name} ({self.FLAGS.get(name, 'pipeline file only')})"):
                formatter.write_dl(
                    [
                        (key, f"{meaning} (default: {default})")
                        for key, default, meaning in option_rows(cls.config_class)
                    ]
                )


def _coerce(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _kv_cache_override(a2sf: str | None) -> dict[str, Any] | None:
    if not a2sf:
        return None
    from .runtime.kv_cache import CachePolicy

    try:
        return CachePolicy.parse(a2sf).to_dict()
    except ValueError as exc:
        raise SlimformerError(
            f"bad --a2sf value: {exc}", fix="e.g. --a2sf budget=256,alpha=0.5,recent=32,sink=4"
        ) from exc


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="slimformer")
@click.option(
    "--debug",
    is_flag=True,
    help="On failure, print the traceback too (for bug reports; or SLIMFORMER_DEBUG=1).",
)
def cli(debug: bool) -> None:
    """slimformer: convert Hugging Face checkpoints into smaller, faster models, with the cost measured.

    \b
    slimformer convert examples/models/tiny-stdlib-lm -o out --eval-ppl stdlib:valid
    slimformer report out
    slimformer eval out --ppl stdlib:valid
    slimformer generate out --prompt "def main():"

    \b
    Every failure is one line on stderr (`error: ... Fix: ...`) and exit code 2; 1 means a bug in slimformer
    (re-run with --debug and report the traceback), 130 Ctrl-C, 143 SIGTERM.
    """
    if debug:
        DEBUG["on"] = True


@cli.command(context_settings=CONTEXT, cls=PassOptionsCommand)
@click.argument("source")
@output_dir_option
@click.option(
    "--pipeline",
    "pipeline_file",
    type=click.Path(path_type=Path),
    help="Pipeline spec (TOML or YAML) to run or replay.",
)
@click.option(
    "--calib",
    multiple=True,
    help="Calibration source: file, directory, 'stdlib[:train|:valid]' or 'hf:NAME[:CONFIG][:SPLIT]'. "
    "Repeatable. Default: stdlib:train (Python source code; a pass that calibrates says so on stderr).",
)
@click.option("--calib-samples", type=int, help="Number of calibration windows (default 32).")
@click.option("--calib-seq-len", type=int, help="Tokens per calibration window (default 256).")
@click.option("--calib-seed", type=int, help="Seed for choosing calibration windows (default 0).")
@click.option(
    "--eval-ppl",
    "--ppl",
    "eval_ppl",
    help="Measure perplexity before and after on this source (file, directory, "
    "'stdlib[:valid]', 'hf:...'); --ppl is the same flag, as in `slimformer eval`.",
)
@click.option("--window", type=int, help=WINDOW_HELP.rstrip(".") + " (default 256).")
@click.option("--max-tokens", type=int, help=MAX_TOKENS_HELP.rstrip(".") + " (default 16384).")
@click.option(
    "--drop", help="Layer drop: attn:N, mlp:N, block:N or joint:N (N a count, or a ratio like 0.25)."
)
@click.option("--iterative", is_flag=True, default=None, help="Layer drop: re-score after each removal.")
@click.option(
    "--max-ppl-increase",
    type=float,
    help="Layer drop: drop while --eval-ppl perplexity rises at most PCT percent.",
)
@click.option(
    "--streaming",
    is_flag=True,
    default=None,
    help="Layer drop: score one block at a time (one block's weights in memory), for models larger than RAM.",
)
@click.option(
    "--heal-steps",
    type=int,
    help="Layer drop: then heal by N steps of KL distillation to the model before dropping "
    "(heal_lr, heal_batch_size, heal_params: 'layer_drop' below, in a pipeline file).",
)
@click.option("--sas", help="SAS conversion, e.g. layers=2,heal_steps=200 (every key: 'sas' below).")
@click.option(
    "--a2sf", help="KV-cache eviction, e.g. budget=256,alpha=0.5,recent=32,sink=4 (every key: 'a2sf' below)."
)
@compute_options(device_note=" Calibration, evaluation and healing run there.")
@click.option("--save-dtype", help="Precision of the written weights (default: unchanged).")
@click.option("--speed", is_flag=True, help="Also measure prefill/decode tokens/s before and after.")
@source_safety_options
@output_options(quiet_note=" (The summary still prints.)")
def convert(
    source: str,
    out: Path,
    pipeline_file: Path | None,
    calib: tuple[str, ...],
    calib_samples: int | None,
    calib_seq_len: int | None,
    calib_seed: int | None,
    eval_ppl: str | None,
    window: int | None,
    max_tokens: int | None,
    drop: str | None,
    iterative: bool | None,
    max_ppl_increase: float | None,
    streaming: bool | None,
    heal_steps: int | None,
    sas: str | None,
    a2sf: str | None,
    device: str,
    dtype: str,
    save_dtype: str | None,
    speed: bool,
    allow_pickle: bool,
    trust_remote_code: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Convert SOURCE (a local directory or Hub id) into a smaller checkpoint in OUT, with a report.

    Every option, pass option and the passes' effect on each other (e.g. layers left for --sas after --drop)
    is checked against SOURCE before any work. Prints a summary on stdout; `slimformer report OUT` prints the
    whole report. Missing parent directories of OUT are created.

    \b
    Examples:
      slimformer convert ./my-llama -o out                       # identity pipeline, report only
      slimformer convert ./my-llama -o out --drop attn:4 --eval-ppl stdlib:valid
      slimformer convert Qwen/Qwen2.5-0.5B -o out --drop joint:0.25 --calib data.jsonl
      slimformer convert ./my-llama -o out --a2sf budget=256,alpha=0.5
      slimformer convert ./my-llama -o out --sas layers=2,heal_steps=200 --calib data.txt
      slimformer convert ./my-llama -o out2 --pipeline out/pipeline.toml   # replay, from any directory
    """
    from .conversion import ConvertOptions
    from .conversion import convert as run_convert
    from .pipeline import PassSpec, PipelineSpec
    from .report import render_summary

    spec = PipelineSpec.from_file(pipeline_file) if pipeline_file else PipelineSpec()
    if calib:
        spec.calibration.sources = list(calib)
        spec.calibration_given = True
    for name, value in (("samples", calib_samples), ("seq_len", calib_seq_len), ("seed", calib_seed)):
        if value is not None:
            setattr(spec.calibration, name, value)
    if eval_ppl:
        spec.evaluation.ppl = eval_ppl
    for name, value in (("window", window), ("max_tokens", max_tokens)):
        if value is not None:
            setattr(spec.evaluation, name, value)
    if (window is not None or max_tokens is not None) and not spec.evaluation.ppl:
        raise SlimformerError(
            "--window and --max-tokens set the perplexity evaluation, and none was asked for",
            fix="add --eval-ppl SPEC (e.g. --eval-ppl stdlib:valid), or drop them",
        )
    if streaming and not drop and max_ppl_increase is None:
        raise SlimformerError(
            "--streaming applies to layer-drop scoring, and no layer drop was asked for",
            fix="add --drop attn:N (or mlp:N, block:N, joint:N, or --max-ppl-increase PCT)",
        )
    if heal_steps is not None and not drop and max_ppl_increase is None:
        raise SlimformerError(
            "--heal-steps heals after a layer drop, and no layer drop was asked for",
            fix="add --drop attn:N (or mlp:N, block:N, joint:N, or --max-ppl-increase PCT)",
        )
    if drop or iterative or max_ppl_increase is not None:
        params: dict[str, Any] = {"drop": drop} if drop else {}
        for flag, value in (("iterative", iterative), ("streaming", streaming)):
            if value:
                params[flag] = True
        for key, number in (("max_ppl_increase", max_ppl_increase), ("heal_steps", heal_steps)):
            if number is not None:
                params[key] = number
        spec.passes.append(PassSpec("layer_drop", params))
    if sas:
        spec.passes.append(PassSpec("sas", parse_options(sas, "--sas")))
    if a2sf:
        spec.passes.append(PassSpec("a2sf", parse_options(a2sf, "--a2sf")))
    options = ConvertOptions(
        device=device,
        dtype=dtype,
        save_dtype=save_dtype,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        overwrite=overwrite,
        quiet=quiet,
        measure_speed=speed,
    )
    report = run_convert(source, out, spec, options)
    click.echo(render_summary(report))  # a result, so -q keeps it; the full report is `slimformer report OUT`


@cli.command(context_settings=CONTEXT)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw report.json instead.")
@click.option("--html", "as_html", is_flag=True, help="Print the path of report.html (written if missing).")
@click.option("--open", "open_html", is_flag=True, help="Open report.html in the default browser.")
def report(directory: Path, as_json: bool, as_html: bool, open_html: bool) -> None:
    """Print a readable summary of a converted DIRECTORY.

    \b
    Examples:
      slimformer report out
      slimformer report out --open     # report.html: tables, plots, the pipeline, in a browser
    """
    from .report import load_report, render_terminal

    data = load_report(directory)
    if as_html or open_html:
        from .report_html import REPORT_HTML, write_html

        # Outputs from before report.html existed get one now, from their report.json.
        page = directory / REPORT_HTML if (directory / REPORT_HTML).is_file() else write_html(data, directory)
        click.echo(str(page.resolve()))
        if open_html:
            import webbrowser

            if not webbrowser.open(page.resolve().as_uri()):
                click.echo("no browser found here: open the path above on a machine with one", err=True)
        return
    click.echo(json.dumps(data, indent=2) if as_json else render_terminal(data))


@cli.command(context_settings=CONTEXT)
@click.argument("source")
@source_safety_options
def inspect(source: str, allow_pickle: bool, trust_remote_code: bool) -> None:
    """Print the checkpoint graph of SOURCE (original or converted): nodes, states, tensors, parameters.

    \b
    Example:
      slimformer inspect ../shared/models/stories260K
    """
    from .graph import REPLACED, load_graph
    from .source import resolve_source

    graph = load_graph(resolve_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))
    # A checkpoint stores a simplified attention as its block config's form; call it what the report calls it.
    for block in graph.blocks:
        form = block.attention.details.get("form", "standard")
        if block.attention.kept and form != "standard":
            block.attention.state = REPLACED
            block.attention.reason = block.attention.reason or f"SAS attention, form {form}"
    click.echo(graph.describe())


@cli.command(context_settings=CONTEXT)
@click.argument("source")
@click.option(
    "--calib",
    multiple=True,
    required=True,
    help="Calibration source (file, directory, stdlib[:train|:valid], hf:...). Repeat to compare sources.",
)
@click.option("--calib-samples", default=32, show_default=True, help="Calibration windows per source.")
@click.option("--calib-seq-len", default=256, show_default=True, help="Tokens per calibration window.")
@click.option("--calib-seed", default=0, show_default=True, help="Seed for choosing calibration windows.")
@click.option(
    "--metric",
    type=click.Choice(["cosine", "angular"]),
    default="cosine",
    show_default=True,
    help="1 - cos(X, Y) (LLM-Drop) or the angular distance arccos(cos)/pi.",
)
@click.option(
    "--compare",
    type=click.Choice(["residual", "norm_output"]),
    default="residual",
    show_default=True,
    help="residual: X before the norm vs X + f(norm X) (LLM-Drop); norm_output: norm(X) vs f(norm X).",
)
@click.option(
    "--drop", help="Drop spec whose drop set is compared across sources (default: a quarter of each kind)."
)
@click.option("--streaming", is_flag=True, help="Score one layer at a time (one block's weights in memory).")
@click.option("--batch-size", default=8, show_default=True, help="Calibration windows per forward.")
@click.option(
    "--json", "json_path", type=click.Path(path_type=Path), help="Also write the scores as JSON to this file."
)
@compute_options()
@source_safety_options
@quiet_option()
def score(
    source: str,
    calib: tuple[str, ...],
    calib_samples: int,
    calib_seq_len: int,
    calib_seed: int,
    metric: str,
    compare: str,
    drop: str | None,
    streaming: bool,
    batch_size: int,
    json_path: Path | None,
    device: str,
    dtype: str,
    allow_pickle: bool,
    trust_remote_code: bool,
    quiet: bool,
) -> None:
    """Print the per-layer importance of attention, MLP and blocks of SOURCE, without converting.

    \b
    With two or more --calib sources, also prints how stable the ranking is across them (Spearman rank
    correlation, overlap of the drop sets) and warns when the choice depends on the source.

    \b
    Examples:
      slimformer score ../shared/models/stories260K --calib ../shared/data/wikitext2/wiki.valid.tokens
      slimformer score ./my-llama --calib stdlib:train --calib wiki.txt --drop attn:4 --json scores.json
    """
    from slimformer.passes.layer_drop.drop import DropSpec, stability_of
    from slimformer.passes.layer_drop.importance import format_table, rank_modules, score_graph

    from .calibration import sample_windows
    from .devices import check_device, parse_dtype
    from .graph import load_graph
    from .source import resolve_source
    from .tokenizer import load_tokenizer

    src = resolve_source(source, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    graph = load_graph(src)
    tokenizer = load_tokenizer(src.path, trust_remote_code=trust_remote_code)
    if tokenizer is None:
        raise SlimformerError(
            "scoring needs calibration text, but the checkpoint has no tokenizer",
            where=source,
            fix="add tokenizer files (tokenizer.json / tokenizer_config.json)",
        )
    device, torch_dtype = check_device(device), parse_dtype(dtype)
    specs = [drop] if drop else [f"{kind}:0.25" for kind in ("attn", "mlp", "block", "joint")]
    for text in specs:
        DropSpec.parse(text).resolve(
            graph, text
        )  # a bad spec, or one asking for too many, fails before scoring
    for name, value, least in (
        ("--calib-samples", calib_samples, 1),
        ("--calib-seq-len", calib_seq_len, 2),
        ("--batch-size", batch_size, 1),
    ):
        if value < least:
            raise SlimformerError(
                f"{name} must be at least {least} (got {value})", fix=f"e.g. {name} {max(least, 8)}"
            )
    from .calibration import check_source

    for spec in calib:
        check_source(spec, flag="--calib")
    _check_json_path(json_path)
    scores = {}
    for spec in calib:
        windows = sample_windows(tokenizer, spec, calib_samples, calib_seq_len, calib_seed)
        scores[spec] = score_graph(
            graph,
            windows,
            streaming=streaming,
            metric=metric,
            compare=compare,
            batch_size=batch_size,
            device=device,
            dtype=torch_dtype,
            progress=not quiet,
            source=spec,
        )
    first_spec = DropSpec.parse(specs[0])
    n_first = first_spec.resolve(graph, specs[0])
    for result in scores.values():
        marked = {m.label for m in rank_modules(result, first_spec.mode)[:n_first]}
        click.echo(format_table(result, marked))
        click.echo(f"(* = the {n_first} {first_spec.mode} module(s) --drop {specs[0]} would remove)\n")
    stability = [stability_of(scores, text, graph) for text in specs] if len(scores) > 1 else []
    for i, pair in enumerate(stability[0].pairs if stability else []):
        a, b = pair["sources"]
        rho = ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} n/a" for k, v in pair["spearman"].items())
        overlap = ", ".join(f"{text} {item.pairs[i]['jaccard']:.2f}" for text, item in zip(specs, stability))
        click.echo(f"{a} vs {b}: Spearman rank correlation {rho}; drop-set overlap (Jaccard) {overlap}")
    for item in stability:
        if item.warning():
            click.echo(f"warning: {item.warning()}", err=True)
    if json_path:
        data = {
            "source": source,
            "family": graph.family,
            "num_layers": len(graph.blocks),
            "calibration": {"samples": calib_samples, "seq_len": calib_seq_len, "seed": calib_seed},
            "scores": {spec: result.to_dict() for spec, result in scores.items()},
            "stability": [item.to_dict() for item in stability],
        }
        json_path.write_text(json.dumps(data, indent=2) + "\n")


def _check_json_path(path: Path | None) -> None:
    """A --json file that cannot be written fails now, not after the measurement it would hold."""
    import tempfile

    if path is None:
        return
    parent = path.expanduser().absolute().parent
    if path.is_dir():
        raise SlimformerError(
            "--json names a directory", where=str(path), fix="give a file path, e.g. --json result.json"
        )
    if not parent.is_dir():
        raise SlimformerError(
            "the directory for --json does not exist",
            where=str(parent),
            fix="create it, or choose another path",
        )
    try:  # a real probe: os.access() says yes to root on read-only file systems
        handle, probe = tempfile.mkstemp(prefix=f".{path.name}.probe-", dir=parent)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise SlimformerError(
            f"cannot write --json there ({exc.strerror})",
            where=str(parent),
            fix="choose a writable location for --json",
        ) from exc


def _require_decoder(ckpt: str, allow_pickle: bool, trust_remote_code: bool, command: str) -> None:
    """Refuse an encoder from the checkpoint's headers, before its weights are loaded."""
    from .graph import load_graph
    from .source import resolve_source

    if load_graph(
        resolve_source(ckpt, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    ).is_encoder:
        raise SlimformerError(
            f"{command} needs a causal language model; this checkpoint is an encoder",
            where=ckpt,
            fix="use a decoder checkpoint (llama, mistral, qwen2, qwen3)",
        )


def _load(ckpt: str, device: str, dtype: str, a2sf: str | None, allow_pickle: bool, trust_remote_code: bool):
    from .conversion import load_model
    from .source import resolve_source
    from .tokenizer import load_tokenizer

    model = load_model(
        ckpt,
        device=device,
        dtype=dtype,
        kv_cache=_kv_cache_override(a2sf),
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
    )
    tokenizer = load_tokenizer(
        resolve_source(ckpt, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code).path,
        trust_remote_code=trust_remote_code,
    )
    if tokenizer is None:
        raise SlimformerError(
            "checkpoint has no tokenizer files", where=ckpt, fix="add tokenizer.json / tokenizer_config.json"
        )
    return model, tokenizer


@cli.command("eval", context_settings=CONTEXT)
@click.argument("ckpt")
@click.option(
    "--ppl",
    "--eval-ppl",
    "ppl_source",
    help=PPL_HELP + " --eval-ppl is the same flag, as in convert.",
)
@click.option(
    "--tasks",
    help="Zero-shot multiple-choice accuracy on these tasks, comma-separated: names (NAME.jsonl in "
    "--evals-dir) or paths of llm-foundry ICL .jsonl files, e.g. arc_easy,piqa,copa.",
)
@click.option(
    "--evals-dir",
    type=click.Path(path_type=Path),
    help=f"With --tasks: the directory task names are looked up in (default: ${EVALS_DIR_ENV}).",
)
@click.option(
    "--limit", type=int, help="With --tasks: score the first N examples of each task (default: all)."
)
@click.option("--window", default=256, show_default=True, help=WINDOW_HELP)
@click.option("--stride", type=int, help="Advance between windows (default: window, i.e. disjoint windows).")
@click.option("--max-tokens", default=16384, show_default=True, help=MAX_TOKENS_HELP)
@click.option(
    "--a2sf",
    help="Override the checkpoint's KV-cache policy, e.g. budget=64,alpha=0.5 (policy=none: full cache).",
)
@click.option(
    "--continuation",
    type=int,
    help="Under eviction: tokens decoded and scored at the end of each window (default: window/4).",
)
@click.option(
    "--chunk",
    type=int,
    help="Under eviction: continuation (or, with --tasks, choice) tokens fed per forward "
    "(default 1: token by token).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    help="Also write the results as JSON to this file.",
)
@compute_options()
@source_safety_options
@quiet_option()
def eval_command(
    ckpt: str,
    ppl_source: str | None,
    tasks: str | None,
    evals_dir: Path | None,
    limit: int | None,
    window: int,
    stride: int | None,
    max_tokens: int,
    a2sf: str | None,
    continuation: int | None,
    chunk: int | None,
    json_path: Path | None,
    device: str,
    dtype: str,
    allow_pickle: bool,
    trust_remote_code: bool,
    quiet: bool,
) -> None:
    """Measure CKPT (converted or original): perplexity (--ppl) and/or zero-shot accuracy (--tasks).

    \b
    --ppl prints `perplexity: <value>`. --tasks prints one line per task,
    `arc_easy: acc 0.5430 ± 0.0223, acc_norm 0.4890 ± 0.0224 (n=500)` (stderrs as lm-eval computes
    them), and their average when there are several; each choice is scored by log-likelihood as
    lm-evaluation-harness does.

    \b
    When a KV-cache policy that evicts is active (stored in CKPT by the a2sf pass, or given with --a2sf),
    scoring in one forward would never see the eviction, so the decode protocol is used. Perplexity: each
    window's first tokens are the prompt (prefilled, then the cache evicts down to its budget) and its
    last --continuation tokens are decoded --chunk at a time through that cache and scored; a second line
    gives the full-cache perplexity of the same tokens and the difference. Tasks: each question is the
    prompt (a budget_ratio is a fraction of it) and each choice is decoded --chunk tokens at a time
    through the evicted cache; the output says so (compare with --a2sf policy=none for the full cache).

    \b
    Examples:
      slimformer eval out --ppl stdlib:valid
      slimformer eval out --ppl wiki.test.raw --window 512 --stride 256 --json ppl.json
      slimformer eval out --ppl stdlib:valid --window 512 --a2sf budget_ratio=0.2,alpha=0.1
      slimformer eval out --tasks arc_easy,piqa --evals-dir ../shared/data/evals --limit 200
      slimformer eval out --tasks copa.jsonl --a2sf budget_ratio=0.5 --json copa.json
    """
    from .calibration import check_source

    # The arguments first: loading a large model to then refuse --window -3 would waste minutes.
    _check_eval_targets(ppl_source, tasks, limit, evals_dir)
    _check_eval_arguments(window, stride, max_tokens, continuation, chunk)
    task_paths = _resolve_tasks(tasks, evals_dir, limit) if tasks is not None else {}
    _check_json_path(json_path)
    if ppl_source:
        check_source(ppl_source, flag="--ppl")
    _kv_cache_override(a2sf)  # a bad --a2sf fails here, before the weights are read
    measured = "perplexity" if not task_paths else "evaluation" if ppl_source else "multiple-choice accuracy"
    _require_decoder(ckpt, allow_pickle, trust_remote_code, measured)
    model, tokenizer = _load(ckpt, device, dtype, a2sf, allow_pickle, trust_remote_code)
    policy = _active_policy(model, ckpt)
    record: dict[str, Any] = {"checkpoint": ckpt}
    if ppl_source:
        record.update(
            _eval_perplexity(
                model, tokenizer, ppl_source, policy, window, stride, max_tokens, continuation, chunk, quiet
            )
        )
    if task_paths:
        record["multiple_choice"] = _eval_tasks(model, tokenizer, task_paths, limit, policy, chunk, quiet)
    if json_path:
        json_path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def _eval_perplexity(
    model: Any,
    tokenizer: Any,
    ppl_source: str,
    policy: Any,
    window: int,
    stride: int | None,
    max_tokens: int,
    continuation: int | None,
    chunk: int | None,
    quiet: bool,
) -> dict[str, Any]:
    """Perplexity (under eviction: the decode protocol, with the full cache's number beside it), printed;
    the JSON fields of the result."""
    from .evaluation import eviction_perplexity, perplexity

    if policy is None and continuation is None and chunk is None:
        result = perplexity(
            model,
            tokenizer,
            ppl_source,
            window=window,
            stride=stride,
            max_tokens=max_tokens,
            progress=not quiet,
        )
        click.echo(f"perplexity: {result.perplexity:.4f}")
        return result.to_dict()
    if stride is not None:
        raise SlimformerError(
            "--stride does not apply to perplexity under KV-cache eviction (windows are disjoint)",
            fix="drop --stride, or measure the full cache with --a2sf policy=none",
        )
    # The model's own cache is the active policy (load_model applied any --a2sf override to its config).
    result = eviction_perplexity(
        model,
        tokenizer,
        ppl_source,
        window=window,
        continuation=continuation,
        chunk=chunk or 1,
        max_tokens=max_tokens,
        progress=not quiet,
    )
    click.echo(f"perplexity: {result.perplexity:.4f}")
    click.echo(
        f"full-cache perplexity of the same tokens: {result.full_cache_perplexity:.4f} "
        f"({result.increase_pct:+.2f}% from eviction; {result.n_windows} windows of {result.prompt_len} prompt + "
        f"{result.continuation} decoded tokens, chunk {result.chunk}, cache held {result.cache_tokens} tokens/slot)"
    )
    return {"kv_cache": policy.to_dict() if policy else None, **result.to_dict()}


# Options of `eval` that only shape the perplexity measurement, and those that only shape --tasks.
PPL_ONLY_OPTIONS = ("window", "stride", "max_tokens", "continuation")
TASK_ONLY_OPTIONS = ("limit", "evals_dir")


def _given(name: str) -> bool:
    """Whether option ``name`` of the running command was set by the user rather than left at its default."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _flags(names: list[str]) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


def _check_eval_targets(
    ppl_source: str | None, tasks: str | None, limit: int | None, evals_dir: Path | None
) -> None:
    """At least one measurement, and no option that belongs to the one not asked for."""
    if not ppl_source and tasks is None:
        raise SlimformerError(
            "slimformer eval needs something to measure: --ppl, --tasks, or both",
            fix="add --ppl SOURCE (e.g. --ppl stdlib:valid) and/or --tasks NAMES "
            "(e.g. --tasks arc_easy,piqa --evals-dir DIR)",
        )
    stray = [name for name in PPL_ONLY_OPTIONS if not ppl_source and _given(name)]
    if stray:
        raise SlimformerError(
            f"{_flags(stray)} set the perplexity measurement, and no --ppl was given",
            fix="add --ppl SOURCE (e.g. --ppl stdlib:valid), or drop them",
        )
    stray = [name for name in TASK_ONLY_OPTIONS if tasks is None and _given(name)]
    if stray:
        raise SlimformerError(
            f"{_flags(stray)} apply to --tasks, and no --tasks was given",
            fix="add --tasks NAMES (e.g. --tasks arc_easy,piqa), or drop them",
        )
    if limit is not None and limit < 1:
        raise SlimformerError(
            f"--limit must be at least 1 (got {limit})",
            fix="e.g. --limit 200 (the first 200 examples of each task), or leave it out for all",
        )


def _resolve_tasks(tasks: str, evals_dir: Path | None, limit: int | None) -> dict[str, Path]:
    """Task name -> its .jsonl file, each file read and checked now (a bad line fails before the model loads)."""
    from .evaluation.multiple_choice import _load_examples

    items = [item.strip() for item in tasks.split(",") if item.strip()]
    if not items:
        raise SlimformerError(
            f"--tasks is empty (got {tasks!r})", fix="name tasks, e.g. --tasks arc_easy,piqa,copa"
        )
    directory = evals_dir if evals_dir is not None else os.environ.get(EVALS_DIR_ENV) or None
    if directory is not None and not Path(directory).expanduser().is_dir():
        flag = "--evals-dir" if evals_dir is not None else EVALS_DIR_ENV
        raise SlimformerError(
            f"the tasks directory ({flag}) does not exist",
            where=str(directory),
            fix=f"point {flag} at the directory holding the task .jsonl files",
        )
    resolved: dict[str, Path] = {}
    for item in items:
        path = _task_path(item, Path(directory).expanduser() if directory is not None else None)
        name = path.name.removesuffix(".jsonl")
        if name in resolved and resolved[name] != path:
            raise SlimformerError(
                f"two tasks are named {name!r} ({resolved[name]} and {path})",
                fix="give each task once, or rename one file",
            )
        _load_examples(path, limit)
        resolved[name] = path
    return resolved


def _task_path(item: str, directory: Path | None) -> Path:
    path = Path(item).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise SlimformerError(
            "a --tasks entry must be a .jsonl file or a task name, not a directory",
            where=str(path),
            fix=f"pass the directory as --evals-dir {path} and name the tasks in it",
        )
    named = len(path.parts) == 1
    if named and directory is not None:
        candidate = directory / (path.name if path.suffix == ".jsonl" else f"{path.name}.jsonl")
        if candidate.is_file():
            return candidate
        available = sorted(p.name.removesuffix(".jsonl") for p in directory.glob("*.jsonl"))
        listing = f"tasks there: {', '.join(available)}" if available else "it holds no .jsonl files"
        raise SlimformerError(
            f"unknown task {item!r}: no {candidate.name} in the tasks directory ({listing})",
            where=str(directory),
            fix="name one of the tasks there, give the path of a .jsonl file, "
            "or point --evals-dir at the directory that holds it",
        )
    if named:
        raise SlimformerError(
            f"task {item!r} is not a file, and no tasks directory is set to look its name up in",
            fix=f"pass --evals-dir DIR (or set {EVALS_DIR_ENV}) to the directory of the task .jsonl files, "
            "or give the file's path",
        )
    raise SlimformerError(
        "task file not found", where=str(path), fix="give the path of an llm-foundry ICL .jsonl file"
    )


def _describe_policy(policy: Any) -> str:
    """``policy=a2sf, budget_ratio=0.5, alpha=1.0``: the fields set, without the bookkeeping ones."""
    fields = policy.to_dict()
    return ", ".join(
        f"{key}={value}"
        for key, value in fields.items()
        if value is not None and key not in ("format", "chunk_size")
    )


def _eval_tasks(
    model: Any,
    tokenizer: Any,
    task_paths: dict[str, Path],
    limit: int | None,
    policy: Any,
    chunk: int | None,
    quiet: bool,
) -> dict[str, Any]:
    """Zero-shot accuracy on each task (printed as it finishes); the JSON block of every result."""
    from .evaluation import multiple_choice_accuracy

    # Under eviction, the question is the prompt and each choice is decoded through the evicted cache: in one
    # forward the cache would only evict after the choice was already scored. None = the model's own cache.
    decode_chunk = (chunk or 1) if policy is not None or chunk is not None else None
    if decode_chunk is not None:
        cache = f"KV-cache eviction ({_describe_policy(policy)})" if policy is not None else "the full cache"
        click.echo(
            f"multiple choice under {cache}, decode protocol: each question is prefilled as the prompt "
            f"(then evicted to the budget), each choice decoded {decode_chunk} token(s) per forward through "
            "that cache and scored"
        )
    results = {}
    for name, path in task_paths.items():
        if not quiet:
            click.echo(f"[slimformer] {name}: scoring {path}", err=True)
        result = multiple_choice_accuracy(
            model, tokenizer, str(path), limit=limit, progress=not quiet, decode_chunk=decode_chunk
        )
        results[name] = result.to_dict()
        click.echo(
            f"{name}: acc {_with_stderr(result.acc, result.acc_stderr)}, "
            f"acc_norm {_with_stderr(result.acc_norm, result.acc_norm_stderr)} (n={result.n})"
        )
    block: dict[str, Any] = {
        "protocol": "decode" if decode_chunk is not None else "one forward",
        "decode_chunk": decode_chunk,
        "kv_cache": policy.to_dict() if policy is not None else None,
        "limit": limit,
        "tasks": results,
    }
    if len(results) > 1:
        average = {key: sum(r[key] for r in results.values()) / len(results) for key in ("acc", "acc_norm")}
        click.echo(
            f"average over {len(results)} tasks: acc {average['acc']:.4f}, acc_norm {average['acc_norm']:.4f}"
        )
        block["average"] = average
    return block


def _with_stderr(value: float, stderr: float | None) -> str:
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def _check_eval_arguments(
    window: int, stride: int | None, max_tokens: int, continuation: int | None, chunk: int | None
) -> None:
    if window < 2:
        raise SlimformerError(f"--window must be at least 2 tokens (got {window})", fix="e.g. --window 256")
    if stride is not None and not 1 <= stride <= window:
        raise SlimformerError(
            f"--stride must be between 1 and the window ({window}), got {stride}",
            fix=f"e.g. --stride {max(1, window // 2)}, or leave it out for disjoint windows",
        )
    if max_tokens < 2:
        raise SlimformerError(
            f"--max-tokens must be at least 2 (got {max_tokens})", fix="e.g. --max-tokens 16384"
        )
    if continuation is not None and not 1 <= continuation < window:
        raise SlimformerError(
            f"--continuation must be between 1 and the window - 1 = {window - 1} (got {continuation})",
            fix="the window holds the prompt and the continuation: shorten --continuation or widen --window",
        )
    if chunk is not None and chunk < 1:
        raise SlimformerError(
            f"--chunk must be at least 1 (got {chunk})", fix="e.g. --chunk 1 (token by token)"
        )


def _check_generation_arguments(max_new_tokens: int, sample: bool, temperature: float, top_p: float) -> None:
    """Refuse what transformers would refuse with a traceback (or silently ignore) before loading anything."""
    if max_new_tokens < 1:
        raise SlimformerError(
            f"--max-new-tokens must be at least 1 (got {max_new_tokens})", fix="e.g. --max-new-tokens 32"
        )
    if sample and not temperature > 0:
        raise SlimformerError(
            f"--sample needs --temperature > 0 (got {temperature})",
            fix="use e.g. --temperature 0.8, or drop --sample for greedy decoding",
        )
    if not 0 < top_p <= 1:
        raise SlimformerError(
            f"--top-p must lie in (0, 1] (got {top_p})", fix="e.g. --top-p 0.9 (1 keeps every token)"
        )
    if not sample and (temperature != 1.0 or top_p != 1.0):
        click.echo("warning: --temperature and --top-p apply only with --sample; decoding greedily", err=True)


def _active_policy(model: Any, ckpt: str) -> Any:
    """The evicting CachePolicy the model's own cache follows, or ``None`` for a plain cache."""
    from .runtime.kv_cache import CachePolicy

    spec = getattr(model.config, "kv_cache", None)
    if not spec:
        return None
    try:
        policy = CachePolicy.from_dict(dict(spec))
    except ValueError as exc:
        raise SlimformerError(
            f"the checkpoint's kv_cache config is invalid: {exc}",
            where=f"{ckpt}/config.json",
            fix="override it with --a2sf, or re-run the conversion",
        ) from exc
    return policy if policy.evicts else None


@cli.command(context_settings=CONTEXT)
@click.argument("ckpt")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens to generate (at least 1).")
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option(
    "--temperature", default=1.0, show_default=True, help="With --sample: softmax temperature (> 0)."
)
@click.option(
    "--top-p", default=1.0, show_default=True, help="With --sample: nucleus sampling mass, in (0, 1]."
)
@click.option("--seed", default=0, show_default=True, help="Seed for sampling.")
@click.option("--a2sf", help="Override the checkpoint's KV-cache policy, e.g. budget=64,alpha=0.5.")
@click.option(
    "--runtime",
    type=click.Choice(["torch", "onnx"]),
    default="torch",
    show_default=True,
    help="torch: a converted (or original) checkpoint; onnx: a directory from `slimformer export onnx`.",
)
@compute_options(dtype_note=" (--runtime torch)")
@source_safety_options
@click.option(
    "--cache-kernel",
    type=click.Choice(["auto", "native", "function"]),
    default=None,
    help="--runtime onnx: run the A2SF cache op with the native kernel (`make kernels`), its ONNX function "
    "body, or auto (native when built; the default). Given, it also says on stderr which one runs.",
)
def generate(
    ckpt: str,
    prompt: str,
    max_new_tokens: int,
    sample: bool,
    temperature: float,
    top_p: float,
    seed: int,
    a2sf: str | None,
    runtime: str,
    device: str,
    dtype: str,
    allow_pickle: bool,
    trust_remote_code: bool,
    cache_kernel: str | None,
) -> None:
    """Generate text from CKPT (greedy by default). The text goes to stdout.

    \b
    Examples:
      slimformer generate out --prompt "def parse(" --max-new-tokens 32
      slimformer generate out --prompt "import os" --sample --temperature 0.8 --seed 1
    """
    import torch

    _check_generation_arguments(max_new_tokens, sample, temperature, top_p)
    if runtime == "onnx":
        require_extra("onnx", "`slimformer generate --runtime onnx`")
        from slimformer.exporters.onnx_runtime import generate_text

        report = (lambda line: click.echo(line, err=True)) if cache_kernel else None
        click.echo(
            generate_text(
                ckpt,
                prompt,
                max_new_tokens=max_new_tokens,
                sample=sample,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                a2sf=_kv_cache_override(a2sf),
                device=device,
                cache_kernel=cache_kernel or "auto",
                report=report,
            )
        )
        return
    if cache_kernel:
        raise SlimformerError(
            "--cache-kernel applies to --runtime onnx only", fix="add --runtime onnx, or drop --cache-kernel"
        )
    _require_decoder(ckpt, allow_pickle, trust_remote_code, "generate")
    model, tokenizer = _load(ckpt, device, dtype, a2sf, allow_pickle, trust_remote_code)
    if model.config.is_encoder:
        raise SlimformerError(
            "generate needs a causal language model; this checkpoint is an encoder", where=ckpt
        )
    inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False).to(device)
    torch.manual_seed(seed)
    kwargs = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, **kwargs)
    click.echo(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


@cli.group(context_settings=CONTEXT)
def export() -> None:
    """Export a converted checkpoint to another runtime's format (see `slimformer export onnx -h`)."""


@export.command("onnx", context_settings=CONTEXT)
@click.argument("ckpt")
@output_dir_option
@click.option("--opset", default=18, show_default=True, help="ONNX opset (18-20).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default="float32",
    show_default=True,
    help="Precision of the exported weights and caches.",
)
@click.option(
    "--cache-op/--no-cache-op",
    default=None,
    help="Put the A2SF cache-eviction op into the graph (default: when the checkpoint's kv_cache policy evicts).",
)
@click.option(
    "--no-validate", is_flag=True, help="Skip comparing ONNX Runtime with the PyTorch runtime after export."
)
@output_options(quiet_note=" (The result line still prints.)")
def export_onnx(
    ckpt: str,
    out: Path,
    opset: int,
    dtype: str,
    cache_op: bool | None,
    no_validate: bool,
    overwrite: bool,
    quiet: bool,
) -> None:
    """Export the converted checkpoint CKPT to ONNX (model.onnx + tokenizer + slimformer_onnx.json) in OUT.

    \b
    Examples:
      slimformer export onnx out -o out-onnx
      slimformer export onnx out -o out-onnx --cache-op --dtype float16
      slimformer generate out-onnx --runtime onnx --prompt "def main():"
    """
    require_extra("onnx", "`slimformer export onnx`")
    from slimformer.exporters.onnx import OnnxExportOptions
    from slimformer.exporters.onnx import export_onnx as run_export

    options = OnnxExportOptions(
        opset=opset,
        dtype=dtype,
        cache_op=cache_op,
        validate=not no_validate,
        overwrite=overwrite,
        quiet=quiet,
    )
    metadata = run_export(ckpt, out, options)
    runs = (metadata.get("validation") or {}).get("runs", [])  # the result: printed with -q too
    worst = max((run["max_abs_diff"] for run in runs), default=None)
    checked = f", validated (max |logits difference| {worst:.1e})" if worst is not None else ", not validated"
    click.echo(
        f"{out}: opset {metadata['opset']}, {metadata['dtype']}, {len(metadata['cache_layers'])} cache slot(s)"
        f"{', A2SF cache op' if metadata['evicting'] else ''}{checked}"
    )


@export.command("vllm", context_settings=CONTEXT)
@click.argument("ckpt")
@output_dir_option
@click.option(
    "--pad-head-dim",
    type=int,
    help="Zero-pad attention heads to this size (same function, more KV cache): "
    "for head sizes vLLM's CPU kernels lack (they have 32, 64, 80, 96, 112, 128, ...).",
)
@output_options(quiet_note=" (The result line still prints.)")
def export_vllm(ckpt: str, out: Path, pad_head_dim: int | None, overwrite: bool, quiet: bool) -> None:
    """Export CKPT to a Nemotron-NAS (DeciLMForCausalLM) directory OUT that vLLM serves.

    \b
    Dropped attention / MLP sub-blocks stay dropped (vLLM allocates KV cache only for layers with
    attention). SAS layers and q/k norms (Qwen3) are refused; a KV-cache eviction policy is not carried.

    \b
    Examples:
      slimformer export vllm out -o out-vllm
      slimformer export vllm tiny-out -o tiny-vllm --pad-head-dim 32   # head_dim 8 -> vLLM on CPU
      vllm serve out-vllm --trust-remote-code
      python -c "from vllm import LLM; LLM(model='out-vllm', trust_remote_code=True)"
    """
    from slimformer.exporters.vllm import export_vllm as run_export

    metadata = run_export(ckpt, out, overwrite=overwrite, quiet=quiet, pad_head_dim=pad_head_dim)
    if not quiet:
        click.echo(
            f"{out}: {metadata['architecture']}, {metadata['num_layers']} layers, {metadata['attention_layers']} with "
            f"attention (KV cache), {metadata['mlp_layers']} with MLP; serve: vllm serve {out} --trust-remote-code"
        )


class Terminated(BaseException):
    """SIGTERM as an exception in the main thread, so that temporary outputs are removed on the way out
    (the default action would end the process on the spot and leave them)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    """Print one ``error: ...`` line (after the traceback with --debug) and exit with ``code``."""
    if exc is not None and DEBUG["on"]:
        traceback.print_exception(exc, file=sys.stderr)
    click.echo(f"error: {' '.join(message.split())}", err=True)  # one line, whatever the message held
    sys.exit(code)


def _usage_fix(exc: click.ClickException) -> str:
    ctx = getattr(exc, "ctx", None)
    return f"see `{ctx.command_path if ctx else 'slimformer'} --help`"


def main() -> None:
    """The ``slimformer`` entry point: every way a command can fail ends as one line on stderr."""
    from .environment import check_stack

    DEBUG["on"] = os.environ.get("SLIMFORMER_DEBUG", "") not in ("", "0")
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        check_stack()  # an unsupported torch / transformers gets one line here, not a traceback later
        code = cli.main(standalone_mode=False)
    except SlimformerError as exc:
        _fail(exc.message, 2, exc)
    except (click.exceptions.Abort, KeyboardInterrupt) as exc:
        _fail("interrupted; nothing was written (temporary outputs were removed)", 130, exc)
    except Terminated as exc:
        _fail("terminated (SIGTERM); nothing was written (temporary outputs were removed)", 143, exc)
    except click.ClickException as exc:  # usage errors: click's several lines become one, with the fix
        _fail(f"{exc.format_message().rstrip('.')}. Fix: {_usage_fix(exc)}", exc.exit_code, exc)
    except OSError as exc:
        # A full disk or a permission outside an output directory (e.g. --json into a read-only place).
        from slimformer.converter.outputs import write_failure

        problem = write_failure(exc, Path(exc.filename or ".").absolute()) if exc.filename else None
        message = (
            problem.message if problem else f"{exc.strerror or exc} (at {exc.filename}). Fix: check the path"
        )
        _fail(message, 2, exc)
    except Exception as exc:  # a bug in slimformer: still one line, and the way to report it
        _fail(
            f"internal error: {type(exc).__name__}: {exc}. Fix: this is a bug in slimformer; re-run with "
            "`slimformer --debug ...` (or SLIMFORMER_DEBUG=1) and report the traceback",
            1,
            exc,
        )
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
