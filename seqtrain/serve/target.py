"""What `serve` serves: TARGET checked before any worker starts, described by /info (each worker loads it
with inference.target.load_target)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from seqtrain import __version__
from seqtrain.encoding import UNK_ID, BatchCost, read_labels
from seqtrain.errors import CheckpointError, ConfigError
from seqtrain.inference.io import Predictor
from seqtrain.inference.onnx import is_export_folder
from seqtrain.serve.options import ServeOptions


def check_target(target: Path, checkpoint: str = "best") -> list[str]:
    """Before the workers start, without torch: TARGET is a run directory or an export folder whose
    labels.json can be read. Raises CheckpointError (one line naming the file) or ConfigError;
    returns warnings (a run that is still being trained)."""
    if not target.exists():
        raise CheckpointError(f"{target} does not exist: give a run directory or an ONNX export folder.")
    if not target.is_dir():
        raise CheckpointError(
            f"{target} is a file, not a run directory or an ONNX export folder "
            "(a folder with config.yaml, tokenizer.json and labels.json)."
        )
    export = is_export_folder(target)
    if export and checkpoint != "best":
        raise ConfigError(
            "--checkpoint picks a checkpoint of a run directory; an export folder holds one model."
        )
    for name in ("config.yaml", "tokenizer.json", "labels.json"):
        if not (target / name).is_file():
            if not export and name == "labels.json" and language_model(target):
                raise CheckpointError(
                    f"{target} is a language model run (written by `seqtrain pretrain`), not a classifier: "
                    f"serve needs a classifier with labels. Fine-tune it with `model.init_from: {target}`."
                )
            raise CheckpointError(
                f"{target / name} is missing: {target} is not a seqtrain run directory or export folder."
            )
    read_labels(target / "labels.json")  # a damaged file: CheckpointError naming it
    return [] if export else training_warning(target)


def language_model(run_dir: Path) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((run_dir / "run.json").read_text()).get("kind") == "language-model"
    return False


def training_warning(run_dir: Path) -> list[str]:
    """A warning when a seqtrain process still holds the run's lock (it is training): serve answers
    with the checkpoint it loads now, not the ones saved later."""
    try:
        pid = int((run_dir / ".lock").read_text().strip() or 0)
    except (OSError, ValueError):
        return []
    if pid <= 0 or pid == os.getpid():
        return []
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return []  # no such process: the lock file is left from a finished run
    if "seqtrain" not in command:
        return []
    return [
        f"{run_dir} is still being trained (process {pid}): serve answers with the checkpoint it loads "
        "now (its step is in /health and /info), not with the ones saved later; restart serve to load "
        "a newer one."
    ]


def measure_cost(run: Predictor, batch_size: int, steps: int = 32, repeats: int = 5) -> BatchCost | None:
    """The model's BatchCost, from the best of `repeats` timings of batches of unknown tokens:
    1 text of 1 step, 1 text of `steps` and `batch_size` texts of `steps`. None for batches of one."""
    if batch_size < 2:
        return None

    def seconds(texts: int, length: int) -> float:
        seqs = [[UNK_ID] * length] * texts
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run.probs(seqs, texts)
            best = min(best, time.perf_counter() - start)
        return best

    call, one, full = seconds(1, 1), seconds(1, steps), seconds(batch_size, steps)
    per_text_step = max((full - one) / (steps * (batch_size - 1)), 1e-9)  # what grows with B
    per_step = max((one - call) / (steps - 1) - per_text_step, 0.0)  # what does not
    return BatchCost(per_call=call / per_text_step, per_step=per_step / per_text_step)


def checkpoint_name(run: Predictor, target: Path) -> str | None:
    ckpt = getattr(run, "checkpoint", None)  # inference.run.Run: the checkpoint folder
    name = ckpt.name if isinstance(ckpt, Path) else None
    if name is None:
        with contextlib.suppress(OSError, ValueError):
            name = json.loads((target / "export.json").read_text()).get("checkpoint")
    return name


def step_of(name: str | None) -> int | None:
    found = re.search(r"step-(\d+)", name or "")
    return int(found.group(1)) if found else None


def describe(
    run: Predictor, target: Path, opts: ServeOptions, cost: BatchCost | None = None
) -> dict[str, Any]:
    """What GET /info answers (for the worker process that answers it)."""
    backend = "torch" if getattr(run, "checkpoint", None) is not None else "onnxruntime"
    name = checkpoint_name(run, target)
    versions = {"seqtrain": __version__, "python": platform.python_version()}
    for package in (backend, "fastapi", "uvicorn", "uvloop", "httptools"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    data = run.config.data
    limits = {k: v for k, v in asdict(opts).items() if k.startswith(("max_", "explain_"))}
    return {
        "target": str(target),
        "backend": backend,
        "task": run.labels.task,
        "labels": run.labels.names,
        "checkpoint": name,
        "step": step_of(name),
        "max_length": data.max_length,
        "ngram_max_length": data.ngram_max_length,  # the tokens the n-gram path reads, when further
        "truncation": data.truncation,
        "limits": {**limits, "read_timeout_s": opts.read_timeout_s},
        "workers": opts.worker_count,
        "pid": os.getpid(),
        "threads": opts.model_threads,  # this worker's model threads
        "batch_cost": asdict(cost) if cost else None,  # in units of one text's time step
        "versions": versions,
    }
