"""The loop both recipes run: epochs -> batches -> stop signal? -> step -> log -> evaluate/save.

    for each epoch until train.epochs or the run's total steps (or early stopping):
        for each batch of the epoch's stream (every rank gets one, or none: the epoch ends for all):
            a stop signal on any rank: save last/, exit 128 + signum (runtime.interrupted)
            step(batch)                    one optimizer step; advances the TrainState, returns its lr
            log(lr) every train.log_every  (and at the last step); the progress bar otherwise
            evaluate() every train.eval_every steps; True stops the run (early stopping, a pruner)
        the rows torchrun's ranks left out of the epoch are noted; without eval_every, evaluate()
    evaluate() once more unless this step was just evaluated

A stop signal during an evaluation ends the run right after it, with last/ at its step: the recipe
abandons the evaluation at its next batch (StopSignals.check) and saves last/ without it, marked with
not_evaluated, and a resume runs that evaluation first.

The recipe's step, log line and evaluation are plain function arguments: the loop knows no model or
metric.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from seqtrain.data import make_loader
from seqtrain.runtime import all_reduce, broadcast, epoch_rows, interrupted, next_batch, note_dropped_rows

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
    evaluate()    evaluate and save a checkpoint; True stops the run here. On a stop signal (stop.check
                  between its batches) it abandons the evaluation and saves last/ after not_evaluated
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
    due = state.step % t.eval_every == 0 if t.eval_every else not state.positions  # else: an epoch's start
    if state.step and state.step != state.last_eval_step and due:
        early_stop = run_evaluation(loop)  # resumed from an evaluation that a stop signal cut short
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
            early_stop = run_evaluation(loop)
    if state.step != state.last_eval_step:
        run_evaluation(loop)
    elif broadcast(stop.signum is not None, run.world):  # a signal since: last/ holds this step
        raise interrupted(stop, state.step, verb, run.config_path)
    return batches


def run_evaluation(loop: Loop) -> bool:
    """The recipe's evaluation and checkpoint at this step; True stops the run early. A stop signal on any
    rank before it ends (the recipe abandons it then, see not_evaluated) ends the run here: every rank has
    just taken part in the checkpoint of this step."""
    run = loop.run
    run.state.last_eval_step = run.state.step  # saved with it: a resume does not evaluate this step again
    early_stop = loop.evaluate()
    if all_reduce([float(loop.stop.signum is not None)], run.world, op="max")[0]:
        raise interrupted(loop.stop, run.state.step, loop.verb, run.config_path)
    return early_stop


def not_evaluated(state: TrainState) -> None:
    """An evaluation abandoned for a stop signal: the checkpoint saved next leaves its step to the resume."""
    state.last_eval_step = -1


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
        if t.eval_every and state.step % t.eval_every == 0 and run_evaluation(loop):
            return False, True
