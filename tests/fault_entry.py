"""A test-only entry point for fault injection; nothing in seqtrain knows about it.

    python -m tests.fault_entry kill-after-save=STEP train CONFIG [...]
    python -m tests.fault_entry no-memory train CONFIG [...]

runs the ordinary `seqtrain` command line with checkpoint.save wrapped so that the process kills
itself with SIGKILL right after checkpoint STEP is written (a crash at the worst moment for
resume, on demand), or with the model's allocation failing as torch reports it on a CPU.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from seqtrain import checkpoint
from seqtrain.cli import main


def kill_after_save(step: int) -> None:
    real = checkpoint.save

    def save(run_dir: Any, at: int, *args: Any, **kwargs: Any) -> Any:
        path = real(run_dir, at, *args, **kwargs)
        if at == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    checkpoint.save = save  # type: ignore[assignment]  # train.py calls checkpoint.save through the module


def no_memory() -> None:
    import seqtrain.train

    def build_model(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                           "you tried to allocate 400000000000 bytes.")

    seqtrain.train.build_model = build_model


if __name__ == "__main__":
    fault, _, value = sys.argv[1].partition("=")
    if fault == "kill-after-save":
        kill_after_save(int(value))
    elif fault == "no-memory":
        no_memory()
    else:
        sys.exit(f"unknown fault {sys.argv[1]!r}; use kill-after-save=STEP or no-memory")
    sys.argv = ["seqtrain", *sys.argv[2:]]
    main()
