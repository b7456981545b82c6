"""data/fetch.py's Hub path (`make data` without a mirror), with the Hub replaced by small in-memory
datasets: the columns each dataset keeps, what it says when the IMDB copy has no ratings, and the
unlabeled reviews that are also labelled ones left out."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import datasets
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT


def fetch_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fetch", ROOT / "data" / "fetch.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_hub(monkeypatch: pytest.MonkeyPatch, splits: dict[str, dict[str, list[Any]]]) -> None:
    def load_dataset(hub_id: str, split: str, **kwargs: Any) -> datasets.Dataset:
        return datasets.Dataset.from_dict(splits[split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def imdb_rows(n: int, rating: bool) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {
        "text": [f"review {i}" for i in range(n)],
        "label": [i % 2 for i in range(n)],
    }
    if rating:
        rows["rating"] = [(i % 4) + 1 if i % 2 == 0 else (i % 4) + 7 for i in range(n)]
    return rows


def columns(folder: Path) -> set[str]:
    return {name for shard in folder.glob("*.parquet") for name in pq.read_schema(shard).names}


def test_the_rating_column_is_kept_where_the_source_has_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_hub(monkeypatch, {"train": {**imdb_rows(5020, rating=True), "other": [0] * 5020}})
    fetch_module().from_hub(tmp_path, "imdb")
    assert columns(tmp_path / "imdb") == {"text", "label", "rating"}
    assert "no `rating` column" not in capsys.readouterr().err


def test_an_imdb_copy_without_ratings_says_the_rating_configs_need_the_mirror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_hub(monkeypatch, {"train": imdb_rows(5020, rating=False)})
    fetch_module().from_hub(tmp_path, "imdb")
    assert columns(tmp_path / "imdb") == {"text", "label"}
    err = " ".join(capsys.readouterr().err.split())
    assert (
        "no `rating` column" in err and "configs/imdb-rating-*.yaml" in err and "SEQTRAIN_DATA_MIRROR" in err
    )


def test_unlabeled_reviews_that_are_also_labelled_are_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub(
        monkeypatch,
        {
            "unsupervised": {
                "text": ["also in train", *[f"only unlabeled {i}" for i in range(8)], "also in test"],
                "label": [-1] * 10,
            },
            "train": {"text": ["also in train", "x"], "label": [0, 1]},
            "test": {"text": ["also in test"], "label": [1]},
        },
    )
    fetch_module().from_hub(tmp_path, "imdb-unlabeled")
    texts = [
        t
        for shard in sorted((tmp_path / "imdb-unlabeled").glob("*.parquet"))
        for t in pq.read_table(shard)["text"].to_pylist()
    ]
    assert texts == [f"only unlabeled {i}" for i in range(8)]


def test_data_readme_lists_every_folder_fetch_writes() -> None:
    readme = (ROOT / "data" / "README.md").read_text()
    for name in fetch_module().DATASETS:
        assert f"`{name}/`" in readme, name
