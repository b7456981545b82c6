"""A test-only entry point for fault injection; nothing in seqtrain knows about it.

    python -m tests.fault_entry kill-after-save=STEP train|pretrain CONFIG [...]
    python -m tests.fault_entry no-memory train CONFIG [...]
    python -m tests.fault_entry slow-vocab=SECONDS train CONFIG [...]
    python -m tests.fault_entry dump-weights=FOLDER train CONFIG [...]
    python -m tests.fault_entry stall-worker=N@FOLDER train|pretrain|tune CONFIG [...]
    python -m tests.fault_entry slow-worker-start=FOLDER train CONFIG [...]
    python -m tests.fault_entry slow-save=SECONDS@FOLDER train CONFIG [...]
    python -m tests.fault_entry slow-eval=SECONDS@FOLDER train CONFIG [...]
    python -m tests.fault_entry slow-eval-batches=SECONDS@FOLDER train|pretrain|tune CONFIG [...]

runs the ordinary `seqtrain` command line with checkpoint.save wrapped so that the process kills
itself with SIGKILL right after checkpoint STEP is written (a crash at the worst moment for
resume, on demand), or with the model's allocation failing as torch reports it on a CPU, or (under
torchrun) with torch's default collective timeout cut to SECONDS while building the vocabulary takes
three times as long, or (not a fault) with each rank writing its own final weights to
FOLDER/rank<RANK>.safetensors.

The others stop at a chosen moment and say so with a file in FOLDER, for a test to send its signal
then: `stall-worker` makes each data worker hang for good after its first N batches (stalled-PID);
`slow-worker-start` holds each data worker for a few seconds as it starts, before seqtrain's own set-up
(starting-PID); `slow-save` makes every checkpoint save after the first one sleep SECONDS halfway,
after its first file (saving-STEP); `slow-eval` makes each evaluation sleep SECONDS (evaluating-N);
`slow-eval-batches` makes every batch of every evaluation take SECONDS more, as a long split would
(eval-batch-PID at the first).
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

    def make_optimizer(model: Any, *args: Any, **kwargs: Any) -> Any:
        models.append(model)
        return real(model, *args, **kwargs)

    def write() -> None:
        os.makedirs(folder, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in models[-1].state_dict().items()}
        save_file(weights, os.path.join(folder, f"rank{os.environ.get('RANK', '0')}.safetensors"))

    seqtrain.train.make_optimizer = make_optimizer
    atexit.register(write)


def _mark(folder: str, name: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        f.write(str(os.getpid()))


def stall_worker(after: int, folder: str) -> None:
    import time

    import torch

    import seqtrain.data

    real = seqtrain.data.BatchStream.__iter__

    def batches(self: Any) -> Any:
        for n, batch in enumerate(real(self)):
            if n == after and torch.utils.data.get_worker_info() is not None:
                _mark(folder, f"stalled-{os.getpid()}")
                time.sleep(3600)
            yield batch

    seqtrain.data.BatchStream.__iter__ = batches  # type: ignore[method-assign]


def slow_worker_start(folder: str) -> None:
    import time

    import seqtrain.data

    real = seqtrain.data._worker_init

    def init(worker_id: int) -> None:
        _mark(folder, f"starting-{os.getpid()}")
        time.sleep(3)
        real(worker_id)

    seqtrain.data._worker_init = init


def slow_save(seconds: float, folder: str) -> None:
    import time

    real_save, real_file = checkpoint.save, checkpoint.save_file
    saving: dict[str, int] = {"saves": 0, "step": -1}

    def save(run_dir: Any, at: int, *args: Any, **kwargs: Any) -> Any:
        saving["saves"] += 1
        saving["step"] = at
        return real_save(run_dir, at, *args, **kwargs)

    def save_file(*args: Any, **kwargs: Any) -> None:
        real_file(*args, **kwargs)
        if saving["saves"] > 1:
            _mark(folder, f"saving-{saving['step']}")
            time.sleep(seconds)

    checkpoint.save = save  # type: ignore[assignment]
    checkpoint.save_file = save_file


def slow_eval(seconds: float, folder: str) -> None:
    import time

    import seqtrain.inference.evaluation  # before the training modules import `evaluate` from it

    real = seqtrain.inference.evaluation.evaluate
    calls = {"n": 0}

    def evaluate(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        _mark(folder, f"evaluating-{calls['n']}")
        time.sleep(seconds)
        return real(*args, **kwargs)

    seqtrain.inference.evaluation.evaluate = evaluate


def slow_eval_batches(seconds: float, folder: str) -> None:
    import time

    import seqtrain.model

    def slowed(real: Any, evaluating: Any) -> Any:
        def run(model: Any, *args: Any, **kwargs: Any) -> Any:
            if evaluating(model, *args, **kwargs):
                _mark(folder, f"eval-batch-{os.getpid()}")
                time.sleep(seconds)
            return real(model, *args, **kwargs)

        return run

    classifier, lm = seqtrain.model.Classifier, seqtrain.model.LanguageModel
    # a classifier in eval mode is evaluated; a language model's exact NLL is its held-out evaluation
    classifier.forward = slowed(classifier.forward, lambda m, *a, **k: not m.training)  # type: ignore[method-assign]
    lm.nll = slowed(lm.nll, lambda m, *a, **k: k.get("exact", False))  # type: ignore[method-assign]


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
    elif fault == "stall-worker":
        n, _, where = value.partition("@")
        stall_worker(int(n), where)
    elif fault == "slow-worker-start":
        slow_worker_start(value)
    elif fault == "slow-save":
        seconds, _, where = value.partition("@")
        slow_save(float(seconds), where)
    elif fault == "slow-eval":
        seconds, _, where = value.partition("@")
        slow_eval(float(seconds), where)
    elif fault == "slow-eval-batches":
        seconds, _, where = value.partition("@")
        slow_eval_batches(float(seconds), where)
    else:
        sys.exit(
            f"unknown fault {sys.argv[1]!r}; "
            "use kill-after-save=STEP, no-memory, slow-vocab=SECONDS, dump-weights=FOLDER, "
            "stall-worker=N@FOLDER, slow-worker-start=FOLDER, slow-save=SECONDS@FOLDER, "
            "slow-eval=SECONDS@FOLDER or slow-eval-batches=SECONDS@FOLDER"
        )
    sys.argv = ["seqtrain", *sys.argv[2:]]
    main()
