"""Typed configuration: dataclasses that mirror the YAML one to one.

Each field's docstring (the string literal under it) is its help text: `seqtrain train --help`
and error messages read them from here (with `ast`; where the sources are not installed, from
config_help.json, their snapshot: `python -m seqtrain.config` refreshes it, tests keep it current).
Loading a config reads no help text unless it has an error to explain. Loading validates every key and
value and raises `ConfigError` with the dotted path, what is allowed, and a did-you-mean for unknown keys.

This module must stay cheap to import (no torch, no datasets): it runs before `--help`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from seqtrain.errors import ConfigError

Cell = Literal["rnn", "lstm", "gru"]
Pooling = Literal["last", "mean", "max", "attention"]


@dataclass(kw_only=True)
class DataConfig:
    path: str = "data/sst2"
    """Hub id (`stanfordnlp/imdb`), a local dataset folder in the Hub layout, or a data file / glob (.parquet,
    .csv, .jsonl, .txt)."""
    eval_path: str | None = None
    """Data file / glob for the eval split when `path` is a single file (else the eval split is read from
    `path`)."""
    text_column: str = "text"
    """Column holding the text."""
    label_column: str = "label"
    """Column holding the label (integers or strings)."""
    label_names: list[str] | None = None
    """Class names in label order; default: the dataset's ClassLabel names, else the sorted label values."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "validation"
    """Split evaluated during and after training (best checkpoint is chosen on it)."""
    validation_split: float | None = None
    """A fraction (e.g. 0.1): hold out that part of train_split, chosen by a hash of each text (the same rows
    in every pass, worker, rank and resume), never train on it, and evaluate on it under the name eval_split.
    For data without a validation split, so that the test split is read only by
    `seqtrain eval --split test`."""
    max_length: int = 400
    """Texts are cut to this many tokens."""
    truncation: Literal["head", "tail", "head+tail"] = "head"
    """Which tokens survive truncation: the first, the last, or half of each."""
    ngram_max_length: int | None = None
    """With model.ngrams: the n-gram path reads each text up to this many tokens (cut as data.truncation
    says), while the recurrent path still reads data.max_length of them (the model cuts them out), so a
    long review's every n-gram counts at the recurrent path's cost; measured on IMDB in BENCHMARKS.md.
    null: both paths read the same data.max_length tokens."""
    chunk_size: int = 4096
    """Examples read, shuffled and sorted by length together; batches are cut from each sorted chunk, then
    shuffled."""
    num_workers: int | None = None
    """DataLoader worker processes that stream, tokenize and batch ahead of the model; 0 = in the main
    process; null = 1 when there are more than 2 physical cores, else 0 (on 2 cores the model's threads use
    both, and a worker only preempts them)."""
    max_train_examples: int | None = None
    """Read only the first N training rows (quick experiments and tests)."""
    max_eval_examples: int | None = None
    """Evaluate on only the first N rows of the eval split."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """Empty texts, null fields, labels outside label_names, bytes that are not UTF-8, CSV lines with too many
    fields: stop with an error naming the row or line, or skip them (counted in the logs; pandas names each
    skipped CSV line)."""


@dataclass(kw_only=True)
class TokenizerConfig:
    kind: Literal["word", "bpe"] = "word"
    """`word`: whole words and punctuation; `bpe`: a subword vocabulary, so rare or misspelt words are not
    <unk>."""
    vocab_size: int = 30000
    """Largest vocabulary, special tokens included."""
    min_frequency: int = 2
    """Tokens seen fewer times than this in the training split become <unk>."""
    lowercase: bool = True
    """Lower-case text before tokenizing."""
    max_examples: int | None = None
    """Build the vocabulary from at most this many training texts (default: all)."""


@dataclass(kw_only=True)
class ModelConfig:
    task: Literal["classification", "regression"] = "classification"
    """classification: one class per text (any number of classes); regression: one number per text (a score,
    stars)."""
    cell: Cell = "lstm"
    """Recurrent cell."""
    embedding_dim: int = 128
    """Size of the token embeddings."""
    hidden_size: int = 256
    """Hidden units per direction and layer."""
    num_layers: int = 1
    """Stacked recurrent layers."""
    bidirectional: bool = False
    """Also read each text right to left (within its own length, so padding never enters)."""
    dropout: float = 0.2
    """Dropout between recurrent layers and before the classifier."""
    embedding_dropout: float = 0.0
    """Dropout on the embedded tokens."""
    word_dropout: float = 0.0
    """Training only: replace this fraction of the real tokens with <unk>, so no single word decides."""
    weight_drop: float = 0.0
    """Training only: dropout on the recurrent (hidden-to-hidden) weights, one mask per batch (DropConnect, as
    in AWD-LSTM)."""
    ngrams: int = 0
    """A wide path beside the recurrent one: a linear model over the presence of each text's 1..ngrams-grams
    (unigrams by token id, longer n-grams hashed into ngram_buckets), its output averaged with the recurrent
    head's at evaluation and prediction. In training each path has its own loss on the same batch, so
    neither leans on the other. 0 = off; 2 (unigrams and bigrams) is the usual choice."""
    ngram_weighting: Literal["none", "nb"] = "none"
    """model.ngrams with classes: `nb` scales each n-gram by its naive Bayes log-count ratio (counted on the
    training split when a run starts, saved with the weights), as NB-weighted logistic regression does, so
    telling n-grams learn first; `none`: plain presence."""
    ngram_buckets: int = 1048576
    """Hash buckets for the n-grams longer than one token (model.ngrams >= 2); each holds one weight per
    output."""
    pooling: Pooling = "last"
    """How the sequence becomes one vector: the last real step, mean or max over real steps, or attention."""
    head_norm: bool = False
    """Batch-normalize the pooled vector before the head, as ULMFiT's classifier does: a language model's
    pooled states differ little from text to text (model.init_from), and a head reading them raw learns
    slowly."""
    pretrained_embeddings: str | None = None
    """GloVe or word2vec text file (`word v1 v2 ...` per line; a `count dim` header is skipped) to start the
    embeddings from; its dimension must equal embedding_dim."""
    freeze_embeddings: bool = False
    """Keep pretrained embeddings fixed during training."""
    init_from: str | None = None
    """Run directory of `seqtrain pretrain`: reuse its tokenizer and start the embeddings and recurrent layers
    from its language model (the head starts fresh). The cell and shapes must match it. In `seqtrain
    pretrain` itself: continue that language model on this config's texts (ULMFiT's second stage)."""
    regression_head: Literal["scalar", "distribution"] = "scalar"
    """Regression: one output trained with `regression_loss`, or (integer targets such as stars) a softmax
    over the values seen in training, trained with cross-entropy, predicting its expected value."""
    regression_loss: Literal["mse", "huber"] = "mse"
    """Regression loss of the scalar head (huber is less hurt by outliers)."""
    emd_weight: float = 0.0
    """Distribution head: add this times the squared earth mover's distance between the predicted and the true
    distribution over the ordered values (cross-entropy alone treats 1 vs 10 stars like 1 vs 2); 0 = off."""
    standardize_targets: bool = True
    """Regression: train on (target - mean) / std of the training targets; predictions are mapped back."""
    bounded: bool = False
    """Regression: squash the output with a sigmoid into [0, 1] (for scores in [0, 1]; turns standardising
    off)."""


@dataclass(kw_only=True)
class TrainConfig:
    batch_size: int = 64
    """Texts per training step."""
    epochs: int = 3
    """Passes over the training split."""
    max_steps: int | None = None
    """Stop after this many steps, whatever `epochs` says."""
    lr: float = 2e-3
    """Peak learning rate."""
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    """Optimizer."""
    weight_decay: float = 0.01
    """Decoupled weight decay (adamw) or L2 (adam, sgd); not applied to biases and embeddings' padding row."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warm-up: none, linear to zero, or cosine to zero."""
    warmup_steps: int = 0
    """Steps of linear warm-up from zero to `lr`."""
    grad_clip: float | None = 1.0
    """Clip the gradient's global norm to this (recurrent gradients explode); null turns it off."""
    label_smoothing: float = 0.0
    """Label smoothing for the cross-entropy loss."""
    ema_decay: float | None = None
    """Evaluate and save an exponential moving average of the weights (e.g. 0.999); null = the raw weights.
    The average warms up as min(ema_decay, (1 + step) / (10 + step)), so early evaluations are not stuck
    near the initial weights."""
    adversarial_eps: float = 0.0
    """Adversarial training (Miyato et al., 2017): each step also trains on the batch with every text's
    embeddings moved by this L2 norm in the direction that raises its loss most (configs/imdb-best.yaml
    uses 1.0); a second forward and backward pass per step; 0 = off."""
    vat_eps: float = 0.0
    """Virtual adversarial training (Miyato et al., 2017), classification only: each step also moves the
    embeddings of a batch of unlabeled texts (pretrain.path, cut as data.max_length says; the labelled batch
    when pretrain.path is null) by this L2 norm in the direction that changes the prediction most, and
    trains the prediction not to change; needs no labels; costs about 3x per step; 0 = off."""
    layer_lr_decay: float = 1.0
    """Discriminative fine-tuning (ULMFiT): each layer group below the head learns at this fraction of the
    rate of the group above it (the head at lr, the top recurrent layer at lr * d, ..., the embeddings at
    lr * d^(num_layers + 1)); ULMFiT uses 1 / 2.6; 1 = one rate for all."""
    unfreeze_every: int = 0
    """Gradual unfreezing (ULMFiT): train only the head for this many steps, then unfreeze one more layer
    group from the top every this many steps (recurrent layers, then the embeddings); 0 = all train."""
    class_weights: Literal["none", "balanced"] = "none"
    """Classification: `balanced` weighs each class's loss by n / (classes * count), for imbalanced labels."""
    eval_every: int = 0
    """Evaluate (and write `last/`) every N steps; 0 = at the end of each epoch."""
    log_every: int = 50
    """Write a training line to metrics.jsonl every N steps."""
    patience: int | None = None
    """Stop after this many evaluations without improvement of `monitor`; null = never stop early."""
    monitor: Literal["auto", "accuracy", "f1_macro", "loss", "mae", "rmse", "r2", "spearman"] = "auto"
    """Eval metric that picks `best/` and drives early stopping; auto = accuracy (classification) or mae
    (regression)."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """Where to train; `auto` takes CUDA when present, else the CPU."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision on CUDA; the CPU always trains in fp32."""
    num_threads: int | None = None
    """Intra-op threads; default: the physical cores."""
    keep_last: int = 1
    """Periodic checkpoints kept besides `best/`."""
    deterministic: bool = False
    """Turn on torch.use_deterministic_algorithms."""
    tensorboard: bool = False
    """Also log to TensorBoard (run_dir/tensorboard; needs `pip install 'seqtrain[tensorboard]'`)."""
    trace_examples: bool = False
    """Write trained-examples.tsv: the step and a hash of every example trained on (audits resume: no replay,
    no gap)."""


