"""Healing an approximately converted model by distillation against the original.

The student (the converted model) learns to match the teacher (the model before conversion) on calibration
windows: the loss is ``KL(teacher || student)`` of the next-token distributions, averaged over positions,
plus optionally ``hidden_mse`` times the relative mean squared error between the outputs of chosen layers
(``||s - t||^2 / ||t||^2``, so the weight does not depend on the activations' scale). Only the parameters
named trainable move (AdamW, linear warmup then cosine decay to a tenth, gradient clipping 1.0); windows are
visited in seeded random order, epoch by epoch, so a run is reproducible on a given device.

:class:`HealingRun` is the flow every pass that changes the model's function runs around :func:`distill`
(``sas`` after its approximate conversion, ``layer_drop`` after dropping): it decides where perplexity is
measured -- ``--eval-ppl`` when given, otherwise an eighth of the calibration windows held out from healing
-- measures, distils, stores the trained parameters back into the checkpoint graph, measures what will be
written, and plots the healing curve. :func:`perplexity_rows` turns the three perplexities into report rows.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from slimformer.converter.errors import SlimformerError
from slimformer.converter.graph import CheckpointGraph, TensorRef
from slimformer.passes.base import PassContext, ReportRow
from torch.nn import functional as F


@dataclass
class HealSettings:
    steps: int
    lr: float = 1e-3
    batch_size: int = 4
    hidden_mse: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 25  # a log line every this many steps (and at the end)
    # A history entry (the plot's points) every this many steps; None: about 50 points whatever the length,
    # so that a short run plots as a curve, not as one dot.
    record_every: int | None = None


def lr_factor(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def kl_divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``sum_v p_t(v) (log p_t(v) - log p_s(v))`` (float32)."""
    teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    student_logp = F.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1).mean()


