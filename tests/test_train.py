from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from seqtrain.config import Config
from seqtrain.errors import ConfigError
from seqtrain.metrics import read_metrics
from seqtrain.train import lr_at, train
from tests.conftest import ROOT, synthetic_rows, tiny_config, write_hub_folder, write_yaml


def test_tiny_run_writes_a_complete_run_directory(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"epochs": 2, "eval_every": 0})
    report = train(cfg)
    run = tmp_path / "run"
    for name in (
        "config.yaml",
        "tokenizer.json",
        "labels.json",
        "metrics.jsonl",
        "run.json",
        "eval-validation.json",
        "best/model.safetensors",
        "last/model.safetensors",
        "last/optimizer.safetensors",
        "last/state.json",
    ):
        assert (run / name).exists(), name
    lines = read_metrics(run / "metrics.jsonl")
    train_lines = [r for r in lines if r["split"] == "train"]
    eval_lines = [r for r in lines if r["split"] == "validation"]
    assert train_lines and all({"step", "epoch", "loss", "tokens_per_sec"} <= r.keys() for r in train_lines)
    assert [r["epoch"] for r in eval_lines] == [1, 2], "an epoch-end evaluation counts the finished epoch"
    assert all({"loss", "accuracy", "f1_macro"} <= r.keys() for r in eval_lines)
    assert report["accuracy"] > 0.8, "the synthetic task is easy"
    steps = json.loads((run / "run.json").read_text())["steps_per_epoch"]
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 2 * steps


def test_nb_weighting_counts_the_whole_training_split_and_saves_the_ratios(
    tiny_data: Path, tmp_path: Path
) -> None:
    from seqtrain.checkpoint import load_tensors
    from seqtrain.data import BatchStream
    from seqtrain.encoding import read_run_files
    from seqtrain.model import naive_bayes_scale

    model = {"ngrams": 2, "ngram_buckets": 512, "ngram_weighting": "nb"}
    cfg = tiny_config(tiny_data, tmp_path / "run", model=model, train={"max_steps": 3})
    train(cfg)
    saved = load_tensors((tmp_path / "run" / "last" / "model.safetensors").resolve())["ngram_scale"]
    # the same ratios from the same split cut into other batches: nothing depends on how it is batched
    tokenizer, labels = read_run_files(tmp_path / "run")
    stream = BatchStream(cfg.data, "train", tokenizer, labels, 7, shuffle=False)
    expected, texts = naive_bayes_scale(stream, cfg.model, tokenizer.get_vocab_size(), 2)
    assert texts == json.loads((tmp_path / "run" / "run.json").read_text())["num_train_examples"]
    assert torch.allclose(saved, expected) and saved.std() > 0  # counted, not left at ones
    assert saved[0].abs().sum() == 0  # padding


def test_same_seed_same_weights_other_seed_differs(tiny_data: Path, tmp_path: Path) -> None:
    a = tmp_path / "a" / "last" / "model.safetensors"
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(tiny_config(tiny_data, tmp_path / name, seed=seed, train={"max_steps": 15}))
    assert a.read_bytes() == (tmp_path / "b" / "last" / "model.safetensors").read_bytes()
    assert a.read_bytes() != (tmp_path / "c" / "last" / "model.safetensors").read_bytes()


def test_existing_run_is_not_overwritten(tiny_data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 3})
    train(cfg)
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg)


def test_resume_refuses_a_different_model(tiny_data: Path, tmp_path: Path) -> None:
    train(tiny_config(tiny_data, tmp_path / "run", train={"max_steps": 3}))
    with pytest.raises(ConfigError, match="model.hidden_size"):
        train(tiny_config(tiny_data, tmp_path / "run", model={"hidden_size": 32}), resume=True)


