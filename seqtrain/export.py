"""`seqtrain export`: the model as a TorchScript or ONNX file, with what is needed to feed it.

The exported model takes right-padded token ids (B, T) int64 (padding id 0) and lengths (B,)
int64, and returns two outputs: `logits` (B, C), the model's raw outputs, and `probs`, what
`seqtrain predict` reports: class probabilities (B, C), or for regression the score in the
target's own units (B, 1). So an ONNX folder answers like the run it came from, and
`seqtrain predict EXPORT_FOLDER` runs it on onnxruntime without importing torch (inference/onnx.py).
It is the eager `Classifier.forward` itself: that
forward already avoids PackedSequence and handles padding with gathers by length, which trace and
export as ordinary tensor ops with dynamic batch and time sizes (checked by the parity tests and
by a check run at the end of every export).

The folder holds the model file, `tokenizer.json`, `labels.json`, `config.yaml` and
`export.json` (inputs, outputs, how to tokenize and truncate).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from seqtrain import __version__
from seqtrain.config import Config
from seqtrain.encoding import PAD_ID, UNK_ID, Labels, read_length
from seqtrain.errors import SeqtrainError
from seqtrain.losses import to_probs
from seqtrain.model import Classifier

FORMATS = {"torchscript": "model.pt", "onnx": "model.onnx"}
# torch.onnx.export needs onnx. The TorchScript-based exporter used below runs without onnxscript
# (only the dynamo exporter used before needed it), so it is not checked for.
ONNX_PACKAGES = ("onnx",)
INSTALL_HINT = "pip install 'seqtrain[export]'"


class ExportError(SeqtrainError):
    pass


def example_inputs(
    vocab_size: int, batch: int = 3, steps: int = 7, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids and distinct lengths: batch and time above 1
    so neither is specialised as a constant."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(steps, 1, batch).round().long().clamp(min=1)
    lengths[0] = steps
    ids = torch.randint(2, max(3, vocab_size), (batch, steps), generator=g)
    ids[torch.arange(steps).unsqueeze(0) >= lengths.unsqueeze(1)] = PAD_ID
    return ids, lengths


class WithProbs(nn.Module):
    """The classifier plus the post-processing `seqtrain predict` applies: (logits, probs)."""

    def __init__(self, model: Classifier, labels: Labels, cfg: Config) -> None:
        super().__init__()
        self.model, self.labels, self.cfg = model, labels, cfg

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(ids, lengths)  # (B, C)
        return logits, to_probs(logits, self.labels, self.cfg)  # (B, C) probabilities, or (B, 1) scores


def missing_onnx_packages() -> list[str]:
    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def export_torchscript(model: WithProbs, path: Path, vocab_size: int) -> Path:
    """torch.jit.trace: the forward has no data-dependent Python branches, so the trace is the whole model."""
    ids, lengths = example_inputs(vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # TracerWarnings about shape-derived Python ints; the parity check covers them
        traced = torch.jit.trace(model, (ids, lengths), check_trace=False)
    traced.save(str(path))
    return path


def export_onnx(model: WithProbs, path: Path, vocab_size: int) -> Path:
    """torch.onnx.export with dynamic batch and time; weights embedded in the one file.

    The TorchScript-based exporter (dynamo=False), which maps each cell to ONNX's RNN, LSTM or GRU
    operator. The dynamo exporter fixed the time length at the example's 7 steps for the plain RNN
    always, and for an LSTM exported a second time in the same process: a file that refuses every
    other length (tests/test_export.py exports each cell more than once and checks other shapes).
    """
    missing = missing_onnx_packages()
    if missing:
        raise ExportError(
            f"ONNX export needs the package(s) {', '.join(missing)}: {INSTALL_HINT} "
            "(or use --format torchscript)."
        )
    ids, lengths = example_inputs(vocab_size)
    # The exporter warns about internals and deprecations; none of it concerns this model, the
    # parity check after export is what counts, and the CLI shows its own message.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model,
                (ids, lengths),
                str(path),
                input_names=["ids", "lengths"],
                output_names=["logits", "probs"],
                dynamic_axes={
                    "ids": {0: "batch", 1: "time"},
                    "lengths": {0: "batch"},
                    "logits": {0: "batch"},
                    "probs": {0: "batch"},
                },
                dynamo=False,
                verbose=False,
            )
    finally:
        onnx_log.setLevel(level)
    return path


def load_exported(path: Path) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A function (ids, lengths) -> logits (numpy) running an exported model file."""
    if path.suffix == ".onnx":
        try:
            import onnxruntime as ort
        except ImportError:
            raise ExportError(f"running {path.name} needs onnxruntime: {INSTALL_HINT}") from None
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
            return np.asarray(
                session.run(["logits"], {"ids": ids.astype(np.int64), "lengths": lengths.astype(np.int64)})[0]
            )

        return run_onnx
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # TorchScript is deprecated in torch 2.13, still supported
        module = torch.jit.load(str(path))

    def run_ts(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = module(torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(lengths.astype(np.int64)))
            return (out[0] if isinstance(out, tuple) else out).numpy()  # (logits, probs); older files: logits

    return run_ts


def check_parity(model: Classifier, path: Path, vocab_size: int) -> float | None:
    """Max abs difference between the exported and the eager model on a batch unlike the trace example.

    None when the file cannot be run here (ONNX without onnxruntime).
    """
    try:
        run = load_exported(path)
    except ExportError:
        return None
    ids, lengths = example_inputs(vocab_size, batch=5, steps=13, seed=1)
    with torch.inference_mode():
        eager = model(ids, lengths).float().numpy()
    return float(np.abs(run(ids.numpy(), lengths.numpy()) - eager).max())


def export_run(run_dir: Path, fmt: str, output: Path | None = None, which: str = "best") -> dict[str, Any]:
    """Export a run's checkpoint into a folder (default RUN_DIR/export); returns what export.json says,
    plus the check."""
    from seqtrain.inference.run import load_run

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}.")
    if fmt == "onnx" and missing_onnx_packages():  # before loading anything: fail fast
        raise ExportError(
            f"ONNX export needs the package(s) {', '.join(missing_onnx_packages())}: {INSTALL_HINT}."
        )
    run, load_warnings = load_run(run_dir, which, device="cpu", what="`seqtrain export`")
    model = WithProbs(run.model.eval(), run.labels, run.config).eval()
    folder = output if output is not None else run_dir / "export"
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = run.tokenizer.get_vocab_size()
    target = folder / FORMATS[fmt]
    if fmt == "torchscript":
        export_torchscript(model, target, vocab_size)
    else:
        export_onnx(model, target, vocab_size)
    for name in ("tokenizer.json", "labels.json", "config.yaml"):
        shutil.copyfile(run_dir / name, folder / name)
    data = run.config.data
    info: dict[str, Any] = {
        "format": fmt,
        "model": target.name,
        "seqtrain": __version__,
        "torch": torch.__version__,
        "checkpoint": run.checkpoint.name,
        "inputs": {
            "ids": (
                "int64 (batch, time): token ids from tokenizer.json (add_special_tokens=False), "
                "right-padded with pad_id"
            ),
            "lengths": "int64 (batch,): the number of real tokens in each row, at least 1",
        },
        "outputs": {
            "logits": "float32 (batch, classes): the model's raw outputs",
            "probs": "float32 (batch, classes): the probabilities of labels.json's names (softmax of logits)",
        },
        "pad_id": PAD_ID,
        "unk_id": UNK_ID,
        "empty_text": "a single unk_id",
        "max_length": read_length(data),
        "truncation": data.truncation,
        "labels": run.labels.names,
    }
    if run.labels.task == "regression":
        info["outputs"] = {
            "logits": (
                "float32 (batch, outputs): the model's raw outputs "
                "(standardised score, or logits over labels.json's values)"
            ),
            "probs": (
                "float32 (batch, 1): the predicted score in the target's own units, "
                "as `seqtrain predict` reports it"
            ),
        }
    (folder / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    info["max_abs_diff"] = check_parity(model.model, target, vocab_size)
    info["folder"] = str(folder)
    info["warnings"] = load_warnings
    return info
