"""A run directory on torch: the model, tokenizer and labels rebuilt from it, and its predictions.

Everything here needs only the run directory (config.yaml, tokenizer.json, labels.json and a
checkpoint); nothing is unpickled. Batches are sorted by length and run under inference_mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from seqtrain import checkpoint
from seqtrain.config import Config, from_dict, read_yaml
from seqtrain.data import sorted_batches
from seqtrain.devices import pick_device
from seqtrain.encoding import BatchCost, Labels, encode, read_run_files
from seqtrain.errors import CheckpointError
from seqtrain.losses import to_probs
from seqtrain.model import Classifier, build_model

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass(kw_only=True)
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
        """Probabilities (N, C), or regression scores (N, 1), of encoded texts (inference.io.Predictor)."""
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
    model = build_model(cfg.model, tokenizer.get_vocab_size(), labels.outputs, data=cfg.data, init=False)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(
            f"{ckpt / 'model.safetensors'} does not fit the model in config.yaml: {e}"
        ) from None
    dev = pick_device(device)
    model.to(dev).eval()
    run = Run(
        dir=run_dir, config=cfg, tokenizer=tokenizer, labels=labels, model=model, checkpoint=ckpt, device=dev
    )
    return run, warnings


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
