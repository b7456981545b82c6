"""`seqtrain init`: inspect a dataset and write a starter config that loads and fits it."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seqtrain.cli import app
from seqtrain.config import load_config
from seqtrain.init_config import inspect_dataset
from tests.conftest import synthetic_rows, write_hub_folder

runner = CliRunner()


def test_init_hub_folder_writes_a_config_that_loads(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "config.yaml"
    result = runner.invoke(app, ["init", str(tiny_data), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "train, validation" in result.output and "text column" in result.output
    cfg = load_config(out)
    assert cfg.data.path == str(tiny_data)
    assert (cfg.data.text_column, cfg.data.label_column) == ("text", "label")
    assert (cfg.data.train_split, cfg.data.eval_split) == ("train", "validation")
    # synthetic texts have 3 to ~53 words: p90 rounded up to a multiple of 16
    assert 32 <= cfg.data.max_length <= 64 and cfg.data.max_length % 16 == 0
    # the whole split was read: the vocabulary is the ~30 words of the generator, rounded up
    assert 30 <= cfg.tokenizer.vocab_size <= 100
    text = out.read_text()
    assert "# label_names: [class_0, class_1]" in text and "p90" in text

    again = runner.invoke(app, ["init", str(tiny_data), "--output", str(out)])
    assert again.exit_code == 1 and "--force" in again.output  # never overwrites silently
    assert runner.invoke(app, ["init", str(tiny_data), "--output", str(out), "--force"]).exit_code == 0


def write_reviews_csv(path: Path, n: int = 400) -> Path:
    """Other column names, string labels, an id column, and imbalanced classes."""
    rng = random.Random(0)
    rows = synthetic_rows(n, 5, string_labels=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentiment", "review", "source"])
        for i, r in enumerate(rows):
            label = r["label"] if rng.random() < 0.9 else "neutral"
            writer.writerow([i, label, r["text"], rng.choice(["web", "mail"])])
    return path


def test_guesses_columns_of_a_csv_file(tmp_path: Path) -> None:
    data = write_reviews_csv(tmp_path / "reviews.csv")
    summary = inspect_dataset(str(data))
    assert summary["splits"] == ["train"]
    assert (summary["text_column"], summary["label_column"]) == ("review", "sentiment")
    assert set(summary["label_counts"]) == {"neg", "pos", "neutral"} and summary["task"] == "classification"
    assert summary["rows_read"] == 400 and summary["whole_split"]
    assert (
        summary["words"]["p50"]
        <= summary["words"]["p90"]
        <= summary["words"]["p99"]
        <= summary["words"]["max"]
    )
    out = tmp_path / "reviews.yaml"
    result = runner.invoke(app, ["init", str(data), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "no validation split" in " ".join(
        result.output.split()
    )  # one file: says so, and holds out part of it
    cfg = load_config(out)
    assert (cfg.data.text_column, cfg.data.label_column) == ("review", "sentiment")
    assert cfg.train.class_weights == "balanced"  # neutral is ~10% of the rows


def test_column_options_and_errors(tmp_path: Path) -> None:
    data = write_reviews_csv(tmp_path / "reviews.csv")
    summary = inspect_dataset(str(data), text_column="review", label_column="source", sample=50)
    assert summary["label_column"] == "source" and summary["rows_read"] == 50 and not summary["whole_split"]
    result = runner.invoke(app, ["init", str(data), "-o", str(tmp_path / "x.yaml"), "--text-column", "body"])
    assert result.exit_code == 1 and "'body'" in result.output and "review" in result.output
    result = runner.invoke(app, ["init", str(tmp_path / "missing"), "-o", str(tmp_path / "y.yaml")])
    assert result.exit_code == 1 and "does not exist" in result.output
    assert not (tmp_path / "y.yaml").exists()


def test_jsonl_with_float_scores_is_a_regression(tmp_path: Path) -> None:
    rng = random.Random(1)
    data = tmp_path / "scores.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": r["text"], "score": round(rng.random() * 5, 2)}) + "\n"
            for r in synthetic_rows(200, 2)
        )
    )
    summary = inspect_dataset(str(data))
    assert summary["task"] == "regression" and summary["label_column"] == "score"
    out = tmp_path / "scores.yaml"
    assert runner.invoke(app, ["init", str(data), "-o", str(out)]).exit_code == 0
    assert "task: regression" in out.read_text()
    assert load_config(out).model.task == "regression"


def test_split_names_are_found(tmp_path: Path) -> None:
    rows = synthetic_rows(50, 0)
    folder = write_hub_folder(tmp_path / "d", {"train": rows, "test": rows[:10]})
    summary = inspect_dataset(str(folder))
    assert sorted(summary["splits"]) == ["test", "train"] and summary["eval_split"] == "validation"
    assert summary["validation_split"] == 0.1  # never evaluates on test


@pytest.mark.slow
def test_init_real_sst2(tmp_path: Path) -> None:
    from tests.conftest import REAL_DATA

    if not (REAL_DATA / "sst2").is_dir():
        pytest.skip("no real data")
    out = tmp_path / "sst2.yaml"
    result = runner.invoke(app, ["init", str(REAL_DATA / "sst2"), "-o", str(out), "--sample", "2000"])
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert (cfg.data.text_column, cfg.data.label_column) == (
        "sentence",
        "label",
    ) and cfg.data.max_length <= 64


def test_init_without_a_validation_split_holds_out_part_of_train_not_test(tmp_path: Path) -> None:
    data = write_hub_folder(tmp_path / "d", {"train": synthetic_rows(300, 0), "test": synthetic_rows(60, 1)})
    out = tmp_path / "config.yaml"
    result = runner.invoke(app, ["init", str(data), "--output", str(out)])
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert (
        cfg.data.validation_split == 0.1
        and cfg.data.eval_split == "validation"
        and cfg.data.train_split == "train"
    )
    assert "test" in out.read_text()  # named in the comment: read only by `seqtrain eval --split test`


@pytest.mark.parametrize("rows,epochs", [(400, 10), (12_000, 9), (60_000, 3)])
def test_the_recipe_takes_more_epochs_on_fewer_rows_and_the_ngram_path(
    tmp_path: Path, rows: int, epochs: int
) -> None:
    # The rows past the sample are counted: 12,000 rows (169 steps an epoch after the 10% held out)
    # need 9 epochs for 1,500 steps, 60,000 rows 3 (the fewest); 400 rows get the most, 10.
    data = write_reviews_csv(tmp_path / "reviews.csv", n=rows)
    out = tmp_path / "config.yaml"
    result = runner.invoke(app, ["init", str(data), "-o", str(out), "--sample", "300"])
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert cfg.train.epochs == epochs and cfg.train.patience == (3 if epochs > 3 else 2)
    assert cfg.model.ngrams == 2 and cfg.train.label_smoothing == 0.1


def test_init_from_a_vectors_run_keeps_the_recipe_and_takes_the_tokenizer_and_dimension(
    tmp_path: Path,
) -> None:
    run = tmp_path / "vectors"
    run.mkdir()
    (run / "tokenizer.json").write_text("{}")
    (run / "run.json").write_text(
        json.dumps({"seqtrain": {"version": "0", "format": 1}, "kind": "word-vectors", "vocab_size": 777})
    )
    (run / "config.yaml").write_text(
        "tokenizer: {kind: word, vocab_size: 777, min_frequency: 3, lowercase: true}\n"
        "model: {cell: gru, embedding_dim: 48, hidden_size: 512, bidirectional: false}\n"
        "pretrain: {objective: vectors}\n"
    )
    data = write_reviews_csv(tmp_path / "reviews.csv")
    out = tmp_path / "config.yaml"
    result = runner.invoke(app, ["init", str(data), "-o", str(out), "--init-from", str(run)])
    assert result.exit_code == 0, result.output
    cfg = load_config(out)
    assert cfg.model.init_from == str(run) and cfg.model.embedding_dim == 48
    assert (cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency) == (777, 3)
    # only the embedding comes from the vectors: the recurrent layers are the recipe's
    assert (cfg.model.cell, cfg.model.hidden_size, cfg.model.bidirectional) == ("lstm", 128, True)
    assert "word vectors" in out.read_text()
