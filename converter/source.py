"""Resolve a checkpoint spec (local directory, GGUF file or Hub id) into local files, safely.

Safety rules: pickled weights (``.bin``/``.pt``/``.pth``) are never unpickled unless the caller passes
``allow_pickle=True`` (and then only with ``torch.load(weights_only=True)``); a checkpoint that ships its
own code (``auto_map``) is refused unless ``trust_remote_code=True``. A spec that names an existing path
never touches the network.

A GGUF file (``model.gguf``, or a directory without ``config.json`` holding exactly one) is read the way
transformers reads it: its config from ``AutoConfig.from_pretrained(dir, gguf_file=name)``, the tokenizer
from ``AutoTokenizer`` (:mod:`.tokenizer`), and the tensors under transformers' names, dequantised one at a
time when the graph asks for them (:class:`GGUFFile`). GGUF holds no code and no pickles.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .environment import require_extra
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
GGUF_SUFFIX = ".gguf"


@dataclass
class CheckpointSource:
    """A checkpoint on local disk: its config and where each weight tensor lives."""

    spec: str
    path: Path
    config: dict[str, Any]
    weight_files: list[Path]
    weight_format: str  # "safetensors", "pickle" or "gguf"
    tensor_files: dict[str, Path] = field(default_factory=dict)  # filled for sharded safetensors
    is_hub: bool = False
    trust_remote_code: bool = False
    gguf: GGUFFile | None = None  # set for a GGUF source; ``path`` is then the .gguf file itself

    @property
    def format_record(self) -> dict[str, Any]:
        """What the report records about the weights: their format, and for GGUF the quantisation."""
        record: dict[str, Any] = {"weight_format": self.weight_format}
        if self.gguf is not None:
            record.update(self.gguf.record())
        return record

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
        if (
            path.suffix.lower() == GGUF_SUFFIX
        ):  # GGUF files are read from disk only, never looked up on the Hub
            raise SlimformerError(
                f"GGUF file {text!r} does not exist", fix="check the path to the .gguf file"
            )
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
    gguf_path = find_gguf(path)
    if gguf_path is not None:
        return _gguf_source(text, gguf_path)
    if not path.is_dir():
        raise SlimformerError(
            "checkpoint source is a file, not a directory",
            where=str(path),
            fix="pass the directory that holds config.json, or a .gguf file",
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


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the only ``.gguf`` in a directory without
    ``config.json`` (a Hugging Face directory wins). Several candidates are an error that lists them."""
    if path.is_file():
        return path if path.suffix.lower() == GGUF_SUFFIX else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == GGUF_SUFFIX and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise SlimformerError(
            f"directory holds {len(found)} GGUF files ({names}), so which one to read is ambiguous",
            where=str(path),
            fix=f"pass the file itself, e.g. {path / found[0].name}",
        )
    return found[0] if found else None


def _gguf_source(spec: str, path: Path) -> CheckpointSource:
    gguf = read_gguf(path)
    return CheckpointSource(
        spec=spec,
        path=gguf.path,
        config=json.loads(json.dumps(gguf.config)),  # a private copy: the parsed file is shared per process
        weight_files=[gguf.path],
        weight_format="gguf",
        gguf=gguf,
    )


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, under the name transformers' GGUF loader gives it."""

    name: str  # Hugging Face name, e.g. model.layers.0.self_attn.q_proj.weight
    gguf_name: str  # e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]  # PyTorch order (GGUF lists dimensions innermost first)
    quant_type: str  # e.g. Q4_1, F32
    unpermute_heads: int | None  # llama q/k: undo llama.cpp's rotary row interleave over this many heads


