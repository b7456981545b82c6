"""Classification metrics from a confusion matrix, and the metrics.jsonl log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def confusion(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) counts: rows are true classes, columns predicted."""
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def classification_report(cm: np.ndarray, names: list[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1 and per-class figures from a confusion matrix."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    predicted = cm.sum(0)
    actual = cm.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    n = int(cm.sum())
    return {
        "n": n,
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "per_class": {
            name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for name, p, r, f, s in zip(names, precision, recall, f1, actual, strict=True)
        },
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "labels": names,
    }


def top_k_accuracy(probs: np.ndarray, y: np.ndarray, k: int) -> float:
    """Share of rows whose true class is among the k most probable."""
    top = np.argsort(-probs, axis=1)[:, :k]
    return float((top == y[:, None]).any(axis=1).mean())


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's correlation needs)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def regression_report(
    pred: np.ndarray, target: np.ndarray, integer: bool, low: float, high: float
) -> dict[str, Any]:
    """MAE, RMSE, R², Spearman; with integer targets also the accuracy of the rounded prediction."""
    err = pred - target
    var = float(((target - target.mean()) ** 2).sum())
    rp, rt = _ranks(pred), _ranks(target)
    denom = float(np.sqrt(((rp - rp.mean()) ** 2).sum() * ((rt - rt.mean()) ** 2).sum()))
    report: dict[str, Any] = {
        "n": len(target),
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "r2": 1.0 - float((err**2).sum()) / var if var > 0 else 0.0,
        "spearman": float(((rp - rp.mean()) * (rt - rt.mean())).sum() / denom) if denom > 0 else 0.0,
    }
    if integer:
        report["accuracy_rounded"] = float((np.clip(np.round(pred), low, high) == target).mean())
    return report


LOWER_IS_BETTER = {"loss", "mae", "rmse"}


def precision_recall(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Precision and recall at every threshold (highest score first) and the average precision."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    tp = np.cumsum(hits)
    k = np.arange(1, len(hits) + 1)
    # Keep only the last of tied scores: a threshold cannot split them.
    last = np.r_[np.diff(scores[order]) != 0, True]
    precision, recall = (tp / k)[last], (tp / max(hits.sum(), 1))[last]
    ap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return precision, recall, ap


def calibration(probs: np.ndarray, targets: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Top-label reliability: confidence vs accuracy in equal-width confidence bins, and the ECE.

    ECE (expected calibration error) = sum over bins of (share of rows) * |accuracy - confidence|.
    """
    conf = probs.max(1)
    correct = probs.argmax(1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        m = which == b
        if not m.any():
            continue
        acc, c = float(correct[m].mean()), float(conf[m].mean())
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "n": int(m.sum()),
                "confidence": c,
                "accuracy": acc,
            }
        )
        ece += m.mean() * abs(acc - c)
    return {"bins": rows, "ece": float(ece)}


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


class MetricsLog:
    """Append-only metrics.jsonl: one JSON object per line, flushed at once (tail -f friendly).

    With a TensorBoard directory, every number also goes to TensorBoard as `<split>/<name>`.
    """

    def __init__(self, path: Path, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        self.tb: Any = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                from seqtrain.errors import ConfigError

                raise ConfigError(
                    "train.tensorboard needs the tensorboard package: pip install 'seqtrain[tensorboard]'."
                ) from None
            self.tb = SummaryWriter(str(tensorboard_dir))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("step", "epoch", "split") and isinstance(value, int | float):
                    self.tb.add_scalar(f"{record['split']}/{key}", value, record["step"])
            self.tb.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint's step (they will be logged again)."""
        if not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
