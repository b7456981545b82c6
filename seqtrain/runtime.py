"""Where a run executes: torchrun/DDP start-up and collectives, threads, data workers, RNG state
and the signals that stop a run. Shared by `train.py` and `pretrain.py`.

Under torchrun every rank runs the same loop; rank 0 builds the vocabulary, evaluates, logs and
writes checkpoints, the others read what it wrote. With one process the collectives are no-ops.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import torch

from seqtrain import console, data, machine
from seqtrain.devices import pick_device
from seqtrain.errors import ConfigError, SeqtrainError
from seqtrain.machine import REPEAT_WINDOW, STOP_SIGNALS, physical_cores

if TYPE_CHECKING:
    from seqtrain.checkpoint import TrainState
    from seqtrain.data import BatchStream

# Before training, ranks other than 0 wait while rank 0 builds the vocabulary (a pass over the whole
# training split), and all ranks count their rows: a gloo group of its own with this timeout carries
# those waits; the training collectives keep torch's default, so a stuck step still fails in minutes.
SETUP_TIMEOUT = timedelta(hours=24)
_setup_group: Any = None


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; gloo on CPU, NCCL on GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, pick_device(device_name)
    import torch.distributed as dist

    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    global _setup_group
    _setup_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    return dist.get_rank(), world, device


def finish_distributed(world: int) -> None:
    """Wait for every rank, then tear the process groups down while the interpreter is whole. The
    caller has dropped its DistributedDataParallel wrapper first: its reducer holds the group, and a
    gloo group still referenced at interpreter exit is destroyed during finalization, where a rank can
    abort ("terminate called without an active exception") after its work is done."""
    if world > 1:
        import gc

        import torch.distributed as dist

        global _setup_group
        dist.barrier()
        _setup_group = None
        dist.destroy_process_group()
        gc.collect()  # the reducer and groups go now, not at exit


def set_threads(num_threads: int | None) -> None:
    """train.num_threads, else the physical cores shared among this machine's processes."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(num_threads or max(1, physical_cores() // local_world))


def resolve_workers(requested: int | None) -> int:
    """data.num_workers: null means a worker only where a core is left over for it."""
    if requested is not None:
        return requested
    return 1 if physical_cores() > 2 else 0