@dataclass(kw_only=True)
class PretrainConfig:
    objective: Literal["lm", "vectors"] = "lm"
    """What `seqtrain pretrain` learns: `lm`, the whole encoder as a language model (next and previous token);
    `vectors`, word vectors only (gensim's skip-gram or fastText, minutes on a CPU), for model.init_from to
    start the embeddings from."""
    vectors_algorithm: Literal["skipgram", "cbow", "fasttext"] = "skipgram"
    """objective vectors: word2vec skip-gram, word2vec CBOW (faster, a little weaker), or fastText skip-gram
    with character n-grams (rare words share their subwords' vectors)."""
    vectors_window: int = 5
    """objective vectors: context words on each side."""
    vectors_epochs: int = 5
    """objective vectors: passes over the texts."""
    vectors_negative: int = 5
    """objective vectors: negative samples per context word."""
    path: str | None = None
    """Unlabeled texts for `seqtrain pretrain`: anything data.path accepts (Hub id, local folder, data files);
    null = only the labelled training texts."""
    split: str = "train"
    """Split of `pretrain.path` to read."""
    text_column: str = "text"
    """Column of `pretrain.path` holding the text."""
    add_train_texts: bool = True
    """Also learn from the texts (never the labels) of data.path's data.train_split."""
    heldout_fraction: float = 0.01
    """Rows held out of training for the held-out perplexity, chosen by a hash of the text (stable under
    streaming and resume)."""
    max_heldout_texts: int = 200
    """Held-out texts scored at each evaluation (full softmax over the vocabulary)."""
    max_length: int = 256
    """Texts are cut to their first this many tokens."""
    softmax: Literal["sampled", "adaptive", "full"] = "adaptive"
    """Output layer: torch's adaptive softmax, sampled softmax with shared negatives, or the full softmax
    (the slowest by far). In the same minutes adaptive takes fewer steps than sampled but reaches a lower
    held-out perplexity (`python -m bench.pretrain`; docs/experiments/lm-pretraining.md)."""
    num_samples: int = 1024
    """sampled: negatives per step, shared by every position of the batch."""
    adaptive_cutoffs: list[int] = field(default_factory=lambda: [2000, 10000])
    """adaptive: vocabulary ids where the head and each tail cluster end."""