class _LayerOutputs:
    """Forward hooks that keep the outputs of some decoder layers during one forward."""

    def __init__(self, model: torch.nn.Module, layers: list[int]) -> None:
        self.outputs: dict[int, torch.Tensor] = {}
        decoder_layers = model.model.layers
        self.handles = [decoder_layers[i].register_forward_hook(self._keep(i)) for i in layers]

    def _keep(self, layer: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            self.outputs[layer] = output

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def distill(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    windows: torch.Tensor,
    trainable: Callable[[str], bool],
    settings: HealSettings,
    *,
    mse_layers: list[int] | None = None,
    log: Callable[[str], None] = print,
    progress: bool = False,
    name: str = "sas",
) -> dict[str, Any]:
    """Train ``student``'s ``trainable`` parameters to imitate ``teacher`` on ``windows`` (``LongTensor[n, T]``).

    Returns a JSON-able record: settings, trainable parameter count, loss history, wall time. The student is
    left in eval mode with every ``requires_grad`` off. ``progress`` shows a bar on a terminal and a plain
    line every few seconds otherwise (:func:`slimformer.converter.progress.progress_bar`); ``name`` (the pass)
    labels the bar and the log lines.
    """
    from slimformer.converter.progress import progress_bar

    device = next(student.parameters()).device
    params = []
    for param_name, param in student.named_parameters():
        param.requires_grad_(trainable(param_name))
        if param.requires_grad:
            params.append(param)
    if not params:
        raise ValueError("nothing to heal: no parameter is trainable")
    for param in teacher.parameters():
        param.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95)
    )
    warmup = max(1, settings.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, settings.steps, warmup))
    use_mse = settings.hidden_mse > 0 and bool(mse_layers)
    student_out = _LayerOutputs(student, mse_layers or []) if use_mse else None
    teacher_out = _LayerOutputs(teacher, mse_layers or []) if use_mse else None
    generator = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    history: list[dict[str, float]] = []
    running = {"loss": 0.0, "kl": 0.0, "mse": 0.0, "n": 0}
    record_every = settings.record_every or max(1, settings.steps // 50)
    teacher.eval()
    student.train()
    started = time.perf_counter()
    bar = progress_bar(settings.steps, f"{name} healing", progress, unit="step")
    try:
        with torch.enable_grad():
            for step in range(1, settings.steps + 1):
                if len(order) < settings.batch_size:
                    order += torch.randperm(len(windows), generator=generator).tolist()
                batch = windows[order[: settings.batch_size]].to(device)
                del order[: settings.batch_size]
                with torch.no_grad():
                    teacher_logits = teacher(input_ids=batch, use_cache=False).logits
                student_logits = student(input_ids=batch, use_cache=False).logits
                kl = kl_divergence(teacher_logits, student_logits)
                mse = torch.zeros((), device=device)
                if use_mse:
                    for layer in mse_layers:
                        t, s = teacher_out.outputs[layer].float(), student_out.outputs[layer].float()
                        mse = mse + (s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
                    mse = mse / len(mse_layers)
                loss = kl + settings.hidden_mse * mse
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                for key, value in (("loss", loss), ("kl", kl), ("mse", mse)):
                    running[key] += value.item()
                running["n"] += 1
                bar.set_postfix_str(f"KL {kl.item():.4f}", refresh=False)
                bar.update(1)
                elapsed = round(time.perf_counter() - started, 1)
                recorded = step % record_every == 0 or step == settings.steps
                if recorded:
                    entry = {
                        "step": step,
                        **{k: running[k] / running["n"] for k in ("loss", "kl", "mse")},
                        "lr": optimizer.param_groups[0]["lr"],
                        "elapsed_s": elapsed,
                    }
                    history.append(entry)
                    running = {"loss": 0.0, "kl": 0.0, "mse": 0.0, "n": 0}
                if step % settings.log_every == 0 or step == settings.steps:
                    shown = history[-1] if recorded else {"kl": kl.item(), "mse": mse.item()}
                    log(
                        f"[{name}] heal step {step}/{settings.steps}: KL {shown['kl']:.4f}"
                        + (f", hidden MSE {shown['mse']:.4f}" if use_mse else "")
                        + f" ({elapsed:.0f}s)"
                    )
    finally:
        bar.close()
        for hooks in (student_out, teacher_out):
            if hooks is not None:
                hooks.remove()
        student.eval()
        for param in student.parameters():
            param.requires_grad_(False)
    return {
        "steps": settings.steps,
        "lr": settings.lr,
        "batch_size": settings.batch_size,
        "hidden_mse": settings.hidden_mse,
        "seed": settings.seed,
        "device": str(device),
        "trainable_params": sum(p.numel() for p in params),
        "seconds": round(time.perf_counter() - started, 2),
        "history": history,
    }


# ---- the flow passes share -------------------------------------------------------------------------------
def require_holdout(ctx: PassContext, samples: int | None = None) -> None:
    """Without ``--eval-ppl`` perplexity is measured on held-out calibration windows: there must be two."""
    if not ctx.evaluation.ppl and (ctx.calibration.samples if samples is None else samples) < 2:
        raise SlimformerError(
            "need at least 2 calibration windows to hold some out for perplexity",
            fix="raise --calib-samples or pass --eval-ppl",
        )


def store_parameters(
    graph: CheckpointGraph, model: torch.nn.Module, trainable: Callable[[str], bool]
) -> None:
    """Write the model's trained parameters back into the graph, in each tensor's stored dtype."""
    owners = {name: node for node in graph.nodes() for name in node.tensors}
    for name, param in model.named_parameters():
        if trainable(name) and name in owners:
            old = owners[name].tensors[name]
            owners[name].tensors[name] = TensorRef.from_tensor(
                name, param.detach().to("cpu", old.load().dtype).clone()
            )


def own_storage(model: torch.nn.Module, trainable: Callable[[str], bool]) -> None:
    """Give the trainable parameters storage of their own. A model built from a graph whose tensors a pass
    computed (``TensorRef.value``, e.g. an earlier healing) shares that memory, and so does the teacher built
    from the same tensors: training in place would move the teacher and the graph along with the student."""
    for name, param in model.named_parameters():
        if trainable(name):
            param.data = param.data.clone()


class HealingRun:
    """Measure, distil, store, measure again: the steps of healing, in the order every pass takes them.

    ``windows`` train; perplexity is measured on ``--eval-ppl`` when given (``source`` names it), otherwise on
    ``heldout``: the last eighth of the calibration windows (at least one), never trained on. ``where`` says
    which, for the report's row settings.
    """

    def __init__(self, ctx: PassContext, name: str, device: str | None = None) -> None:
        self.ctx, self.name, self.device = ctx, name, device or ctx.device
        windows = ctx.calibration_windows()
        evaluation = ctx.evaluation
        if evaluation.ppl:
            self.windows, self.heldout, self.source = windows, None, evaluation.ppl
            self.where = (
                f"--eval-ppl {evaluation.ppl}: window {evaluation.window}, "
                f"at most {evaluation.max_tokens:,} tokens"
            )
            return
        require_holdout(ctx, len(windows))
        n = max(1, len(windows) // 8)
        self.windows, self.heldout = windows[:-n], windows[-n:]
        self.source = f"{n} held-out calibration window(s) of {windows.shape[1]} tokens"
        self.where = (
            f"no --eval-ppl: {n} calibration window(s) of {windows.shape[1]} tokens held out from healing"
        )

    def measure(self, model: torch.nn.Module) -> float:
        from slimformer.converter.evaluation import perplexity_of_tokens

        if self.heldout is None:
            return self.ctx.perplexity(model)
        return perplexity_of_tokens(model, self.heldout, window=self.heldout.shape[1]).perplexity

    def heal(
        self,
        graph: CheckpointGraph,
        student: torch.nn.Module,
        teacher: torch.nn.Module,
        trainable: Callable[[str], bool],
        settings: HealSettings,
        *,
        params: str,
        fix: str,
        mse_layers: list[int] | None = None,
    ) -> tuple[dict[str, Any], float]:
        """Distil ``student`` (built from ``graph``) towards ``teacher``, store its ``trainable`` parameters in
        ``graph`` and measure the model the graph now builds -- what will be written, not the live student.
        Returns the distillation record (with ``params``, ``epochs``, ``windows``) and that perplexity.
        ``params`` names the trainable set in messages; ``fix`` says what to choose when it is empty."""
        ctx, windows = self.ctx, self.windows
        if not any(trainable(name) for name, _ in student.named_parameters()):
            raise SlimformerError(f"{self.name}: heal_params={params} selects no parameter to train", fix=fix)
        epochs = settings.steps * settings.batch_size / len(windows)
        if epochs > 2:
            # Measured on pycoder-8m (README, SAS): 64 windows seen 6 times healed 2 layers to ppl 32.5, 256
            # windows seen 1.6 times to 31.3 -- a small calibration set is overfitted.
            ctx.log(
                f"[{self.name}] note: healing visits each of the {len(windows)} calibration windows {epochs:.1f} "
                "times; more windows (--calib-samples) heal better than more passes over few"
            )
        own_storage(student, trainable)
        record = distill(
            student,
            teacher,
            windows,
            trainable,
            settings,
            mse_layers=mse_layers,
            log=ctx.log,
            progress=ctx.progress,
            name=self.name,
        )
        record.update(params=params, epochs=round(epochs, 2), windows=len(windows), seq_len=windows.shape[1])
        store_parameters(graph, student, trainable)
        healed = self.measure(graph.build_model(device=self.device))
        ctx.log(f"[{self.name}] perplexity after healing: {healed:.3f} ({self.source})")
        plot = healing_plot(record, f"{self.name}: healing by distillation")
        if plot is not None:
            ctx.artefacts[f"{self.name}_healing.png"] = plot
        return record, healed


def perplexity_rows(
    source: str,
    change: str,
    before: float,
    changed: float,
    healed: float | None,
    where: str,
    heal: dict[str, Any] | None = None,
) -> list[ReportRow]:
    """The report rows of a healed change: perplexity before it against after it, and against after healing."""
    rows = [ReportRow(f"perplexity on {source} after {change}", before, changed, where)]
    if healed is not None and heal is not None:
        how = (
            f"{heal['steps']} KL step(s) x {heal['batch_size']} of {heal['windows']} calibration window(s) of "
            f"{heal['seq_len']} tokens ({heal['epochs']:g} epoch(s)), lr {heal['lr']:g}, {heal['params']} parameters"
        )
        rows.append(
            ReportRow(f"perplexity on {source} after {change} and healing", before, healed, f"{where}; {how}")
        )
    return rows


def healing_plot(heal: dict[str, Any], title: str) -> bytes | None:
    """A PNG of the healing curve (KL per logged step), or ``None`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    history = heal["history"]
    fig, ax = plt.subplots(figsize=(5, 3))
    # Every logged step is a point; markers only while there are few enough to tell apart.
    ax.plot(
        [h["step"] for h in history], [h["kl"] for h in history], marker="o" if len(history) <= 60 else None
    )
    ax.set_xlabel("healing step")
    ax.set_ylabel("KL(teacher || student)")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()
