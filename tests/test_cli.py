"""The command line through Typer's test runner: exit codes, messages, outputs."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from seqtrain.cli import app
from tests.conftest import ROOT, train_tiny_run

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(
        tmp_path_factory.mktemp("cli"), data={"label_names": ["negative", "positive"]}, train={"epochs": 3}
    )


def test_train_writes_run(trained: Path) -> None:
    assert (trained / "best" / "model.safetensors").exists()
    assert yaml.safe_load((trained / "config.yaml").read_text())["model"]["cell"] == "gru"


@pytest.mark.subprocess
def test_train_prints_the_resolved_config(tmp_path: Path) -> None:
    """What `train` prints first is the resolved config: the file, its defaults filled in,
    the overrides applied."""
    from seqtrain.config import load_config, to_dict

    path = tmp_path / "c.yaml"
    path.write_text(
        f"name: shown\noutput_dir: {tmp_path / 'run'}\ndata:\n  path: {tmp_path / 'no-such-data'}\n"
    )
    overrides = ["model.cell=gru", "train.lr=0.5", "data.label_names=[bad, good]"]
    exe = Path(sys.executable).parent / "seqtrain"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "seqtrain"]
    proc = subprocess.run(
        [*cmd, "train", str(path), *overrides],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "400"},
        timeout=120,
    )
    assert proc.returncode == 1 and "does not exist" in proc.stderr, (
        proc.stderr
    )  # it stops at the data, after printing
    printed = yaml.safe_load(proc.stderr.split("error:")[0])
    assert printed == to_dict(load_config(path, overrides))
    assert (
        printed["model"]["cell"] == "gru"
        and printed["train"]["lr"] == 0.5
        and printed["data"]["label_names"] == ["bad", "good"]
    )
    assert printed["model"]["hidden_size"] == 256 and printed["train"]["warmup_steps"] == 0, (
        "defaults are filled in"
    )


def test_eval_json_is_one_object(trained: Path) -> None:
    result = runner.invoke(app, ["eval", str(trained), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {"accuracy", "f1_macro", "loss", "n"} <= report.keys() and report["n"] == 200
    assert report["accuracy"] > 0.8
    assert json.loads((trained / "eval-validation.json").read_text())["accuracy"] == report["accuracy"]


def test_eval_tables(trained: Path) -> None:
    result = runner.invoke(app, ["eval", str(trained), "--split", "train", "--limit", "100"])
    assert result.exit_code == 0, result.output
    assert "confusion matrix" in result.stdout and "negative" in result.stdout
    assert (trained / "eval-train-limit100.json").exists()  # a partial evaluation gets its own file


def test_predict_arguments_jsonl(trained: Path) -> None:
    result = runner.invoke(app, ["predict", str(trained), "great wonderful film", "awful boring dull"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["label"] for r in rows] == ["positive", "negative"]
    assert rows[0]["text"] == "great wonderful film"
    assert abs(sum(rows[0]["probs"].values()) - 1) < 1e-4


def test_predict_stdin_and_files_keep_order(trained: Path, tmp_path: Path) -> None:
    texts = ["great superb", "awful " * 50, "dull", "the film was brilliant and moving"]
    result = runner.invoke(app, ["predict", str(trained), "--input", "-"], input="\n".join(texts) + "\n")
    assert [json.loads(line)["text"] for line in result.stdout.splitlines()] == texts
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in texts[:2])
        + "not json\n"
        + json.dumps({"text": texts[2]})
        + "\n"
    )
    out = tmp_path / "out.csv"
    result = runner.invoke(app, ["predict", str(trained), "--input", str(jsonl), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "line 3" in result.output  # the malformed line is reported, the rest predicted in order
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["text"] for r in rows] == texts[:3] and set(rows[0]) == {
        "text",
        "label",
        "prob_negative",
        "prob_positive",
    }
    csv_in = tmp_path / "in.csv"
    csv_in.write_text("id,review\n1,great superb\n2,awful dull\n")
    result = runner.invoke(app, ["predict", str(trained), "-i", str(csv_in), "--text-column", "review"])
    assert [json.loads(line)["label"] for line in result.stdout.splitlines()] == ["positive", "negative"]


def test_config_error_exits_2_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hiden_size: 3\n")
    result = runner.invoke(app, ["train", str(bad)])
    assert result.exit_code == 2
    assert "model.hidden_size" in result.output and "Traceback" not in result.output


def test_missing_run_dir_is_a_clear_error(tmp_path: Path) -> None:
    for cmd in (["eval", str(tmp_path / "nope")], ["predict", str(tmp_path / "nope"), "hi"]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 1 and "does not exist" in result.output


def test_data_error_names_the_column(tmp_path: Path, trained: Path) -> None:
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    cfg["data"]["text_column"] = "review"
    cfg["output_dir"] = str(tmp_path / "r")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 1 and "'review'" in result.output and "Traceback" not in result.output


@pytest.mark.subprocess
def test_help_and_version_are_fast() -> None:
    exe = Path(sys.executable).parent / "seqtrain"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "seqtrain"]
    subprocess.run([*cmd, "--help"], capture_output=True, check=True)  # warm the file cache
    start = time.perf_counter()
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, check=True)
    elapsed = time.perf_counter() - start
    assert "train" in out.stdout and "predict" in out.stdout
    assert elapsed < 1.0, f"--help took {elapsed:.2f}s; torch must not be imported for it"
    version = subprocess.run([*cmd, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("seqtrain ")


@pytest.mark.subprocess
def test_help_does_not_import_torch() -> None:
    code = (
        "import sys; from seqtrain import cli; import seqtrain.config; "
        "print('torch' in sys.modules, 'datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False False"


def test_predict_parquet_dataset_ids_and_threshold(trained: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"id": "a1", "review": "great superb"}, {"id": "b2", "review": "awful dull"}]),
        tmp_path / "in.parquet",
    )
    result = runner.invoke(
        app, ["predict", str(trained), "-i", str(tmp_path / "in.parquet"), "--text-column", "review"]
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["id"], r["label"]) for r in rows] == [("a1", "positive"), ("b2", "negative")]
    always = runner.invoke(app, ["predict", str(trained), "awful dull", "--threshold", "0.0"])
    assert json.loads(always.stdout)["label"] == "positive"
    data = yaml.safe_load((trained / "config.yaml").read_text())["data"]["path"]
    result = runner.invoke(
        app, ["predict", str(trained), "--data", data, "--split", "validation", "-o", str(tmp_path / "o.csv")]
    )
    assert result.exit_code == 0, result.output
    assert len((tmp_path / "o.csv").read_text().splitlines()) == 201


@pytest.mark.subprocess
def test_predict_streams_stdin_before_input_ends(trained: Path) -> None:
    """The first results come out while stdin is still open."""
    import select

    exe = Path(sys.executable).parent / "seqtrain"
    proc = subprocess.Popen(
        [str(exe), "predict", str(trained), "--input", "-", "--batch-size", "8"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("great superb film\n" * 40)
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "no output while the input is still open"
    assert json.loads(proc.stdout.readline())["label"] == "positive"
    proc.stdin.close()
    proc.wait(timeout=60)


def test_predict_stream_reads_ahead_in_order_and_stops_cleanly(trained: Path) -> None:
    """Chunks tokenized ahead by the helper thread come back in input order, equal to one-shot
    prediction; a consumer that stops early is not kept waiting; a reader error reaches the consumer."""
    import itertools

    import numpy as np

    from seqtrain.inference.io import predict_stream
    from seqtrain.inference.run import load_run, predict_probs

    run, _ = load_run(trained)
    texts = [f"{'great superb ' * (i % 7)}film {i} {'dull awful ' * (i % 5)}" for i in range(50)]
    streamed = list(predict_stream(run, texts, chunk=8, batch_size=3))
    assert [t for t, _ in streamed] == texts
    np.testing.assert_allclose(np.stack([p for _, p in streamed]), predict_probs(run, texts), atol=1e-6)

    first = list(itertools.islice(predict_stream(run, (f"film {i}" for i in itertools.count()), chunk=4), 6))
    assert len(first) == 6  # the reader is bounded (a chunk queued, one being built) and is a daemon

    def broken() -> Iterator[str]:
        yield "fine film"
        raise ValueError("bad input at line 2")

    with pytest.raises(ValueError, match="line 2"):
        list(predict_stream(run, broken(), chunk=1))


@pytest.mark.parametrize(("code", "ignored"), [(130, True), (143, True), (129, True), (1, False), (0, False)])
def test_a_command_stopped_by_a_signal_ignores_the_same_request_arriving_late(
    code: int, ignored: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A --jobs worker that stopped for Ctrl-C can get the same Ctrl-C again from tune while the
    interpreter cleans up: with the default handler that prints a KeyboardInterrupt traceback from an
    atexit callback. main() ignores stop signals once a command exits 128 + signum, and only then."""
    import signal

    from seqtrain import cli

    def stopped() -> None:
        raise SystemExit(code)

    monkeypatch.setattr(cli, "app", stopped)
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
        assert exit_.value.code == code
        now = {signum: signal.getsignal(signum) for signum in before}
        if ignored:
            assert set(now.values()) == {signal.SIG_IGN}
        else:
            assert now == before
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