@dataclass(kw_only=True)
class Config:
    name: str = "run"
    """Run name; the default output directory is runs/<name>."""
    output_dir: str | None = None
    """Run directory (default: runs/<name>)."""
    seed: int = 0
    """Seed for weights, dropout and data order."""
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir if self.output_dir is not None else f"runs/{self.name}")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "pretrain": PretrainConfig,
}


# --------------------------------------------------------------------------- help text


HELP_SNAPSHOT = "config_help.json"


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass, read from its source with `ast`, or from the
    snapshot shipped beside this module where the sources are not (bytecode-only installs)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return _help_snapshot().get(cls.__name__, {})
    tree = ast.parse(textwrap.dedent(source))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in itertools.pairwise(body):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _help_snapshot() -> dict[str, dict[str, str]]:
    import json
    from importlib.resources import files

    try:
        return json.loads(files("seqtrain").joinpath(HELP_SNAPSHOT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def help_snapshot() -> dict[str, dict[str, str]]:
    """What config_help.json holds: each config class's field docs, read from the source."""
    return {cls.__name__: field_docs(cls) for cls in (Config, *SECTIONS.values())}


def describe_type(tp: Any) -> str:
    """A short human description of an annotation: `int`, `one of 'rnn', 'lstm'`, `a float or null`."""
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(describe_type(a) for a in args)
        return f"{inner} or null" if len(args) < len(get_args(tp)) else inner
    if origin is list:
        return f"a list of {describe_type(get_args(tp)[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


# train keys that only `seqtrain train` (and tune's trials) use: pretrain warns when one is set
PRETRAIN_IGNORES = (
    "label_smoothing",
    "ema_decay",
    "adversarial_eps",
    "vat_eps",
    "layer_lr_decay",
    "unfreeze_every",
    "class_weights",
    "patience",
    "monitor",
    "tensorboard",
    "trace_examples",
)


def help_text() -> str:
    """Every config key with its default and help, section by section (for `train --help`); the train keys
    that `seqtrain pretrain` ignores say so."""
    lines: list[str] = []
    for section, cls in [("", Config), *SECTIONS.items()]:
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        lines.append(f"{section or 'top level'}:")
        for f in dataclasses.fields(cls):
            if f.name in SECTIONS:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            lines.append(
                f"  {(section + '.' if section else '') + f.name} "
                f"({describe_type(hints[f.name])}, default {default!r}): {docs.get(f.name, '')}"
                + (
                    " [train and tune only; pretrain ignores it]"
                    if cls is TrainConfig and f.name in PRETRAIN_IGNORES
                    else ""
                )
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader (no python tags, nothing executed) that also refuses duplicate keys."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(
                f"duplicate key {key!r} at line {key_node.start_mark.line + 1}: each key may appear once."
            )
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def safe_parse(text: str) -> Any:
    """Parse YAML with the strict safe loader: plain data only, no python tags, no duplicate keys."""
    loader = _StrictLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely; every failure becomes a ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {str(path)!r}: {e}") from None
    try:
        return safe_parse(text)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML (python tags are refused): {e}") from None


# --------------------------------------------------------------------------- validation


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, tp: Any, where: str, help_: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = get_origin(tp)
    bad = ConfigError(
        f"{where} must be {describe_type(tp)}, got {value!r}." + (f" ({where}: {help_})" if help_ else "")
    )
    if origin is Literal:
        if value not in get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in get_args(tp)], n=1)
            raise ConfigError(str(bad) + (f" Did you mean {close[0]!r}?" if close else ""))
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where, help_)
            except ConfigError:
                pass
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, get_args(tp)[0], f"{where}[{i}]", help_) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        if not math.isfinite(value):  # .nan, .inf: no setting means "not a number" or "infinite"
            raise ConfigError(f"{where} must be a finite number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {raw!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(
                f"unknown config key {where!r}.{_suggest(where, valid)} Valid keys here: {', '.join(names)}."
            )
        if key in SECTIONS and cls is Config:
            kwargs[key] = _build(SECTIONS[key], value if value is not None else {}, f"{key}.")
        else:
            try:
                kwargs[key] = _coerce(value, hints[key], where, "")
            except ConfigError:  # again, to say what the key means: help is read only for errors
                kwargs[key] = _coerce(value, hints[key], where, field_docs(cls).get(key, ""))
    return cls(**kwargs)


