"""--jobs J: J `seqtrain tune` processes on one study, the cores divided between them."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time

from seqtrain import console
from seqtrain.machine import physical_cores
from seqtrain.tune.options import Options


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
    procs = [subprocess.Popen([*tune, *dataclasses.replace(worker, seed=s).argv()], env=env) for s in seeds]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # each worker saves its trial's last/ and exits; a rerun resumes them
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    bad = [c for c in codes if c != 0]
    if bad:
        console.warn(f"{len(bad)} of {opts.jobs} worker processes exited with {', '.join(map(str, bad))}")
