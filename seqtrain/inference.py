"""Load a run directory and use it: evaluate a split, predict texts.

Everything here needs only the run directory (config.yaml, tokenizer.json, labels.json and a
checkpoint); nothing is unpickled. Batches are sorted by length and run under inference_mode.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from seqtrain import badrows, checkpoint
from seqtrain.config import Config, from_dict, read_yaml
from seqtrain.data import BatchStream, sorted_batches
from seqtrain.encoding import UNK_ID, BatchCost, Labels, encode, read_run_files
from seqtrain.errors import CheckpointError, DataError
from seqtrain.losses import task_loss, to_probs, to_scores
from seqtrain.metrics import classification_report, confusion, regression_report, top_k_accuracy
from seqtrain.model import Classifier, build_model

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    return torch.device(name)


@dataclass
class Run:
    """A trained run, ready to use."""

    dir: Path
    config: Config
    tokenizer: Tokenizer
    labels: Labels
    model: Classifier
    checkpoint: Path
    device: torch.device

    def probs(self, seqs: list[list[int]], batch_size: int, cost: BatchCost | None = None) -> np.ndarray:
        """Probabilities (N, C), or regression scores (N, 1), of encoded texts (predict.Predictor)."""
        return probs_of(self, seqs, batch_size, cost)


def load_run(
    run_dir: Path, which: str = "best", device: str = "cpu", what: str = "this command"
) -> tuple[Run, list[str]]:
    """Rebuild model, tokenizer and labels from a run directory (safe loaders only). A language model run
    (seqtrain pretrain), a missing file or a damaged labels.json is a CheckpointError; `what` names the
    command in that message."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} does not exist.")
    other = checkpoint.not_a_classifier(run_dir, what)
    if other is not None:
        raise other
    for name in ("config.yaml", "tokenizer.json", "labels.json"):
        if not (run_dir / name).is_file():
            raise CheckpointError(
                f"{run_dir / name} is missing: {run_dir} is not a complete seqtrain run directory."
            )
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    tokenizer, labels = read_run_files(run_dir)
    ckpt, warnings = checkpoint.find(run_dir, which)
    weights = checkpoint.load_tensors(ckpt / "model.safetensors")
    model = build_model(cfg.model, tokenizer.get_vocab_size(), labels.outputs, init=False)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} does not fit the model in config.yaml: {e}"
        ) from None
    dev = pick_device(device)
    model.to(dev).eval()
    return Run(run_dir, cfg, tokenizer, labels, model, ckpt, dev), warnings


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
) -> dict[str, Any]:
    """Stream a split in length-sorted batches and score it.

    classification: loss, accuracy, macro P/R/F1, per class, confusion matrix (+ top-k for many classes);
    regression: loss, MAE, RMSE, R², Spearman (+ rounded accuracy for integer targets).
    With `collect`, report["arrays"] holds per-row outputs, targets and token lengths (numpy).
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


def predict_probs(run: Run, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, C) — or, for regression, scores (N, 1) — in input order; batched by length."""
    return probs_of(run, encode(run.tokenizer, texts, run.config.data), batch_size)


@torch.inference_mode()
def probs_of(
    run: Run, seqs: list[list[int]], batch_size: int = 256, cost: BatchCost | None = None
) -> np.ndarray:
    """predict_probs on texts already tokenized."""
    probs = np.zeros((len(seqs), run.labels.probs_width), dtype=np.float32)
    if not seqs:
        return probs
    for idx, ids, lengths in sorted_batches(seqs, batch_size, cost):
        out = run.model(ids.to(run.device), lengths.to(run.device))
        probs[idx] = to_probs(out, run.labels, run.config).cpu().numpy()
    return probs
