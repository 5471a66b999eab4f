"""Calibration and evaluation text sources, named by one spec string.

Spec forms:

* ``stdlib`` / ``stdlib:train`` / ``stdlib:valid`` -- the Python standard library's own ``.py`` sources,
  present on every machine with Python. ``train``/``valid`` split the files by a hash of their relative
  path (1 in 10 files is ``valid``), so a model trained on ``stdlib:train`` can be evaluated on held-out
  code.
* a path -- a ``.txt``/``.py``/``.md`` file, a ``.jsonl`` file (the ``text`` field of each record), any
  of these gzip-compressed (``.gz``), or a directory of them (read in sorted order). A text file whose
  documents are joined by U+001E (record separator) yields one document per record.
* ``hf:NAME[:CONFIG][:SPLIT]`` -- a Hugging Face Hub dataset through ``datasets.load_dataset`` (needs the
  ``hub`` extra and a network connection); its ``text`` column is used.

Documents are tokenised and joined with the tokenizer's EOS token. :func:`sample_windows` draws ``n``
windows of ``seq_len`` tokens deterministically from a seed; :func:`token_stream` returns the source in
its natural order for evaluation.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from .errors import SlimformerError

RECORD_SEPARATOR = "\x1e"
TEXT_SUFFIXES = (".txt", ".py", ".md", ".raw", ".tokens", ".jsonl", ".json")
STDLIB_SPLITS = ("all", "train", "valid")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "all") -> list[Path]:
    """The standard library's ``.py`` files (no tests, no site-packages), optionally one split of them."""
    if split not in STDLIB_SPLITS:
        raise SlimformerError(
            f"unknown stdlib split {split!r}",
            fix=f"use one of {', '.join('stdlib:' + s for s in STDLIB_SPLITS)}",
        )
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        top = rel.split("/", 1)[0]
        if top in {"site-packages", "dist-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"}:
            continue
        if "/tests/" in f"/{rel}" or "/test/" in f"/{rel}":
            continue
        if split != "all" and _is_valid_path(rel) != (split == "valid"):
            continue
        files.append(path)
    return files


def _is_valid_path(relative_path: str) -> bool:
    digest = hashlib.md5(relative_path.encode()).digest()
    return digest[0] % 10 == 0


def local_source_path(spec: str) -> Path | None:
    """The local file or directory a spec names, or ``None`` for ``stdlib[...]`` and ``hf:...``."""
    if spec == "stdlib" or spec.startswith(("stdlib:", "hf:")):
        return None
    return Path(spec).expanduser()


def source_files(path: Path) -> list[Path]:
    """The files a local source reads, in reading order: the file itself, or a directory's text files."""
    return (
        [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and _is_text_file(p))
    )


def source_digest(path: Path) -> str:
    """``sha256:<hex>`` of a local source's content (a directory: its text files' names and bytes), so that a
    replayed pipeline can tell that its data changed."""
    digest = hashlib.sha256()
    for file in source_files(path):
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def check_source(spec: str, *, flag: str = "--calib") -> None:
    """Fail now, before any work, if ``spec`` cannot be read: a missing path, an empty directory, an unknown
    stdlib split, a malformed ``hf:`` spec or a Hub dataset while offline. Reads no text."""
    if spec == "stdlib" or spec.startswith("stdlib:"):
        split = spec.split(":", 1)[1] if ":" in spec else "all"
        if split not in STDLIB_SPLITS:
            raise SlimformerError(
                f"unknown stdlib split {split!r} in {flag} {spec}",
                fix=f"use one of {', '.join('stdlib:' + s for s in STDLIB_SPLITS)}",
            )
        return
    if spec.startswith("hf:"):
        if not spec[3:].split(":")[0]:
            raise SlimformerError(
                f"malformed Hub dataset spec {spec!r} in {flag}",
                fix="write hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:test",
            )
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise SlimformerError(
                f"Hub dataset {spec!r} requested while offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)",
                fix="use a local file or 'stdlib', or unset the offline variable",
            )
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise SlimformerError(
            f"{flag} source {spec!r} does not exist",
            fix="give a text/jsonl/gzip file, a directory of them, 'stdlib[:train|:valid]' or 'hf:NAME[:CONFIG][:SPLIT]'",
        )
    if not source_files(path):
        raise SlimformerError(
            f"{flag} directory holds no text files",
            where=str(path),
            fix=f"put files ending in {', '.join(TEXT_SUFFIXES)} (or .gz) there",
        )
    unreadable = [file for file in source_files(path) if not os.access(file, os.R_OK)]
    if unreadable:
        raise SlimformerError(
            f"{flag} source cannot be read (permission denied)",
            where=str(unreadable[0]),
            fix="make the file readable (chmod u+r) or choose another source",
        )


