"""Run directories that are not what a command expects: the user's own folder, the other verb's run, a
damaged labels.json. In-process through Typer's runner; each case checks the exit code, a message that
names the file or key, no traceback, and that the user's files are untouched."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner, Result

from seqtrain import checkpoint
from seqtrain.cli import app
from seqtrain.config import to_dict
from tests.conftest import synthetic_rows, tiny_config, write_hub_folder

runner = CliRunner()


def invoke(*args: str, input: str | None = None) -> Result:
    result = runner.invoke(app, list(args), input=input)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output, result.output
    return result


def flat(result: Result) -> str:
    return " ".join(result.output.split())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_hub_folder(
        tmp_path_factory.mktemp("data") / "tiny",
        {"train": synthetic_rows(120, 0), "validation": synthetic_rows(40, 1)},
    )


def write_config(path: Path, data: Path, out: Path, **sections: Any) -> Path:
    train = {"max_steps": 2, "log_every": 1, **sections.pop("train", {})}
    raw = to_dict(tiny_config(data, out, train=train, data={"max_eval_examples": 20}, **sections))
    path.write_text(yaml.safe_dump(raw))
    return path


LM = {"pretrain": {"path": None, "max_length": 32, "heldout_fraction": 0.1, "softmax": "full"}}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("classifier")
    result = invoke("train", str(write_config(tmp / "c.yaml", data, tmp / "run")))
    assert result.exit_code == 0, result.output
    return tmp / "run"


@pytest.fixture(scope="module")
def language_model(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Path:
    tmp = tmp_path_factory.mktemp("lm")
    result = invoke("pretrain", str(write_config(tmp / "lm.yaml", data, tmp / "run", **LM)))
    assert result.exit_code == 0, result.output
    return tmp / "run"


def copy_run(run: Path, tmp: Path) -> Path:
    shutil.copytree(run, tmp / "copy", symlinks=True)
    return tmp / "copy"


# --------------------------------------------------------------------------- the user's own folder


def users_folder(tmp: Path, *extra: str) -> tuple[Path, dict[str, str]]:
    folder = tmp / "mine"
    folder.mkdir()
    files = {
        "config.yaml": "# my precious comments\nname: mine\n",
        "labels.json": '["my", "labels"]\n',
        **{name: "mine\n" for name in extra},
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder, files


def untouched(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        assert (folder / name).read_text() == text, name


@pytest.mark.parametrize("verb", ["train", "pretrain"])
def test_a_failed_resume_leaves_nothing_that_lets_a_fresh_run_overwrite_the_users_files(
    tmp_path: Path, data: Path, verb: str
) -> None:
    folder, files = users_folder(tmp_path)
    cfg = str(write_config(tmp_path / "c.yaml", data, folder, **(LM if verb == "pretrain" else {})))
    resumed = invoke(verb, cfg, "--resume")
    assert resumed.exit_code == 2, resumed.output
    assert re.search(r"not a seqtrain run.*nothing to resume", flat(resumed)), resumed.output
    assert not (folder / ".lock").exists()
    fresh = invoke(verb, cfg)
    assert fresh.exit_code == 2, fresh.output
    assert "seqtrain did not create" in flat(fresh) and "config.yaml" in flat(fresh)
    untouched(folder, files)
    assert sorted(p.name for p in folder.iterdir()) == sorted(files)


def test_a_users_run_json_does_not_make_the_folder_seqtrains(tmp_path: Path, data: Path) -> None:
    folder, files = users_folder(tmp_path, "run.json")
    (folder / ".lock").write_text("")  # left by an older seqtrain's failed resume
    result = invoke("train", str(write_config(tmp_path / "c.yaml", data, folder)))
    assert result.exit_code == 2 and "seqtrain did not create" in flat(result), result.output
    untouched(folder, files)


def test_a_new_run_is_marked_as_seqtrains_and_a_lone_lock_file_blocks_nothing(
    tmp_path: Path, data: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("999999\n")
    result = invoke("train", str(write_config(tmp_path / "c.yaml", data, out)))
    assert result.exit_code == 0, result.output
    marker = json.loads((out / "run.json").read_text())["seqtrain"]
    assert marker["version"] and checkpoint.is_seqtrain_run(out)
    again = invoke("train", str(write_config(tmp_path / "c.yaml", data, out)), "--resume")
    assert again.exit_code == 0, again.output


def test_a_run_stopped_before_its_files_is_still_seqtrains(tmp_path: Path) -> None:
    """The marker is written when the lock is taken: a run that fails while reading its data leaves a
    folder the next fresh run may use (not one it refuses as the user's)."""
    out = tmp_path / "out"
    checkpoint.lock_run_dir(out, fresh=True)
    checkpoint.unlock_run_dir(out)
    (out / "tokenizer.json").write_text("{}")
    assert checkpoint.is_seqtrain_run(out)
    assert checkpoint.lock_run_dir(out, fresh=True) == []
    checkpoint.unlock_run_dir(out)


def test_resume_of_an_empty_or_missing_folder_creates_nothing(tmp_path: Path, data: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "missing"):
        result = invoke("train", str(write_config(tmp_path / "c.yaml", data, out)), "--resume")
        assert result.exit_code == 1 and "nothing to resume" in flat(result), result.output
    assert list(empty.iterdir()) == [] and not (tmp_path / "missing").exists()


# --------------------------------------------------------------------------- the other verb's run


def test_train_resume_on_a_pretrain_run_names_the_verb(
    tmp_path: Path, data: Path, language_model: Path
) -> None:
    run = copy_run(language_model, tmp_path)
    result = invoke("train", str(write_config(tmp_path / "c.yaml", data, run)), "--resume")
    assert result.exit_code == 2, result.output
    assert re.search(r"language model run.*seqtrain pretrain CONFIG --resume.*model\.init_from", flat(result))


def test_pretrain_resume_on_a_classifier_run_names_the_verb(
    tmp_path: Path, data: Path, classifier: Path
) -> None:
    run = copy_run(classifier, tmp_path)
    result = invoke("pretrain", str(write_config(tmp_path / "c.yaml", data, run, **LM)), "--resume")
    assert result.exit_code == 2, result.output
    assert re.search(r"classifier run.*seqtrain train CONFIG --resume", flat(result)), result.output


def test_a_fresh_pretrain_over_a_classifier_run_names_it(
    tmp_path: Path, data: Path, classifier: Path
) -> None:
    run = copy_run(classifier, tmp_path)
    result = invoke("pretrain", str(write_config(tmp_path / "c.yaml", data, run, **LM)))
    assert result.exit_code == 2 and "holds a classifier run" in flat(result), result.output


@pytest.mark.parametrize(
    "args",
    [
        ["eval", "{run}"],
        ["predict", "{run}", "great film"],
        ["explain", "{run}", "great film"],
        ["export", "{run}", "--output", "{tmp}/export"],
    ],
    ids=["eval", "predict", "explain", "export"],
)
def test_a_pretrain_run_is_named_as_a_language_model_by_commands_that_need_labels(
    tmp_path: Path, language_model: Path, args: list[str]
) -> None:
    result = invoke(*(a.format(run=language_model, tmp=tmp_path) for a in args))
    assert result.exit_code == 1, result.output
    text = flat(result)
    assert "language model run" in text and "model.init_from" in text and "labels.json" not in text, text


def test_no_checkpoint_in_a_pretrain_run_says_pretrain(tmp_path: Path, language_model: Path) -> None:
    run = copy_run(language_model, tmp_path)
    checkpoint.remove_all(run)
    with pytest.raises(checkpoint.CheckpointError, match=r"Train first: seqtrain pretrain CONFIG"):
        checkpoint.find(run, "last")


def test_no_intact_checkpoint_does_not_promise_a_fallback(tmp_path: Path, classifier: Path) -> None:
    run = copy_run(classifier, tmp_path)
    for ckpt in checkpoint.step_dirs(run):
        (ckpt / "model.safetensors").write_bytes(b"damaged")
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.find(run, "best")
    assert "no intact checkpoint" in str(raised.value) and "Falling back" not in str(raised.value)


# --------------------------------------------------------------------------- a damaged labels.json


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ('{"x": 1}', "'names'"),
        ("not json at all", "not JSON"),
        ("[1, 2]", "JSON list"),
        ('{"names": ["neg", "pos"], "values": [0]}', "2 classes with 1 values"),
        ('{"names": ["neg", "pos"], "values": [0, 1], "counts": "many"}', "'counts'"),
    ],
    ids=["other-object", "not-json", "a-list", "values-short", "counts-not-a-list"],
)
@pytest.mark.parametrize("verb", ["predict", "explain", "eval"])
def test_a_damaged_labels_json_is_named(
    tmp_path: Path, classifier: Path, content: str, fault: str, verb: str
) -> None:
    run = copy_run(classifier, tmp_path)
    (run / "labels.json").write_text(content)
    result = invoke(verb, str(run), *(["great film"] if verb != "eval" else []))
    assert result.exit_code == 1, result.output
    text = flat(result)
    assert "labels.json is damaged" in text and fault in text and "train the run again" in text, text


