"""Loading a checkpoint's tokenizer (shared by conversion, evaluation and every exporter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import SlimformerError


def load_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The checkpoint's tokenizer, or ``None`` when it ships none."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not any(
        (path / name).is_file()
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SlimformerError(
            f"cannot load the tokenizer: {exc}", where=str(path), fix="restore the tokenizer files"
        ) from exc
