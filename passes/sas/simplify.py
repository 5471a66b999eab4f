"""The ``sas`` pass: simplified attention sub-blocks (He & Hofmann, "Simplifying Transformer Blocks").

What it does depends on the checkpoint:

1. **SAS-form checkpoints** (layers whose block config names a form of ``converter/runtime/sas.py``, e.g.
   trained by ``examples/train_sas.py``): every exact fold of ``passes/sas_fold.py`` -- reparameterised value
   and projection maps that are multiples of the identity become identities, and maps between which no skip
   and no norm sit are folded into their neighbours (Graef). The result is verified on real inputs and
   refused if the logits move by more than ``max_fold_error`` (relative); removed tensors leave the files.

2. **Ordinary pre-norm checkpoints** (Llama, Mistral, Qwen2, Qwen3) with ``layers=N``: an **approximate**
   conversion. In ``N`` layers the attention sub-block becomes shaped attention with identity values and
   projection -- ``v_proj`` and ``o_proj`` are deleted, queries and keys are kept -- inside the original
   residual block (form ``shaped``: ``x + A(norm(x))``; removing the skip of a pretrained residual stack
   would not be an approximation at all). This changes the function, so the pass measures perplexity before
   the conversion, after it and after healing, and reports all three.

   *Layer selection.* For every candidate layer the per-head gains ``(alpha, beta, gamma)`` are fitted by
   least squares so that ``alpha * n_h + beta * softmax_h n_h - gamma * C n_h`` (``n`` the layer's normed
   input, head slices ``h``, the layer's own softmax) best matches the slice ``h`` of the original attention
   output ``y``. The score is the fit's residual error relative to the residual stream it is added to,
   ``||y - y_fit|| / ||x||`` over the calibration tokens: how far the replacement moves the stream the rest
   of the network reads (the same reference as the cosine of layer_drop). The ``N`` lowest are converted,
   all from one scoring of the intact model, and start from their fitted gains. ``||y|| / ||x||`` (what
   dropping the attention would cost on the same scale) is reported beside it.

   *Healing.* Distillation against the original model (``passes/healing.py``): ``KL(teacher || student)``
   on the calibration windows, plus ``hidden_mse`` times the relative MSE of the converted layers' outputs,
   for ``heal_steps`` AdamW steps on ``heal_device`` (default: ``--device``), training ``heal_params``:
   ``converted`` (every parameter of the converted layers), ``attention`` (their attention sub-blocks) or
   ``all``. Seeded, so a run repeats on the same device.

   *Perplexity* is measured on ``--eval-ppl`` when given; otherwise on held-out calibration windows (an
   eighth of them, at least one, never used for healing), and the report says which.

GQA: identity values need ``num_attention_heads * head_dim == hidden_size`` (refused otherwise); a converted
GQA layer keeps its KV-head keys and caches one value slice per query head (``hidden_size`` values per token
instead of ``num_key_value_heads * head_dim``), see ``converter/runtime/sas.py``; the report's KV bytes
count it. Encoders (BERT) are refused: their runtime is BERT's own post-norm attention.

CLI: ``slimformer convert SRC -o OUT --sas layers=2,heal_steps=200 --eval-ppl stdlib:valid``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import REPLACED, Block, CheckpointGraph, TensorRef
from slimformer.converter.runtime.masks import visible_keys
from slimformer.converter.runtime.sas import STANDARD, ShapedAttention, attention_branches
from slimformer.passes.base import DryRun, Pass, PassContext, PassResult, ReportRow, register
from slimformer.passes.healing import HealingRun, HealSettings, perplexity_rows, require_holdout
from transformers.models.llama.modeling_llama import repeat_kv

from .fold import fold as fold_maps
from .fold import form, has_reparam_maps, logits_of, relative_error

HEAL_PARAMS = ("converted", "attention", "all")
CONVERTED_FORM = "shaped"


@dataclass
class SasConfig:
    """Options of the ``sas`` pass (CLI: ``--sas layers=2,heal_steps=200``; ``heal-steps`` is read as ``heal_steps``).
    The ``help`` metadata is what ``slimformer convert --help`` prints."""

    layers: int = field(
        default=0,
        metadata={
            "help": "standard attention sub-blocks to convert approximately, lowest fit error first "
            "(0: only fold SAS-form layers)"
        },
    )
    heal_steps: int = field(
        default=100, metadata={"help": "distillation steps after the conversion (0: no healing)"}
    )
    heal_lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate of healing"})
    heal_batch_size: int = field(default=4, metadata={"help": "calibration windows per healing step"})
    heal_params: str = field(
        default="converted",
        metadata={
            "help": "what healing trains: converted (all parameters of the converted layers), attention, or all"
        },
    )
    hidden_mse: float = field(
        default=0.0,
        metadata={"help": "weight of the converted layers' relative hidden-state MSE in the healing loss"},
    )
    heal_device: str | None = field(
        default=None, metadata={"help": "device for healing", "default_text": "the --device"}
    )
    identity_tol: float = field(
        default=1e-6, metadata={"help": "fold a map to the identity when ||W - cI|| / ||cI|| is below this"}
    )
    max_fold_error: float = field(
        default=1e-4, metadata={"help": "refuse a fold whose relative logit error exceeds this"}
    )
    seed: int = field(default=0, metadata={"help": "seed of healing's window order"})

    def __post_init__(self) -> None:
        for name in ("layers", "heal_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer")
        if not isinstance(self.heal_batch_size, int) or self.heal_batch_size < 1:
            raise ValueError(f"heal_batch_size={self.heal_batch_size!r} must be a positive integer")
        if self.heal_params not in HEAL_PARAMS:
            raise ValueError(f"heal_params={self.heal_params!r} must be one of {', '.join(HEAL_PARAMS)}")
        for name in ("heal_lr", "hidden_mse", "identity_tol", "max_fold_error"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative number")


@register
class SasPass(Pass):
    name = "sas"
    config_class = SasConfig

    def needs_calibration(self) -> bool:
        return bool(self.config.layers)

    def check(self, dry: DryRun) -> None:
        """Family and head layout, something to do, enough standard layers left, text and a device to heal
        on; then mark the converted layers in the copy (which ones depends on the fit, not known yet)."""
        from slimformer.converter.devices import check_device

        cfg, graph, ctx = self.config, dry.graph, dry.ctx
        check_supported(graph)
        sas_layers = [block for block in graph.blocks if block.attention.kept and form(block) != STANDARD]
        if not cfg.layers and not sas_layers:
            raise SlimformerError(
                f"the sas pass has nothing to do: the checkpoint has no SAS-form layers{dry.after()} and layers=0",
                fix="give layers=N to convert N attention sub-blocks approximately (e.g. --sas layers=2,heal_steps=200)",
            )
        if not cfg.layers:
            return
        candidates = [block for block in graph.blocks if block.attention.kept and form(block) == STANDARD]
        if cfg.layers > len(candidates):
            raise SlimformerError(
                f"sas layers={cfg.layers} but only {len(candidates)} of {len(graph.blocks)} layers have a standard "
                f"attention sub-block to convert{dry.after()}",
                fix=f"use layers={len(candidates)} or fewer"
                + (", or drop fewer attention sub-blocks" if dry.history else ""),
            )
        if ctx.tokenizer is None:
            raise SlimformerError(
                "the approximate SAS conversion needs calibration text, but the checkpoint has no tokenizer",
                fix="add the tokenizer files to the checkpoint",
            )
        require_holdout(ctx)
        if cfg.heal_device:
            check_device(cfg.heal_device)
        for block in candidates[-cfg.layers :]:
            block.attention.state, block.attention.details["form"] = REPLACED, CONVERTED_FORM
        dry.history.append(f"sas converts {cfg.layers} attention sub-block(s)")

    def run(self, graph: CheckpointGraph, ctx: PassContext) -> PassResult:
        check_supported(graph)
        changes: dict[str, Any] = {}
        sas_layers = [
            block.index for block in graph.blocks if block.attention.kept and form(block) != STANDARD
        ]
        if has_reparam_maps(graph):
            changes["fold"] = self.fold(graph, ctx)
        elif sas_layers:
            changes["fold"] = {
                "actions": [],
                "params_removed": 0,
                "note": "every value and projection map is already the identity",
            }
        if self.config.layers:
            changes["conversion"] = self.convert(graph, ctx)
        if not changes:
            raise SlimformerError(
                "the sas pass has nothing to do: the checkpoint has no SAS-form layers and layers=0",
                fix="give layers=N to convert N attention sub-blocks approximately (e.g. --sas layers=2,heal_steps=200)",
            )
        return PassResult(notes=_notes(changes), rows=_rows(changes), data=changes)

    # ---- 1. exact folds ---------------------------------------------------------------------------------

    def fold(self, graph: CheckpointGraph, ctx: PassContext) -> dict[str, Any]:
        windows, source = verification_windows(graph, ctx)
        reference = logits_of(graph.build_model(device=ctx.device), windows)
        report = fold_maps(graph, self.config.identity_tol)
        error = relative_error(reference, logits_of(graph.build_model(device=ctx.device), windows))
        ctx.log(
            f"[sas] folded {len(report.actions)} map(s), {report.params_removed:,} parameters removed; "
            f"relative logit error {error:.2e} on {source}"
        )
        if error > self.config.max_fold_error:
            raise SlimformerError(
                f"the SAS fold changed the logits by {error:.2e} (relative), more than max_fold_error={self.config.max_fold_error:g}",
                fix="lower identity_tol (only maps that are the identity up to rounding fold losslessly)",
            )
        return {
            **report.to_dict(),
            "identity_tol": self.config.identity_tol,
            "relative_logit_error": error,
            "max_fold_error": self.config.max_fold_error,
            "verified_on": source,
            "lossless": True,
        }

    # ---- 2. approximate conversion -----------------------------------------------------------------------

    def convert(self, graph: CheckpointGraph, ctx: PassContext) -> dict[str, Any]:
        cfg = self.config
        candidates = [
            block.index for block in graph.blocks if block.attention.kept and form(block) == STANDARD
        ]
        if cfg.layers > len(candidates):
            raise SlimformerError(
                f"sas layers={cfg.layers} but only {len(candidates)} layer(s) have a standard attention sub-block to convert",
                fix=f"use layers={len(candidates)} or fewer",
            )
        if ctx.tokenizer is None:
            raise SlimformerError(
                "the approximate SAS conversion needs calibration text, but the checkpoint has no tokenizer",
                fix="add the tokenizer files to the checkpoint",
            )
        run = HealingRun(ctx, self.name, device=cfg.heal_device)
        heal_windows, ppl_source, device = run.windows, run.source, run.device
        teacher = graph.build_model(device=device)
        ppl_before = run.measure(teacher)
        ctx.log(
            f"[sas] perplexity before conversion: {ppl_before:.3f} ({ppl_source}); scoring {len(candidates)} layer(s) ..."
        )
        fits = fit_layers(teacher, heal_windows, candidates, batch_size=cfg.heal_batch_size)
        chosen = sorted(sorted(fits, key=lambda f: f.score)[: cfg.layers], key=lambda f: f.layer)
        params_before, kv_before = graph.num_params(), graph.kv_bytes_per_token()
        for fit in chosen:
            replace_attention(graph.blocks[fit.layer], fit)
        converted = [fit.layer for fit in chosen]
        ctx.log(
            f"[sas] converted layer(s) {converted} to shaped attention with identity V/P "
            f"({params_before - graph.num_params():,} parameters removed) -- an approximation"
        )

        student = graph.build_model(device=device)
        ppl_after = run.measure(student)
        ctx.log(f"[sas] perplexity after conversion: {ppl_after:.3f}")
        heal = None
        ppl_healed = None
        if cfg.heal_steps:
            trainable = trainable_filter(graph, converted, cfg.heal_params)
            settings = HealSettings(
                steps=cfg.heal_steps,
                lr=cfg.heal_lr,
                batch_size=cfg.heal_batch_size,
                hidden_mse=cfg.hidden_mse,
                seed=cfg.seed,
            )
            heal, ppl_healed = run.heal(
                graph,
                student,
                teacher,
                trainable,
                settings,
                params=cfg.heal_params,
                fix=f"use heal_params={' or '.join(p for p in HEAL_PARAMS if p != cfg.heal_params)}",
                mse_layers=converted,
            )
        return {
            "approximate": True,
            "note": (
                "APPROXIMATE conversion: in the converted layers the attention's value and output projections are "
                "replaced by identities (shaped attention, residual skip kept); the model computes a different "
                "function, and the perplexities below measure the cost"
            ),
            "converted_layers": converted,
            "form": CONVERTED_FORM,
            "score": "least-squares fit error of shaped attention relative to the residual stream, ||y - y_fit|| / ||x||",
            "layer_scores": [fit.to_dict() for fit in fits],
            "params_removed": params_before - graph.num_params(),
            "kv_bytes_per_token": {"before": kv_before, "after": graph.kv_bytes_per_token()},
            "perplexity": {
                "source": ppl_source,
                "before": ppl_before,
                "after_conversion": ppl_after,
                "after_healing": ppl_healed,
            },
            "measured_on": run.where,
            "calibration": {"windows": len(heal_windows), "seq_len": heal_windows.shape[1]},
            "heal": heal,
        }


# ---- what the report says ---------------------------------------------------------------------------------


def _notes(changes: dict[str, Any]) -> list[str]:
    notes = []
    fold = changes.get("fold")
    if fold is not None:
        if "relative_logit_error" in fold:
            notes.append(
                f"folded {len(fold['actions'])} identity map(s) exactly: {fold['params_removed']:,} parameters "
                f"removed, relative logit error {fold['relative_logit_error']:.2e} on {fold['verified_on']}"
            )
        else:
            notes.append(fold["note"])
    conversion = changes.get("conversion")
    if conversion is not None:
        notes.append(conversion["note"])
        notes.append(
            f"converted layer(s) {conversion['converted_layers']} to {conversion['form']}: "
            f"{conversion['params_removed']:,} parameters removed"
        )
        heal = conversion.get("heal")
        if heal:
            notes.append(
                f"healed {heal.get('steps')} step(s) of KL distillation to the original "
                f"({heal.get('params')} parameters, {heal.get('epochs')} epoch(s) of the calibration windows)"
            )
    return notes


def _rows(changes: dict[str, Any]) -> list[ReportRow]:
    conversion = changes.get("conversion")
    if conversion is None:
        return []
    ppl = conversion["perplexity"]
    return perplexity_rows(
        ppl["source"],
        "conversion",
        ppl["before"],
        ppl["after_conversion"],
        ppl["after_healing"],
        conversion["measured_on"],
        conversion["heal"],
    )


# ---- checks -----------------------------------------------------------------------------------------------


def check_supported(graph: CheckpointGraph) -> None:
    """Refuse, with the reason, a checkpoint whose attention layout SAS cannot express."""
    if graph.is_encoder:
        raise SlimformerError(
            f"the sas pass does not support {graph.family}: it is an encoder whose runtime keeps BERT's own post-norm attention",
            fix="use a decoder of the llama, mistral, qwen2 or qwen3 family",
        )
    config = graph.base_config
    heads, head_dim, hidden = config["num_attention_heads"], config["head_dim"], config["hidden_size"]
    if heads * head_dim != hidden:
        raise SlimformerError(
            f"the sas pass needs num_attention_heads * head_dim == hidden_size for identity values "
            f"(each head reads its slice of the input), but this {graph.family} checkpoint has {heads} * {head_dim} != {hidden}",
            fix="SAS conversion is not possible for this attention layout; use another pass",
        )


def verification_windows(graph: CheckpointGraph, ctx: PassContext) -> tuple[torch.Tensor, str]:
    """Inputs to check a fold on: calibration windows, or seeded random tokens without a tokenizer (the fold is
    an identity of functions, so any input tests it)."""
    if ctx.tokenizer is not None:
        return ctx.calibration_windows()[:8], f"calibration windows ({ctx.calibration.sources[0]})"
    generator = torch.Generator().manual_seed(ctx.calibration.seed)
    windows = torch.randint(0, graph.base_config["vocab_size"], (4, 64), generator=generator)
    return windows, "4 x 64 random tokens (the checkpoint has no tokenizer)"


# ---- layer scoring ------------------------------------------------------------------------------------------


@dataclass
class LayerFit:
    layer: int
    gains: torch.Tensor  # [3, H]: alpha, beta, gamma per head (least squares)
    fit_error: float  # ||y - y_fit|| / ||x||: the score (lower converts first)
    attention_error: float  # ||y - y_fit|| / ||y||
    drop_error: float  # ||y|| / ||x||: what removing the attention would do on the same scale

    @property
    def score(self) -> float:
        return self.fit_error

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "fit_error": self.fit_error,
            "attention_error": self.attention_error,
            "drop_error": self.drop_error,
            **{
                f"mean_{name}": float(self.gains[i].mean())
                for i, name in enumerate(("alpha", "beta", "gamma"))
            },
        }


class _FitStatistics:
    """Normal equations of the per-head least-squares fit, accumulated over batches (float64)."""

    def __init__(self, heads: int) -> None:
        self.gram = torch.zeros(heads, 3, 3, dtype=torch.float64)
        self.cross = torch.zeros(heads, 3, dtype=torch.float64)
        self.target = torch.zeros(heads, dtype=torch.float64)
        self.stream = 0.0

    def add(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """``features`` ``[3, B, H, T, D]`` (own value, softmax branch, minus the centred branch), ``target`` ``[B, H, T, D]``."""
        features, target = features.double(), target.double()
        self.gram += torch.einsum("kbhtd,jbhtd->hkj", features, features).cpu()
        self.cross += torch.einsum("kbhtd,bhtd->hk", features, target).cpu()
        self.target += target.pow(2).sum(dim=(0, 2, 3)).cpu()

    def solve(self, layer: int) -> LayerFit:
        ridge = (
            1e-9
            * self.gram.diagonal(dim1=-2, dim2=-1).mean(dim=-1)[:, None, None]
            * torch.eye(3, dtype=torch.float64)
        )
        gains = torch.linalg.solve(self.gram + ridge, self.cross[..., None])[..., 0]  # [H, 3]
        residual = (
            self.target
            - 2 * (gains * self.cross).sum(-1)
            + torch.einsum("hk,hkj,hj->h", gains, self.gram, gains)
        )
        error = float(residual.clamp_min(0).sum()) ** 0.5
        target = float(self.target.sum()) ** 0.5
        stream = self.stream**0.5
        return LayerFit(layer, gains.T.float(), error / stream, error / max(target, 1e-30), target / stream)


@torch.no_grad()
def fit_layers(
    model: torch.nn.Module, windows: torch.Tensor, layers: list[int], batch_size: int = 4
) -> list[LayerFit]:
    """Fit shaped attention to each layer's attention output in one pass of ``model`` over ``windows``."""
    config = model.config
    device = next(model.parameters()).device
    stats = {i: _FitStatistics(config.num_attention_heads) for i in layers}
    handles = []
    for i in layers:
        layer = model.model.layers[i]
        probe = ShapedAttention(config, i, cache_idx=0).to(device)
        # The probe computes queries and keys with the layer's own (shared, not copied) modules.
        for name in ("q_proj", "k_proj", "q_norm", "k_norm"):
            if hasattr(layer.self_attn, name):
                setattr(probe, name, getattr(layer.self_attn, name))
        handles.append(layer.register_forward_pre_hook(_stream_hook(stats[i])))
        handles.append(layer.self_attn.register_forward_hook(_fit_hook(probe, stats[i])))
    try:
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [stats[i].solve(i) for i in layers]


