"""The torch device a config names: `train.device` (auto, cpu, cuda) for training, eval and predict."""

from __future__ import annotations

import torch

from seqtrain.errors import DataError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DataError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'.")
    return torch.device(name)
