"""--jobs J: J `seqtrain tune` processes on one study, the cores divided between them."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import types

from seqtrain import console
from seqtrain.machine import end_with_parent, physical_cores
from seqtrain.tune.options import Options
from seqtrain.tune.trial import StopRequested, handling_stop_signals

# How long --jobs waits for its workers to save their trials and exit after a stop signal (seconds).
STOP_TIMEOUT = 25.0


def run_workers(opts: Options, study_name: str, url: str, deadline: float | None) -> None:
    """--jobs J: J `seqtrain tune` processes on the same storage, the cores divided between them."""
    threads = max(1, physical_cores() // opts.jobs)
    overrides = list(opts.overrides)
    if not any(o.startswith("train.num_threads=") for o in overrides):
        overrides.append(f"train.num_threads={threads}")
    worker = dataclasses.replace(
        opts,
        overrides=overrides,
        study=study_name,
        storage=url,
        jobs=1,
        report=False,
        timeout_min=None if deadline is None else max(0.01, (deadline - time.time()) / 60),
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    console.info(f"--jobs {opts.jobs}: {opts.jobs} processes with {threads} thread(s) each")
    seeds = [None if opts.seed is None else opts.seed + 1000 * i for i in range(opts.jobs)]
    tune = [sys.executable, "-m", "seqtrain", "tune"]
    received: list[int] = []
    procs: list[subprocess.Popen[bytes]] = []

    def record(signum: int, frame: types.FrameType | None) -> None:
        received.append(signum)

    main = threading.current_thread() is threading.main_thread()  # where handlers can be set
    with handling_stop_signals(record) if main else contextlib.nullcontext():
        end_with_this = functools.partial(_end_with, os.getpid())
        for s in seeds:
            argv = [*tune, *dataclasses.replace(worker, seed=s).argv()]
            procs.append(subprocess.Popen(argv, env=env, preexec_fn=end_with_this))
        codes = _wait(procs, received)
    if received:  # each worker saved its trial's last/ and exited; a rerun resumes them
        raise StopRequested(received[0])
    bad = [c for c in codes if c != 0]
    if bad:
        console.warn(f"{len(bad)} of {opts.jobs} worker processes exited with {', '.join(map(str, bad))}")


def _wait(procs: list[subprocess.Popen[bytes]], received: list[int]) -> list[int]:
    """The workers' exit codes. Each stop signal this process receives is passed on to the workers still
    running (a worker takes the same request arriving twice, from its process group and from here, as
    one); STOP_TIMEOUT after the first, the workers left are killed with their data workers."""
    passed, deadline = 0, None
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [c for c in codes if c is not None]
        for signum in received[passed:]:
            for p in procs:
                if p.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.send_signal(signum)
        passed = len(received)
        if received and deadline is None:
            deadline = time.monotonic() + STOP_TIMEOUT
        if deadline is not None and time.monotonic() > deadline:
            left = [p for p in procs if p.poll() is None]
            console.warn(
                f"{len(left)} worker process(es) still running {STOP_TIMEOUT:.0f} s after the stop signal: "
                "killed; their trials resume from their last checkpoints"
            )
            for p in left:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()  # its data workers end with it (data._worker_init)
            return [p.wait() for p in procs]
        time.sleep(0.05)


def _end_with(parent: int) -> None:
    """In a worker before it starts: SIGTERM when `parent` (this process) ends, however it ends (SIGKILL,
    the OOM killer), so that the worker saves its trial and stops instead of running the study on alone."""
    end_with_parent(signal.SIGTERM)
    if os.getppid() != parent:  # it ended before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
