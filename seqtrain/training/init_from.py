"""model.init_from: start a run from a `seqtrain pretrain` run (a language model or word vectors).

    pretrained_language_model  the run's tokenizer and whole language model, after checking the config
    init_from_pretrained       the same with the encoder's weights alone, named as in `Classifier`
    load_encoder               copy those into a classifier (or a language model's encoder)
    start_from_language_model  `pretrain` with model.init_from: the whole language model, or its encoder

Both recipes import this; neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from seqtrain import checkpoint, console
from seqtrain.config import Config, from_dict, read_yaml
from seqtrain.encoding import load_tokenizer
from seqtrain.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from seqtrain.model import Classifier, LanguageModel


def pretrained_language_model(cfg: Config) -> tuple[Tokenizer, dict[str, torch.Tensor]]:
    """model.init_from's tokenizer and whole language model, after checking that `cfg.model` and
    `cfg.tokenizer` match the run's. Errors name the key and both values."""
    source = Path(cfg.model.init_from or "")
    if not (source / "config.yaml").is_file() or not (source / "tokenizer.json").is_file():
        raise ConfigError(
            f"model.init_from: {str(source)!r} is not a `seqtrain pretrain` run directory "
            "(no config.yaml and tokenizer.json there)."
        )
    if checkpoint.run_kind(source) == checkpoint.CLASSIFIER:  # before its shapes: they are not the point
        raise ConfigError(
            f"model.init_from: {source} is a classifier run (written by `seqtrain train`), not a `seqtrain "
            "pretrain` run. Point it at a pretrain run's folder, or leave model.init_from out."
        )
    vectors = checkpoint.run_kind(source) == checkpoint.WORD_VECTORS  # only the embedding must fit
    theirs = from_dict(read_yaml(source / "config.yaml"))
    shapes = (
        ["embedding_dim"]
        if vectors
        else ["cell", "embedding_dim", "hidden_size", "num_layers", "bidirectional"]
    )
    for key in shapes:
        mine, other = getattr(cfg.model, key), getattr(theirs.model, key)
        if mine != other:
            what = "word vectors" if vectors else "pretrained encoder"
            raise ConfigError(
                f"model.{key} is {mine!r}, but the {what} in {source} has {other!r}. "
                f"Set model.{key}: {other!r} (or pretrain again with model.{key}: {mine!r})."
            )
    for key in ("kind", "vocab_size", "min_frequency", "lowercase"):
        mine, other = getattr(cfg.tokenizer, key), getattr(theirs.tokenizer, key)
        if mine != other:
            raise ConfigError(
                f"tokenizer.{key} is {mine!r}, but model.init_from reuses the tokenizer of {source}, built "
                f"with {other!r}. Set tokenizer.{key}: {other!r}."
            )
    ckpt, warnings = checkpoint.find(source, "best")
    for w in warnings:
        console.warn(w)
    weights, state, _, _ = checkpoint.load(ckpt)
    if state.get("kind") not in (checkpoint.LANGUAGE_MODEL, checkpoint.WORD_VECTORS):
        raise CheckpointError(
            f"model.init_from: {source} is a classifier run, not a `seqtrain pretrain` run."
        )
    return load_tokenizer(source / "tokenizer.json"), weights


def init_from_pretrained(cfg: Config) -> tuple[Tokenizer, dict[str, torch.Tensor]]:
    """The pretrained run's tokenizer and its encoder weights (names as in `Classifier`), after checking
    that `cfg.model` and `cfg.tokenizer` match the run's. Errors name the key and both values."""
    tokenizer, weights = pretrained_language_model(cfg)
    return tokenizer, encoder_of(weights)


def encoder_of(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A language model's encoder weights under the classifier's names; a vectors run's weights
    (`embedding.weight` alone) as they are."""
    if "embedding.weight" in weights:
        return weights
    return {k.removeprefix("encoder."): v for k, v in weights.items() if k.startswith("encoder.")}


def start_from_language_model(cfg: Config, model: LanguageModel) -> str:
    """`pretrain` with model.init_from: start from that run's language model, whole when the output
    layers have the same shapes (same pretrain.softmax and sizes), else its encoder; says which."""
    _, weights = pretrained_language_model(cfg)  # checks the shapes and the tokenizer keys
    if "embedding.weight" in weights:  # a vectors run
        load_encoder(model.encoder, weights, cfg.model.init_from or "")
        return "the word vectors (the embedding; the recurrent and output layers start fresh)"
    own = model.state_dict()
    if weights.keys() == own.keys() and all(own[k].shape == v.shape for k, v in weights.items()):
        model.load_state_dict(weights)
        return "the whole language model"
    load_encoder(model.encoder, encoder_of(weights), cfg.model.init_from or "")
    return "the encoder (the output layer differs: another pretrain.softmax) and a fresh output layer"


def load_encoder(model: Classifier, encoder: dict[str, torch.Tensor], source: str) -> None:
    """Copy the pretrained embedding and recurrent layers into `model`; its head keeps its fresh start."""
    own = model.state_dict()
    for name, tensor in encoder.items():
        if name not in own:
            raise ConfigError(f"model.init_from: {source} holds {name}, which this model does not have.")
        if own[name].shape != tensor.shape:
            raise ConfigError(
                f"model.init_from: {name} is {tuple(tensor.shape)} in {source} but "
                f"{tuple(own[name].shape)} here; the vocabulary or model shapes differ."
            )
    # a vectors run holds the embedding alone; a language model also the recurrent layers
    parts = ("embedding.", "layers.") if any(n.startswith("layers.") for n in encoder) else ("embedding.",)
    missing = [n for n in own if n.startswith(parts) and n not in encoder]
    if missing:
        raise ConfigError(f"model.init_from: {source} lacks {', '.join(missing[:3])}.")
    model.load_state_dict(encoder, strict=False)
