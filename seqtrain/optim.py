"""The optimizer and the learning-rate schedule, shared by `train` and `pretrain`."""

from __future__ import annotations

import math

import torch

from seqtrain.config import TrainConfig
from seqtrain.model import Classifier


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


def layer_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """A classifier's parameters from the bottom up: the embeddings, each recurrent layer, then the head
    (with the attention pooling). The language model of `pretrain` is one group."""
    if not isinstance(model, Classifier):
        return [list(model.parameters())]
    top = [
        p for m in (model.attention, model.head, model.ngram_weights) if m is not None for p in m.parameters()
    ]
    return [list(model.embedding.parameters()), *[list(layer.parameters()) for layer in model.layers], top]


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    # One learning rate for all (the usual case) keeps two groups, so older checkpoints still resume.
    layered = t.layer_lr_decay != 1.0 or t.unfreeze_every > 0
    stack = layer_groups(model) if layered else [list(model.parameters())]
    groups = []
    for depth, params in enumerate(stack):
        below_top = len(stack) - 1 - depth  # 0 for the head
        # train.layer_lr_decay: the head learns at lr, each group below at d times the one above it;
        # train.unfreeze_every: the head trains from step 0, the group k below it from step k * N.
        extra = {"lr_scale": t.layer_lr_decay**below_top, "unfreeze_at": below_top * t.unfreeze_every}
        # No weight decay on biases and norms (1-D) — decaying them only hurts.
        for decay, part in (
            (t.weight_decay, [p for p in params if p.dim() >= 2]),
            (0.0, [p for p in params if p.dim() < 2]),
        ):
            if part:
                groups.append({"params": part, "weight_decay": decay, **extra})
    # fused=True: one kernel over all parameters instead of a dozen elementwise passes per tensor, a
    # large share of a small model's step on the CPU otherwise.
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, fused=True)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, fused=True)
    return torch.optim.SGD(groups, lr=t.lr, momentum=0.9)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int) -> None:
    """Each group at lr times its layer's scale, or 0 (frozen: AdamW then neither moves nor decays it)
    until its unfreezing step."""
    for group in optimizer.param_groups:
        frozen = step < group.get("unfreeze_at", 0)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)


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
