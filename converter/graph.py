"""The checkpoint graph: the model as embeddings -> N blocks -> final norm -> head, with lazy tensors.

Each block has an attention sub-block and an MLP sub-block (each owning its norm, because removing a
sub-block removes its norm too). Tensors stay in their safetensors files, memory-mapped, until someone
asks for them; a pass that rewrites weights stores the new tensor on the node. Passes change the
per-block state (kept / dropped / replaced, cache policy, SAS form); exporters and the runtime read it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .architectures import ATTENTION, EMBEDDINGS, FINAL_NORM, HEAD, MLP, Architecture, architecture_for
from .environment import check_checkpoint_format
from .errors import SlimformerError
from .runtime.configuration_slimformer import SlimformerConfig, default_block_config
from .source import CheckpointSource, GGUFFile, GGUFTensor

KEPT, DROPPED, REPLACED = "kept", "dropped", "replaced"

DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


@dataclass
class TensorRef:
    """One tensor: where it lives on disk (lazy) or its value once a pass has replaced it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: Path | None = None
    source_name: str | None = None
    value: torch.Tensor | None = None

    @classmethod
    def from_tensor(cls, name: str, tensor: torch.Tensor) -> TensorRef:
        """A tensor a pass computed: it lives in memory (``value``), not in a source file."""
        return cls(name, tuple(tensor.shape), str(tensor.dtype), value=tensor)

    def load(self) -> torch.Tensor:
        if self.value is not None:
            return self.value
        try:
            with safe_open(str(self.file), framework="pt") as handle:
                return handle.get_tensor(self.source_name)
        except (SafetensorError, OSError) as exc:
            raise SlimformerError(
                f"cannot read tensor {self.source_name!r}: {exc}",
                where=str(self.file),
                fix="the file is truncated or corrupt; download it again",
            ) from exc

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Node:
    """A set of tensors that live or die together (embeddings, a sub-block with its norm, the head)."""

    kind: str
    tensors: dict[str, TensorRef] = field(default_factory=dict)
    state: str = KEPT
    reason: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def kept(self) -> bool:
        return self.state != DROPPED

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values()) if self.kept else 0


@dataclass
class Block:
    index: int
    attention: Node
    mlp: Node
    cache_policy: dict[str, Any] | None = None

    def block_config(self) -> dict[str, Any]:
        config = default_block_config()
        config["attention"].update(self.attention.details)
        config["attention"]["no_op"] = not self.attention.kept
        config["ffn"].update(self.mlp.details)
        config["ffn"]["no_op"] = not self.mlp.kept
        return config


