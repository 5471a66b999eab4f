"""Write a checkpoint graph as a converted Hugging Face directory (``model_type: "slimformer"``).

The directory holds ``config.json`` (base config + ``block_configs`` + ``kv_cache`` + ``auto_map``),
the kept tensors only (sharded with an index above ``max_shard_bytes``), the tokenizer and generation
config of the source (a GGUF source's tokenizer saved as tokenizer files; ``tokenizer_config.json``
readable by transformers 4.57 and 5), and the runtime files, so that
``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)`` works with plain transformers.

Everything is written into a temporary sibling directory that is renamed into place only when complete
(see :mod:`slimformer.converter.outputs`); an existing output is never half-overwritten.

"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from slimformer.converter import __version__, runtime
from slimformer.converter.environment import CHECKPOINT_FORMAT
from slimformer.converter.graph import CheckpointGraph
from slimformer.converter.runtime import RUNTIME_FILES
from slimformer.converter.source import CheckpointSource
from slimformer.converter.tokenizer import load_tokenizer, portable_tokenizer_config

RUNTIME_DIR = Path(runtime.__file__).resolve().parent
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def write_checkpoint(
    graph: CheckpointGraph,
    directory: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, int]:
    """Write the converted checkpoint into ``directory`` (normally the one from :func:`atomic_output_dir`)."""
    config = graph.runtime_config()
    if dtype is not None:
        config.dtype = str(dtype).removeprefix("torch.")
    config_dict = config.to_dict()
    model_class = "SlimformerEncoderModel" if graph.is_encoder else "SlimformerForCausalLM"
    config_dict["architectures"] = [model_class]
    config_dict["auto_map"] = {"AutoConfig": "configuration_slimformer.SlimformerConfig"}
    auto_class = "AutoModel" if graph.is_encoder else "AutoModelForCausalLM"
    config_dict["auto_map"][auto_class] = f"modeling_slimformer.{model_class}"
    # Which format and release wrote this, so that an older slimformer can say so instead of misreading it.
    config_dict["slimformer_format"] = CHECKPOINT_FORMAT
    config_dict["slimformer_version"] = __version__
    (directory / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    for name in RUNTIME_FILES:
        shutil.copyfile(RUNTIME_DIR / name, directory / name)
    write_tokenizer_files(graph.source, directory)
    return write_tensors(graph, directory, dtype, max_shard_bytes)


def write_tokenizer_files(source: CheckpointSource, directory: Path) -> None:
    """The source's tokenizer and carried files (generation config) in ``directory``, loadable by
    transformers 4.57 and 5 alike; for a GGUF source the tokenizer in its metadata, saved as files."""
    for file in source.tokenizer_files + source.carried_files:
        shutil.copyfile(file, directory / file.name)
    if source.gguf is not None:
        # The tokenizer lives in the GGUF metadata: write it out as real tokenizer files (tokenizer.json,
        # tokenizer_config.json, chat template) that any transformers load of the directory reads.
        load_tokenizer(source.path).save_pretrained(str(directory))
    # Copied or saved under transformers 5, tokenizer_config.json may name a class 4.57 lacks.
    portable_tokenizer_config(directory, generic=source.gguf is not None)


def write_tensors(
    graph: CheckpointGraph, directory: Path, dtype: torch.dtype | None, max_shard_bytes: int
) -> dict[str, int]:
    """Stream tensors into shards so no more than one shard is ever in memory."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    written: list[tuple[str, int]] = []  # (tensor name, shard index)
    total = 0
    paths: list[Path] = []

    def flush(last: bool) -> None:
        index = len(paths)
        path = directory / f".shard-{index}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        paths.append(path)
        if not last:
            shards.append({})

    for ref in graph.kept_tensors():
        tensor = ref.load()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            flush(last=False)
            shard_bytes = 0
        shards[-1][ref.name] = tensor.contiguous()
        shard_bytes += size
        total += size
        written.append((ref.name, len(paths)))
    flush(last=True)

    if len(paths) == 1:
        paths[0].rename(directory / "model.safetensors")
    else:
        names = [f"model-{i + 1:05d}-of-{len(paths):05d}.safetensors" for i in range(len(paths))]
        for path, name in zip(paths, names):
            path.rename(directory / name)
        index = {"metadata": {"total_size": total}, "weight_map": {tensor: names[i] for tensor, i in written}}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"tensors": len(written), "bytes": total, "shards": len(paths)}
