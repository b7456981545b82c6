"""Pictures and the eval report: curves.png after training, `seqtrain plot`,
`eval --plots` and `eval --report`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from seqtrain.cli import app
from seqtrain.metrics import calibration, precision_recall
from seqtrain.plots import plot_calibration, plot_confusion, plot_curves, plot_pr
from seqtrain.report import length_buckets, truncation_stats
from tests.conftest import synthetic_rows, tiny_config, train_tiny_run

runner = CliRunner()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk; fails unless the file is a PNG."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    w, h = png_size(path)
    assert 300 <= w <= 3000 and 200 <= h <= 3000, (w, h)
    import matplotlib.image

    pixels = matplotlib.image.imread(path)  # decodes completely
    assert pixels.shape[:2] == (h, w) and pixels.std() > 0  # not a blank image


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # max_length 24 < the longest texts (~53 tokens), so the report has truncated texts to count
    return train_tiny_run(
        tmp_path_factory.mktemp("plots"),
        data={"label_names": ["negative", "positive"], "max_length": 24},
        train={"epochs": 2},
    )


def test_training_writes_curves(trained: Path) -> None:
    assert_png(trained / "curves.png")


def test_plot_command_draws_several_runs(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "both.png"
    result = runner.invoke(app, ["plot", str(trained), str(trained), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert_png(out)
    result = runner.invoke(app, ["plot", str(tmp_path)])  # no metrics.jsonl: a message, not a traceback
    assert result.exit_code == 1 and "metrics.jsonl" in result.output


def test_eval_plots(trained: Path) -> None:
    for name in ("confusion.png", "pr.png", "calibration.png"):
        (trained / name).unlink(missing_ok=True)
    result = runner.invoke(app, ["eval", str(trained), "--plots"])
    assert result.exit_code == 0, result.output
    for name in ("confusion.png", "pr.png", "calibration.png"):
        assert_png(trained / name)
    result = runner.invoke(app, ["eval", str(trained), "--plots", "--split", "train", "--limit", "100"])
    assert result.exit_code == 0, result.output
    assert_png(trained / "confusion-train.png")  # another split does not overwrite the eval split's pictures


def test_eval_report_json_and_tables(trained: Path) -> None:
    result = runner.invoke(app, ["eval", str(trained), "--report", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    report = out["report"]
    assert "arrays" not in out  # the per-row arrays stay out of the JSON
    buckets = report["by_length"]
    assert sum(b["n"] for b in buckets) == out["n"] == 200
    assert all(0 <= b["accuracy"] <= 1 for b in buckets) and buckets[-1]["max_tokens"] == 24
    assert buckets[-1].get("includes_truncated")
    n_correct = sum(b["accuracy"] * b["n"] for b in buckets)
    assert n_correct == pytest.approx(out["accuracy"] * out["n"])
    truncation = report["truncation"]
    assert truncation["max_length"] == 24 and 0.2 < truncation["truncated_rate"] < 0.9
    assert truncation["tokens_max"] > 24
    assert report["unk_rate"] == out["unk_rate"] and 0 <= report["ece"] <= 1
    assert json.loads((trained / "eval-validation.json").read_text())["report"] == report

    result = runner.invoke(app, ["eval", str(trained), "--report"])
    assert result.exit_code == 0, result.output
    assert "by text length" in result.stdout and "truncated at max_length 24" in result.stdout


def test_truncation_rate_matches_a_count_by_hand(tiny_data: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    rows = synthetic_rows(200, 1)
    words = sorted({w for r in rows for w in r["text"].split()})
    tok = Tokenizer(
        WordLevel({"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}, unk_token="<unk>")
    )
    tok.pre_tokenizer = Whitespace()
    cfg = tiny_config(tiny_data, tiny_data / "out", data={"max_length": 20})
    stats = truncation_stats(tok, cfg.data, "validation", None)
    expected = np.mean([len(r["text"].split()) > 20 for r in rows])
    assert stats["truncated_rate"] == pytest.approx(expected)
    assert stats["tokens_max"] == max(len(r["text"].split()) for r in rows)


def test_length_buckets_are_quantiles_and_cover_every_row() -> None:
    lengths = np.arange(1, 101)
    correct = (lengths > 50).astype(float)
    buckets = length_buckets(lengths, correct, buckets=4, max_length=100)
    assert [b["n"] for b in buckets] == [25, 25, 25, 25]
    assert [b["accuracy"] for b in buckets] == [0.0, 0.0, 1.0, 1.0]
    assert (
        buckets[0]["min_tokens"] == 1
        and buckets[-1]["max_tokens"] == 100
        and buckets[-1]["includes_truncated"]
    )
    same = length_buckets(np.full(10, 7), np.ones(10), buckets=4)  # one length: one bucket
    assert len(same) == 1 and same[0]["n"] == 10


def test_precision_recall_and_calibration_numbers() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    positive = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    precision, recall, ap = precision_recall(scores, positive)
    assert recall[-1] == 1.0 and precision[0] == 1.0
    assert ap == pytest.approx((1 + 1 + 3 / 4) / 3)  # precision at each positive, averaged
    probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.6, 0.4], [0.7, 0.3]])
    cal = calibration(probs, np.array([1, 0, 0, 0]), bins=10)
    # confidences 0.9 (right), 0.8 (wrong), 0.6 (right), 0.7 (right):
    # |1-.9| + |0-.8| + |1-.6| + |1-.7|, over 4
    assert cal["ece"] == pytest.approx((0.1 + 0.8 + 0.4 + 0.3) / 4)


def test_plot_functions_write_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 2 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    cm = np.zeros((3, 3), dtype=np.int64)
    np.add.at(cm, (y, probs.argmax(1)), 1)
    assert_png(plot_confusion(cm, ["a", "b", "c"], tmp_path / "cm.png"))
    assert_png(plot_calibration(probs, y, tmp_path / "cal.png"))
    binary = probs[:, :2] / probs[:, :2].sum(1, keepdims=True)
    assert_png(plot_pr(binary, (y == 1).astype(int), ["no", "yes"], tmp_path / "pr.png"))
    records = [{"step": s, "split": "train", "loss": 1 / s, "accuracy": 1 - 1 / s} for s in range(1, 50)]
    records += [
        {"step": s, "split": "validation", "loss": 1.2 / s, "accuracy": 1 - 1.2 / s} for s in (10, 20, 49)
    ]
    regression = [
        {"step": s, "split": split, "loss": 1 / s, "mae": 2 / s}
        for s in range(1, 20)
        for split in ("train", "test")
    ]
    assert_png(plot_curves([("a", records), ("b", records[::2])], tmp_path / "curves.png"))
    assert_png(plot_curves([("r", regression)], tmp_path / "regression.png"))
