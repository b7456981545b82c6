"""CLI start-up, for `make bench`: the median wall time of `seqtrain --help` as a fresh process."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import START_ENV, check

TARGET_HELP_S = 0.3


def help_seconds(runs: int) -> float:
    """Median wall time of `seqtrain --help` as a fresh process."""
    cmd = [str(Path(sys.executable).parent / "seqtrain"), "--help"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=START_ENV, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def startup_table(help_s: float) -> tuple[str, list[str], list[list[str]]]:
    return (
        "CLI start-up",
        ["command", "median wall time", f"target (≤ {TARGET_HELP_S:g} s)"],
        [["seqtrain --help", f"{help_s:.3f} s", check(help_s, TARGET_HELP_S, at_least=False)]],
    )
