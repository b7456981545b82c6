"""A test-only entry point for fault injection; nothing in seqtrain knows about it.

    python -m tests.fault_entry kill-after-save=STEP train|pretrain CONFIG [...]
    python -m tests.fault_entry no-memory train CONFIG [...]
    python -m tests.fault_entry slow-vocab=SECONDS train CONFIG [...]
    python -m tests.fault_entry dump-weights=FOLDER train CONFIG [...]

runs the ordinary `seqtrain` command line with checkpoint.save wrapped so that the process kills
itself with SIGKILL right after checkpoint STEP is written (a crash at the worst moment for
resume, on demand), or with the model's allocation failing as torch reports it on a CPU, or (under
torchrun) with torch's default collective timeout cut to SECONDS while building the vocabulary takes
three times as long, or (not a fault) with each rank writing its own final weights to
FOLDER/rank<RANK>.safetensors.
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
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
            "you tried to allocate 400000000000 bytes."
        )

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


def dump_weights(folder: str) -> None:
    import atexit

    from safetensors.torch import save_file

    import seqtrain.train

    models = []
    real = seqtrain.train.make_optimizer

    def make_optimizer(model: Any, *args: Any) -> Any:
        models.append(model)
        return real(model, *args)

    def write() -> None:
        os.makedirs(folder, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in models[-1].state_dict().items()}
        save_file(weights, os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.safetensors"))

    seqtrain.train.make_optimizer = make_optimizer
    atexit.register(write)


if __name__ == "__main__":
    fault, _, value = sys.argv[1].partition("=")
    if fault == "kill-after-save":
        kill_after_save(int(value))
    elif fault == "no-memory":
        no_memory()
    elif fault == "slow-vocab":
        slow_vocab(int(value))
    elif fault == "dump-weights":
        dump_weights(value)
    else:
        sys.exit(
            f"unknown fault {sys.argv[1]!r}; "
            "use kill-after-save=STEP, no-memory, slow-vocab=SECONDS or dump-weights=FOLDER"
        )
    sys.argv = ["seqtrain", *sys.argv[2:]]
    main()