@dataclass
class CheckpointGraph:
    source: CheckpointSource
    architecture: Architecture
    base_config: dict[str, Any]  # runtime_config() of the adapter: flattened base config
    embeddings: Node
    blocks: list[Block]
    final_norm: Node
    head: Node
    kv_cache: dict[str, Any] | None = None

    # ---- structure -------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.architecture.family

    @property
    def is_encoder(self) -> bool:
        return self.architecture.kind == "encoder"

    def nodes(self) -> Iterator[Node]:
        yield self.embeddings
        for block in self.blocks:
            yield block.attention
            yield block.mlp
        yield self.final_norm
        yield self.head

    def kept_tensors(self) -> Iterator[TensorRef]:
        for node in self.nodes():
            if node.kept:
                yield from node.tensors.values()

    def runtime_config(self) -> SlimformerConfig:
        kwargs = copy.deepcopy(self.base_config)
        kwargs["block_configs"] = [block.block_config() for block in self.blocks]
        kwargs["kv_cache"] = copy.deepcopy(self.kv_cache)
        if self.is_encoder:
            kwargs["add_pooling_layer"] = bool(self.head.tensors)
        return SlimformerConfig(**kwargs)

    # ---- measurements ----------------------------------------------------------------------------
    def num_params(self) -> int:
        """Parameters stored in the checkpoint (a tied head counts once)."""
        return sum(node.num_params for node in self.nodes())

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of K and V cached per token (all layers that keep attention) at ``dtype``."""
        if self.is_encoder:
            return 0
        config = self.base_config
        keys = config["num_key_value_heads"] * config["head_dim"]
        # A simplified (SAS) layer caches identity values, one head_dim slice per *query* head (runtime/sas.py).
        sas_values = config["num_attention_heads"] * config["head_dim"]
        widths = [
            keys + (keys if b.attention.details.get("form", "standard") == "standard" else sas_values)
            for b in self.blocks
            if b.attention.kept
        ]
        return sum(widths) * DTYPE_BYTES[dtype]

    def layer_states(self) -> list[dict[str, Any]]:
        return [
            {
                "layer": b.index,
                "attention": b.attention.state,
                "mlp": b.mlp.state,
                **({"attention_reason": b.attention.reason} if b.attention.reason else {}),
                **({"mlp_reason": b.mlp.reason} if b.mlp.reason else {}),
                **({"attention_form": b.attention.details["form"]} if "form" in b.attention.details else {}),
                **({"cache_policy": b.cache_policy} if b.cache_policy else {}),
            }
            for b in self.blocks
        ]

    def invariant_problems(self, *, tensors: bool = True) -> list[str]:
        """What makes the graph inconsistent, in words (empty when it is sound). Checked after every pass:

        * the KV-cache policy is valid for the cache slots the graph has (one per layer keeping attention;
          per-slot ``layer_budgets`` must match them), and exactly those layers carry a slot summary;
        * with ``tensors``, the kept nodes hold exactly the tensors the runtime model of this structure loads.
        """
        problems = []
        slots = [block for block in self.blocks if block.attention.kept]
        if self.kv_cache is not None:
            from .runtime.kv_cache import CachePolicy

            try:
                CachePolicy.from_dict(self.kv_cache).validate(num_slots=len(slots))
            except ValueError as exc:
                problems.append(f"the KV-cache policy does not fit the {len(slots)} cache slot(s): {exc}")
        for block in self.blocks:
            if block.cache_policy is not None and not block.attention.kept:
                problems.append(f"layer {block.index} has no attention but still carries a KV-cache slot")
            elif block.cache_policy is None and block.attention.kept and self.kv_cache is not None:
                problems.append(f"layer {block.index} keeps attention but has no KV-cache slot")
        if tensors:
            missing, unexpected = _tensor_mismatch(self)
            if missing:
                problems.append(f"{len(missing)} tensor(s) the model needs are missing, e.g. {missing[:3]}")
            if unexpected:
                problems.append(
                    f"{len(unexpected)} kept tensor(s) belong to no module, e.g. {unexpected[:3]}"
                )
        return problems

    def describe(self) -> str:
        """A readable listing of the graph: each node, its state, tensor count and parameters."""
        lines = [
            f"{self.family} ({self.architecture.kind}), {len(self.blocks)} blocks, {self.num_params():,} parameters"
        ]

        def row(label: str, node: Node) -> str:
            params = sum(t.numel for t in node.tensors.values())
            note = f"  [{node.reason}]" if node.reason else ""
            return f"  {label:<16} {node.state:<9} {len(node.tensors):>3} tensors {params:>12,} params{note}"

        lines.append(row("embeddings", self.embeddings))
        for block in self.blocks:
            lines.append(row(f"{block.index}.attention", block.attention))
            lines.append(row(f"{block.index}.mlp", block.mlp))
        lines.append(row("final_norm", self.final_norm))
        lines.append(
            row("head", self.head) if self.head.tensors else "  head             tied to the embeddings"
        )
        if self.kv_cache:
            lines.append(f"  kv cache policy: {self.kv_cache}")
        return "\n".join(lines)

    # ---- materialisation -------------------------------------------------------------------------
    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        tensors = {}
        for ref in self.kept_tensors():
            tensor = ref.load()
            tensors[ref.name] = (
                tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            )
        return tensors

    def build_model(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        attn_implementation: str = "sdpa",
    ) -> torch.nn.Module:
        """A runtime model (``SlimformerForCausalLM`` / ``SlimformerEncoderModel``) with the graph's weights."""
        from .runtime.modeling_slimformer import SlimformerEncoderModel, SlimformerForCausalLM

        config = self.runtime_config()
        model_class = SlimformerEncoderModel if self.is_encoder else SlimformerForCausalLM
        with torch.device("meta"):
            model = model_class._from_config(config, attn_implementation=attn_implementation)
        state = self.state_dict(dtype)
        missing, unexpected = _missing_and_unexpected(model, state)
        if missing or unexpected:
            raise SlimformerError(
                f"weights do not match the model structure (missing: {missing[:5]}, unexpected: {unexpected[:5]})",
                where=str(self.source.path),
                fix="the checkpoint is incomplete or its config does not describe its weights",
            )
        model.load_state_dict(state, strict=False, assign=True)
        if not self.is_encoder and config.tie_word_embeddings:
            # Tie by hand: tie_weights() differs between transformers 4.57 and 5 on a meta-built model.
            model.lm_head.weight = model.model.embed_tokens.weight
        _materialise_buffers(model, device)
        if _has_meta(model):
            raise SlimformerError(
                "some weights were never loaded",
                where=str(self.source.path),
                fix="the checkpoint is incomplete",
            )
        return model.to(device=device, dtype=dtype).eval()


