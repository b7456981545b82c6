"""torchrun: two CPU processes with gloo, each streaming its own part of the split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from seqtrain.config import to_dict
from seqtrain.metrics import read_metrics
from seqtrain.train import train
from tests.conftest import ROOT, synthetic_rows, tiny_config, write_hub_folder


def torchrun(config: Path, *args: str, nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "seqtrain", "train", str(config), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_two_process_gloo_run_matches_single_process_band(tmp_path: Path) -> None:
    data = write_hub_folder(tmp_path / "d", {"train": synthetic_rows(1200, 0), "validation": synthetic_rows(300, 1)}, shards=4)
    single = tiny_config(data, tmp_path / "single", train={"epochs": 2, "batch_size": 32})
    start = time.perf_counter()
    ddp_cfg = tiny_config(data, tmp_path / "ddp", train={"epochs": 2, "batch_size": 16})  # 2 x 16 = the same global batch
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(to_dict(ddp_cfg)))
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


def test_uneven_shards_never_hang_and_world_size_is_checked_on_resume(tmp_path: Path) -> None:
    rows = synthetic_rows(520, 0)
    # shard 0 holds 500 rows, shard 1 holds 20: rank 1 runs dry long before rank 0
    write_hub_folder(tmp_path / "d", {"validation": synthetic_rows(100, 1)})
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows[:500]), tmp_path / "d" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[500:]), tmp_path / "d" / "train-00001-of-00002.parquet")
    cfg = tiny_config(tmp_path / "d", tmp_path / "run", data={"chunk_size": 64}, train={"epochs": 2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    proc = torchrun(path, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = json.loads((tmp_path / "run" / "last" / "state.json").read_text())["step"]
    assert steps == 2 * 2  # 20 rows -> 2 batches of 16 per epoch on rank 1; both ranks stop there
    single = subprocess.run([sys.executable, "-m", "seqtrain", "train", str(path), "--resume", "train.epochs=3"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert single.returncode != 0 and "same --nproc_per_node" in single.stderr
