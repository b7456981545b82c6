"""Load a run directory and use it: evaluate a split, predict texts.

Everything here needs only the run directory (config.yaml, tokenizer.json, labels.json and a
checkpoint); nothing is unpickled. Batches are sorted by length and run under inference_mode.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from seqtrain import checkpoint
from seqtrain.config import Config, from_dict, read_yaml
from seqtrain.data import UNK_ID, BatchStream, Labels, encode, sorted_batches
from seqtrain.errors import CheckpointError, DataError
from seqtrain.metrics import classification_report, confusion
from seqtrain.model import Classifier, build_model

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    return torch.device(name)


def load_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read the tokenizer {path}: {e}") from None


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


def load_run(run_dir: Path, which: str = "best", device: str = "cpu") -> tuple[Run, list[str]]:
    """Rebuild model, tokenizer and labels from a run directory (safe loaders only)."""
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {str(run_dir)!r} does not exist.")
    for name in ("config.yaml", "tokenizer.json", "labels.json"):
        if not (run_dir / name).is_file():
            raise CheckpointError(f"{run_dir / name} is missing: {run_dir} is not a complete seqtrain run directory.")
    cfg = from_dict(read_yaml(run_dir / "config.yaml"))
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    labels = Labels.from_json(json.loads((run_dir / "labels.json").read_text()))
    ckpt, warnings = checkpoint.find(run_dir, which)
    weights = checkpoint.load_tensors(ckpt / "model.safetensors")
    model = build_model(cfg.model, tokenizer.get_vocab_size(), len(labels.names))
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt / 'model.safetensors'} does not fit the model in config.yaml: {e}") from None
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
) -> dict[str, Any]:
    """Stream a split in length-sorted batches; loss, accuracy, macro P/R/F1, confusion matrix."""
    was_training = model.training
    model.eval()
    stream = BatchStream(data_cfg or cfg.data, split, tokenizer, labels, cfg.train.batch_size * 2, shuffle=False, limit=limit)
    C = len(labels.names)
    cm = np.zeros((C, C), dtype=np.int64)
    loss_sum, n, tokens, unk = 0.0, 0, 0, 0
    start = time.perf_counter()
    bad: dict[str, int] = {}
    for batch in stream:
        ids, lengths, y = batch["ids"].to(device), batch["lengths"].to(device), batch["labels"].to(device)
        logits = model(ids, lengths).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        cm += confusion(y.cpu().numpy(), logits.argmax(-1).cpu().numpy(), C)
        n += len(y)
        tokens += int(lengths.sum())
        unk += int((batch["ids"] == UNK_ID).sum())
        bad = batch["position"]["bad_rows"]
    if n == 0:
        raise DataError(f"split {split!r} of {(data_cfg or cfg.data).path!r} has no usable rows to evaluate.")
    model.train(was_training)
    report = classification_report(cm, labels.names)
    report.update(
        loss=loss_sum / n, split=split, unk_rate=unk / max(tokens, 1),
        examples_per_sec=n / (time.perf_counter() - start), bad_rows=bad,
    )
    return report


@torch.inference_mode()
def predict_probs(run: Run, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, C) for texts, in input order; batched by length."""
    probs = np.zeros((len(texts), len(run.labels.names)), dtype=np.float32)
    if not texts:
        return probs
    seqs = encode(run.tokenizer, texts, run.config.data)
    for idx, ids, lengths in sorted_batches(seqs, batch_size):
        logits = run.model(ids.to(run.device), lengths.to(run.device)).float()
        probs[idx] = torch.softmax(logits, -1).cpu().numpy()
    return probs


def predict_stream(run: Run, texts: Iterable[str], chunk: int = 2048, batch_size: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """(text, probs) in input order, reading `chunk` texts at a time so output streams."""
    buf: list[str] = []
    for text in texts:
        buf.append(text)
        if len(buf) == chunk:
            yield from zip(buf, predict_probs(run, buf, batch_size), strict=True)
            buf = []
    if buf:
        yield from zip(buf, predict_probs(run, buf, batch_size), strict=True)
