"""What this machine has and how this process stops, without importing torch (ONNX prediction and
`seqtrain tune` run without it)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h

# Signals that stop a run after the current step, with last/ saved, and a study: Ctrl-C, `kill`, closing
# the terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# One request to stop can reach a process twice: a terminal's hangup comes from the kernel and from the
# shell, a Ctrl-C to `tune --jobs` reaches each of its workers from the terminal and from tune. A stop
# signal this soon (seconds) after the first is that same request, not a second one.
REPEAT_WINDOW = 1.0
# When a training run of this process last took a first stop signal (time.monotonic(); set by
# runtime.StopSignals): `seqtrain tune` reads it between trials, so that the same request reaching it
# twice stops it once.
stop_requested_at: float | None = None


def physical_cores() -> int:
    """Physical cores visible to us (hyper-threads do not speed up GEMMs): the default thread count
    of training (train.num_threads) and of ONNX prediction."""
    try:
        pairs = set()
        phys = core = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("physical id"):
                phys = line.split(":")[1].strip()
            elif line.startswith("core id"):
                core = line.split(":")[1].strip()
                pairs.add((phys, core))
        n = len(pairs) or os.cpu_count() or 1
    except OSError:
        n = os.cpu_count() or 1
    return max(1, min(n, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n))


def end_with_parent(signum: int) -> None:
    """In a child process: the kernel sends it `signum` when its parent ends, however the parent ends
    (SIGKILL, the OOM killer). Linux only; elsewhere nothing."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)


def ignore_stop_signals() -> None:
    """From here on this process ignores stop signals: for a data worker (its main process decides when
    to stop), and for a process already exiting because of one, so that the same request arriving late
    (from the terminal and from `tune --jobs`) does not interrupt the interpreter's own cleanup with a
    KeyboardInterrupt traceback."""
    for signum in STOP_SIGNALS:
        with contextlib.suppress(OSError, ValueError):  # ValueError: not the main thread
            signal.signal(signum, signal.SIG_IGN)