MAX_PARAMETERS = 1_000_000_000  # 4 GB of fp32 weights, 16 GB with AdamW's state and the gradients


def estimate_parameters(cfg: Config) -> int:
    """About how many weights the model has: embeddings plus the recurrent layers (the head is small)."""
    m = cfg.model
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[m.cell] * (2 if m.bidirectional else 1)
    first = gates * m.hidden_size * (m.embedding_dim + m.hidden_size + 2)
    later = gates * m.hidden_size * (m.hidden_size * (2 if m.bidirectional else 1) + m.hidden_size + 2)
    return cfg.tokenizer.vocab_size * m.embedding_dim + first + (m.num_layers - 1) * later


def _check_name(name: str) -> None:
    """`name` becomes runs/<name>: one plain folder name, printable."""
    if not name.strip():
        raise ConfigError(f"name must not be empty (got {name!r}): the run directory is runs/<name>.")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ConfigError(
            f"name {name!r} holds control characters (a newline, a tab, ...); use a plain folder name."
        )
    if "/" in name or "\\" in name or name.strip() in (".", ".."):
        raise ConfigError(
            f"name {name!r} must be a plain folder name (no / or \\, not . or ..): "
            "the run directory is runs/<name>. "
            "To write elsewhere, set output_dir."
        )


