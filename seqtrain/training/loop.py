"""The loop both recipes run: epochs -> batches -> stop signal? -> step -> log -> evaluate/save.

    for each epoch until train.epochs or the run's total steps (or early stopping):
        for each batch of the epoch's stream (every rank gets one, or none: the epoch ends for all):
            a stop signal on any rank: save last/, exit 128 + signum (runtime.interrupted)
            step(batch)                    one optimizer step; advances the TrainState, returns its lr
            log(lr) every train.log_every  (and at the last step); the progress bar otherwise
            evaluate() every train.eval_every steps; True stops the run (early stopping, a pruner)
        the rows torchrun's ranks left out of the epoch are noted; without eval_every, evaluate()
    evaluate() once more unless this step was just evaluated; a signal during it is honoured too

The recipe's step, log line and evaluation are plain function arguments: the loop knows no model or
metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from seqtrain.data import make_loader
from seqtrain.runtime import broadcast, epoch_rows, interrupted, next_batch, note_dropped_rows

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from seqtrain import console
    from seqtrain.checkpoint import TrainState
    from seqtrain.config import Config
    from seqtrain.data import BatchStream
    from seqtrain.runtime import StopSignals


class LoopRun(Protocol):
    """What the loop reads of a recipe's run (train.ClassifierRun, pretrain.LMRun)."""

    cfg: Config
    config_path: str
    rank: int
    world: int
    workers: int
    run_info: dict[str, Any]
    total_steps: int
    state: TrainState


def _no_wait(seconds: float) -> None:
    pass


@dataclass(kw_only=True)
class Loop:
    """run_loop's arguments, for run_epoch."""

    run: LoopRun
    verb: str  # `seqtrain VERB`, for the message a signal ends the run with
    stop: StopSignals
    bar: console.TrainProgress
    step: Callable[[dict[str, Any]], float]
    log: Callable[[float], None]
    evaluate: Callable[[], bool]
    save_last: Callable[[], None]
    waited: Callable[[float], None]


def run_loop(
    run: LoopRun,
    verb: str,
    stop: StopSignals,
    bar: console.TrainProgress,
    *,
    stream: Callable[[], BatchStream],
    step: Callable[[dict[str, Any]], float],
    log: Callable[[float], None],
    evaluate: Callable[[], bool],
    save_last: Callable[[], None],
    waited: Callable[[float], None] = _no_wait,
) -> Iterator[dict[str, Any]] | None:
    """Train until the run's end, early stopping or a signal (raised as runtime.Interrupted). Returns the
    last epoch's batches: the caller holds them until its StopSignals block ends their data workers at
    once (data.stop_workers), where dropping them here would wait for the workers to finish.

    stream()      the training stream of run.state.epoch, from the state's position
    step(batch)   one optimizer step on the batch; advances run.state and returns the lr it used
    log(lr)       the train line, every train.log_every steps and at the last
    evaluate()    evaluate and save a checkpoint; True stops the run here
    save_last()   a checkpoint without evaluation (a stop signal)
    waited(s)     the seconds spent waiting for each batch
    """
    loop = Loop(
        run=run,
        verb=verb,
        stop=stop,
        bar=bar,
        step=step,
        log=log,
        evaluate=evaluate,
        save_last=save_last,
        waited=waited,
    )
    state, t = run.state, run.cfg.train
    early_stop, batches = False, None
    while state.epoch < t.epochs and state.step < run.total_steps and not early_stop:
        batches = iter(make_loader(stream(), run.workers))
        epoch_done, early_stop = run_epoch(loop, batches)
        if not epoch_done or early_stop:
            break  # max_steps or early stopping, inside the epoch
        if run.world > 1:
            note_dropped_rows(
                run.run_info,
                state.epoch + 1,
                epoch_rows(state.positions, run.world),
                run.rank,
                run.cfg.run_dir,
                bar,
            )
        state.next_epoch()
        if not t.eval_every and state.step != state.last_eval_step:
            state.last_eval_step = state.step
            early_stop = evaluate()
    if state.step != state.last_eval_step:
        state.last_eval_step = state.step  # saved with it: a resume does not evaluate this step again
        evaluate()
    if broadcast(stop.signum is not None, run.world):  # a signal in the last evaluation: honoured too
        raise interrupted(stop, state.step, verb, run.config_path)
    return batches


def run_epoch(loop: Loop, batches: Iterator[dict[str, Any]]) -> tuple[bool, bool]:
    """The rest of state.epoch's `batches`; returns (the epoch ran out, the run should stop early)."""
    run = loop.run
    state, t = run.state, run.cfg.train
    while True:
        waited = time.perf_counter()
        batch, signalled = next_batch(batches, loop.stop, run.world)  # all ranks agree on both
        loop.waited(time.perf_counter() - waited)
        if signalled:
            loop.save_last()
            raise interrupted(loop.stop, state.step, loop.verb, run.config_path)
        if batch is None:
            return True, False
        if state.step >= run.total_steps:
            return False, False
        lr = loop.step(batch)
        if state.step % t.log_every == 0 or state.step == run.total_steps:
            loop.log(lr)
        else:
            loop.bar.update(state.step)
        if t.eval_every and state.step % t.eval_every == 0:
            state.last_eval_step = state.step
            if loop.evaluate():
                return False, True
