"""One process's trials: the next one to run (an orphaned trial of this machine first, resumed), its
training with every evaluation reported to the pruner, and how it ended told to the study. Ctrl-C or
a crash at any point leaves the trial to the next `tune` on the study."""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from seqtrain import console, machine
from seqtrain.config import from_dict, read_yaml, total_steps
from seqtrain.errors import DiskFullError, SeqtrainError
from seqtrain.machine import REPEAT_WINDOW, STOP_SIGNALS
from seqtrain.tune.options import PRUNE_AFTER, Options
from seqtrain.tune.space import _fmt, trial_config
from seqtrain.tune.storage import _is_storage_error

if TYPE_CHECKING:
    import optuna


# --------------------------------------------------------------------------- who runs which trial


def _process_start(pid: int) -> str | None:
    """The start time of a process (field 22 of /proc/PID/stat), to tell a live owner from a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid())}


def _orphaned(trial: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose process let it go (Ctrl-C) or, on this machine, is gone (killed, crashed)."""
    owner = trial.user_attrs.get("owner") or {}
    if owner.get("released"):
        return True  # also when the process lives on (tune called from Python) or is on another machine
    if owner.get("host") != socket.gethostname():
        return False  # another machine's trial: it may well be running
    start = _process_start(int(owner.get("pid", 0)))
    return start is None or start != owner.get("pid_start")


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One process of this machine at a time picks its next trial (no two resume the same one)."""
    with open(folder / ".tune.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def next_trial(study: optuna.Study, n_trials: int, folder: Path) -> tuple[optuna.Trial | None, bool]:
    """(trial, resumed): an orphaned RUNNING trial of this machine first, else a new one while the
    study has fewer than `n_trials` trials; (None, False) when it is full."""
    import optuna
    from optuna.trial import TrialState

    with _locked(folder):
        trials = study.get_trials(deepcopy=False)
        for frozen in trials:
            if frozen.state == TrialState.RUNNING and _orphaned(frozen):
                study._storage.set_trial_user_attr(frozen._trial_id, "owner", _owner())
                return optuna.Trial(study, frozen._trial_id), True
        if sum(t.state != TrialState.WAITING for t in trials) >= n_trials:
            return None, False
        # ask() stores the new trial as RUNNING before it returns it: a Ctrl-C in between would leave a
        # trial with no owner, which no later tune may take (it could be another machine's).
        trial = None
        try:
            with _stop_deferred():
                trial = study.ask()
                trial.set_user_attr("owner", _owner())
        except BaseException:
            if trial is not None:
                _release(trial)
            raise
        return trial, False


class StopRequested(KeyboardInterrupt):
    """A stop signal to `seqtrain tune` outside a trial's training, raised as Ctrl-C raises
    KeyboardInterrupt (and held back the same way while the study is written); the command exits with
    128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_raised_at: list[float] = []  # when _raise_stop raised, in this tune()


def _raise_stop(signum: int, frame: types.FrameType | None) -> None:
    """Raise StopRequested, unless this is the same request arriving again (from the process group and
    from `tune --jobs`, machine.REPEAT_WINDOW) after it stopped a trial's training or was raised here."""
    trained = machine.stop_requested_at
    last = max([*_raised_at, -math.inf if trained is None else trained])
    if time.monotonic() - last < REPEAT_WINDOW:
        return
    _raised_at.append(time.monotonic())
    raise StopRequested(signum)


