"""One test that really learns: real SST-2 rows from ../shared/data (or data/), on the CPU."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from seqtrain.config import from_dict
from seqtrain.train import train
from tests.conftest import REAL_DATA


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_DATA / "sst2").is_dir(), reason="needs ../shared/data/sst2 or data/sst2")
def test_a_few_thousand_sst2_rows_reach_75_percent(tmp_path: Path) -> None:
    start = time.perf_counter()
    cfg = from_dict(
        {
            "name": "learns",
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "data": {
                "path": str(REAL_DATA / "sst2"),
                "text_column": "sentence",
                "max_length": 64,
                "max_train_examples": 15000,
                "max_eval_examples": 2000,
                "num_workers": 0,
            },
            "tokenizer": {"vocab_size": 10000, "min_frequency": 1},
            "model": {
                "cell": "gru",
                "embedding_dim": 64,
                "hidden_size": 64,
                "pooling": "max",
                "bidirectional": True,
            },
            "train": {"batch_size": 32, "epochs": 3, "lr": 0.003, "eval_every": 0, "num_threads": 1},
        }
    )
    report = train(cfg)
    elapsed = time.perf_counter() - start
    assert report["accuracy"] >= 0.75, report["accuracy"]
    assert elapsed < 120, f"took {elapsed:.0f}s"
