"""Resolve a checkpoint spec (local directory or Hub id) into local files, safely.

Safety rules: pickled weights (``.bin``/``.pt``/``.pth``) are never unpickled unless the caller passes
``allow_pickle=True`` (and then only with ``torch.load(weights_only=True)``); a checkpoint that ships its
own code (``auto_map``) is refused unless ``trust_remote_code=True``. A spec that names an existing path
never touches the network.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import SlimformerError

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)
CARRIED_FILES = ("generation_config.json",)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CheckpointSource:
    """A checkpoint on local disk: its config and where each weight tensor lives."""

    spec: str
    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    weight_format: str  # "safetensors" or "pickle"
    tensor_files: dict[str, Path] = field(default_factory=dict)  # filled for sharded safetensors
    is_hub: bool = False
    trust_remote_code: bool = False

    @property
    def tokenizer_files(self) -> list[Path]:
        return [self.path / name for name in TOKENIZER_FILES if (self.path / name).is_file()]

    @property
    def carried_files(self) -> list[Path]:
        return [self.path / name for name in CARRIED_FILES if (self.path / name).is_file()]


def resolve_source(
    spec: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> CheckpointSource:
    """Find the checkpoint ``spec`` names and check it is safe and complete enough to read."""
    text = str(spec)
    path = Path(text).expanduser()
    is_hub = False
    if not path.exists() and "@" in text and revision is None:
        # org/model@REVISION pins a branch, tag or commit (as pip's VCS URLs do), in CLI and pipeline files alike.
        text, _, revision = text.rpartition("@")
        path = Path(text).expanduser()
    if not path.exists():
        if _looks_like_path(text) or not HUB_ID.match(text):
            bare_name = "/" not in text and "\\" not in text
            raise SlimformerError(
                f"checkpoint directory {text!r} does not exist",
                fix=(
                    f"give an existing local directory; for a Hub model write its full id 'org/{text}' "
                    "(legacy ids without an org are not looked up, so a mistyped path never goes to the network)"
                )
                if bare_name
                else "give an existing local directory or a Hub id such as 'org/model'",
            )
        path = _download(text, allow_pickle=allow_pickle, revision=revision)
        is_hub = True
    if not path.is_dir():
        raise SlimformerError(
            "checkpoint source is a file, not a directory",
            where=str(path),
            fix="pass the directory that holds config.json",
        )
    if not any(path.iterdir()):
        raise SlimformerError(
            "checkpoint directory is empty",
            where=str(path),
            fix="point at a directory with config.json and weights",
        )
    config = _read_config(path)
    _check_remote_code(path, config, trust_remote_code)
    weight_files, weight_format, tensor_files = _find_weights(path, allow_pickle)
    return CheckpointSource(
        spec=text,
        path=path,
        config=config,
        weight_files=weight_files,
        weight_format=weight_format,
        tensor_files=tensor_files,
        is_hub=is_hub,
        trust_remote_code=trust_remote_code,
    )


def _looks_like_path(text: str) -> bool:
    return text.startswith(("/", "./", "../", "~")) or text.count("/") != 1 or os.sep == "\\" and "\\" in text


def _download(repo_id: str, *, allow_pickle: bool, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    if allow_pickle:
        patterns += ["*.bin", "*.pt", "*.pth"]
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=offline)
        )
    except LocalEntryNotFoundError as exc:
        raise SlimformerError(
            f"Hub model {repo_id!r} is not in the local cache and the Hub cannot be reached (offline)",
            fix="connect to the network, or download it once and pass its local directory",
        ) from exc
    except RevisionNotFoundError as exc:
        raise SlimformerError(
            f"Hub model {repo_id!r} has no revision {revision!r}",
            fix="check the branch, tag or commit after '@'",
        ) from exc
    except RepositoryNotFoundError as exc:  # also gated models without access (GatedRepoError)
        raise SlimformerError(
            f"Hub model {repo_id!r} does not exist, is private, or is gated",
            fix="check the id; for private or gated models log in with `hf auth login` or set HF_TOKEN",
        ) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SlimformerError(
            f"cannot download Hub model {repo_id!r}: {type(exc).__name__}: {exc}",
            fix="check the network connection, or pass a local directory",
        ) from exc


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SlimformerError(
            "no config.json in checkpoint directory",
            where=str(path),
            fix="point at a Hugging Face model directory",
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SlimformerError(
            f"config.json is not valid JSON: {exc}", where=str(config_path), fix="restore the file"
        ) from exc
    if not isinstance(config, dict) or "model_type" not in config:
        raise SlimformerError(
            "config.json has no 'model_type'",
            where=str(config_path),
            fix="restore the model's original config",
        )
    return config


def _check_remote_code(path: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    if config.get("model_type") == "slimformer":
        return  # our own format: slimformer ships and reads this code itself, nothing remote runs
    code_files = sorted(p.name for p in path.glob("*.py"))
    tokenizer_config = path / "tokenizer_config.json"
    tokenizer_auto_map = False
    if tokenizer_config.is_file():
        try:
            tokenizer_auto_map = "auto_map" in json.loads(tokenizer_config.read_text())
        except json.JSONDecodeError:
            tokenizer_auto_map = False
    if ("auto_map" in config or tokenizer_auto_map) and not trust_remote_code:
        raise SlimformerError(
            f"checkpoint ships its own code (auto_map; files: {', '.join(code_files) or 'on the Hub'}), which slimformer will not run",
            where=str(path),
            fix="review the code and pass --trust-remote-code if you trust it",
        )


def _find_weights(path: Path, allow_pickle: bool) -> tuple[list[Path], str, dict[str, Path]]:
    index_path = path / SAFETENSORS_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise SlimformerError(
                f"{SAFETENSORS_INDEX} is malformed ({exc})",
                where=str(index_path),
                fix="restore the index file from the original checkpoint",
            ) from exc
        tensor_files = {name: path / file for name, file in weight_map.items()}
        files = sorted(set(tensor_files.values()))
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise SlimformerError(
                f"sharded checkpoint is missing shard(s) {', '.join(missing)}",
                where=str(path),
                fix="download every shard listed in the index",
            )
        return files, "safetensors", tensor_files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, "safetensors", {}
    pickled = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        if not allow_pickle:
            raise SlimformerError(
                f"checkpoint has only pickled weights ({', '.join(p.name for p in pickled)}); unpickling can run arbitrary code",
                where=str(path),
                fix="convert them to safetensors, or pass --allow-pickle if you trust the file",
            )
        return pickled, "pickle", {}
    if (path / "model.onnx").is_file():
        # `slimformer export onnx` output: the weights are in the ONNX graph, which only the ONNX runtime reads.
        raise SlimformerError(
            "this directory is an ONNX export (model.onnx), not a PyTorch checkpoint",
            where=str(path),
            fix=f"generate with `slimformer generate {path} --runtime onnx ...`; convert, eval and export "
            "need the converted checkpoint it was exported from",
        )
    raise SlimformerError(
        "checkpoint has a config but no weights (*.safetensors, model.safetensors.index.json)",
        where=str(path),
        fix="download the weight files into the directory",
    )
