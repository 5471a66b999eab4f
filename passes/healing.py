"""Healing an approximately converted model by distillation against the original.

The student (the converted model) learns to match the teacher (the model before conversion) on calibration
windows: the loss is ``KL(teacher || student)`` of the next-token distributions, averaged over positions,
plus optionally ``hidden_mse`` times the relative mean squared error between the outputs of chosen layers
(``||s - t||^2 / ||t||^2``, so the weight does not depend on the activations' scale). Only the parameters
named trainable move (AdamW, linear warmup then cosine decay to a tenth, gradient clipping 1.0); windows are
visited in seeded random order, epoch by epoch, so a run is reproducible on a given device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
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
) -> dict[str, Any]:
    """Train ``student``'s ``trainable`` parameters to imitate ``teacher`` on ``windows`` (``LongTensor[n, T]``).

    Returns a JSON-able record: settings, trainable parameter count, loss history, wall time. The student is
    left in eval mode with every ``requires_grad`` off. ``progress`` shows a bar on a terminal and a plain
    line every few seconds otherwise (:func:`slimformer.converter.progress.progress_bar`).
    """
    from slimformer.converter.progress import progress_bar

    device = next(student.parameters()).device
    params = []
    for name, param in student.named_parameters():
        param.requires_grad_(trainable(name))
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
    bar = progress_bar(settings.steps, "sas healing", progress, unit="step")
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
                        f"[sas] heal step {step}/{settings.steps}: KL {shown['kl']:.4f}"
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