def _check_values(cfg: Config) -> None:
    """Range checks that a type alone cannot express."""
    _check_name(cfg.name)
    positive = {
        "data.max_length": cfg.data.max_length,
        "data.chunk_size": cfg.data.chunk_size,
        "tokenizer.vocab_size": cfg.tokenizer.vocab_size,
        "tokenizer.min_frequency": cfg.tokenizer.min_frequency,
        "model.embedding_dim": cfg.model.embedding_dim,
        "model.hidden_size": cfg.model.hidden_size,
        "model.num_layers": cfg.model.num_layers,
        "train.batch_size": cfg.train.batch_size,
        "train.epochs": cfg.train.epochs,
        "train.log_every": cfg.train.log_every,
        "train.keep_last": cfg.train.keep_last,
    }
    for key, v in positive.items():
        if v < 1:
            raise ConfigError(f"{key} must be at least 1, got {v}.")
    optional_positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.patience": cfg.train.patience,
        "train.num_threads": cfg.train.num_threads,
        "data.max_train_examples": cfg.data.max_train_examples,
        "data.max_eval_examples": cfg.data.max_eval_examples,
        "tokenizer.max_examples": cfg.tokenizer.max_examples,
    }
    for key, opt in optional_positive.items():
        if opt is not None and opt < 1:
            raise ConfigError(f"{key} must be at least 1 or null, got {opt}.")
    for key, p in {
        "model.dropout": cfg.model.dropout,
        "model.embedding_dropout": cfg.model.embedding_dropout,
        "model.word_dropout": cfg.model.word_dropout,
        "model.weight_drop": cfg.model.weight_drop,
        "train.label_smoothing": cfg.train.label_smoothing,
        "train.ema_decay": cfg.train.ema_decay or 0.0,
    }.items():
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"{key} must be in [0, 1), got {p}.")
    if not 0 <= cfg.model.ngrams <= 3:
        raise ConfigError(f"model.ngrams must be 0 (off), 1, 2 or 3, got {cfg.model.ngrams}.")
    if cfg.model.ngram_weighting == "nb" and not cfg.model.ngrams:
        raise ConfigError(
            "model.ngram_weighting: nb weights the n-gram path, which is off (model.ngrams: 0). "
            "Set model.ngrams: 2, or model.ngram_weighting: none."
        )
    if cfg.model.ngram_weighting == "nb" and cfg.model.task == "regression":
        raise ConfigError(
            "model.ngram_weighting: nb counts n-grams per class; model.task is regression. "
            "Set model.ngram_weighting: none."
        )
    if cfg.data.ngram_max_length is not None and not cfg.model.ngrams:
        raise ConfigError(
            "data.ngram_max_length sets how far the n-gram path reads, which is off (model.ngrams: 0). "
            "Set model.ngrams: 2, or data.ngram_max_length: null."
        )
    if cfg.data.ngram_max_length is not None and cfg.data.ngram_max_length < cfg.data.max_length:
        raise ConfigError(
            f"data.ngram_max_length ({cfg.data.ngram_max_length}) is below data.max_length "
            f"({cfg.data.max_length}): the n-gram path reads at least the recurrent path's tokens. "
            "Raise it, or set it to null."
        )
    if cfg.model.ngram_buckets < 1:
        raise ConfigError(f"model.ngram_buckets must be at least 1, got {cfg.model.ngram_buckets}.")
    if cfg.model.emd_weight < 0:
        raise ConfigError(f"model.emd_weight must be 0 or more, got {cfg.model.emd_weight}.")
    if cfg.model.emd_weight and not (
        cfg.model.task == "regression" and cfg.model.regression_head == "distribution"
    ):
        raise ConfigError(
            "model.emd_weight applies to model.task: regression with model.regression_head: distribution; "
            "set it to 0 or use that head."
        )
    if cfg.train.lr <= 0:
        raise ConfigError(f"train.lr must be positive, got {cfg.train.lr}.")
    if cfg.train.adversarial_eps < 0:
        raise ConfigError(f"train.adversarial_eps must be 0 (off) or more, got {cfg.train.adversarial_eps}.")
    if cfg.train.vat_eps < 0:
        raise ConfigError(f"train.vat_eps must be 0 (off) or more, got {cfg.train.vat_eps}.")
    if cfg.train.vat_eps and cfg.model.task == "regression":
        raise ConfigError(
            "train.vat_eps needs class probabilities to compare; model.task is regression. "
            "Set train.vat_eps: 0."
        )
    if not 0 < cfg.train.layer_lr_decay <= 1:
        raise ConfigError(f"train.layer_lr_decay must be in (0, 1], got {cfg.train.layer_lr_decay}.")
    if cfg.train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {cfg.train.weight_decay}.")
    if cfg.train.grad_clip is not None and cfg.train.grad_clip <= 0:
        raise ConfigError(f"train.grad_clip must be positive or null, got {cfg.train.grad_clip}.")
    for key, n in {
        "train.eval_every": cfg.train.eval_every,
        "train.warmup_steps": cfg.train.warmup_steps,
        "train.unfreeze_every": cfg.train.unfreeze_every,
        "data.num_workers": cfg.data.num_workers or 0,
    }.items():
        if n < 0:
            raise ConfigError(f"{key} must be >= 0, got {n}.")
    if cfg.data.label_names is not None and len(set(cfg.data.label_names)) != len(cfg.data.label_names):
        raise ConfigError(f"data.label_names has duplicates: {cfg.data.label_names}.")
    if (
        cfg.data.label_names is not None
        and len(cfg.data.label_names) < 2
        and cfg.model.task == "classification"
    ):
        raise ConfigError(
            f"data.label_names must name two or more classes, got {cfg.data.label_names}; "
            "remove the key (or set it to null) to take the class names from the data."
        )
    n_params = estimate_parameters(cfg)
    if n_params > MAX_PARAMETERS:
        m = cfg.model
        raise ConfigError(
            f"model.hidden_size {m.hidden_size}, model.embedding_dim {m.embedding_dim}, "
            f"model.num_layers {m.num_layers} and tokenizer.vocab_size {cfg.tokenizer.vocab_size} "
            f"give about {n_params:.3g} parameters ({n_params * 16 / 1e9:,.0f} GB to train with AdamW); "
            f"the limit is {MAX_PARAMETERS:.0e}. Make them smaller."
        )
    regression_metrics = {"mae", "rmse", "r2", "spearman"}
    if cfg.model.task == "classification" and cfg.train.monitor in regression_metrics:
        raise ConfigError(
            f"train.monitor {cfg.train.monitor!r} is a regression metric; "
            "for classification use accuracy, f1_macro or loss."
        )
    if cfg.model.task == "regression" and cfg.train.monitor in {"accuracy", "f1_macro"}:
        raise ConfigError(
            f"train.monitor {cfg.train.monitor!r} needs classes; "
            "for regression use mae, rmse, r2, spearman or loss."
        )
    if cfg.model.regression_head == "distribution" and cfg.model.bounded:
        raise ConfigError(
            "model.bounded applies to the scalar regression head; with regression_head: distribution "
            "the prediction already lies between the smallest and largest target."
        )
    if cfg.data.text_column == cfg.data.label_column:
        raise ConfigError("data.text_column and data.label_column name the same column.")
    if cfg.data.validation_split is not None:
        if not 0.0 < cfg.data.validation_split < 0.5:
            raise ConfigError(f"data.validation_split must be in (0, 0.5), got {cfg.data.validation_split}.")
        if cfg.data.eval_split == cfg.data.train_split:
            raise ConfigError(
                f"data.validation_split holds out part of {cfg.data.train_split!r} under the name "
                f"data.eval_split, which must differ from data.train_split (e.g. eval_split: validation)."
            )
    if not 0.0 < cfg.pretrain.heldout_fraction < 0.5:
        raise ConfigError(
            f"pretrain.heldout_fraction must be in (0, 0.5), got {cfg.pretrain.heldout_fraction}."
        )
    for key, n in {
        "pretrain.max_heldout_texts": cfg.pretrain.max_heldout_texts,
        "pretrain.max_length": cfg.pretrain.max_length,
        "pretrain.num_samples": cfg.pretrain.num_samples,
        "pretrain.vectors_window": cfg.pretrain.vectors_window,
        "pretrain.vectors_epochs": cfg.pretrain.vectors_epochs,
        "pretrain.vectors_negative": cfg.pretrain.vectors_negative,
    }.items():
        if n < 1:
            raise ConfigError(f"{key} must be at least 1, got {n}.")