@contextlib.contextmanager
def handling_stop_signals(handler: Callable[[int, types.FrameType | None], None]) -> Iterator[None]:
    """`handler` for every stop signal in the block, the previous handlers restored after it."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """While tune runs: every stop signal raises StopRequested, also in a process started with them
    ignored (a shell's background job ignores SIGINT); a trial's training records them instead
    (runtime.StopSignals). Only in the main thread, where signal handlers can be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _raised_at.clear()
    machine.stop_requested_at = None  # an earlier stop is none to this tune()
    with handling_stop_signals(_raise_stop):
        yield


@contextlib.contextmanager
def _stop_deferred() -> Iterator[None]:
    """A stop signal waits until the block has written the study (a new trial and its owner, a trial's
    result), then raises StopRequested: the database is never left halfway. A second one (the same request
    arriving twice is not, machine.REPEAT_WINDOW) raises at once. Only where stop signals raise (tune()
    sets that up in the main thread; a KeyboardInterrupt raised directly cannot be held back)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not _raise_stop
    ):
        yield
        return
    pending: list[tuple[int, float]] = []

    def later(signum: int, frame: types.FrameType | None) -> None:
        if pending and time.monotonic() - pending[0][1] >= REPEAT_WINDOW:
            raise StopRequested(signum)
        pending.append((signum, time.monotonic()))

    with handling_stop_signals(later):
        yield
    if pending:
        raise StopRequested(pending[0][0])


# --------------------------------------------------------------------------- one trial


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the trial's own progress bar and tables: tune prints one line per evaluation."""
    saved = console.err.quiet, console.out.quiet
    console.err.quiet = console.out.quiet = True
    try:
        yield
    finally:
        console.err.quiet, console.out.quiet = saved


def _say(msg: str) -> None:
    saved = console.err.quiet
    console.err.quiet = False
    console.info(msg)
    console.err.quiet = saved


def run_trial(study: optuna.Study, trial: optuna.Trial, resumed: bool, ctx: dict[str, Any]) -> None:
    """Train one trial and tell the study how it ended: COMPLETE, PRUNED or FAIL (with the error)."""
    from optuna.trial import TrialState

    from seqtrain.checkpoint import is_disk_full, remove_all
    from seqtrain.train import Interrupted, train
    from seqtrain.tune.pruner import progress

    n = trial.number
    run_dir = ctx["folder"] / f"trial-{n:04d}"
    params = {key: p.suggest(trial, key) for key, p in ctx["space"].items()}
    shown = " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in params.items())
    monitor = ctx["monitor"]
    seen: dict[str, Any] = {"step": 0, "pruned": False, "evals": 0}
    t0 = time.perf_counter()

    def should_stop(step: int, metrics: dict[str, Any]) -> bool:
        """Report this evaluation at its fraction of the planned steps and ask the pruner."""
        seen["evals"] += 1
        seen["step"] = step
        planned = _planned(run_dir) or step  # run.json is written before the first evaluation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a resumed trial may repeat an already reported step
            trial.report(float(metrics[monitor]), progress(step, planned))
        seen["pruned"] = step >= PRUNE_AFTER * planned and trial.should_prune()
        _say(
            f"trial {n} eval {seen['evals']} (step {step:,}): {monitor} {metrics[monitor]:.4f}"
            + ("  pruned" if seen["pruned"] else "")
        )
        return bool(seen["pruned"])

    try:
        cfg = trial_config(ctx["base"], params, f"{ctx['study']}-trial-{n:04d}", str(run_dir))
        resume = resumed and (run_dir / "last" / "state.json").exists()
        if resume:  # the steps so far count even if no evaluation is left (stopped after its last one)
            seen["evals"], seen["step"] = _backfill(trial, run_dir, cfg.data.eval_split, monitor)
        else:
            shutil.rmtree(
                run_dir, ignore_errors=True
            )  # a trial killed before its first checkpoint starts over
        _say(f"trial {n} {'resumed from ' + str(run_dir / 'last') if resume else 'started'}: {shown}")
        with _quiet():
            best = train(
                cfg, resume=resume, config_path=str(run_dir / "config.yaml"), should_stop=should_stop
            )
    except Interrupted as e:  # the trial stays RUNNING, released by work(): rerunning tune resumes it
        stopped = SeqtrainError(
            f"trial {n} stopped with its last/ checkpoint saved; run the same `seqtrain tune` "
            "command again to resume it and continue the study."
        )
        stopped.exit_code = e.exit_code
        raise stopped from None
    except Exception as e:  # a bad combination, out of memory, a data error: record it and go on
        if _is_storage_error(e):
            raise  # the study's database, not the trial: tune() says what failed
        if isinstance(e, DiskFullError) or is_disk_full(e):
            # The machine's fault, not the trial's: recorded as failed, every later trial would fail
            # the same way within seconds. Stop instead; the trial stays RUNNING and resumes from last/.
            raise SeqtrainError(
                f"trial {n} stopped: {str(e).rstrip('.')}. Free some disk space (the study needs only "
                "study.db and each trial's metrics.jsonl; the checkpoints/ folders of finished trials "
                f"under {ctx['folder']} can go if you do not need their models), then run the same "
                f"`seqtrain tune` command again: trial {n} resumes from its last checkpoint and the "
                "study continues."
            ) from None
        error = f"{type(e).__name__}: {e}"
        with _stop_deferred():
            trial.set_user_attr("error", error[:2000])
            _finish(trial, seen, t0, run_dir)
            study.tell(trial, state=TrialState.FAIL)
        _say(f"trial {n} failed: {error}")
        return
    # The run is over: a Ctrl-C now waits until its result is stored. Released instead, the trial would
    # be resumed from last/, and a pruned one would train on past the point where it was pruned.
    with _stop_deferred():
        planned = _finish(trial, seen, t0, run_dir)
        if seen["pruned"] and planned is not None and seen["step"] >= planned:
            seen["pruned"] = False  # "prune" at the last evaluation: the run is complete, keep its result
        minutes = (time.perf_counter() - t0) / 60
        if seen["pruned"]:
            study.tell(trial, state=TrialState.PRUNED)
            _say(f"trial {n} pruned after {seen['step']:,} steps ({minutes:.1f} min)")
            if not ctx["keep_pruned"]:
                remove_all(run_dir)
        elif not best or monitor not in best:
            trial.set_user_attr("error", f"the run ended without an evaluation of {monitor}")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, float(best[monitor]))
            _say(f"trial {n} finished: {monitor} {best[monitor]:.4f} ({minutes:.1f} min)")


