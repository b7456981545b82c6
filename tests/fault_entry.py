"""A test-only entry point for fault injection; nothing in seqtrain knows about it.

    python -m tests.fault_entry kill-after-save=STEP train CONFIG [...]
    python -m tests.fault_entry no-memory train CONFIG [...]
    python -m tests.fault_entry slow-vocab=SECONDS train CONFIG [...]

runs the ordinary `seqtrain` command line with checkpoint.save wrapped so that the process kills
itself with SIGKILL right after checkpoint STEP is written (a crash at the worst moment for
resume, on demand), or with the model's allocation failing as torch reports it on a CPU, or (under torchrun) with torch's
default collective timeout cut to SECONDS while building the vocabulary takes three times as long.
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


def slow_vocab(seconds: int) -> None:
    import time
    from datetime import timedelta

    import torch.distributed.distributed_c10d as c10d

    import seqtrain.train

    c10d.default_pg_timeout = timedelta(seconds=seconds)  # what init_process_group takes without a timeout
    real = seqtrain.train.build_vocab

    def build_vocab(*args: Any, **kwargs: Any) -> Any:
        time.sleep(3 * seconds)
        return real(*args, **kwargs)

    seqtrain.train.build_vocab = build_vocab


if __name__ == "__main__":
    fault, _, value = sys.argv[1].partition("=")
    if fault == "kill-after-save":
        kill_after_save(int(value))
    elif fault == "no-memory":
        no_memory()
    elif fault == "slow-vocab":
        slow_vocab(int(value))
    else:
        sys.exit(f"unknown fault {sys.argv[1]!r}; use kill-after-save=STEP, no-memory or slow-vocab=SECONDS")
    sys.argv = ["seqtrain", *sys.argv[2:]]
    main()
