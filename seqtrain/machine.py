"""What this machine has, without importing torch (ONNX prediction runs without it)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from pathlib import Path

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
