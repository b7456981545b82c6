"""An ONNX export folder on onnxruntime, with no torch import (`seqtrain predict EXPORT_FOLDER`, and serve
and explain).

`seqtrain export RUN_DIR --format onnx` writes a folder with model.onnx (outputs `logits` and
`probs`), tokenizer.json, labels.json, config.yaml and export.json. Predicting from that folder
needs only onnxruntime, HF tokenizers and numpy: the process starts without the cost of importing
torch and loading a checkpoint, which is most of the wall time of a few thousand predictions
(BENCHMARKS.md). Texts are encoded and batched by length
exactly as on the torch path (encoding.py), so the results agree with `seqtrain predict RUN_DIR`
to float precision (tests/test_export.py).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seqtrain.config import Config, from_dict, read_yaml
from seqtrain.encoding import BatchCost, Labels, read_run_files, sorted_batches
from seqtrain.errors import CheckpointError
from seqtrain.machine import physical_cores

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FILES = ("model.onnx", "tokenizer.json", "labels.json", "config.yaml")


@dataclass(kw_only=True)
class ExportedRun:
    """An ONNX export folder, ready to predict (an inference.io.Predictor)."""

    dir: Path
    config: Config
    tokenizer: Tokenizer
    labels: Labels
    session: Any  # onnxruntime.InferenceSession
    pool: ThreadPoolExecutor | None = None  # runs several batches at once (RNN cells; see load_exported_run)

    def probs(self, seqs: list[list[int]], batch_size: int, cost: BatchCost | None = None) -> np.ndarray:
        """(N, C) probabilities or (N, 1) regression scores: the model's `probs` output, in input order."""
        out = np.zeros((len(seqs), self.labels.probs_width), dtype=np.float32)

        def forward(batch: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
            idx, ids, lengths = batch
            out[idx] = self.session.run(["probs"], {"ids": ids, "lengths": lengths})[0]  # (B, width)

        # With a pool, each thread keeps one core busy (onnxruntime releases the GIL in run()).
        for _ in (self.pool.map if self.pool else map)(forward, sorted_batches(seqs, batch_size, cost)):
            pass
        return out


def is_export_folder(path: Path) -> bool:
    return (path / "export.json").is_file()


def load_exported_run(folder: Path, threads: int | None = None) -> ExportedRun:
    """The folder's model on onnxruntime, on `threads` threads (None: one per physical core)."""
    try:
        info = json.loads((folder / "export.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {folder / 'export.json'}: {e}") from None
    if info.get("format") != "onnx":
        raise CheckpointError(
            f"{folder} holds a {info.get('format', 'non-ONNX')} export; "
            "`seqtrain predict` runs ONNX export folders "
            f"(seqtrain export RUN_DIR --format onnx) or the run directory itself."
        )
    if "probs" not in info.get("outputs", {}):
        raise CheckpointError(
            f"{folder / 'model.onnx'} comes from an older seqtrain and has no `probs` output; "
            f"export it again: seqtrain export RUN_DIR --format onnx --output {folder}"
        )
    for name in FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name} is missing: {folder} is not a complete export folder.")
    try:
        import onnxruntime as ort
    except ImportError:
        raise CheckpointError(
            f"predicting with {folder / 'model.onnx'} needs onnxruntime: pip install 'seqtrain[export]'"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = (
        3  # errors only: ORT warns about initializers it folds, which concern no one here
    )
    config = from_dict(read_yaml(folder / "config.yaml"))
    # onnxruntime's CPU RNN kernel runs on one thread, whatever intra_op_num_threads says; its LSTM
    # and GRU kernels split every time step across the threads. So an RNN runs one batch per core
    # at once (faster end to end), while for LSTM and GRU that was slower than one batch on all cores.
    pool = None
    cores = threads or physical_cores()
    if config.model.cell == "rnn" and cores > 1:
        options.intra_op_num_threads = 1
        pool = ThreadPoolExecutor(cores, thread_name_prefix="seqtrain-onnx")
    elif threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    tokenizer, labels = read_run_files(folder)
    return ExportedRun(
        dir=folder, config=config, tokenizer=tokenizer, labels=labels, session=session, pool=pool
    )
