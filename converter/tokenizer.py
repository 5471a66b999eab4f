"""Loading a checkpoint's tokenizer (shared by conversion, evaluation and every exporter), and writing
tokenizer files that both supported transformers releases read."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

from .errors import SlimformerError

#: The class transformers 4.57 and 5 both load a ``tokenizer.json`` with, unchanged. transformers 5 names
#: it ``TokenizersBackend`` in the ``tokenizer_config.json`` it saves, a class 4.57 does not have.
PORTABLE_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
V5_ONLY_TOKENIZER_CLASSES = ("TokenizersBackend",)


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, or ``None`` when it ships none. A ``.gguf`` file (or a directory with
    no tokenizer files but one GGUF file) yields the tokenizer transformers builds from its metadata."""
    from transformers import AutoTokenizer

    path = Path(path)
    gguf = _gguf_file(path)
    if gguf is not None:
        from .source import read_gguf

        read_gguf(gguf)  # checks the gguf extra is installed and the file parses, with slimformer's messages
        stat = gguf.resolve().stat()
        # A copy: callers may set a pad token; the parsed original is shared by the whole process.
        return copy.deepcopy(_gguf_tokenizer(gguf.resolve(), stat.st_size, stat.st_mtime_ns))
    if not any(
        (path / name).is_file()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
    ):
        return None
    try:
        if _needs_portable_class(path):
            # Saved by transformers 5 and read by 4.57: the class it names does not exist here, and the
            # tokenizer.json it describes is the whole tokenizer, which the generic fast class loads as is.
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SlimformerError(
            f"cannot load the tokenizer: {exc}", where=str(path), fix="restore the tokenizer files"
        ) from exc


def _needs_portable_class(path: Path) -> bool:
    """Whether ``path``'s tokenizer_config.json names a transformers-5-only class this transformers lacks."""
    import transformers

    current = _read_tokenizer_config(path).get("tokenizer_class")
    return (
        current in V5_ONLY_TOKENIZER_CLASSES
        and not hasattr(transformers, current)
        and (path / "tokenizer.json").is_file()
    )


def _read_tokenizer_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / "tokenizer_config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}  # absent or unreadable: loading it reports the problem
    return config if isinstance(config, dict) else {}


def _gguf_file(path: Path) -> Path | None:
    from .source import TOKENIZER_FILES, find_gguf

    if path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES):
        return None  # real tokenizer files win over a GGUF file beside them
    return find_gguf(path)


@functools.lru_cache(maxsize=2)
def _gguf_tokenizer(path: Path, size: int, mtime_ns: int) -> Any:
    """Built once per process (it takes seconds: every token and merge is parsed from the metadata)."""
    from transformers import AutoTokenizer

    from .source import read_gguf

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers' GGUF tokenizer converters raise many kinds by tokenizer model
        raise SlimformerError(
            f"transformers cannot build the tokenizer of this GGUF file: {type(exc).__name__}: {exc}",
            where=str(path),
            fix="use a GGUF file with a byte-level BPE (gpt2) or SentencePiece (llama) tokenizer",
        ) from exc
    _match_gguf_special_tokens(tokenizer, read_gguf(path))
    return tokenizer


def _match_gguf_special_tokens(tokenizer: Any, gguf: Any) -> None:
    """Make the special tokens and the BOS rule those the file declares. transformers 4.57 builds
    SmolLM2's GGUF tokenizer with ``<|im_start|>`` as EOS and prepends BOS although the file says
    ``add_bos_token: false``; transformers 5 reads both right. Setting them here gives one tokenizer
    on both releases, and the converted directory's tokenizer files say the same. Decoding never "cleans
    up" spaces before punctuation (4.57's default), as llama.cpp's detokeniser never does: on a byte-level
    vocabulary that would change the text (transformers 5 ignores the flag there for the same reason)."""
    tokenizer.clean_up_tokenization_spaces = False
    for role, token in gguf.special_tokens().items():
        if getattr(tokenizer, f"{role}_token", None) != token:
            setattr(tokenizer, f"{role}_token", token)
    add_bos = gguf.add_bos_token()
    if add_bos is not None and getattr(tokenizer, "add_bos_token", add_bos) != add_bos:
        # A property on the fast Llama tokenizer that also rebuilds the post-processor (where BOS is added).
        tokenizer.add_bos_token = add_bos


def portable_tokenizer_config(directory: Path, *, generic: bool = False) -> bool:
    """Rewrite ``directory/tokenizer_config.json`` so that transformers 4.57 and 5 both load it: a
    ``tokenizer_class`` only transformers 5 knows becomes :data:`PORTABLE_TOKENIZER_CLASS` (when a
    ``tokenizer.json`` is there for it to load). With ``generic``, any class does -- for tokenizers built
    from a GGUF file, whose ``tokenizer.json`` is the whole tokenizer: 4.57 names SmolLM2's
    ``LlamaTokenizer``, which transformers 5 loads only after warning that the vocabulary is byte-level.
    Returns whether the file changed."""
    config_path = directory / "tokenizer_config.json"
    config = _read_tokenizer_config(directory)
    if not config or not (directory / "tokenizer.json").is_file():
        return False
    current = config.get("tokenizer_class")
    if current == PORTABLE_TOKENIZER_CLASS or not (generic or current in V5_ONLY_TOKENIZER_CLASSES):
        return False
    config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASS
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return True
