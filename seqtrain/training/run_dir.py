"""A run's life around its loop, the same for the classifier and the language model:

    start_processes  torchrun's rank and world, threads, train.deterministic
    lock             one process at a time in the run directory (rank 0 holds it)
    claim            a fresh run: refuse to overwrite one, start metrics.jsonl afresh
    open_run         fresh (rank 0 writes the run's files, the others wait and read them) or resumed
                     (the last checkpoint, the logs cut back to its step, the same process layout)
    restore          a resumed model, optimizer, TrainState and RNG
    wrap             DistributedDataParallel under torchrun
    finish_run       curves.png, the closing line, the lock released

What differs between the two (the files a run writes, the stream it reads) comes in as functions.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from seqtrain import checkpoint, console
from seqtrain.checkpoint import TrainState
from seqtrain.config import Config, TrainConfig, check_resumable
from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.runtime import (
    broadcast,
    check_same_layout,
    init_distributed,
    plan_ranks,
    restore_rng,
    set_threads,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path

    from seqtrain.data import BatchStream
    from seqtrain.metrics import MetricsLog

Files = TypeVar("Files")  # what a run reads back from its folder: (tokenizer, labels), or a tokenizer


def start_processes(t: TrainConfig) -> tuple[int, int, torch.device]:
    """This process's rank, the world size and its device; threads; train.deterministic."""
    rank, world, device = init_distributed(t.device)
    set_threads(t.num_threads)
    if rank != 0:
        console.quiet()  # one progress display and one log: rank 0's
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for reproducible GEMMs
        torch.use_deterministic_algorithms(True)
    return rank, world, device


def lock(run_dir: Path, rank: int, resume: bool, kind: str) -> None:
    """Rank 0 takes the run directory's lock; what killed saves left behind goes."""
    if rank == 0:
        for name in checkpoint.lock_run_dir(run_dir, fresh=not resume, kind=kind):
            console.warn(f"removed {run_dir / name}, left behind by an interrupted save")


def claim(run_dir: Path, verb: str, config_path: str) -> None:
    """A fresh run's first step: refuse a folder that holds checkpoints, start its metrics afresh."""
    if (run_dir / "checkpoints").exists() and any((run_dir / "checkpoints").iterdir()):
        raise ConfigError(
            f"{run_dir} already holds a run. Continue it with `seqtrain {verb} {config_path} --resume`, "
            "or pick another output_dir (e.g. name=... or output_dir=...), or delete the folder."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)


def steps_per_epoch(chunk_rows: Iterable[int], batch_size: int) -> int:
    """One process's steps per epoch from the rows of each chunk the vocabulary pass counted; under
    torchrun each rank counts its own part later (runtime.plan_ranks) and the epoch is the smallest."""
    return max(1, sum(math.ceil(n / batch_size) for n in chunk_rows))


@dataclass(kw_only=True)
class Resumed:
    """The checkpoint a --resume continues from."""

    path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    optimizer: dict[str, Any] | None
    rng: dict[str, torch.Tensor]


def last_checkpoint(cfg: Config) -> Resumed:
    """--resume: the config may change only what a resume allows; last/, verified."""
    check_resumable(cfg)
    ckpt, warnings = checkpoint.find(cfg.run_dir, "last")
    for w in warnings:
        console.warn(w)
    weights, state, optimizer, rng = checkpoint.load(ckpt, verified=True)  # find() verified it
    return Resumed(path=ckpt, weights=weights, state=state, optimizer=optimizer, rng=rng)


def open_run(
    cfg: Config,
    *,
    resume: bool,
    rank: int,
    world: int,
    workers: int,
    log: MetricsLog,
    prepare: Callable[[], tuple[Files, dict[str, Any]]],
    read: Callable[[], Files],
    stream: Callable[[Files], BatchStream],
    truncate: Callable[[int], None] | None = None,
) -> tuple[Files, dict[str, Any], Resumed | None]:
    """The run's files, run.json and, on resume, the checkpoint to continue from.

    Resume: `read()` the files; rank 0 cuts metrics.jsonl (and `truncate(step)` the recipe's other logs)
    back to the checkpoint's step. Fresh: rank 0 calls `prepare()` (build the vocabulary, write the
    files) while the other ranks wait, then they `read()` them; every rank counts its part of
    `stream(files)` (the first epoch's) and rank 0 writes the smallest epoch into run.json."""
    run_dir = cfg.run_dir
    if resume:
        saved = last_checkpoint(cfg)
        files = read()
        run_info = json.loads((run_dir / "run.json").read_text())
        console.info(
            f"resuming {run_dir} from {saved.path.name} "
            f"(step {saved.state['step']}, epoch {saved.state['epoch']})"
        )
        if rank == 0:
            log.truncate_after(saved.state["step"])
            if truncate is not None:
                truncate(saved.state["step"])
        check_same_layout(run_dir, run_info, saved.state, workers, world)
        return files, run_info, saved
    if rank != 0:
        error = broadcast(None, world, setup=True)  # rank 0 builds the vocabulary meanwhile
        if error:
            raise SeqtrainError(error)
        files = read()
        run_info = json.loads((run_dir / "run.json").read_text())
    else:
        try:
            files, run_info = prepare()
        except SeqtrainError as e:
            broadcast(str(e), world, setup=True)
            raise
        broadcast(None, world, setup=True)
    if plan_ranks(stream(files), world, run_info) and rank == 0:
        checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    return files, run_info, None


def restore(
    saved: Resumed,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    rank: int,
    weights: dict[str, torch.Tensor] | None = None,
) -> TrainState:
    """A resume: the weights (`weights`, or the checkpoint's), the optimizer, this rank's TrainState and
    every RNG as they were after the checkpoint's step."""
    model.load_state_dict(saved.weights if weights is None else weights)
    if saved.optimizer is not None:
        optimizer.load_state_dict(saved.optimizer)
    state = TrainState.from_checkpoint(saved.state, rank)
    restore_rng(saved.state["rng"], saved.rng, rank)
    return state


def wrap(
    model: torch.nn.Module, device: torch.device, world: int, find_unused_parameters: bool = False
) -> torch.nn.Module:
    """`model`, or under torchrun its DistributedDataParallel wrapper (backward all-reduces the
    gradients); `model` itself stays the one that is saved and evaluated."""
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=find_unused_parameters,
    )


def finish_run(run_dir: Path, draw: Callable[[Path], None], line: str) -> None:
    """Rank 0, after the loop and the recipe's summary: curves.png, `line`, the lock released."""
    try:  # a picture is a bonus: a plotting problem must not fail a finished training
        draw(run_dir / "curves.png")
    except Exception as e:
        console.warn(f"could not draw {run_dir / 'curves.png'}: {type(e).__name__}: {e}")
    console.info(line)
    checkpoint.unlock_run_dir(run_dir)
