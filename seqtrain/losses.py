"""What a model's outputs mean: the training loss, and outputs turned into scores and probabilities.

Shared by training (`train.py`), evaluation and prediction (`inference/`), export and explain; it
needs only torch and the label mapping, so training imports nothing from inference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from seqtrain.config import Config
    from seqtrain.encoding import Labels


def to_scores(out: torch.Tensor, labels: Labels, cfg: Config) -> torch.Tensor:
    """Regression outputs -> predictions in the target's own units (B,).

    scalar head: out (B, 1), standardised; distribution head: out (B, V) logits over the target values.
    """
    if labels.values:
        support = torch.tensor(labels.values, dtype=torch.float32, device=out.device)  # (V,)
        return torch.softmax(out.float(), -1) @ support  # the expected value
    pred = out.squeeze(-1).float()
    if cfg.model.standardize_targets and not cfg.model.bounded:
        pred = pred * labels.std + labels.mean
    return pred


def to_probs(out: torch.Tensor, labels: Labels, cfg: Config) -> torch.Tensor:
    """Model outputs -> what `predict` reports (B, labels.probs_width): class probabilities, or the
    regression score."""
    if labels.task == "regression":
        return to_scores(out, labels, cfg).unsqueeze(-1)  # (B, 1) in the target's units
    return torch.softmax(out.float(), -1)  # (B, C)


def squared_emd(
    logits: torch.Tensor, index: torch.Tensor, support: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Squared earth mover's distance between softmax(logits) (B, V) and one-hot targets at `index` (B,),
    on the ordered values `support` (V,): the gap between CDFs, weighted by the distance between
    neighbouring values (1-4 then 7-10 stars: the 4->7 gap counts 3x), scaled to a [0, 1] range."""
    V = support.shape[0]
    cdf = torch.softmax(logits, -1).cumsum(-1)[:, :-1]  # (B, V-1): P(value <= support[k])
    target = (
        torch.arange(V - 1, device=logits.device).unsqueeze(0) >= index.unsqueeze(1)
    ).float()  # (B, V-1)
    gaps = (support[1:] - support[:-1]) / (support[-1] - support[0]).clamp(min=1e-9)  # (V-1,)
    per_row = ((cdf - target) ** 2 * gaps).sum(-1)  # (B,)
    return per_row.mean() if reduction == "mean" else per_row.sum()


def task_loss(
    out: torch.Tensor,
    y: torch.Tensor,
    labels: Labels,
    cfg: Config,
    reduction: str = "mean",
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss: cross-entropy for classes; MSE or Huber (on standardised targets) for regression."""
    smoothing = cfg.train.label_smoothing if reduction == "mean" else 0.0  # evaluation reports the plain loss
    if labels.task == "regression" and labels.values:  # distribution head: which of the V values
        support = torch.tensor(labels.values, dtype=torch.float32, device=out.device)
        index = torch.bucketize(y.float(), support).clamp(
            max=len(labels.values) - 1
        )  # exact for values seen in training
        loss = F.cross_entropy(out.float(), index, label_smoothing=smoothing, reduction=reduction)
        if cfg.model.emd_weight:
            loss = loss + cfg.model.emd_weight * squared_emd(out.float(), index, support, reduction)
        return loss
    if labels.task == "regression":
        pred = out.squeeze(-1).float()
        if cfg.model.standardize_targets and not cfg.model.bounded:
            y = (y - labels.mean) / labels.std
        fn = F.mse_loss if cfg.model.regression_loss == "mse" else F.huber_loss
        return fn(pred, y, reduction=reduction)
    return F.cross_entropy(
        out.float(), y, weight=class_weights, label_smoothing=smoothing, reduction=reduction
    )