def _stream_hook(stats: _FitStatistics) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        stats.stream += float(args[0].double().pow(2).sum())

    return hook


def _fit_hook(probe: ShapedAttention, stats: _FitStatistics) -> Callable[..., None]:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        normed, position_embeddings = args[0], args[1]
        query, key = probe.queries_keys(normed, position_embeddings)
        values = probe.heads(normed)
        # The layer's own mask: causal, windowed where the family slides (calibration windows have no padding).
        visible = visible_keys(
            None, None, normed.shape[1], 0, sliding_window=probe.config.sliding_window, device=normed.device
        )
        soft, centred = attention_branches(
            query, repeat_kv(key, probe.num_key_value_groups), values, visible, probe.scaling
        )
        stats.add(torch.stack([values, soft, -centred]), probe.heads(output))

    return hook


# ---- graph rewrites ---------------------------------------------------------------------------------------------


def replace_attention(block: Block, fit: LayerFit) -> None:
    """Turn ``block``'s attention into shaped attention with identity V/P: drop v_proj/o_proj, add the gains."""
    node = block.attention
    prefix = f"model.layers.{block.index}.self_attn."
    dtype = node.tensors[prefix + "q_proj.weight"].load().dtype
    for name in [n for n in node.tensors if n.startswith((prefix + "v_proj.", prefix + "o_proj."))]:
        del node.tensors[name]
    for row, gain in enumerate(("alpha", "beta", "gamma")):
        name = f"{prefix}shaped_{gain}"
        node.tensors[name] = TensorRef.from_tensor(name, fit.gains[row].to(dtype).contiguous())
    node.details["form"] = CONVERTED_FORM
    node.state = REPLACED
    node.reason = f"SAS attention, identity V/P (approximate; fit error {fit.fit_error:.3f} of the stream)"


def trainable_filter(graph: CheckpointGraph, layers: list[int], which: str) -> Callable[[str], bool]:
    if which == "all":
        return lambda name: True
    if which == "attention":
        names = {name for i in layers for name in graph.blocks[i].attention.tensors}
        return lambda name: name in names
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    return lambda name: name.startswith(prefixes)
