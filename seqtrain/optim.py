"""The optimizer and the learning-rate schedule, shared by `train` and `pretrain`."""

from __future__ import annotations

import math

import torch

from seqtrain.config import TrainConfig


def lr_at(step: int, t: TrainConfig, total_steps: int) -> float:
    """Linear warm-up, then constant, linear or cosine decay to zero at `total_steps`."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.lr_schedule == "constant":
        return t.lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    if t.lr_schedule == "linear":
        return t.lr * (1.0 - progress)
    return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norms (1-D) — decaying them only hurts.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused=True: one kernel over all parameters instead of a dozen elementwise passes per tensor;
    # on this CPU it cut AdamW on 5.5M parameters from 48 ms to 3 ms a step (~10% of an LSTM step).
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, fused=True)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, fused=True)
    return torch.optim.SGD(groups, lr=t.lr, momentum=0.9)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    grad_clip: float | None,
) -> None:
    """After backward: unscale and clip the gradients (train.grad_clip), step, update the fp16 loss scale."""
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