def iter_documents(spec: str) -> Iterator[str]:
    """Yield the documents of a source spec in their natural (deterministic) order."""
    if spec == "stdlib" or spec.startswith("stdlib:"):
        split = spec.split(":", 1)[1] if ":" in spec else "all"
        for path in stdlib_files(split):
            text = path.read_text(encoding="utf-8", errors="replace")
            if text.strip():
                yield text
        return
    if spec.startswith("hf:"):
        yield from _hub_documents(spec)
        return
    path = Path(spec).expanduser()
    if not path.exists():
        raise SlimformerError(
            f"calibration/evaluation source {spec!r} does not exist",
            fix="give a text/jsonl/gzip file, a directory of them, 'stdlib[:train|:valid]' or 'hf:NAME[:CONFIG][:SPLIT]'",
        )
    files = source_files(path)
    if not files:
        raise SlimformerError(
            "directory holds no text files",
            where=str(path),
            fix=f"put files ending in {', '.join(TEXT_SUFFIXES)} (or .gz) there",
        )
    for file in files:
        yield from _file_documents(file)


def _is_text_file(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(TEXT_SUFFIXES)


def _file_documents(path: Path) -> Iterator[str]:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError) as exc:
        raise SlimformerError(
            f"cannot read text source: {exc}",
            where=str(path),
            fix="check the file is readable and not truncated",
        ) from exc
    stem = path.name[:-3] if path.name.endswith(".gz") else path.name
    if stem.endswith(".jsonl"):
        for line_number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimformerError(
                    f"invalid JSON on line {line_number}",
                    where=str(path),
                    fix="each line must be a JSON object with a 'text' field",
                ) from exc
            doc = record.get("text") if isinstance(record, dict) else None
            if not isinstance(doc, str):
                raise SlimformerError(
                    f"line {line_number} has no string 'text' field",
                    where=str(path),
                    fix="each line must be a JSON object with a 'text' field",
                )
            if doc.strip():
                yield doc
        return
    for doc in text.split(RECORD_SEPARATOR):
        if doc.strip():
            yield doc


def _hub_documents(spec: str) -> Iterator[str]:
    parts = spec[3:].split(":")
    if not parts[0]:
        raise SlimformerError(
            f"malformed Hub dataset spec {spec!r}",
            fix="write hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-2-raw-v1:test",
        )
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "validation"
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise SlimformerError(
            f"Hub dataset {name!r} requested while offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)",
            fix="use a local file or 'stdlib', or unset the offline variable",
        )
    try:
        import datasets
    except ImportError as exc:
        raise SlimformerError(
            "Hub datasets need the 'datasets' package", fix="pip install 'slimformer[hub]'"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # network errors, unknown names and bad splits all surface here
        raise SlimformerError(
            f"cannot load Hub dataset {name!r} (config={config}, split={split}): {type(exc).__name__}: {exc}",
            fix="check the name and that the machine is online, or use a local file or 'stdlib'",
        ) from exc
    if "text" not in dataset.column_names:
        raise SlimformerError(
            f"Hub dataset {name!r} has no 'text' column (columns: {dataset.column_names})",
            fix="choose a text dataset",
        )
    for doc in dataset["text"]:
        if doc and doc.strip():
            yield doc


def _encode(tokenizer, text: str) -> list[int]:
    # A document is cut into windows later, so its length past model_max_length is expected: verbose=False
    # silences the tokenizer's "sequence length is longer than the maximum" warning, which would mislead here.
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _separator(tokenizer) -> list[int]:
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def token_stream(tokenizer, spec: str, max_tokens: int | None = None) -> torch.Tensor:
    """The source's documents in natural order, tokenised and joined by EOS, cut at ``max_tokens``."""
    ids: list[int] = []
    sep = _separator(tokenizer)
    for doc in iter_documents(spec):
        ids.extend(_encode(tokenizer, doc))
        ids.extend(sep)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    if not ids:
        raise SlimformerError(f"source {spec!r} is empty", fix="point at a source with text in it")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return torch.tensor(ids, dtype=torch.long)


def sample_windows(tokenizer, spec: str, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``n`` windows of ``seq_len`` tokens, ``LongTensor[n, seq_len]``, chosen deterministically by ``seed``.

    Documents are visited in a seeded random order and concatenated (EOS between them) until ``n *
    seq_len`` tokens are collected; the stream is then cut into consecutive windows. Reading stops early,
    so a large source is never tokenised whole.
    """
    if n <= 0 or seq_len <= 1:
        raise SlimformerError(
            f"need at least 1 window of at least 2 tokens (got n={n}, seq_len={seq_len})",
            fix="raise --calib-samples / --calib-seq-len",
        )
    docs = list(iter_documents(spec)) if not (spec == "stdlib" or spec.startswith("stdlib:")) else None
    if docs is None:
        split = spec.split(":", 1)[1] if ":" in spec else "all"
        files = stdlib_files(split)
        random.Random(seed).shuffle(files)
        doc_iter: Iterator[str] = (p.read_text(encoding="utf-8", errors="replace") for p in files)
    else:
        if not docs:
            raise SlimformerError(f"source {spec!r} is empty", fix="point at a source with text in it")
        random.Random(seed).shuffle(docs)
        doc_iter = iter(docs)
    needed = n * seq_len
    sep = _separator(tokenizer)
    ids: list[int] = []
    for doc in doc_iter:
        if not doc.strip():
            continue
        ids.extend(_encode(tokenizer, doc))
        ids.extend(sep)
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        raise SlimformerError(
            f"source {spec!r} has {len(ids)} tokens, fewer than the {n} x {seq_len} = {needed} requested",
            fix="lower --calib-samples or --calib-seq-len, or use a larger source",
        )
    return torch.tensor(ids[:needed], dtype=torch.long).view(n, seq_len)
