"""Shared fixtures: small datasets written in the Hub layout, and small configs that train in seconds."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from seqtrain.config import Config, from_dict

# `make test` runs the tests on pytest-xdist workers (--dist loadgroup). The tests of a file named here run
# on one worker, one after another: its module-scoped fixtures are expensive and are built once, or (the
# torchrun tests) no two of them should start 2 processes each at once on a 2-core machine. Every other
# test is sent on its own, to whichever worker is free. The groups are given by file here because pytest 9
# ignores the node-id suffix through which xdist 3.8 applies `pytest.mark.xdist_group`.
XDIST_GROUPS = {
    "test_distributed.py": "distributed",
    "test_pretrain.py": "pretrain",  # a language model pretrained on SST-2
    "test_explain.py": "explain",  # a classifier trained on 6,000 SST-2 rows
    "test_serve.py": "serve",  # a run, its ONNX export, a server
    "test_export.py": "export",  # a run per cell
    "test_cli.py": "cli",
    "test_plots.py": "plots",
}


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: only called when xdist runs the tests
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadgroup":
        return None  # xdist's own scheduler
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        """A work unit per test, or per file for the files in XDIST_GROUPS; the largest units go first."""

        def _split_scope(self, nodeid: str) -> str:
            name = nodeid.split("::", 1)[0].rsplit("/", 1)[-1]
            return XDIST_GROUPS.get(name, nodeid)

    return FileGroups(config, log)


ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
REAL_DATA = next((p for p in (ROOT / "data", SHARED) if (p / "sst2").is_dir()), SHARED)

POSITIVE = ["great", "wonderful", "superb", "moving", "brilliant", "delightful", "charming", "excellent"]
NEGATIVE = ["awful", "boring", "dull", "terrible", "tedious", "clumsy", "bland", "dreadful"]
FILLER = [
    "the",
    "film",
    "movie",
    "plot",
    "actors",
    "story",
    "was",
    "is",
    "and",
    "a",
    "with",
    "its",
    "this",
    "of",
]


def synthetic_rows(n: int, seed: int, string_labels: bool = False) -> list[dict[str, Any]]:
    """Sentences whose label is decided by sentiment words; lengths vary from 3 to ~60 tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 50))]
        for _ in range(rng.randint(1, 3)):
            words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append(
            {"text": " ".join(words), "label": ("pos" if label else "neg") if string_labels else label}
        )
    return rows


def write_hub_folder(root: Path, splits: dict[str, list[dict[str, Any]]], shards: int = 1) -> Path:
    """Write `<split>-NNNNN-of-NNNNN.parquet` files, like a Hub dataset repository."""
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        n = shards if split == "train" else 1
        for i in range(n):
            part = rows[i::n]
            table = pa.Table.from_pylist(part)
            pq.write_table(table, root / f"{split}-{i:05d}-of-{n:05d}.parquet")
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    return write_hub_folder(
        tmp_path / "tiny", {"train": synthetic_rows(600, 0), "validation": synthetic_rows(200, 1)}, shards=2
    )


def train_tiny_run(tmp: Path, **sections: dict[str, Any]) -> Path:
    """Train a tiny run through the CLI (as a user would) on fresh synthetic data;
    returns its run directory."""
    from typer.testing import CliRunner

    from seqtrain.cli import app

    data = write_hub_folder(
        tmp / "tiny", {"train": synthetic_rows(600, 0), "validation": synthetic_rows(200, 1)}
    )
    path = tmp / "tiny.yaml"
    write_yaml(path, tiny_config(data, tmp / "run", **sections))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def write_yaml(path: Path, cfg: Config) -> Path:
    """`cfg` as the YAML file a user would write; returns the path."""
    import yaml

    from seqtrain.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def tiny_config(data_path: Path, out: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "name": "tiny",
        "output_dir": str(out),
        "seed": 0,
        "data": {"path": str(data_path), "max_length": 64, "chunk_size": 128, "num_workers": 0},
        "tokenizer": {"vocab_size": 500, "min_frequency": 1},
        "model": {"cell": "gru", "embedding_dim": 16, "hidden_size": 16},
        "train": {"batch_size": 16, "epochs": 1, "lr": 0.01, "log_every": 5, "num_threads": 1},
    }
    for key, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(key, {}).update(values)
        else:
            raw[key] = values
    return from_dict(raw)