def read_gguf(path: Path) -> GGUFFile:
    """The parsed GGUF file at ``path``, read once per process: parsing the metadata of a 135M-parameter
    file takes seconds, and one command resolves its source several times (check, model, tokenizer)."""
    require_extra("gguf", "reading a GGUF file")
    path = path.expanduser().resolve()
    stat = path.stat()
    return _read_gguf(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf(path: Path, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)  # size and mtime are in the key so that a rewritten file is read again


class GGUFFile:
    """A memory-mapped GGUF file: transformers' config for it, its quantisation, and its tensors, each
    dequantised to float32 only when asked for (:meth:`dequantize`)."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        try:
            self.reader = GGUFReader(str(path))
        except (
            Exception
        ) as exc:  # the parser of an untrusted binary raises many kinds (ValueError, struct...)
            raise SlimformerError(
                f"not a readable GGUF file ({type(exc).__name__}: {exc})",
                where=str(path),
                fix="download the file again; a GGUF file begins with the bytes 'GGUF'",
            ) from exc
        self.architecture = str(self._field("general.architecture", "?"))
        self.hf_config = self._hf_config()
        # What save_pretrained would write as config.json, so the graph treats it like any other source.
        self.config: dict[str, Any] = json.loads(self.hf_config.to_json_string(use_diff=True))
        self.config.pop("_model_name_or_path", None)  # the GGUF's display name, a load artefact
        self.config["model_type"] = self.hf_config.model_type
        self._tensors = {t.name: t for t in self.reader.tensors}

    # ---- metadata --------------------------------------------------------------------------------
    def _field(self, key: str, default: Any = None, index: int = 0) -> Any:
        """One metadata value (element ``index`` of an array), decoded; read from the raw parts, which
        every gguf release since 0.10 has (``ReaderField.contents`` is newer)."""
        field_ = self.reader.fields.get(key)
        if field_ is None or index >= len(field_.data):
            return default
        part = field_.parts[field_.data[index]]
        from gguf import GGUFValueType

        kind = field_.types[-1] if field_.types else None
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    def _hf_config(self) -> Any:
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
        except Exception as exc:  # transformers raises ValueError, KeyError, NotImplementedError by arch
            raise SlimformerError(
                f"transformers cannot read this GGUF file (architecture {self.architecture!r}): "
                f"{type(exc).__name__}: {exc}",
                where=str(self.path),
                fix="slimformer reads GGUF files of the llama, mistral, qwen2 and qwen3 architectures",
            ) from exc

    @property
    def quantization(self) -> str:
        """The file's quantisation as llama.cpp names it (general.file_type, e.g. Q4_1); without that
        field, the most common type of its matrices."""
        from gguf import LlamaFileType

        file_type = self._field("general.file_type")
        if file_type is not None:
            try:
                return LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
            except ValueError:
                pass
        matrices = Counter(t.tensor_type.name for t in self.reader.tensors if len(t.shape) > 1)
        return matrices.most_common(1)[0][0] if matrices else "F32"

    def record(self) -> dict[str, Any]:
        types = Counter(t.tensor_type.name for t in self.reader.tensors)
        return {
            "quantization": self.quantization,
            "gguf_architecture": self.architecture,
            "gguf_tensor_types": dict(sorted(types.items())),
            "dequantized_to": "float32",
        }

    def special_tokens(self) -> dict[str, str]:
        """The tokenizer's special tokens as the file declares them (bos, eos, unk, pad -> token text)."""
        tokens = {}
        keys = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}  # llama.cpp's key names
        for role, key in keys.items():
            token_id = self._field(f"tokenizer.ggml.{key}_token_id")
            if token_id is not None:
                text = self._field("tokenizer.ggml.tokens", index=int(token_id))
                if text is not None:
                    tokens[role] = text
        return tokens

    def add_bos_token(self) -> bool | None:
        value = self._field("tokenizer.ggml.add_bos_token")
        return None if value is None else bool(value)

    # ---- tensors ---------------------------------------------------------------------------------
    @functools.cached_property
    def tensors(self) -> list[GGUFTensor]:
        """The tensors under the Hugging Face names of the model transformers builds for this config, found
        with gguf's own name table as transformers' GGUF loader finds them. Computed on first use, after the
        graph has checked that slimformer supports the family."""
        import torch
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        from transformers import AutoModelForCausalLM

        arch = next((key for key, name in MODEL_ARCH_NAMES.items() if name == self.architecture), None)
        if arch is None:
            raise SlimformerError(
                f"the gguf package does not know the architecture {self.architecture!r}",
                where=str(self.path),
                fix="upgrade gguf (pip install -U gguf)",
            )
        config = self.config
        try:
            with torch.device("meta"):  # only the parameter names are needed
                model = AutoModelForCausalLM.from_config(self.hf_config)
        except ValueError as exc:
            raise SlimformerError(
                f"GGUF architecture {self.architecture!r} is not a causal language model transformers builds",
                where=str(self.path),
                fix="slimformer reads GGUF files of the llama, mistral, qwen2 and qwen3 architectures",
            ) from exc
        name_map = get_tensor_name_map(arch, config["num_hidden_layers"])
        to_hf = {}
        for hf_name in model.state_dict():
            module, _, suffix = hf_name.rpartition(".")
            gguf_name = name_map.get_name(module) if suffix in ("weight", "bias") else None
            if gguf_name is not None:
                to_hf.setdefault(f"{gguf_name}.{suffix}", hf_name)
        heads = {"attn_q": config.get("num_attention_heads"), "attn_k": config.get("num_key_value_heads")}
        tensors = []
        for tensor in self.reader.tensors:
            hf_name = to_hf.get(tensor.name)
            if hf_name is None:
                continue  # e.g. rope_freqs: derived from the config; transformers skips them too
            kind = tensor.name.split(".")[-2]
            tensors.append(
                GGUFTensor(
                    name=hf_name,
                    gguf_name=tensor.name,
                    shape=tuple(int(d) for d in reversed(tensor.shape.tolist())),
                    quant_type=tensor.tensor_type.name,
                    # llama.cpp permutes q/k rows only for its llama architecture (its LlamaModel converter)
                    unpermute_heads=heads.get(kind) if self.architecture == "llama" else None,
                )
            )
        return tensors

    def dequantize(self, tensor: GGUFTensor) -> Any:
        """The tensor as float32 (a fresh copy: the file's memory map is read-only)."""
        import numpy as np
        import torch
        from gguf import dequantize

        raw = self._tensors[tensor.gguf_name]
        try:
            weights = dequantize(raw.data, raw.tensor_type).reshape(tensor.shape)
        except NotImplementedError as exc:
            raise SlimformerError(
                f"the installed gguf package cannot dequantise {tensor.quant_type} tensors ({tensor.gguf_name})",
                where=str(self.path),
                fix="upgrade gguf (pip install -U gguf)",
            ) from exc
        except ValueError as exc:
            raise SlimformerError(
                f"cannot read tensor {tensor.gguf_name!r}: {exc}",
                where=str(self.path),
                fix="the file is truncated or corrupt; download it again",
            ) from exc
        if tensor.unpermute_heads:
            # The inverse of llama.cpp's convert_hf_to_gguf permute(): rows (head, half, pair) -> (head, pair, half).
            n_head = tensor.unpermute_heads
            rows = weights.shape[0]
            weights = (
                weights.reshape(n_head, rows // n_head // 2, 2, *weights.shape[1:])
                .swapaxes(1, 2)
                .reshape(weights.shape)
            )
        return torch.from_numpy(np.array(weights, dtype=np.float32))


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
    ggufs = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}"))
    raise SlimformerError(
        "checkpoint has a config but no weights (*.safetensors, model.safetensors.index.json)",
        where=str(path),
        # config.json makes it a Hugging Face directory, so a GGUF file beside it is read only when named
        fix=f"pass the GGUF file itself ({path / ggufs[0]}) or download the weight files into the directory"
        if ggufs
        else "download the weight files into the directory",
    )
