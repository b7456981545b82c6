from __future__ import annotations

from pathlib import Path

import pytest

from seqtrain.config import Config, field_docs, help_text, load_config
from seqtrain.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.path.startswith("data/"), "shipped configs read the datasets `make data` writes"


def test_shipped_configs_exist() -> None:
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {"quickstart.yaml", "sst2-lstm.yaml", "imdb-lstm.yaml", "imdb-gru.yaml", "imdb-rnn.yaml"} <= names


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_dotted_path_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "model:\n  hiden_size: 10\n"))
    assert "model.hiden_size" in str(e.value)
    assert "model.hidden_size" in str(e.value)
    assert e.value.exit_code == 2


def test_unknown_section_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))


def test_wrong_type_names_key_and_allowed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "train:\n  batch_size: lots\n"))
    assert "train.batch_size" in str(e.value) and "integer" in str(e.value)


def test_bad_choice_lists_choices_and_suggests(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "model:\n  cell: lstn\n"))
    msg = str(e.value)
    assert "'rnn', 'lstm', 'gru'" in msg and "Did you mean 'lstm'" in msg


def test_range_check(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.dropout must be in \[0, 1\)"):
        load_config(write(tmp_path, "model:\n  dropout: 1.5\n"))
    with pytest.raises(ConfigError, match=r"train.adversarial_eps must be 0 \(off\) or more, got -1.0"):
        load_config(write(tmp_path, "train:\n  adversarial_eps: -1\n"))
    with pytest.raises(ConfigError, match=r"train.vat_eps must be 0 \(off\) or more, got -0.5"):
        load_config(write(tmp_path, "train:\n  vat_eps: -0.5\n"))
    with pytest.raises(ConfigError, match=r"train.layer_lr_decay must be in \(0, 1\], got 0.0"):
        load_config(write(tmp_path, "train:\n  layer_lr_decay: 0\n"))
    with pytest.raises(ConfigError, match=r"train.unfreeze_every must be >= 0, got -3"):
        load_config(write(tmp_path, "train:\n  unfreeze_every: -3\n"))
    with pytest.raises(ConfigError, match=r"model.ngram_weighting: nb weights the n-gram path, which is off"):
        load_config(write(tmp_path, "model:\n  ngram_weighting: nb\n"))
    with pytest.raises(ConfigError, match=r"nb counts n-grams per class; model.task is regression"):
        load_config(write(tmp_path, "model:\n  ngram_weighting: nb\n  ngrams: 2\n  task: regression\n"))
    with pytest.raises(
        ConfigError, match=r"data.ngram_max_length sets how far the n-gram path reads, which is off"
    ):
        load_config(write(tmp_path, "data:\n  ngram_max_length: 4096\n"))
    with pytest.raises(ConfigError, match=r"data.ngram_max_length \(100\) is below data.max_length \(400\)"):
        load_config(write(tmp_path, "data:\n  ngram_max_length: 100\nmodel:\n  ngrams: 2\n"))


def test_int_accepted_for_float_but_not_bool_for_int(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "train:\n  lr: 1\n")).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(write(tmp_path, "train:\n  epochs: true\n"))


def test_duplicate_keys_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n"))


def test_python_tags_rejected_and_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"name: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, text))
    assert not marker.exists()


def test_overrides_go_through_validation(tmp_path: Path) -> None:
    p = write(tmp_path, "model:\n  cell: lstm\n")
    cfg = load_config(p, ["model.cell=gru", "train.lr=3e-4", "train.max_steps=10", "data.label_names=[a, b]"])
    assert cfg.model.cell == "gru" and cfg.train.lr == 3e-4 and cfg.train.max_steps == 10
    assert cfg.data.label_names == ["a", "b"]
    with pytest.raises(ConfigError, match="model.cel"):
        load_config(p, ["model.cel=gru"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(p, ["model.cell"])


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_output_dir_defaults_to_runs_name(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "name: abc\n"))
    assert str(cfg.run_dir) == "runs/abc"


def test_field_docstrings_are_the_help() -> None:
    from seqtrain.config import ModelConfig

    docs = field_docs(ModelConfig)
    assert "Recurrent cell" in docs["cell"]
    text = help_text()
    assert "model.pooling" in text and "train.grad_clip" in text
