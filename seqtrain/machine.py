"""What this machine has, without importing torch (ONNX prediction runs without it)."""

from __future__ import annotations

import os
from pathlib import Path


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
