"""`seqtrain export`: TorchScript and ONNX files that give the eager model's logits on any batch shape."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from seqtrain.cli import app
from seqtrain.data import pad
from seqtrain.encoding import encode
from seqtrain.export import export_run, load_exported
from seqtrain.inference.run import load_run
from tests.conftest import synthetic_rows, tiny_config, write_hub_folder, write_yaml

runner = CliRunner()

MODELS = {
    # the bidirectional model reverses each row within its length and gathers the last real step
    "lstm-bi-last": {"cell": "lstm", "bidirectional": True, "pooling": "last", "num_layers": 2},
    # max pooling masks the padded steps; model.head_norm's batch norm exports with its running statistics
    "gru-max": {"cell": "gru", "bidirectional": False, "pooling": "max", "head_norm": True},
    # the plain RNN goes through the other ONNX exporter (the dynamo one fixes the time length)
    "rnn-last": {"cell": "rnn", "bidirectional": False, "pooling": "last"},
    # model.ngrams: the hashed n-grams' sort and de-duplication export too, and their logits join the head's
    "gru-ngrams": {
        "cell": "gru",
        "bidirectional": False,
        "pooling": "mean",
        "ngrams": 2,
        "ngram_buckets": 4096,
        "ngram_weighting": "nb",  # the naive Bayes ratios travel as a constant of the graph
    },
    # data.ngram_max_length: the recurrent path's head+tail cut of the longer ids exports as tensor ops
    "lstm-bi-ngrams-read-further": {
        "cell": "lstm",
        "bidirectional": True,
        "pooling": "max",
        "ngrams": 2,
        "ngram_buckets": 4096,
    },
}
DATA = {"lstm-bi-ngrams-read-further": {"max_length": 24, "ngram_max_length": 96, "truncation": "head+tail"}}


@pytest.fixture(scope="module", params=list(MODELS))
def run_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp(request.param)
    data = write_hub_folder(
        tmp / "tiny", {"train": synthetic_rows(300, 0), "validation": synthetic_rows(50, 1)}
    )
    cfg = tiny_config(
        data, tmp / "run", model=MODELS[request.param], data=DATA.get(request.param, {"max_length": 48})
    )
    path = tmp / "tiny.yaml"
    write_yaml(path, cfg)
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def varied_texts(n: int = 100) -> list[str]:
    """Sentences of 1 to ~100 tokens: single words, typical rows,
    and rows longer than max_length (truncated)."""
    rng = random.Random(7)
    texts = [r["text"] for r in synthetic_rows(n - 10, 3)]
    texts += ["great", "dull", "?", "unseenword", "the"]  # one token, and an unknown one
    texts += [
        " ".join(rng.choice(["great", "awful", "the", "film", "plot"]) for _ in range(k))
        for k in (47, 48, 49, 80, 100)
    ]
    rng.shuffle(texts)
    return texts


def assert_parity(run_dir: Path, model_file: Path) -> None:
    run, _ = load_run(run_dir)
    exported = load_exported(model_file)
    seqs = encode(run.tokenizer, varied_texts(), run.config.data)
    assert len(seqs) == 100 and len({len(s) for s in seqs}) > 30
    # Batch shapes unlike the export example (3 x 7): one row, odd sizes, all 100 at once
    for batch_size in (1, 7, 100):
        for start in range(0, len(seqs), batch_size):
            ids, lengths = pad(seqs[start : start + batch_size])
            eager = run.model(ids, lengths).detach().numpy()
            got = exported(ids.numpy(), lengths.numpy())
            assert got.shape == eager.shape
            assert np.abs(got - eager).max() <= 1e-5, (batch_size, start, np.abs(got - eager).max())
            assert (got.argmax(1) == eager.argmax(1)).all()


def test_torchscript_parity(run_dir: Path, tmp_path: Path) -> None:
    info = export_run(run_dir, "torchscript", tmp_path / "ts")
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] <= 1e-5
    assert_parity(run_dir, tmp_path / "ts" / "model.pt")


def test_onnx_parity(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    info = export_run(run_dir, "onnx", tmp_path / "onnx")
    assert info["max_abs_diff"] is not None and info["max_abs_diff"] <= 1e-5
    assert not list((tmp_path / "onnx").glob("*.data"))  # weights inside the one file
    assert_parity(run_dir, tmp_path / "onnx" / "model.onnx")


def test_export_command_writes_the_folder(run_dir: Path) -> None:
    result = runner.invoke(app, ["export", str(run_dir), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    folder = run_dir / "export"
    assert {p.name for p in folder.iterdir()} == {
        "model.pt",
        "tokenizer.json",
        "labels.json",
        "config.yaml",
        "export.json",
    }
    info = json.loads((folder / "export.json").read_text())
    assert info["format"] == "torchscript" and info["model"] == "model.pt" and info["pad_id"] == 0
    # the ids the model takes: data.ngram_max_length where the n-gram path reads further
    data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    read = data["ngram_max_length"] or 48
    assert info["max_length"] == read and set(info["inputs"]) == {"ids", "lengths"}
    assert (folder / "tokenizer.json").read_bytes() == (run_dir / "tokenizer.json").read_bytes()
    assert "max abs difference" in result.output


def test_export_errors(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["export", str(run_dir), "--format", "pickle"])
    assert result.exit_code == 2 and "onnx or torchscript" in result.output
    result = runner.invoke(app, ["export", str(run_dir.parent / "nope")])
    assert result.exit_code == 1 and "does not exist" in result.output
    monkeypatch.setattr("seqtrain.export.missing_onnx_packages", lambda: ["onnx", "onnxscript"])
    result = runner.invoke(app, ["export", str(run_dir), "--format", "onnx"])
    assert result.exit_code == 1 and "pip install 'seqtrain[export]'" in result.output


def predict_json(target: Path, texts: list[str], *extra: str) -> list[dict]:
    result = runner.invoke(app, ["predict", str(target), *texts, *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def assert_export_folder_predicts_like_the_run(run_dir: Path, folder: Path, texts: list[str]) -> None:
    """`seqtrain predict FOLDER` (onnxruntime) gives what `seqtrain predict RUN_DIR` (torch) gives."""
    pytest.importorskip("onnxruntime")
    export_run(run_dir, "onnx", folder)
    from_run, from_folder = predict_json(run_dir, texts), predict_json(folder, texts)
    assert len(from_run) == len(from_folder) == len(texts)
    for a, b in zip(from_run, from_folder, strict=True):
        assert a["text"] == b["text"]
        if "score" in a:
            assert b["score"] == pytest.approx(a["score"], abs=1e-4)
        else:
            assert a["label"] == b["label"]
            assert b["probs"] == pytest.approx(a["probs"], abs=1e-5)


def test_predict_on_the_onnx_folder_matches_the_run(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    assert_export_folder_predicts_like_the_run(run_dir, tmp_path / "onnx", varied_texts())


def test_onnx_rnn_runs_batches_on_every_core_with_the_same_results(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime's RNN kernel uses one thread, so an RNN export runs one batch per core at once;
    LSTM and GRU exports run a batch at a time on all cores. Either way the outputs are the model's."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from seqtrain.inference.onnx import load_exported_run

    monkeypatch.setattr("seqtrain.inference.onnx.physical_cores", lambda: 2)
    export_run(run_dir, "onnx", tmp_path / "onnx")
    exported = load_exported_run(tmp_path / "onnx")
    assert (exported.pool is not None) == (exported.config.model.cell == "rnn")
    run, _ = load_run(run_dir)
    seqs = encode(run.tokenizer, varied_texts(), run.config.data)
    np.testing.assert_allclose(
        exported.probs(seqs, 7), run.probs(seqs, 7), atol=1e-5
    )  # 15 batches of 7, two at a time


@pytest.mark.subprocess
def test_predict_on_an_export_folder_never_imports_torch(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    export_run(run_dir, "onnx", tmp_path / "onnx")
    code = (
        "import sys\n"
        "from seqtrain.cli import app\n"
        "try:\n"
        f"    app(['predict', {str(tmp_path / 'onnx')!r}, 'a great film', 'dull'])\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2 and '"label"' in done.stdout


def test_predict_refuses_folders_it_cannot_run(run_dir: Path, tmp_path: Path) -> None:
    export_run(run_dir, "torchscript", tmp_path / "ts")
    result = runner.invoke(app, ["predict", str(tmp_path / "ts"), "great"])
    assert (
        result.exit_code == 1 and "ONNX export folders" in result.output and "Traceback" not in result.output
    )
    info = json.loads((tmp_path / "ts" / "export.json").read_text())
    info.update(format="onnx", outputs={"logits": "..."})  # what export.json said before the `probs` output
    (tmp_path / "ts" / "export.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["predict", str(tmp_path / "ts"), "great"])
    assert result.exit_code == 1 and "export it again" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "ts"), "great", "--checkpoint", "last"])
    assert result.exit_code == 2 and "export folder holds one model" in result.output
    # explain loads its target as predict and serve do (inference.target.load_target)
    result = runner.invoke(app, ["explain", str(tmp_path / "ts"), "great", "--checkpoint", "last"])
    assert result.exit_code == 2 and "export folder holds one model" in result.output