def broadcast(obj: Any, world: int, setup: bool = False) -> Any:
    """Rank 0's value of `obj`, on every rank; `setup`: with SETUP_TIMEOUT (the vocabulary wait)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=_setup_group if setup else None)
    return box[0]


def all_gather(obj: Any, world: int, setup: bool = False) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=_setup_group if setup else None)
    return out


def all_reduce(values: list[float], world: int, op: str = "sum") -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    x = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return [float(v) for v in x.tolist()]


def plan_ranks(stream: BatchStream, world: int, run_info: dict[str, Any]) -> bool:
    """torchrun: count each rank's rows and batches of an epoch (`BatchStream.count`, no tokenizing) into
    run_info. An epoch ends for all ranks when the one with the fewest batches runs out (a rank cannot
    step alone: the gradients are averaged over all), so that is the epoch's number of steps; the other
    ranks' remaining batches are not trained that epoch. True when run_info changed (rank 0 rewrites
    run.json)."""
    if world == 1 or "rank_batches" in run_info:
        return False
    counts = all_gather(stream.count(), world, setup=True)
    rows, batches = [c[0] for c in counts], [c[1] for c in counts]
    if min(batches) == 0:
        raise SeqtrainError(
            f"rank {batches.index(0)} of {world} gets no training rows (rows per rank: {rows}). Use fewer "
            "processes, or split the training data into more files."
        )
    run_info.update(steps_per_epoch=min(batches), rank_rows=rows, rank_batches=batches, rows_dropped={})
    if max(batches) > min(batches):
        console.warn(
            f"uneven parts under torchrun: batches per epoch by rank {batches} (rows {rows}). "
            f"Each epoch runs {min(batches)} steps, where the smallest part ends; the other ranks' remaining "
            f"{sum(batches) - world * min(batches)} batches are not trained in that epoch. "
            "Files (shards) in a number divisible by the processes, of similar sizes, avoid that."
        )
    return True


def note_dropped_rows(
    run_info: dict[str, Any], epoch: int, trained: int, rank: int, run_dir: Path, bar: console.TrainProgress
) -> None:
    """torchrun, at an epoch's end: how many of the epoch's rows were not trained (uneven parts),
    in run.json."""
    total = sum(run_info.get("rank_rows", []))
    if rank != 0 or not total or total == trained:
        return
    run_info.setdefault("rows_dropped", {})[str(epoch)] = total - trained
    from seqtrain import checkpoint

    checkpoint.write_json_atomic(run_dir / "run.json", run_info)
    bar.log(
        f"epoch {epoch}: {total - trained:,} of {total:,} training rows were not trained "
        "(uneven parts across ranks; run.json has rows_dropped per epoch)"
    )


def epoch_rows(positions: dict[str, Any], world: int) -> int:
    """Rows trained in this epoch, summed over worker slots and ranks
    (each slot's position counts its own)."""
    return int(all_reduce([float(sum(p.get("rows", 0) for p in positions.values()))], world)[0])


def bad_rows(positions: dict[str, Any], world: int) -> dict[str, int]:
    """Rows skipped so far in this epoch, by reason, summed over worker slots and ranks."""
    total: Counter[str] = Counter()
    for counts in all_gather([p["bad_rows"] for p in positions.values()], world):
        for c in counts:
            total.update(c)
    return dict(total)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def rng_state() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python's, numpy's and torch's generators (plus every CUDA device's): JSON part, tensor part."""
    np_state: Any = np.random.get_state()
    py = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    return (
        {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
        tensors,
    )


def set_rng_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def all_rng_states(world: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Every rank's generators (each rank calls this; rank 0 saves the result): rank 0's as `rng_state`
    gives them, the other ranks' JSON parts under "ranks" and their tensors prefixed "rank{r}."."""
    states = all_gather(rng_state(), world)
    json_part, tensors = states[0]
    json_part = {**json_part, "ranks": [j for j, _ in states[1:]]}
    for r, (_, own) in enumerate(states[1:], start=1):
        tensors = {**tensors, **{f"rank{r}.{k}": v for k, v in own.items()}}
    return json_part, tensors