def _release(trial: optuna.Trial) -> None:
    """Mark a stopped trial as free to resume by the next `tune` on this study (it stays RUNNING: a
    finished state could not be resumed), even if this process lives on, as when tune is called from
    Python. A trial already told (Ctrl-C deferred until its result was stored) needs nothing."""
    from optuna.trial import TrialState

    with contextlib.suppress(Exception):  # the database is gone: the dead-process check remains
        if _frozen(trial).state == TrialState.RUNNING:
            trial.set_user_attr("owner", {**_owner(), "released": True})


def _backfill(trial: optuna.Trial, run_dir: Path, split: str, monitor: str) -> tuple[int, int]:
    """A resumed trial: report the evaluations its run logged up to last/ (its process may have died
    between logging one and reporting it); returns how many there were and last/'s step."""
    from seqtrain.tune.pruner import progress

    last = json.loads((run_dir / "last" / "state.json").read_text())["step"]
    values: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line torn by the kill
            record = json.loads(line)
            if record.get("split") == split and record["step"] <= last and monitor in record:
                values[record["step"]] = float(record[monitor])
    reported = _frozen(trial).intermediate_values
    planned = _planned(run_dir) or last
    for step in sorted(values):
        if progress(step, planned) not in reported:
            trial.report(values[step], progress(step, planned))
    return len(values), last


def _finish(trial: optuna.Trial, seen: dict[str, Any], t0: float, run_dir: Path) -> int | None:
    """Steps trained, steps planned and seconds (added up over resumes) for the table and the savings;
    returns the steps planned."""
    trial.set_user_attr("seconds", _frozen(trial).user_attrs.get("seconds", 0.0) + time.perf_counter() - t0)
    trial.set_user_attr("steps", seen["step"])
    planned = _planned(run_dir)
    if planned is not None:
        trial.set_user_attr("planned_steps", planned)
    return planned


def _planned(run_dir: Path) -> int | None:
    """The steps a run will train if nothing stops it (as train() computes them), once run.json exists."""
    with contextlib.suppress(OSError, ValueError, KeyError, yaml.YAMLError):
        spe = json.loads((run_dir / "run.json").read_text())["steps_per_epoch"]
        t = from_dict(read_yaml(run_dir / "config.yaml")).train
        return int(total_steps(t, spe))
    return None


def _frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
    """The stored state of a trial (its reports and attributes, also those of a previous process)."""
    return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


def work(study: optuna.Study, opts: Options, ctx: dict[str, Any], deadline: float | None) -> None:
    """Run trials until the study has `opts.trials` of them or the deadline passes."""
    while deadline is None or time.time() < deadline:
        trial, resumed = next_trial(study, opts.trials, ctx["folder"])
        if trial is None:
            return
        # From here until the study is told how the trial ended, anything that stops this process (Ctrl-C
        # in training or in tune's own bookkeeping, a database error) hands the trial to the next tune,
        # also when this process lives on and runs tune again (a notebook, a test).
        try:
            run_trial(study, trial, resumed, ctx)
        except BaseException:
            _release(trial)
            raise
