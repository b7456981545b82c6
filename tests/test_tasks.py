"""Beyond binary: many classes and regression, with the same commands."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from seqtrain.cli import app
from seqtrain.data import build_vocab
from seqtrain.errors import DataError
from seqtrain.metrics import regression_report, top_k_accuracy
from seqtrain.train import train
from tests.conftest import FILLER, tiny_config, write_hub_folder
from tests.test_export import assert_export_folder_predicts_like_the_run

runner = CliRunner()
# Five grades of sentiment words: the rating is the grade of the words in the text.
GRADES = [
    ["dreadful", "awful"],
    ["dull", "weak"],
    ["okay", "fine"],
    ["good", "nice"],
    ["superb", "brilliant"],
]


def rated_rows(n: int, seed: int, as_string: bool = False) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        stars = rng.randint(1, 5)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 20))]
        for _ in range(2):
            words.insert(rng.randint(0, len(words)), rng.choice(GRADES[stars - 1]))
        rows.append({"text": " ".join(words), "stars": f"{stars} stars" if as_string else stars})
    return rows


@pytest.fixture
def rated(tmp_path: Path) -> Path:
    return write_hub_folder(
        tmp_path / "rated", {"train": rated_rows(1500, 0), "validation": rated_rows(300, 1)}
    )


@pytest.mark.slow
def test_many_classes_learn_beyond_the_majority(rated: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        rated,
        tmp_path / "run",
        data={"label_column": "stars"},
        train={"epochs": 4, "class_weights": "balanced"},
    )
    report = train(cfg)
    counts = np.bincount([r["stars"] for r in rated_rows(300, 1)])
    majority = counts.max() / counts.sum()
    assert report["accuracy"] >= majority + 0.3, (
        report["accuracy"],
        majority,
    )  # a margin of 30 points over the majority class
    assert report["top_k"] == 3
    # The model is near perfect on its own validation split, where top-3 and top-1 agree. On the same
    # texts with shuffled stars, top-3 must beat top-1, and both must match a recount from the probabilities.
    from seqtrain.inference.run import load_run, predict_probs

    shuffled = rated_rows(300, 1)
    stars = [r["stars"] for r in shuffled]
    random.Random(0).shuffle(stars)
    for r, s in zip(shuffled, stars, strict=True):
        r["stars"] = s
    write_hub_folder(tmp_path / "shuffled", {"validation": shuffled})
    ev = json.loads(
        runner.invoke(
            app, ["eval", str(tmp_path / "run"), "--data", str(tmp_path / "shuffled"), "--json"]
        ).stdout
    )
    run, _ = load_run(tmp_path / "run")
    probs = predict_probs(run, [r["text"] for r in shuffled])
    truth = np.array([run.labels.values.index(s) for s in stars])
    top3 = np.argsort(-probs, axis=1)[:, :3]
    assert ev["top_k_accuracy"] == pytest.approx(float((top3 == truth[:, None]).any(axis=1).mean()), abs=1e-9)
    assert ev["accuracy"] == pytest.approx(float((top3[:, 0] == truth).mean()), abs=1e-9)
    assert ev["top_k_accuracy"] > ev["accuracy"] + 0.2
    assert len(report["per_class"]) == 5
    out = runner.invoke(app, ["predict", str(tmp_path / "run"), "brilliant superb", "--top-k", "2"])
    rec = json.loads(out.stdout)
    assert rec["label"] == "5" and rec["top_k"][0]["label"] == "5" and len(rec["top_k"]) == 2


def test_string_labels_are_discovered_for_many_classes(tmp_path: Path) -> None:
    data = write_hub_folder(
        tmp_path / "s", {"train": rated_rows(200, 0, as_string=True), "validation": rated_rows(20, 1, True)}
    )
    vocab = build_vocab(tiny_config(data, tmp_path / "run", data={"label_column": "stars"}))
    assert vocab.labels.names == ["1 stars", "2 stars", "3 stars", "4 stars", "5 stars"]
    assert sum(vocab.labels.counts) == 200


@pytest.mark.slow
def test_regression_learns_better_than_the_mean(rated: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        rated,
        tmp_path / "run",
        data={"label_column": "stars"},
        model={"task": "regression"},
        train={"epochs": 4},
    )
    report = train(cfg)
    targets = np.array([r["stars"] for r in rated_rows(300, 1)], dtype=float)
    mean_mae = np.abs(targets - np.mean([r["stars"] for r in rated_rows(1500, 0)])).mean()
    assert report["mae"] < 0.5 * mean_mae, (
        report["mae"],
        mean_mae,
    )  # at most half the error of predicting the mean
    assert report["spearman"] > 0.8 and "accuracy_rounded" in report
    out = runner.invoke(app, ["predict", str(tmp_path / "run"), "superb brilliant film", "dreadful awful"])
    scores = [json.loads(line)["score"] for line in out.stdout.splitlines()]
    assert scores[0] > 4 and scores[1] < 2
    ev = runner.invoke(app, ["eval", str(tmp_path / "run"), "--json"])
    assert {"mae", "rmse", "r2", "spearman", "loss", "n"} <= json.loads(ev.stdout).keys()
    # the ONNX export maps the standardised output back to stars as the torch path does
    assert_export_folder_predicts_like_the_run(
        tmp_path / "run", tmp_path / "onnx", [r["text"] for r in rated_rows(40, 2)]
    )


def test_bounded_regression_needs_targets_in_unit_interval(rated: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        rated, tmp_path / "run", data={"label_column": "stars"}, model={"task": "regression", "bounded": True}
    )
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        build_vocab(cfg)


def test_text_in_a_regression_target_names_column_and_row(tmp_path: Path) -> None:
    rows = rated_rows(50, 0)
    rows[13]["stars"] = "great"  # type: ignore[assignment]
    for r in rows:
        r["stars"] = str(r["stars"])
    data = write_hub_folder(tmp_path / "bad", {"train": rows, "validation": rated_rows(5, 1)})
    cfg = tiny_config(data, tmp_path / "run", data={"label_column": "stars"}, model={"task": "regression"})
    with pytest.raises(DataError) as e:
        build_vocab(cfg)
    assert "'stars'" in str(e.value) and "'great'" in str(e.value) and "row 13" in str(e.value)


def test_monitor_must_fit_the_task(tmp_path: Path) -> None:
    from seqtrain.errors import ConfigError

    with pytest.raises(ConfigError, match="regression metric"):
        tiny_config(tmp_path, tmp_path / "r", train={"monitor": "mae"})


def test_regression_metrics_and_top_k() -> None:
    pred = np.array([1.0, 2.0, 3.0, 4.0])
    target = np.array([1.0, 2.0, 3.0, 5.0])
    r = regression_report(pred, target, integer=True, low=1, high=5)
    assert (
        r["mae"] == pytest.approx(0.25)
        and r["spearman"] == pytest.approx(1.0)
        and r["accuracy_rounded"] == 0.75
    )
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    assert top_k_accuracy(probs, np.array([1, 0]), 2) == 0.5


@pytest.mark.slow
def test_distribution_head_regression_predicts_expected_stars(rated: Path, tmp_path: Path) -> None:
    cfg = tiny_config(
        rated,
        tmp_path / "run",
        data={"label_column": "stars"},
        model={"task": "regression", "regression_head": "distribution"},
        train={"epochs": 4},
    )
    report = train(cfg)
    labels = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert labels["values"] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert report["spearman"] > 0.8 and report["mae"] < 0.8
    out = runner.invoke(app, ["predict", str(tmp_path / "run"), "superb brilliant film", "dreadful awful"])
    scores = [json.loads(line)["score"] for line in out.stdout.splitlines()]
    assert 1.0 <= scores[1] < 2 < 4 < scores[0] <= 5.0
    # the ONNX export computes the expected value over the stars as the torch path does
    assert_export_folder_predicts_like_the_run(
        tmp_path / "run", tmp_path / "onnx", [r["text"] for r in rated_rows(40, 2)]
    )


def test_distribution_head_needs_integer_targets(tmp_path: Path) -> None:
    rows = [{"text": r["text"], "stars": r["stars"] + 0.5} for r in rated_rows(100, 0)]
    data = write_hub_folder(tmp_path / "f", {"train": rows, "validation": rows[:10]})
    cfg = tiny_config(
        data,
        tmp_path / "run",
        data={"label_column": "stars"},
        model={"task": "regression", "regression_head": "distribution"},
    )
    with pytest.raises(DataError, match="integer targets"):
        build_vocab(cfg)


def test_squared_emd_grows_with_distance_on_the_value_scale() -> None:
    import torch

    from seqtrain.losses import squared_emd

    support = torch.tensor([1.0, 2.0, 3.0, 4.0, 7.0, 8.0, 9.0, 10.0])
    sure = torch.full((8, 8), -30.0).fill_diagonal_(30.0)  # row k: all mass on value k
    target = torch.zeros(8, dtype=torch.long)  # every row's truth: 1 star
    per_row = [float(squared_emd(sure[k : k + 1], target[:1], support)) for k in range(8)]
    assert per_row[0] == pytest.approx(0.0, abs=1e-6)
    assert per_row == sorted(per_row), "further from the truth costs more"
    assert per_row[7] == pytest.approx(1.0, abs=1e-5)  # the whole range
    assert per_row[4] - per_row[3] == pytest.approx(3 / 9, abs=1e-5)  # the 4 -> 7 gap weighs 3 steps
    assert float(squared_emd(sure, target, support, "sum")) == pytest.approx(sum(per_row), abs=1e-4)


@pytest.mark.slow
def test_emd_weight_trains_and_is_checked(rated: Path, tmp_path: Path) -> None:
    from seqtrain.config import from_dict, to_dict
    from seqtrain.errors import ConfigError

    cfg = tiny_config(
        rated,
        tmp_path / "run",
        data={"label_column": "stars"},
        model={"task": "regression", "regression_head": "distribution", "emd_weight": 1.0},
        train={"epochs": 4},
    )
    report = train(cfg)
    assert report["spearman"] > 0.8 and report["mae"] < 0.8
    raw = to_dict(cfg)
    raw["model"].update(regression_head="scalar")
    with pytest.raises(ConfigError, match="emd_weight"):
        from_dict(raw)
