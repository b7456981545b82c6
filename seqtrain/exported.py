"""`seqtrain predict EXPORT_FOLDER`: an ONNX export run on onnxruntime, with no torch import.

`seqtrain export RUN_DIR --format onnx` writes a folder with model.onnx (outputs `logits` and
`probs`), tokenizer.json, labels.json, config.yaml and export.json. Predicting from that folder
needs only onnxruntime, HF tokenizers and numpy: the process is up in a fraction of a second
instead of the ~2 s that importing torch and loading a checkpoint take on a small machine, which
is most of the wall time of a few thousand predictions. Texts are encoded and batched by length
exactly as on the torch path (encoding.py), so the results agree with `seqtrain predict RUN_DIR`
to float precision (tests/test_export.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seqtrain.config import Config, from_dict, read_yaml
from seqtrain.encoding import Labels, read_run_files, sorted_batches
from seqtrain.errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FILES = ("model.onnx", "tokenizer.json", "labels.json", "config.yaml")


@dataclass
class ExportedRun:
    """An ONNX export folder, ready to predict (a predict.Predictor)."""

    dir: Path
    config: Config
    tokenizer: Tokenizer
    labels: Labels
    session: Any  # onnxruntime.InferenceSession

    def probs(self, seqs: list[list[int]], batch_size: int) -> np.ndarray:
        """(N, C) probabilities or (N, 1) regression scores: the model's `probs` output, in input order."""
        out = np.zeros((len(seqs), self.labels.probs_width), dtype=np.float32)
        for idx, ids, lengths in sorted_batches(seqs, batch_size):
            out[idx] = self.session.run(["probs"], {"ids": ids, "lengths": lengths})[0]  # (B, width)
        return out


def is_export_folder(path: Path) -> bool:
    return (path / "export.json").is_file()


def load_exported_run(folder: Path) -> ExportedRun:
    try:
        info = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {folder / 'export.json'}: {e}") from None
    if info.get("format") != "onnx":
        raise CheckpointError(
            f"{folder} holds a {info.get('format', 'non-ONNX')} export; `seqtrain predict` runs ONNX export folders "
            f"(seqtrain export RUN_DIR --format onnx) or the run directory itself."
        )
    if "probs" not in info.get("outputs", {}):
        raise CheckpointError(
            f"{folder / 'model.onnx'} comes from an older seqtrain and has no `probs` output; export it again: "
            f"seqtrain export RUN_DIR --format onnx --output {folder}"
        )
    for name in FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: {folder} is not a complete export folder.")
    try:
        import onnxruntime as ort
    except ImportError:
        raise CheckpointError(f"predicting with {folder / 'model.onnx'} needs onnxruntime: pip install 'seqtrain[export]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about initializers it folds, which concern no one here
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    tokenizer, labels = read_run_files(folder)
    return ExportedRun(folder, from_dict(read_yaml(folder / "config.yaml")), tokenizer, labels, session)
