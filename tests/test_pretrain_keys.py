"""`seqtrain pretrain` and the keys it reads: errors name the pretrain.* key at fault, data.on_bad_rows
holds for .txt texts, and train keys a language model does not use are said to be ignored. In-process
through Typer's runner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from seqtrain.config import PRETRAIN_IGNORES, TrainConfig, to_dict
from tests.conftest import synthetic_rows, tiny_config, write_hub_folder
from tests.test_run_dirs import flat, invoke


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Unlabeled texts, one a line, with one line that is not UTF-8."""
    lines = [r["text"].encode() for r in synthetic_rows(120, 3)]
    path = tmp_path_factory.mktemp("texts") / "unlabeled.txt"
    path.write_bytes(b"\n".join([*lines[:60], b"caf\xe9 \xff\xfe great", *lines[60:]]) + b"\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = {"train": synthetic_rows(120, 0), "validation": synthetic_rows(40, 1)}
    return write_hub_folder(tmp_path_factory.mktemp("data") / "tiny", splits)


def config(tmp: Path, data: Path, texts: Path | None, **train: object) -> str:
    pre = {
        "path": str(texts) if texts else None,
        "max_length": 32,
        "heldout_fraction": 0.1,
        "softmax": "full",
    }
    raw = to_dict(
        tiny_config(
            data,
            tmp / "lm",
            data={"on_bad_rows": "skip"},
            train={"max_steps": 2, "log_every": 1, **train},
            pretrain=pre,
        )
    )
    (tmp / "lm.yaml").write_text(yaml.safe_dump(raw))
    return str(tmp / "lm.yaml")


def test_on_bad_rows_skip_holds_for_txt_texts(tmp_path: Path, data: Path, texts: Path) -> None:
    result = invoke("pretrain", config(tmp_path, data, texts))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "lm" / "run.json").read_text())["bad_rows"] == {
        "text is not valid UTF-8": 1
    }


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pretrain.path={tmp}/nope.txt", r"pretrain\.path '.*nope\.txt' does not exist"),
        (
            "pretrain.text_column=body",
            r"no column 'body' \(pretrain\.text_column\).*Set pretrain\.text_column",
        ),
    ],
    ids=["path", "text-column"],
)
def test_errors_about_the_pretraining_texts_name_pretrain_keys(
    tmp_path: Path, data: Path, texts: Path, override: str, message: str
) -> None:
    result = invoke("pretrain", config(tmp_path, data, texts), override.format(tmp=tmp_path))
    assert result.exit_code == 1, result.output
    assert re.search(message, flat(result)) and "data.path" not in flat(result), result.output


def test_adaptive_cutoffs_left_out_are_said(tmp_path: Path, data: Path) -> None:
    result = invoke(
        "pretrain",
        config(tmp_path, data, None),
        "pretrain.softmax=adaptive",
        "pretrain.adaptive_cutoffs=[20, 10000]",
    )
    assert result.exit_code == 0, result.output
    assert re.search(
        r"pretrain\.adaptive_cutoffs \[20, 10000\]: the vocabulary has \d+ tokens, "
        r"so the softmax uses \[20\]",
        flat(result),
    ), result.output


def test_train_keys_pretrain_ignores_are_warned_one_line_each(tmp_path: Path, data: Path) -> None:
    result = invoke(
        "pretrain",
        config(tmp_path, data, None),
        "train.patience=2",
        "train.label_smoothing=0.1",
        "train.tensorboard=false",
    )
    assert result.exit_code == 0, result.output
    warned = re.findall(r"train\.(\w+) is .*?ignores it", result.output)
    assert warned == ["label_smoothing", "patience"], result.output  # not tensorboard: left at its default


def test_every_ignored_key_is_a_train_key_and_config_help_says_so() -> None:
    assert set(PRETRAIN_IGNORES) <= {f for f in TrainConfig.__dataclass_fields__}
    result = invoke("config-help")
    for key in PRETRAIN_IGNORES:
        line = next(x for x in result.output.splitlines() if x.strip().startswith(f"train.{key} "))
        assert line.endswith("[train and tune only; pretrain ignores it]"), line
    assert "pretrain ignores" not in next(
        x for x in result.output.splitlines() if "train.deterministic " in x
    )


def test_train_deterministic_is_honoured_by_pretrain(tmp_path: Path, data: Path) -> None:
    try:
        result = invoke("pretrain", config(tmp_path, data, None), "train.deterministic=true")
        assert result.exit_code == 0, result.output
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
