"""torchrun: two CPU processes with gloo, each streaming its own part of the split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqtrain import checkpoint
from seqtrain.metrics import read_metrics
from seqtrain.optim import lr_at
from seqtrain.train import train
from tests.conftest import ROOT, synthetic_rows, tiny_config, write_hub_folder, write_yaml

pytestmark = [pytest.mark.distributed, pytest.mark.subprocess]  # torchrun children


def torchrun(
    config: Path,
    *args: str,
    nproc: int = 2,
    timeout: float = 120,
    command: str = "train",
    entry: tuple[str, ...] = ("seqtrain",),
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        *entry,
        command,
        str(config),
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_two_process_gloo_run_matches_single_process_band(tmp_path: Path) -> None:
    data = write_hub_folder(
        tmp_path / "d", {"train": synthetic_rows(1200, 0), "validation": synthetic_rows(300, 1)}, shards=4
    )
    single = tiny_config(data, tmp_path / "single", train={"epochs": 2, "batch_size": 32})
    start = time.perf_counter()
    ddp_cfg = tiny_config(
        data, tmp_path / "ddp", train={"epochs": 2, "batch_size": 16}
    )  # 2 x 16 = the same global batch
    path = tmp_path / "ddp.yaml"
    write_yaml(path, ddp_cfg)
    proc = torchrun(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - start < 60
    single_report = train(single)
    ddp_report = json.loads((tmp_path / "ddp" / "eval-validation.json").read_text())
    assert ddp_report["accuracy"] > 0.8 and abs(ddp_report["accuracy"] - single_report["accuracy"]) < 0.1
    # one writer: a single metrics log whose train lines count both ranks' rows
    state = json.loads((tmp_path / "ddp" / "last" / "state.json").read_text())
    assert len(state["ranks"]) == 2 and state["train_state"]["world"] == 2
    lines = [r for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl") if r["split"] == "validation"]
    assert [r["epoch"] for r in lines] == [1, 2]


def test_ranks_hold_equal_weights_that_match_one_process_at_the_same_global_batch(tmp_path: Path) -> None:
    """One SGD step (no dropout): 2 ranks x 16 rows through DDP end with equal weights on both ranks, equal
    (to float rounding) to 1 process taking the same 32 rows as one batch. Without the gradient all-reduce
    each rank would step on its own 16 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    rows = synthetic_rows(32, 0)
    two, one = tmp_path / "two", tmp_path / "one"
    for folder in (two, one):
        write_hub_folder(folder, {"validation": synthetic_rows(40, 1)})
    pq.write_table(pa.Table.from_pylist(rows[:16]), two / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[16:]), two / "train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows), one / "train-00000-of-00001.parquet")
    same = {"model": {"dropout": 0.0}, "data": {"chunk_size": 64}}
    step = {"optimizer": "sgd", "lr": 0.5, "lr_schedule": "constant", "epochs": 1}
    ddp_cfg = tiny_config(two, tmp_path / "ddp", **same, train={**step, "batch_size": 16})
    path = tmp_path / "ddp.yaml"
    write_yaml(path, ddp_cfg)
    proc = torchrun(path, entry=("tests.fault_entry", f"dump-weights={tmp_path / 'ranks'}"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(tiny_config(one, tmp_path / "single", **same, train={**step, "batch_size": 32}))
    assert json.loads((tmp_path / "ddp" / "last" / "state.json").read_text())["step"] == 1
    assert json.loads((tmp_path / "single" / "last" / "state.json").read_text())["step"] == 1
    rank0, rank1 = (
        load_file(tmp_path / "ranks" / "rank0.safetensors"),
        load_file(tmp_path / "ranks" / "rank1.safetensors"),
    )
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    ddp = checkpoint.load_tensors(tmp_path / "ddp" / "last" / "model.safetensors")
    single = checkpoint.load_tensors(tmp_path / "single" / "last" / "model.safetensors")
    assert all(torch.equal(ddp[k], rank0[k]) for k in ddp)
    worst = max(float((ddp[k] - single[k]).abs().max()) for k in ddp)
    assert worst < 1e-5, worst


def uneven_data(folder: Path) -> Path:
    """shard 0 holds 500 rows, shard 1 holds 20: rank 1 runs dry long before rank 0"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = synthetic_rows(520, 0)
    write_hub_folder(folder, {"validation": synthetic_rows(100, 1)})
    pq.write_table(pa.Table.from_pylist(rows[:500]), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[500:]), folder / "train-00001-of-00002.parquet")
    return folder


def test_uneven_shards_never_hang_and_world_size_is_checked_on_resume(tmp_path: Path) -> None:
    uneven_data(tmp_path / "d")
    cfg = tiny_config(tmp_path / "d", tmp_path / "run", data={"chunk_size": 64}, train={"epochs": 2})
    path = tmp_path / "c.yaml"
    write_yaml(path, cfg)
    proc = torchrun(path, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((tmp_path / "run" / "last" / "state.json").read_text())["step"]
    assert steps == 2 * 2  # 20 rows -> 2 batches of 16 per epoch on rank 1; both ranks stop there
    # the plan is what runs: 2 steps per epoch (the schedule decays to the 4th step), and the drop is counted
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["steps_per_epoch"] == 2 and run["rank_rows"] == [500, 20] and run["rank_batches"] == [32, 2]
    assert run["rows_dropped"] == {"1": 468, "2": 468}  # rank 0 trains 2 x 16 of its 500 rows, rank 1 all 20
    assert "468 of 520 training rows were not trained" in " ".join(proc.stderr.split())
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"][-1]
    assert last["step"] == 4 and last["lr"] == pytest.approx(lr_at(3, cfg.train, 4))
    single = subprocess.run(
        [sys.executable, "-m", "seqtrain", "train", str(path), "--resume", "train.epochs=3"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert single.returncode != 0 and "same --nproc_per_node" in single.stderr


def test_pretrain_plans_the_steps_that_run_on_uneven_shards(tmp_path: Path) -> None:
    cfg = tiny_config(
        uneven_data(tmp_path / "d"),
        tmp_path / "lm",
        data={"chunk_size": 64},
        train={"epochs": 2},
        model={"bidirectional": True},
        pretrain={"path": None, "heldout_fraction": 0.05, "softmax": "full"},
    )
    path = tmp_path / "lm.yaml"
    write_yaml(path, cfg)
    proc = torchrun(path, command="pretrain", timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((tmp_path / "lm" / "run.json").read_text())
    assert (
        run["rank_batches"][1] == 2
        and run["steps_per_epoch"] == 2
        and sum(run["rank_rows"]) == run["num_train_examples"]
    )
    assert json.loads((tmp_path / "lm" / "last" / "state.json").read_text())["step"] == 2 * 2
    assert set(run["rows_dropped"]) == {"1", "2"}
    last = [r for r in read_metrics(tmp_path / "lm" / "metrics.jsonl") if r["split"] == "train"][-1]
    assert last["step"] == 4 and last["lr"] == pytest.approx(lr_at(3, cfg.train, 4))
    single = subprocess.run(
        [sys.executable, "-m", "seqtrain", "pretrain", str(path), "--resume", "train.epochs=3"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert (
        single.returncode != 0
        and "same --nproc_per_node" in single.stderr
        and "Traceback" not in single.stderr
    )


def test_two_process_resume_restores_each_ranks_rng_bitwise(tmp_path: Path) -> None:
    """Killed right after a checkpoint under torchrun, then resumed: each rank draws its own dropout masks
    again (the checkpoint holds every rank's generators), so the weights equal an uninterrupted run's."""
    rows = synthetic_rows(400, 0)
    data = write_hub_folder(tmp_path / "d", {"train": rows, "validation": synthetic_rows(60, 1)}, shards=2)
    paths = {}
    for name in ("straight", "killed"):
        cfg = tiny_config(
            data,
            tmp_path / name,
            data={"chunk_size": 50},
            model={"dropout": 0.5, "embedding_dropout": 0.3},
            train={"epochs": 2, "eval_every": 5},
        )
        paths[name] = tmp_path / f"{name}.yaml"
        write_yaml(paths[name], cfg)
    straight = torchrun(paths["straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = torchrun(paths["killed"], entry=("tests.fault_entry", "kill-after-save=5"))
    assert killed.returncode != 0
    state = json.loads((tmp_path / "killed" / "last" / "state.json").read_text())
    rng = checkpoint.load_tensors(tmp_path / "killed" / "last" / "rng.safetensors")
    assert (
        state["step"] == 5
        and len(state["rng"]["ranks"]) == 1
        and not torch.equal(rng["torch"], rng["rank1.torch"])
    )
    resumed = torchrun(paths["killed"], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = (tmp_path / "straight" / "last" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "killed" / "last" / "model.safetensors").read_bytes()


def test_other_ranks_wait_for_a_slow_vocabulary_past_the_default_timeout(tmp_path: Path) -> None:
    """rank 0 builds the vocabulary for 9 s while torch's default collective timeout is 3 s:
    rank 1 still waits."""
    data = write_hub_folder(
        tmp_path / "d", {"train": synthetic_rows(200, 0), "validation": synthetic_rows(40, 1)}, shards=2
    )
    path = tmp_path / "c.yaml"
    write_yaml(path, tiny_config(data, tmp_path / "run", train={"max_steps": 3}))
    proc = torchrun(path, entry=("tests.fault_entry", "slow-vocab=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_log_sums_unknown_tokens_and_skipped_rows_over_ranks(tmp_path: Path) -> None:
    """rank 0's part has 3 empty texts and no unknown words;
    rank 1's has 5 empty texts and a word seen once per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = synthetic_rows(400, 0)
    part0 = rows[:200] + [{"text": "", "label": 0}] * 3
    part1 = [{"text": f"{r['text']} zq{i}x", "label": r["label"]} for i, r in enumerate(rows[200:])] + [
        {"text": "", "label": 1}
    ] * 5
    folder = write_hub_folder(tmp_path / "d", {"validation": synthetic_rows(40, 1)})
    pq.write_table(pa.Table.from_pylist(part0), folder / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(part1), folder / "train-00001-of-00002.parquet")
    cfg = tiny_config(
        folder,
        tmp_path / "run",
        data={"chunk_size": 256, "on_bad_rows": "skip"},
        tokenizer={"min_frequency": 2},
    )
    path = tmp_path / "c.yaml"
    write_yaml(path, cfg)
    proc = torchrun(path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert lines and all(r["bad_rows"] == {"empty text": 8} for r in lines)
    assert all(r["unk_rate"] > 0.01 for r in lines)
