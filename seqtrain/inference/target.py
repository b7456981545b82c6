"""What `predict`, `explain` and `serve` run: a run directory on torch, or an ONNX export folder on
onnxruntime, where torch is never imported."""

from __future__ import annotations

from typing import TYPE_CHECKING

from seqtrain.errors import ConfigError
from seqtrain.inference.onnx import is_export_folder, load_exported_run

if TYPE_CHECKING:
    from pathlib import Path

    from seqtrain.inference.io import Predictor


def load_target(
    target: Path, checkpoint: str = "best", threads: int | None = None, *, what: str = "this command"
) -> tuple[Predictor, list[str]]:
    """The model in `target`, on `threads` threads (None: the library's default), and the warnings its
    loading gave (a damaged checkpoint passed over for an older one). `checkpoint` (best or last) picks one of
    a run directory's; an export folder holds one model, so anything but best is a ConfigError. `what`
    names the command in the error for a run that is not a classifier."""
    if not is_export_folder(target):
        import torch

        from seqtrain.inference.run import load_run

        if threads:
            torch.set_num_threads(threads)
        return load_run(target, checkpoint, what=what)
    if checkpoint != "best":
        raise ConfigError(
            "--checkpoint picks a checkpoint of a run directory; an export folder holds one model."
        )
    return load_exported_run(target, threads), []
