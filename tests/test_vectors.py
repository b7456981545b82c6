"""Word vectors from unlabeled text (`pretrain.objective: vectors`, seqtrain/vectors.py) and starting a
classifier's embeddings from them (model.init_from), on real SST-2 text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from seqtrain import checkpoint
from seqtrain.cli import app
from seqtrain.config import Config, from_dict, to_dict
from seqtrain.encoding import PAD_ID, load_tokenizer
from seqtrain.errors import ConfigError
from seqtrain.model import build_model, load_pretrained_embeddings
from seqtrain.pretrain import init_from_pretrained, load_encoder, pretrain
from seqtrain.train import train
from tests.conftest import REAL_DATA, write_yaml

pytest.importorskip("gensim")
SST2 = REAL_DATA / "sst2"
runner = CliRunner()


def vectors_config(out: Path, **changes: dict) -> Config:
    raw = {
        "name": "vectors",
        "output_dir": str(out),
        "seed": 0,
        "data": {"path": str(SST2), "text_column": "sentence", "max_train_examples": 20000},
        "tokenizer": {"vocab_size": 3000},
        "model": {"embedding_dim": 24},
        "pretrain": {"objective": "vectors", "path": None, "vectors_epochs": 5},
        "train": {"num_threads": 1},
    }
    for section, values in changes.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def classifier_config(out: Path, init_from: Path | None, **model: object) -> Config:
    return from_dict(
        {
            "name": "ft",
            "output_dir": str(out),
            "seed": 0,
            "data": {
                "path": str(SST2),
                "text_column": "sentence",
                "max_train_examples": 3000,
                "max_eval_examples": 400,
                "max_length": 48,
            },
            "tokenizer": {"vocab_size": 3000},
            "model": {
                "cell": "gru",
                "embedding_dim": 24,
                "hidden_size": 16,
                "init_from": str(init_from) if init_from else None,
                **model,
            },
            "train": {"batch_size": 32, "epochs": 1, "lr": 0.005, "num_threads": 1, "log_every": 20},
        }
    )


@pytest.fixture(scope="module")
def vectors_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vectors") / "run"
    pretrain(vectors_config(out))
    return out


def test_the_run_holds_one_vector_per_token_id(vectors_run: Path) -> None:
    tokenizer = load_tokenizer(vectors_run / "tokenizer.json")
    ckpt, _ = checkpoint.find(vectors_run, "best")
    weights, state, _, _ = checkpoint.load(ckpt)
    assert state["kind"] == "word-vectors" and checkpoint.run_kind(vectors_run) == "word-vectors"
    matrix = weights["embedding.weight"]
    assert matrix.shape == (tokenizer.get_vocab_size(), 24)
    assert float(matrix[PAD_ID].abs().sum()) == 0.0
    summary = json.loads((vectors_run / "pretrain-summary.json").read_text())
    assert summary["tokens"] > 30_000 and summary["trained_vectors"] > 0.9 * tokenizer.get_vocab_size()
    # scaled like a fresh embedding's N(0, 1) rows
    assert 0.8 < float(matrix[1:].std()) < 1.2
    # vectors.txt is the same matrix in word2vec's text format, readable as model.pretrained_embeddings
    header = (vectors_run / "vectors.txt").read_text().split("\n", 1)[0]
    assert header == f"{tokenizer.get_vocab_size()} 24"
    model = build_model(classifier_config(vectors_run, None).model, tokenizer.get_vocab_size(), 2)
    found, _ = load_pretrained_embeddings(
        model, str(vectors_run / "vectors.txt"), tokenizer.get_vocab(), True
    )
    assert found == tokenizer.get_vocab_size() - 1  # every token but the padding row's
    good = tokenizer.token_to_id("good")
    assert torch.allclose(model.embedding.weight[good], matrix[good], atol=1e-4)


def test_the_vectors_learned_what_words_mean(vectors_run: Path) -> None:
    # Skip-gram on SST-2's phrases puts words used alike near each other: among the 3,000 tokens,
    # "movie" is one of the nearest to "film" (cosine after removing the vectors' common direction).
    # Random vectors put a given word in the top 2% once in fifty draws.
    tokenizer = load_tokenizer(vectors_run / "tokenizer.json")
    weights, _, _, _ = checkpoint.load(checkpoint.find(vectors_run, "best")[0])
    matrix = weights["embedding.weight"][1:]  # (V - 1, E) without the padding row
    matrix = torch.nn.functional.normalize(matrix - matrix.mean(0), dim=1)

    def rank(word: str, other: str) -> int:
        similarity = matrix @ matrix[tokenizer.token_to_id(word) - 1]  # (V - 1,)
        return int((similarity > similarity[tokenizer.token_to_id(other) - 1]).sum()) - 1  # itself first

    for word, other in (("film", "movie"), ("good", "great"), ("bad", "terrible")):
        assert rank(word, other) < 60, (word, other, rank(word, other))


def test_init_from_a_vectors_run_copies_the_embedding_and_nothing_else(
    vectors_run: Path, tmp_path: Path
) -> None:
    cfg = classifier_config(tmp_path / "ft", vectors_run, bidirectional=True)  # shapes other than dim: fine
    tokenizer, encoder = init_from_pretrained(cfg)
    assert list(encoder) == ["embedding.weight"]
    model = build_model(cfg.model, tokenizer.get_vocab_size(), 2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_encoder(model, encoder, str(vectors_run))
    assert torch.equal(model.embedding.weight, encoder["embedding.weight"])
    for name, tensor in model.state_dict().items():
        if not name.startswith("embedding."):
            assert torch.equal(tensor, fresh[name]), name


@pytest.mark.slow
def test_a_classifier_started_from_the_vectors_learns(vectors_run: Path, tmp_path: Path) -> None:
    raw = to_dict(classifier_config(tmp_path / "ft", vectors_run, ngrams=2, ngram_buckets=1 << 16))
    raw["train"]["epochs"] = 2
    report = train(from_dict(raw))
    assert report["accuracy"] > 0.6  # 400 validation phrases; half are positive
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["model"]["init_from"] == str(vectors_run)


def test_vectors_of_another_dimension_or_vocabulary_are_a_clear_error(
    vectors_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"model\.embedding_dim is 32, but the word vectors .* has 24"):
        init_from_pretrained(classifier_config(tmp_path / "a", vectors_run, embedding_dim=32))
    cfg = classifier_config(tmp_path / "b", vectors_run)
    raw = to_dict(cfg)
    raw["tokenizer"]["vocab_size"] = 5000
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size is 5000.*built with 3000"):
        init_from_pretrained(from_dict(raw))


def test_vectors_mistakes_on_the_command_line_exit_2_and_overwrite_nothing(
    vectors_run: Path, tmp_path: Path
) -> None:
    def files() -> dict[str, int]:  # the lock file aside: a refused run may take and release the lock
        return {p.name: p.stat().st_mtime_ns for p in vectors_run.iterdir() if p.name != ".lock"}

    before = files()
    config = tmp_path / "vectors.yaml"
    write_yaml(config, vectors_config(vectors_run))
    # --resume of a vectors run; a second vectors run into the same folder
    for args, says in (
        (["pretrain", str(config), "--resume"], "has no --resume"),
        (["pretrain", str(config)], "already holds a run"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and says in result.output, result.output
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    # a classifier of another dimension
    ft = tmp_path / "ft.yaml"
    write_yaml(ft, classifier_config(tmp_path / "ft", vectors_run, embedding_dim=16))
    result = runner.invoke(app, ["train", str(ft)])
    assert result.exit_code == 2 and "model.embedding_dim" in result.output, result.output
    assert files() == before


def test_resuming_a_run_with_ngrams_switched_on_is_refused(tmp_path: Path) -> None:
    cfg = classifier_config(tmp_path / "plain", None)
    raw = to_dict(cfg)
    raw["train"]["max_steps"] = 5
    train(from_dict(raw))
    raw["model"]["ngrams"] = 2
    config = tmp_path / "ngrams.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", str(config), "--resume"])
    assert result.exit_code == 2 and "model.ngrams" in result.output, result.output