def restore_rng(state: dict[str, Any], tensors: dict[str, torch.Tensor], rank: int) -> None:
    """This rank's generators from what `all_rng_states` saved (a checkpoint without them: rank 0's)."""
    if rank > 0 and len(state.get("ranks", [])) >= rank:
        prefix = f"rank{rank}."
        state, tensors = (
            state["ranks"][rank - 1],
            {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
        )
    set_rng_state(state, tensors)


def check_same_layout(
    run_dir: Path, run_info: dict[str, Any], saved: dict[str, Any], workers: int, world: int
) -> None:
    """A resume needs the data workers and processes the run had: each one's stream position is saved."""
    if run_info.get("workers") is not None and run_info["workers"] != workers:
        raise ConfigError(
            f"cannot resume {run_dir} with {workers} data workers: "
            f"it was trained with {run_info['workers']}, and the stream position is per worker. "
            f"Set data.num_workers={run_info['workers']}."
        )
    if saved["train_state"].get("world", 1) != world:
        raise ConfigError(
            f"cannot resume {run_dir} with {world} processes: "
            f"it was trained with {saved['train_state'].get('world', 1)}, "
            "and each process's position in the data stream is saved. Resume with the same --nproc_per_node."
        )


def next_batch(
    loader: Iterator[dict[str, Any]], stop: StopSignals, world: int
) -> tuple[dict[str, Any] | None, bool]:
    """The next batch, or None when this or any rank ran out (the epoch ends at the same step for all, so no
    rank waits forever in an all-reduce); and whether a stop signal reached any rank (all stop)."""
    batch = data.next_or_none(loader, stop.stopping)  # a signal ends the wait for a slow data worker
    exhausted, signalled = all_reduce([float(batch is None), float(stop.signum is not None)], world, op="max")
    return (None if exhausted else batch), bool(signalled)


def interrupted(stop: StopSignals, step: int, command: str, config_path: str) -> Interrupted:
    """What a loop raises after saving last/ on a stop signal."""
    signum = stop.signum or signal.SIGTERM
    return Interrupted(
        f"stopped by {signal.Signals(signum).name} at step {step}; last/ is saved. Resume with: "
        f"seqtrain {command} {config_path} --resume",
        signum,
    )


def save_checkpoint(
    run_dir: Path,
    state: TrainState,
    rank: int,
    world: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    *,
    best: bool,
    keep_last: int,
    train_model: torch.nn.Module | None = None,
) -> None:
    """Every rank calls this (it gathers each rank's stream position and generators); rank 0 writes."""
    from seqtrain import checkpoint

    ranks = all_gather(
        (state.positions, state.next_slot, state.unlabeled_epoch, state.unlabeled_position), world
    )
    rng_json, rng_tensors = all_rng_states(world)
    if rank != 0:
        return
    checkpoint.save(
        run_dir,
        state.step,
        model,
        optimizer,
        {
            "step": state.step,
            "epoch": state.epoch,
            "train_state": asdict(state),
            "ranks": ranks,
            "rng": rng_json,
            "_rng_tensors": rng_tensors,
            **extra,
        },
        best=best,
        keep_last=keep_last,
        train_model=train_model,
    )


def amp(device: torch.device, precision: str) -> tuple[bool, torch.dtype, torch.amp.GradScaler]:
    """train.precision on this device: whether to autocast, to which dtype, and the (fp16) loss scaler."""
    use_amp = device.type == "cuda" and precision != "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return use_amp, dtype, torch.amp.GradScaler("cuda", enabled=use_amp and precision == "fp16")


class StopSignals:
    """`with StopSignals() as stop:` records SIGINT/SIGTERM/SIGHUP instead of dying mid-step; the loop
    checks `stop.signum` between steps and while it waits for a batch, an evaluation between its batches
    (`stop.check`), saves last/ and exits 128 + signum.
    A second signal (REPEAT_WINDOW or more after the first) exits at once, keeping the checkpoint saved
    before (a save is written aside and moved into place, so one cut short leaves the previous intact).
    Leaving the block ends the data workers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._at = 0.0
        self._old: dict[int, Any] = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._at = signum, time.monotonic()
            machine.stop_requested_at = self._at
        elif time.monotonic() - self._at >= REPEAT_WINDOW:
            _exit_now(signum)

    def stopping(self) -> bool:
        return self.signum is not None

    def check(self) -> None:
        """Raise EvaluationStopped once a stop signal came: what an evaluation calls between its batches."""
        if self.signum is not None:
            raise EvaluationStopped

    def __enter__(self) -> StopSignals:
        self._old = {sig: signal.signal(sig, self._record) for sig in STOP_SIGNALS}
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:  # workers are ended, not waited for: one busy with a long read (or stuck) would hold the exit
            data.stop_workers()
        finally:
            for sig, handler in self._old.items():
                signal.signal(sig, handler)


def _exit_now(signum: int) -> NoReturn:
    """A second stop signal: end the data workers and exit 128 + signum, in the middle of whatever runs."""
    data.kill_workers()
    name = signal.Signals(signum).name
    text = (
        f"\nerror: stopped at once by a second {name}, without saving; last/ holds the latest complete "
        "checkpoint (resume with --resume).\n"
    )
    with contextlib.suppress(OSError):
        os.write(2, ("\x1b[?25h" if os.isatty(2) else "").encode() + text.encode())  # the bar hid the cursor
    os._exit(128 + signum)


class EvaluationStopped(Exception):
    """A stop signal during an evaluation: the recipe abandons it (no eval line, no best/ from it), saves
    last/ marked as not evaluated at its step, so that a resume evaluates that step first."""


class Interrupted(SeqtrainError):
    """Stopped by a signal after saving last/; exits with 128 + the signal number, like the shell."""

    def __init__(self, msg: str, signum: int) -> None:
        super().__init__(msg)
        self.exit_code = 128 + signum