def test_read_labels_accepts_what_train_writes(classifier: Path) -> None:
    from seqtrain.encoding import Labels, read_labels

    labels = read_labels(classifier / "labels.json")
    assert labels == Labels.from_json(json.loads((classifier / "labels.json").read_text()))


# --------------------------------------------------------------------------- init and model.init_from


def test_init_from_a_classifier_run_is_refused_and_writes_nothing(
    tmp_path: Path, data: Path, classifier: Path
) -> None:
    out = tmp_path / "ft.yaml"
    result = invoke("init", str(data), "-o", str(out), "--init-from", str(classifier))
    assert result.exit_code == 1, result.output
    assert "is a classifier run" in flat(result) and "seqtrain pretrain" in flat(result)
    assert not out.exists()


def test_init_from_a_language_model_prints_the_vocab_size_it_writes(
    tmp_path: Path, data: Path, language_model: Path
) -> None:
    out = tmp_path / "ft.yaml"
    result = invoke("init", str(data), "-o", str(out), "--init-from", str(language_model))
    assert result.exit_code == 0, result.output
    written = yaml.safe_load(out.read_text())["tokenizer"]["vocab_size"]
    assert written == yaml.safe_load((language_model / "config.yaml").read_text())["tokenizer"]["vocab_size"]
    assert re.search(rf"vocab_size {written:,}\b", flat(result)), result.output


def test_model_init_from_a_classifier_run_says_so_before_the_shapes(
    tmp_path: Path, data: Path, classifier: Path
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", data, tmp_path / "ft", model={"init_from": str(classifier), "cell": "lstm"}
    )
    result = invoke("train", str(cfg))
    assert result.exit_code == 2, result.output
    assert "model.init_from" in flat(result) and "is a classifier run" in flat(result), result.output
    assert "model.cell" not in flat(result).split("error:")[-1]