def test_lr_schedule_warms_up_and_decays() -> None:
    from seqtrain.config import TrainConfig

    t = TrainConfig(lr=1.0, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(0, t, 100) == pytest.approx(0.1) and lr_at(9, t, 100) == pytest.approx(1.0)
    assert lr_at(55, t, 100) == pytest.approx(0.5) and lr_at(100, t, 100) == pytest.approx(0.0)


def run_cli(config: Path, *args: str, kill_after: int | None = None) -> subprocess.CompletedProcess[str]:
    """`seqtrain train`; with kill_after, through the test-only entry point that SIGKILLs right after that
    save."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    entry = ["seqtrain"] if kill_after is None else ["tests.fault_entry", f"kill-after-save={kill_after}"]
    return subprocess.run(
        [sys.executable, "-m", *entry, "train", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


# A single kill at step 10 is the first half of [10, 30], and two workers killed at 10 are the first half
# of the case with workers: neither has a case of its own; EMA and the n-gram path ride on the two kills,
# a held-out split and VAT on the workers' case (each case is a subprocess run three times: the cases
# are few to keep `make test` short).
@pytest.mark.subprocess
@pytest.mark.parametrize(
    "workers,kills,ema,held,vat,ngrams",
    [
        (0, [10, 30], 0.99, None, False, 2),  # model.ngrams: its table, optimizer state and NB ratios too
        (0, ["epoch"], None, None, False, 0),
        (2, [10, 50], None, 0.2, True, 0),  # streams: the rows left for training, unlabeled batches
    ],
)
def test_sigkill_then_resume_is_bitwise_identical(
    tiny_data: Path,
    tmp_path: Path,
    workers: int,
    kills: list,
    ema: float | None,
    held: float | None,
    vat: bool,
    ngrams: int,
) -> None:
    """Killed with SIGKILL right after a checkpoint (mid-epoch, twice, at an epoch boundary), then resumed:
    the final weights equal an uninterrupted run's, byte for byte (with EMA: the average and the raw weights;
    with data.validation_split: the stream of the rows left for training; with train.vat_eps: the stream
    of unlabeled batches, 13 to a pass here, so the kill at 50 lands in its fourth pass)."""
    unlabeled = write_hub_folder(
        tmp_path / "unlabeled", {"train": [{"text": r["text"]} for r in synthetic_rows(200, 5)]}
    )

    def config(out: str) -> Config:
        return tiny_config(
            tiny_data,
            tmp_path / out,
            data={"num_workers": workers, "validation_split": held},
            model={"ngrams": ngrams, "ngram_buckets": 4096, "ngram_weighting": "nb" if ngrams else "none"},
            train={"epochs": 2, "eval_every": 10, "log_every": 5, "ema_decay": ema, "vat_eps": float(vat)},
            pretrain={"path": str(unlabeled) if vat else None},
        )

    train(config("straight"))  # the reference, in this process: one interpreter start fewer
    steps = json.loads((tmp_path / "straight" / "run.json").read_text())["steps_per_epoch"]
    cfg = tmp_path / "killed.yaml"
    write_yaml(cfg, config("killed"))
    for i, k in enumerate(kills):
        at = steps if k == "epoch" else k
        proc = run_cli(
            cfg,
            *(["--resume"] if i else []),
            "train.eval_every=" + str(at if k == "epoch" else 10),
            kill_after=at,
        )
        assert proc.returncode == -9, proc.stderr
    final = run_cli(cfg, "--resume")
    assert final.returncode == 0, final.stderr
    a = (tmp_path / "straight" / "last" / "model.safetensors").read_bytes()
    b = (tmp_path / "killed" / "last" / "model.safetensors").read_bytes()
    assert a == b
    if ema:
        raw = (tmp_path / "straight" / "last" / "train-model.safetensors").read_bytes()
        assert raw == (tmp_path / "killed" / "last" / "train-model.safetensors").read_bytes()
        assert raw != a, "model.safetensors holds the average, not the raw weights"
    lines = [r for r in read_metrics(tmp_path / "killed" / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in lines] == sorted({r["step"] for r in lines}), "no step is logged twice"


def test_interrupt_on_an_epochs_last_batch_keeps_that_epochs_evaluation(
    tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    import seqtrain.train
    from seqtrain.runtime import Interrupted

    cfg = tiny_config(tiny_data, tmp_path / "run", train={"epochs": 2, "eval_every": 0})
    real = seqtrain.train.lr_at

    def lr_at_then_sigterm(step: int, *args: Any) -> float:  # SIGTERM while the epoch's last batch trains
        if step == json.loads((tmp_path / "run" / "run.json").read_text())["steps_per_epoch"] - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(seqtrain.train, "lr_at", lr_at_then_sigterm)
    with pytest.raises(Interrupted):
        train(cfg)
    monkeypatch.undo()
    train(cfg, resume=True)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "validation"]
    assert [r["epoch"] for r in evals] == [1, 2]


def test_a_missing_eval_split_stops_before_any_training(tmp_path: Path) -> None:
    from seqtrain.errors import DataError
    from tests.conftest import synthetic_rows, write_hub_folder

    data = write_hub_folder(tmp_path / "d", {"train": synthetic_rows(300, 0), "test": synthetic_rows(40, 1)})
    with pytest.raises(DataError, match="'validation'"):
        train(tiny_config(data, tmp_path / "run", train={"epochs": 1, "eval_every": 0}))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any(
        (tmp_path / "run" / "checkpoints").iterdir()
    )
    assert not [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.parametrize("on_bad_rows", ["error", "skip"])
def test_labels_found_only_in_the_eval_split_are_reported_before_training(
    tmp_path: Path, on_bad_rows: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from seqtrain.errors import DataError
    from tests.conftest import synthetic_rows, write_hub_folder

    evals = synthetic_rows(40, 1, string_labels=True) + [{"text": "so so", "label": "meh"}] * 3
    data = write_hub_folder(
        tmp_path / "d", {"train": synthetic_rows(300, 0, string_labels=True), "validation": evals}
    )
    cfg = tiny_config(
        data, tmp_path / "run", data={"on_bad_rows": on_bad_rows}, train={"epochs": 1, "eval_every": 0}
    )
    if on_bad_rows == "error":
        with pytest.raises(DataError, match=r"\['meh'\].*only in the eval split 'validation'"):
            train(cfg)
        assert not [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
        return
    seen = []
    import seqtrain.train

    real = seqtrain.train.lr_at

    def lr_at(step: int, *args: Any) -> float:
        seen.append(capsys.readouterr().err)  # what was printed before the first step
        return real(step, *args)

    seqtrain.train.lr_at = lr_at  # type: ignore[assignment]
    try:
        train(cfg)
    finally:
        seqtrain.train.lr_at = real
    assert "only in the eval split 'validation'" in " ".join(seen[0].split())


def test_validation_split_holds_out_hashed_training_rows_and_never_reads_test(tmp_path: Path) -> None:
    from seqtrain.data import is_heldout
    from tests.conftest import synthetic_rows, write_hub_folder

    rows = synthetic_rows(600, 0)
    data = write_hub_folder(tmp_path / "d", {"train": rows}, shards=2)
    (data / "test-00000-of-00001.parquet").write_bytes(b"not parquet: reading the test split would fail")
    held = [r for r in rows if is_heldout(r["text"], 0.2)]
    assert 60 < len(held) < 180
    cfg = tiny_config(
        data, tmp_path / "run", data={"validation_split": 0.2}, train={"epochs": 2, "eval_every": 0}
    )
    report = train(cfg)
    assert report["n"] == len(held) and report["accuracy"] > 0.7
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["num_train_examples"] == len(rows) - len(held)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "validation"]
    assert [r["epoch"] for r in evals] == [1, 2]
    with pytest.raises(ConfigError, match="data.validation_split"):
        train(tiny_config(data, tmp_path / "bad", data={"validation_split": 0.2, "eval_split": "train"}))