def load_graph(source: CheckpointSource) -> CheckpointGraph:
    """Build the graph of a resolved checkpoint; checks every tensor's shape against the config."""
    config = source.config
    if config["model_type"] == "slimformer":
        check_checkpoint_format(config, str(source.path))
        architecture = architecture_for(config.get("base_model_type", "?"))
        base = {
            k: v
            for k, v in config.items()
            if k
            not in (
                "model_type",
                "architectures",
                "auto_map",
                "transformers_version",
                "block_configs",
                "kv_cache",
                "add_pooling_layer",
                "_name_or_path",
                "slimformer_format",
                "slimformer_version",
            )
        }
        block_configs = config.get("block_configs")
        kv_cache = config.get("kv_cache")
    else:
        architecture = architecture_for(config["model_type"])
        base = architecture.runtime_config(config)
        block_configs, kv_cache = None, None
    try:
        shape_config = SlimformerConfig(**{k: v for k, v in base.items() if k != "block_configs"})
    except (TypeError, ValueError, KeyError) as exc:
        raise SlimformerError(
            f"config.json cannot be used for {architecture.family}: {exc}",
            where=str(source.path),
            fix="restore the model's original config",
        ) from exc
    layers = shape_config.num_hidden_layers
    embeddings, final_norm, head = Node(EMBEDDINGS), Node(FINAL_NORM), Node(HEAD)
    blocks = [Block(i, Node(ATTENTION), Node(MLP)) for i in range(layers)]
    for ref in _iter_source_tensors(source):
        slot = architecture.classify(ref.source_name)
        if slot is None:
            continue
        ref.name = slot.name
        expected = architecture.expected_shape(slot.name, shape_config)
        if expected is not None and tuple(ref.shape) != expected:
            raise SlimformerError(
                f"tensor {ref.source_name!r} has shape {list(ref.shape)} but the config implies {list(expected)}",
                where=str(ref.file or source.path),
                fix="the weights do not belong to this config.json; use matching files",
            )
        if slot.section in (ATTENTION, MLP):
            if slot.layer >= layers:
                raise SlimformerError(
                    f"tensor {ref.source_name!r} belongs to layer {slot.layer} but config has {layers} layers",
                    where=str(source.path),
                    fix="the weights do not belong to this config.json",
                )
            block = blocks[slot.layer]
            (block.attention if slot.section == ATTENTION else block.mlp).tensors[slot.name] = ref
        else:
            {EMBEDDINGS: embeddings, FINAL_NORM: final_norm, HEAD: head}[slot.section].tensors[slot.name] = (
                ref
            )
    if block_configs is not None:
        for block, spec in zip(blocks, block_configs):
            for node, key in ((block.attention, "attention"), (block.mlp, "ffn")):
                node.details = {k: v for k, v in spec[key].items() if k != "no_op"}
                if spec[key].get("no_op"):
                    node.state = DROPPED
    graph = CheckpointGraph(
        source, architecture, base, embeddings, blocks, final_norm, head, kv_cache=kv_cache
    )
    _check_complete(graph)
    return graph


