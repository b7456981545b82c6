"""A split of a dataset scored by a model on torch: what training's evaluations and `seqtrain eval` report.

Batches are streamed, sorted by length and run under inference_mode; a broken file is a message.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from seqtrain import badrows
from seqtrain.data import BatchStream
from seqtrain.encoding import UNK_ID, Labels
from seqtrain.errors import DataError
from seqtrain.losses import task_loss, to_scores
from seqtrain.metrics import classification_report, confusion, regression_report, top_k_accuracy

if TYPE_CHECKING:
    from collections.abc import Callable

    from tokenizers import Tokenizer

    from seqtrain.config import Config
    from seqtrain.model import Classifier


@torch.inference_mode()
def evaluate(
    model: Classifier,
    cfg: Config,
    tokenizer: Tokenizer,
    labels: Labels,
    split: str,
    device: torch.device,
    limit: int | None = None,
    data_cfg: Any = None,
    collect: bool = False,
    interrupt: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Stream a split in length-sorted batches and score it.

    classification: loss, accuracy, macro P/R/F1, per class, confusion matrix (+ top-k for many classes);
    regression: loss, MAE, RMSE, R², Spearman (+ rounded accuracy for integer targets).
    With `collect`, report["arrays"] holds per-row outputs, targets and token lengths (numpy).
    `interrupt()` is called after every batch; what it raises ends the evaluation (a training run's stop).
    """
    was_training = model.training
    model.eval()
    data = data_cfg or cfg.data
    stream = BatchStream(data, split, tokenizer, labels, cfg.train.batch_size * 2, shuffle=False, limit=limit)
    outputs: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    lengths_all: list[np.ndarray] = []
    loss_sum, tokens, unk = 0.0, 0, 0
    start = time.perf_counter()
    bad: dict[str, int] = {}
    for batch in badrows.guarded(
        stream, badrows.split_path(data, split), split
    ):  # a broken file: a message, not a traceback
        ids, lengths, y = batch["ids"].to(device), batch["lengths"].to(device), batch["labels"].to(device)
        out = model(ids, lengths)
        loss_sum += task_loss(out, y, labels, cfg, reduction="sum").item()
        if labels.task == "regression":
            outputs.append(to_scores(out, labels, cfg).cpu().numpy())
        else:
            outputs.append(torch.softmax(out.float(), -1).cpu().numpy())
        targets.append(batch["labels"].numpy())
        lengths_all.append(batch["lengths"].numpy())
        tokens += int(lengths.sum())
        unk += int((batch["ids"] == UNK_ID).sum())
        bad = batch["position"]["bad_rows"]
        if interrupt is not None:
            interrupt()
    model.train(was_training)
    if not targets:
        raise DataError(f"split {split!r} of {data.path!r} has no usable rows to evaluate.")
    out_all, y_all = np.concatenate(outputs), np.concatenate(targets)
    n = len(y_all)
    if labels.task == "regression":
        report = regression_report(out_all, y_all.astype(np.float64), labels.integer, labels.low, labels.high)
    else:
        C = len(labels.names)
        report = classification_report(confusion(y_all, out_all.argmax(1), C), labels.names)
        if C > 2:
            report["top_k"] = min(3, C - 1)
            report["top_k_accuracy"] = top_k_accuracy(out_all, y_all, report["top_k"])
    report.update(
        loss=loss_sum / n,
        split=split,
        task=labels.task,
        unk_rate=unk / max(tokens, 1),
        examples_per_sec=n / (time.perf_counter() - start),
        bad_rows=bad,
    )
    if collect:
        report["arrays"] = {"outputs": out_all, "targets": y_all, "lengths": np.concatenate(lengths_all)}
    return report