def from_dict(raw: Any) -> Config:
    """Validate a plain dict (parsed YAML) into a Config."""
    cfg = _build(Config, raw if raw is not None else {}, "")
    _check_values(cfg)
    return cfg


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings to a raw dict; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. model.cell=gru.")
        key, _, text = item.partition("=")
        try:
            value = safe_parse(text) if text else None
        except yaml.YAMLError:
            value = text
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            if not isinstance(node.get(part, {}), dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section.")
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config file; errors name the file and the key."""
    raw = read_yaml(Path(path))
    if raw is None:
        raise ConfigError(
            f"{path} is empty: a config needs at least data.path "
            "(an empty file would train every default on data/sst2). "
            "Start from one in configs/, or run `seqtrain init DATA`."
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values (name:, data:, model:, ...).")
    raw = apply_overrides(raw, overrides or [])
    try:
        return from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# Keys that may differ between the first run and a --resume; everything else must match.
RESUMABLE_CHANGES = {
    "name",
    "output_dir",
    "train.epochs",
    "train.max_steps",
    "train.lr",
    "train.eval_every",
    "train.log_every",
    "train.patience",
    "train.keep_last",
    "train.device",
    "train.num_threads",
    "data.max_eval_examples",
}


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            keys.append(f"{prefix}{k}")
    return keys


def total_steps(t: TrainConfig, steps_per_epoch: int) -> int:
    """The steps a run trains if nothing stops it: train.epochs of `steps_per_epoch`, at most
    train.max_steps (unset or 0: no cap). Both loops and tune's progress read this."""
    return min(t.max_steps or 10**12, t.epochs * steps_per_epoch)


def monitored(t: TrainConfig, regression: bool) -> str:
    """The metric that picks the best checkpoint: train.monitor, or for "auto" the task's own (mae for
    regression, accuracy for classes). Training and tune's study read this."""
    return t.monitor if t.monitor != "auto" else ("mae" if regression else "accuracy")


def check_resumable(cfg: Config) -> None:
    """Refuse a --resume whose config differs from the run's config.yaml in a key that must not change."""
    from seqtrain.errors import CheckpointError

    run_dir = cfg.run_dir
    if not (run_dir / "config.yaml").exists():
        raise CheckpointError(f"nothing to resume in {run_dir}: no config.yaml. Start without --resume.")
    saved = to_dict(from_dict(read_yaml(run_dir / "config.yaml")))
    changed = [k for k in config_diff(saved, to_dict(cfg)) if k not in RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(
            f"cannot resume {run_dir}: {', '.join(changed)} differ from the run's config.yaml. "
            f"Only these may change on resume: {', '.join(sorted(RESUMABLE_CHANGES))}."
        )


# python -m seqtrain.config: refresh the help snapshot after editing a field's docstring
if __name__ == "__main__":
    import json
    import sys

    # `--check` (make lint) fails when the snapshot differs from the source instead of rewriting it
    snapshot_path = Path(__file__).with_name(HELP_SNAPSHOT)
    current = json.dumps(help_snapshot(), indent=1, sort_keys=True) + "\n"
    if "--check" in sys.argv[1:]:
        sys.exit(0 if snapshot_path.read_text() == current else 1)
    snapshot_path.write_text(current)