@dataclass
class GGUFTensorRef(TensorRef):
    """A tensor of a GGUF file: dequantised to float32 each time it is loaded, as a safetensors reference is
    read from its memory map each time, so that a streaming pass holds one block of weights, not the model."""

    gguf: GGUFFile | None = field(default=None, repr=False, compare=False)
    gguf_tensor: GGUFTensor | None = field(default=None, repr=False, compare=False)

    def load(self) -> torch.Tensor:
        if self.value is not None:
            return self.value
        return self.gguf.dequantize(self.gguf_tensor)


def _iter_source_tensors(source: CheckpointSource) -> Iterator[TensorRef]:
    if source.gguf is not None:
        for tensor in source.gguf.tensors:
            yield GGUFTensorRef(
                tensor.name,
                tensor.shape,
                "torch.float32",  # what load() returns, whatever the quantisation in the file
                file=source.gguf.path,
                source_name=tensor.name,
                gguf=source.gguf,
                gguf_tensor=tensor,
            )
        return
    if source.weight_format == "pickle":
        for file in source.weight_files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise SlimformerError(
                    f"cannot read pickled weights: {exc}", where=str(file), fix="re-download the file"
                ) from exc
            for name, tensor in state.items():
                yield TensorRef(name, tuple(tensor.shape), str(tensor.dtype), source_name=name, value=tensor)
        return
    for file in source.weight_files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    yield TensorRef(
                        name, tuple(view.get_shape()), view.get_dtype(), file=file, source_name=name
                    )
        except SafetensorError as exc:
            raise SlimformerError(
                f"safetensors file is truncated or corrupt: {exc}",
                where=str(file),
                fix="download the file again",
            ) from exc


def _tensor_mismatch(graph: CheckpointGraph) -> tuple[list[str], list[str]]:
    """(missing, unexpected): the tensors the runtime model of the graph's current structure needs that no
    kept node holds, and those kept nodes hold that it would not load. Built on the meta device: no weights."""
    config = graph.runtime_config()
    if graph.is_encoder:
        from .runtime.modeling_slimformer import SlimformerEncoderModel as model_class
    else:
        from .runtime.modeling_slimformer import SlimformerForCausalLM as model_class
    with torch.device("meta"):
        model = model_class._from_config(config)
    expected = set(model.state_dict())
    present = {ref.name for ref in graph.kept_tensors()}
    if not graph.is_encoder and config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        present.discard("lm_head.weight")
    buffers = _buffer_names(model)
    return sorted(expected - present - buffers), sorted(present - expected - buffers)


def _check_complete(graph: CheckpointGraph) -> None:
    if not graph.is_encoder and graph.runtime_config().tie_word_embeddings:
        graph.head.tensors.pop("lm_head.weight", None)
    missing, _ = _tensor_mismatch(graph)
    present = list(graph.kept_tensors())
    if missing:
        raise SlimformerError(
            f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:3]}",
            where=str(graph.source.path),
            fix="the weight files are incomplete or belong to a different config",
        )
    if not present:
        raise SlimformerError(
            "checkpoint has no tensors", where=str(graph.source.path), fix="download the weight files"
        )


def _buffer_names(model: torch.nn.Module) -> set[str]:
    return {name for name, _ in model.named_buffers()}


def _missing_and_unexpected(
    model: torch.nn.Module, state: dict[str, torch.Tensor]
) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict()) - _buffer_names(model)
    if getattr(model.config, "tie_word_embeddings", False) and not model.config.is_encoder:
        expected.discard("lm_head.weight")
    return sorted(expected - set(state)), sorted(set(state) - expected)


def _has_meta(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def _materialise_buffers(model: torch.nn.Module, device: str | torch.device) -> None:
    """Recompute non-persistent buffers (RoPE inverse frequencies, BERT position ids) lost on meta."""
    from .runtime.modeling_slimformer import reset_buffers

    for module in model.modules():
        reset_buffers(module, device)
