"""From a Hugging Face dataset to padded, length-bucketed batches.

    open_split         stream one split (Hub id, local folder or data files) with `datasets`
    build_vocab        stream the training split once: tokenizer (HF `tokenizers`), labels, row count
    BatchStream        a torch IterableDataset: read a chunk of rows -> tokenize -> shuffle -> sort
                       by length -> cut batches -> shuffle the batches -> yield; resumable per batch
    sorted_batches     batches of already-encoded texts, by length, for eval and predict

Why chunks: a CPU recurrent kernel costs the same for a pad as for a token, so each batch should
hold texts of similar length (a few percent of padding instead of a large share). Sorting a chunk of a few
thousand rows gives that, and shuffling the batches cut from it keeps the order random. A chunk
never spans two shards, so the stream position of any batch is tiny: (shard, the `datasets`
state at the chunk's start, batches already taken from the chunk).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import math
import os
import signal
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import torch

from seqtrain import badrows, encoding
from seqtrain.config import Config, DataConfig, TokenizerConfig
from seqtrain.encoding import PAD, UNK, Labels, clip, encode, number
from seqtrain.errors import DataError
from seqtrain.machine import STOP_SIGNALS, end_with_parent, ignore_stop_signals

if TYPE_CHECKING:
    import datasets
    from tokenizers import Tokenizer

FILE_BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".txt": "text",
}


# --------------------------------------------------------------------------- reading


def _data_files(path: str) -> list[str]:
    if any(c in path for c in "*?["):
        return sorted(glob.glob(path))
    return [path] if Path(path).is_file() else []


def open_split(data: DataConfig, split: str, limit: int | None = None) -> datasets.IterableDataset:
    """Stream one split. The same call serves a Hub id online and a folder or files offline.
    With data.validation_split, the eval split is the held-out rows of the training split, and the
    training split is the rest."""
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    fraction = data.validation_split
    if fraction and split in (data.train_split, data.eval_split):
        heldout = split == data.eval_split
        ds = open_split(replace(data, validation_split=None), data.train_split)
        column = (
            data.text_column
        )  # a text that is not a string stays in the training part, which counts it as a bad row
        ds = ds.filter(
            lambda row: (isinstance(row[column], str) and is_heldout(row[column], fraction)) == heldout
        )
        return ds.take(limit) if limit is not None else ds
    path = data.eval_path if (split == data.eval_split and data.eval_path) else data.path
    files = _data_files(path)
    try:
        if files:
            suffix = Path(files[0]).suffix.lower()
            if suffix not in FILE_BUILDERS:
                raise DataError(
                    f"data.path {path!r}: cannot read {suffix!r} files; "
                    f"use one of {', '.join(FILE_BUILDERS)}."
                )
            kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
            kwargs.update(badrows.reader_options(FILE_BUILDERS[suffix], data.on_bad_rows))
            ds = datasets.load_dataset(
                FILE_BUILDERS[suffix], data_files={split: files}, split=split, streaming=True, **kwargs
            )
        elif Path(path).is_dir() or not _looks_like_hub_id(path):
            if not Path(path).exists():
                raise DataError(
                    f"data.path {path!r} does not exist. Give a local dataset folder, data files, or a Hub id"
                    " like 'stanfordnlp/imdb' (run `make data` to fetch the shipped datasets into data/)."
                )
            badrows.check_folder(path)
            ds = datasets.load_dataset(path, split=split, streaming=True)
        else:
            ds = datasets.load_dataset(path, split=split, streaming=True)
    except DataError:
        raise
    except ValueError as e:
        msg = str(e)
        if "split" in msg.lower():
            raise DataError(f"dataset {path!r} has no split {split!r}: {msg}") from None
        raise DataError(f"cannot load dataset {path!r} (split {split!r}): {msg}") from None
    except Exception as e:  # network, missing repo, malformed files: all user-facing
        raise DataError(f"cannot load dataset {path!r} (split {split!r}): {type(e).__name__}: {e}") from None
    if limit is not None:
        ds = ds.take(limit)
    return ds


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") <= 1 and not path.startswith((".", "/", "~"))


def check_columns(
    ds: datasets.IterableDataset, data: DataConfig, split: str, need_label: bool = True
) -> None:
    """Fail before training if the configured columns are not in the split."""
    columns = list(ds.column_names or (ds.features or {}).keys())
    if not columns:
        try:
            with badrows.reading(badrows.split_path(data, split), split):
                columns = list(next(iter(ds)).keys())
        except StopIteration:
            raise DataError(f"split {split!r} of {data.path!r} is empty.") from None
    wanted = [("data.text_column", data.text_column)]
    if need_label:
        wanted.append(("data.label_column", data.label_column))
    for key, col in wanted:
        if col not in columns:
            raise DataError(
                f"split {split!r} of {data.path!r} has no column {col!r} ({key}); its columns are: "
                f"{', '.join(columns)}. Set {key} to one of them."
            )


# --------------------------------------------------------------------------- labels


def regression_labels(values: list[float], data: DataConfig, head: str = "scalar") -> Labels:
    arr = np.asarray(values, dtype=np.float64)
    std = float(arr.std())
    integer = bool(np.all(arr == np.round(arr)))
    support: list[float] = []
    if head == "distribution":
        support = sorted(set(arr.tolist()))
        if not integer or len(support) > 100:
            raise DataError(
                "model.regression_head: distribution needs integer targets with at most 100 values; "
                f"column {data.label_column!r} has {len(support)} distinct values"
                f"{'' if integer else ', not all integers'}. Use regression_head: scalar."
            )
    return Labels(
        names=[data.label_column],
        values=support,
        task="regression",
        mean=float(arr.mean()),
        std=std if std > 0 else 1.0,
        integer=integer,
        low=float(arr.min()),
        high=float(arr.max()),
    )


def resolve_labels(ds: datasets.IterableDataset, data: DataConfig, seen: Iterable[Any]) -> Labels:
    """Class names from the dataset's ClassLabel feature, else `data.label_names`, else the values seen."""
    seen_set = {v for v in seen if v is not None}
    feature = (ds.features or {}).get(data.label_column)
    feature_names = getattr(feature, "names", None)
    if feature_names:
        names = list(data.label_names or feature_names)
        return Labels(names=names, values=list(range(len(names))))
    if data.label_names:
        names = list(data.label_names)
        if all(isinstance(v, int) for v in seen_set):
            bad = sorted(v for v in seen_set if not 0 <= v < len(names))
            if bad:
                raise DataError(
                    f"label column {data.label_column!r} holds {bad[:5]} "
                    f"but data.label_names has {len(names)} names "
                    f"(integer labels must be 0..{len(names) - 1})."
                )
            return Labels(names=names, values=list(range(len(names))))
        bad = sorted(str(v) for v in seen_set - set(names))
        if bad:
            raise DataError(
                f"label column {data.label_column!r} holds {bad[:5]}, "
                f"which are not in data.label_names {names}."
            )
        return Labels(names=names, values=names)
    if not seen_set:
        raise DataError(f"no labels found in column {data.label_column!r} of split {data.train_split!r}.")
    values = sorted(seen_set, key=lambda v: (isinstance(v, str), v))
    return Labels(names=[str(v) for v in values], values=values)


# --------------------------------------------------------------------------- tokenizer


def new_tokenizer(tok: TokenizerConfig) -> tuple[Tokenizer, Any]:
    """An untrained tokenizer and its trainer. Normalization strips HTML line breaks (IMDB has them)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE, WordLevel

    norm = [normalizers.Replace(Regex(r"<br\s*/?>"), " "), normalizers.NFKC()]
    if tok.lowercase:
        norm.append(normalizers.Lowercase())
    specials = [PAD, UNK]
    if tok.kind == "word":
        tokenizer = Tokenizer(WordLevel(unk_token=UNK))
        trainer: Any = trainers.WordLevelTrainer(
            vocab_size=tok.vocab_size,
            min_frequency=tok.min_frequency,
            special_tokens=specials,
            show_progress=False,
        )
    else:
        tokenizer = Tokenizer(BPE(unk_token=UNK, continuing_subword_prefix="##"))
        trainer = trainers.BpeTrainer(
            vocab_size=tok.vocab_size,
            min_frequency=tok.min_frequency,
            special_tokens=specials,
            continuing_subword_prefix="##",
            show_progress=False,
        )
    tokenizer.normalizer = normalizers.Sequence(norm)
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer, trainer


@dataclass
class Vocab:
    """What one pass over the training split yields."""

    tokenizer: Tokenizer
    labels: Labels
    num_examples: int
    bad_rows: Counter[str]
    chunk_rows: list[int]  # usable rows in each chunk BatchStream will read


def bad_row_reason(
    text: Any, label: Any, need_label: bool = True, label_names: list[str] | None = None
) -> str | None:
    if text is None:
        return "null text"
    if not isinstance(text, str):
        return "text is not a string"
    if not text.strip():
        return "empty text"
    if need_label and label is None:
        return "null label"
    if badrows.not_utf8(text):
        return "text is not valid UTF-8"
    if need_label and badrows.label_problem(label, label_names):
        return "unknown label"
    return None


class RowAt(NamedTuple):
    """Where a row sits: its shard, and its place (from 0) in the split, in the shard and in the chunk."""

    shard: int
    row: int
    in_shard: int
    in_chunk: int


@dataclass
class RowTally:
    """What a counting pass over a split adds up."""

    count: int = 0  # usable rows
    chunk_rows: list[int] = field(default_factory=list)  # usable rows in each chunk BatchStream will read
    bad: Counter[str] = field(default_factory=Counter)  # rows skipped, by reason


def count_rows(
    ds: Any,
    data: DataConfig,
    split: str,
    n_shards: int,
    tally: RowTally,
    where: Callable[[RowAt], str],
    label_names: list[str] | None = None,
    labelled: bool = True,
    heldout: float | None = None,
) -> Iterator[tuple[str, Any, RowAt]]:
    """The usable rows of `ds` (text, label or None when not `labelled`, place), each counted in `tally`.

    Rows are read shard by shard in chunks exactly as `BatchStream` will read them. A bad row stops
    with an error naming it by `where` or, with data.on_bad_rows: skip, is counted in tally.bad;
    rows held out (`heldout`: the fraction, see `is_heldout`) are neither counted nor yielded.
    """
    row = 0
    for index in range(n_shards):
        shard = ds if n_shards == 1 else ds.shard(num_shards=n_shards, index=index)
        in_shard = 0
        for chunk in shard.iter(batch_size=data.chunk_size):
            tally.chunk_rows.append(0)
            chunk_texts = chunk[data.text_column]
            labels = chunk[data.label_column] if labelled else [None] * len(chunk_texts)
            for in_chunk, (text, label) in enumerate(zip(chunk_texts, labels, strict=True)):
                at = RowAt(index, row, in_shard, in_chunk)
                row, in_shard = row + 1, in_shard + 1
                reason = bad_row_reason(text, label, need_label=labelled, label_names=label_names)
                if reason:
                    if data.on_bad_rows == "error":
                        raise DataError(
                            f"split {split!r} of {data.path!r}, {where(at)}: {reason}"
                            f"{f' {label!r}' * (reason == 'unknown label')}. Fix the row, or set "
                            "data.on_bad_rows: skip to skip such rows (they are counted in the logs)."
                        )
                    tally.bad[reason] += 1
                    continue
                if heldout and is_heldout(text, heldout):
                    continue
                tally.count += 1
                tally.chunk_rows[-1] += 1
                yield text, label, at


def build_vocab(cfg: Config, tokenizer: Tokenizer | None = None) -> Vocab:
    """Stream the training split once: train the tokenizer (unless one is given, as `model.init_from`
    does), collect the labels, count the rows.

    Rows are read shard by shard in chunks exactly as `BatchStream` will read them, so the number
    of batches per epoch (and with it the LR schedule and the progress bar) is exact.
    """
    data = cfg.data
    ds = open_split(data, data.train_split, data.max_train_examples)
    check_columns(ds, data, data.train_split)
    ds = ds.select_columns([data.text_column, data.label_column])
    n_shards = 1 if data.max_train_examples else ds.n_shards
    given = tokenizer
    tokenizer, trainer = new_tokenizer(cfg.tokenizer) if given is None else (given, None)
    regression = cfg.model.task == "regression"
    seen: Counter[Any] = Counter()
    numbers: list[float] = []  # regression targets (8 bytes a row: fine even for millions of rows)
    tally = RowTally()
    cap = cfg.tokenizer.max_examples

    def where(at: RowAt) -> str:
        return f"row {at.row}" + (f" (shard {at.shard}, row {at.in_shard})" if n_shards > 1 else "")

    def texts() -> Iterator[str]:
        label_names = None if regression else data.label_names
        for text, label, at in count_rows(ds, data, data.train_split, n_shards, tally, where, label_names):
            if regression:
                x = number(label)
                if x is None:
                    raise DataError(
                        f"model.task is regression but column {data.label_column!r} holds {label!r} "
                        f"at {where(at)} of split {data.train_split!r}: targets must be numbers. "
                        "Pick a numeric data.label_column."
                    )
                numbers.append(x)
            else:
                if isinstance(label, float) and label.is_integer():
                    label = int(label)
                seen[label] += 1
            if cap is None or tally.count <= cap:
                yield clip(text, data)

    with badrows.reading(badrows.split_path(data, data.train_split), data.train_split):
        if given is None:
            tokenizer.train_from_iterator(texts(), trainer=trainer)
        else:
            for _ in texts():  # labels and row counts only
                pass
    if tally.count == 0:
        raise DataError(
            f"split {data.train_split!r} of {data.path!r} has no usable rows "
            f"({dict(tally.bad) or 'it is empty'})."
        )
    if regression:
        labels = regression_labels(numbers, data, cfg.model.regression_head)
        if cfg.model.bounded and not (labels.low >= 0.0 and labels.high <= 1.0):
            raise DataError(
                "model.bounded squashes predictions into [0, 1], "
                f"but column {data.label_column!r} ranges from {labels.low:g} to {labels.high:g}. "
                "Rescale the targets or set model.bounded: false."
            )
    else:
        labels = resolve_labels(ds, data, seen)
        labels.counts = [seen.get(v, 0) for v in labels.values]
        if len(labels.names) < 2:
            raise DataError(
                f"column {data.label_column!r} holds a single label {labels.names}; "
                "a classifier needs two or more."
            )
    return Vocab(
        tokenizer=tokenizer,
        labels=labels,
        num_examples=tally.count,
        bad_rows=tally.bad,
        chunk_rows=tally.chunk_rows,
    )


def check_eval_split(cfg: Config, labels: Labels) -> str | None:
    """Before training: the eval split opens and has the columns, and its labels are known from the training
    split. Labels found only in the eval split stop here with data.on_bad_rows: error; with skip, the returned
    warning says that evaluation will skip their rows."""
    data = cfg.data
    ds = open_split(data, data.eval_split, data.max_eval_examples)
    check_columns(ds, data, data.eval_split)
    unknown: Counter[str] = Counter()
    rows = 0
    with badrows.reading(badrows.split_path(data, data.eval_split), data.eval_split):
        for chunk in ds.select_columns([data.label_column]).iter(batch_size=data.chunk_size):
            rows += len(chunk[data.label_column])
            if labels.task != "regression":
                unknown.update(
                    str(v) for v in chunk[data.label_column] if v is not None and labels.target(v) is None
                )
    if rows == 0 and data.validation_split:
        raise DataError(
            f"data.validation_split {data.validation_split} holds out no row of {data.train_split!r}: "
            "raise it."
        )
    if not unknown:
        return None
    msg = (
        f"labels {sorted(unknown)[:5]} ({sum(unknown.values()):,} rows) appear only "
        f"in the eval split {data.eval_split!r} of {badrows.split_path(data, data.eval_split)!r}, "
        f"not in the training split {data.train_split!r} (labels {labels.names})"
    )
    if data.on_bad_rows == "error":
        raise DataError(
            f"{msg}. Fix the data, or set data.on_bad_rows: skip to leave those rows out of evaluation."
        )
    return f"{msg}: evaluation skips those rows (data.on_bad_rows: skip)."


# --------------------------------------------------------------------------- unlabeled text (pretraining)


def is_heldout(text: str, fraction: float) -> bool:
    """Whether a row belongs to the held-out part: a hash of its text, so the choice is the same in
    every pass, worker, rank and resume, and needs no index."""
    digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def unlabeled_source(cfg: Config) -> DataConfig:
    """pretrain.path as a source of texts: data's reading settings, its own path, split and column, and no
    held-out part (data.validation_split belongs to the labelled data)."""
    pre = cfg.pretrain
    assert pre.path is not None
    return replace(
        cfg.data,
        path=pre.path,
        eval_path=None,
        text_column=pre.text_column,
        train_split=pre.split,
        validation_split=None,
    )


def text_sources(cfg: Config) -> list[tuple[DataConfig, str]]:
    """What `seqtrain pretrain` reads: pretrain.path, plus the texts of data.path's training split.
    Each source is a DataConfig whose text is cut to pretrain.max_length tokens, from the head."""
    pre = cfg.pretrain
    sources = []
    if pre.path:
        sources.append((unlabeled_source(cfg), pre.split))
    if pre.add_train_texts:
        sources.append((cfg.data, cfg.data.train_split))
    sources = [
        (replace(data, max_length=pre.max_length, truncation="head", ngram_max_length=None), split)
        for data, split in sources
    ]
    if not sources:
        raise DataError(
            "pretrain.path is null and pretrain.add_train_texts is false: there is no text to learn from. "
            "Set pretrain.path to unlabeled texts."
        )
    return sources


def pretraining_texts(cfg: Config, tally: RowTally) -> Iterator[str]:
    """Every usable pretraining text (held-out rows excluded), whole, source after source; `tally`
    counts them, by chunk, and the rows skipped."""
    for data, split in text_sources(cfg):
        ds = open_split(data, split, cfg.data.max_train_examples)
        check_columns(ds, data, split, need_label=False)
        ds = ds.select_columns([data.text_column])
        n_shards = 1 if cfg.data.max_train_examples else ds.n_shards
        rows = count_rows(
            ds,
            data,
            split,
            n_shards,
            tally,
            lambda at: f"shard {at.shard}, chunk row {at.in_chunk}",
            labelled=False,
            heldout=cfg.pretrain.heldout_fraction,
        )
        for text, _, _ in rows:
            yield text


def build_text_vocab(
    cfg: Config, tokenizer: Tokenizer | None = None
) -> tuple[Tokenizer, int, list[int], Counter[str]]:
    """One pass over the pretraining texts (held-out rows excluded): the tokenizer (unless one is given,
    as `model.init_from` does), the row count, the rows per chunk exactly as `BatchStream` will read
    them, and the rows skipped by reason."""
    given = tokenizer
    tokenizer, trainer = new_tokenizer(cfg.tokenizer) if given is None else (given, None)
    tally = RowTally()
    cap = cfg.tokenizer.max_examples

    def texts() -> Iterator[str]:
        for text in pretraining_texts(cfg, tally):
            if cap is None or tally.count <= cap:
                yield text[: cfg.pretrain.max_length * 20]  # ~20 characters a token at most

    with badrows.pretrain_keys(cfg.pretrain, cfg.data):
        if given is None:
            tokenizer.train_from_iterator(texts(), trainer=trainer)
        else:
            for _ in texts():  # count the rows only
                pass
    if tally.count == 0:
        raise DataError(
            f"the pretraining texts ({', '.join(d.path for d, _ in text_sources(cfg))}) have no usable rows."
        )
    return tokenizer, tally.count, tally.chunk_rows, tally.bad


def heldout_texts(cfg: Config) -> list[str]:
    """The first pretrain.max_heldout_texts held-out rows, taken evenly from every source."""
    sources = text_sources(cfg)
    per_source = max(1, cfg.pretrain.max_heldout_texts // len(sources))
    out: list[str] = []
    for data, split in sources:
        ds = open_split(data, split, cfg.data.max_train_examples).select_columns([data.text_column])
        taken = 0
        for chunk in ds.iter(batch_size=data.chunk_size):
            for text in chunk[data.text_column]:
                if bad_row_reason(text, None, need_label=False) is None and is_heldout(
                    text, cfg.pretrain.heldout_fraction
                ):
                    out.append(text)
                    taken += 1
                    if taken >= per_source:
                        break
            if taken >= per_source:
                break
    if not out:
        raise DataError("no held-out texts: raise pretrain.heldout_fraction or give more text.")
    return out


def pad(seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """encoding.pad as tensors: ids (B, T) and lengths (B,)."""
    ids, lengths = encoding.pad(seqs)
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def sorted_batches(
    seqs: list[list[int]], batch_size: int, cost: encoding.BatchCost | None = None
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """encoding.sorted_batches as tensors: (row indices, ids, lengths), for eval, predict and serve."""
    for idx, ids, lengths in encoding.sorted_batches(seqs, batch_size, cost):
        yield idx, torch.from_numpy(ids), torch.from_numpy(lengths)


# --------------------------------------------------------------------------- the training stream


def identity(x: Any) -> Any:
    """DataLoader collate for already-built batches (a module-level function, so workers can pickle it)."""
    return x


class BatchStream(torch.utils.data.IterableDataset):
    """Batches for one epoch of one split, each carrying the stream position right after it.

    Each item is a dict: ids (B, T), lengths (B,), labels (B,), `position` (what resumes the stream
    right after this batch) and `bad_rows` (rows skipped so far, by reason). With DataLoader
    workers, each worker reads its own shards; the position records which shard and where.
    """

    def __init__(
        self,
        data: DataConfig,
        split: str,
        tokenizer: Tokenizer,
        labels: Labels | None,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        epoch: int = 0,
        limit: int | None = None,
        resume: dict[str, Any] | None = None,
        slot_offset: int = 0,
        rank: int = 0,
        world: int = 1,
        sources: list[tuple[DataConfig, str]] | None = None,
        heldout: float = 0.0,
    ) -> None:
        self.data, self.split, self.tokenizer, self.labels = data, split, tokenizer, labels
        self.batch_size, self.shuffle, self.seed, self.epoch, self.limit = (
            batch_size,
            shuffle,
            seed,
            epoch,
            limit,
        )
        self.resume = resume or {}  # slot -> position
        # Worker i plays slot (i + slot_offset) % workers: on resume, the slot due next becomes
        # worker 0, which the DataLoader asks first, so the round-robin order continues unchanged.
        self.slot_offset = slot_offset
        self.rank, self.world = rank, world  # torchrun: this process reads its own part of the split
        # Language-model pretraining: several text-only sources (labels=None) read as one stream, minus
        # the rows that `is_heldout` keeps for the held-out perplexity.
        self.sources = sources or [(data, split)]
        self.heldout = heldout

    def _shards(
        self, worker: int, workers: int
    ) -> tuple[list[datasets.IterableDataset], list[tuple[int, int]]]:
        """This worker's (source, shard) pairs, in this epoch's order, and each source's dataset."""
        opened = []
        order = []
        for source, (data, split) in enumerate(self.sources):
            ds = open_split(data, split, self.limit)
            columns = [data.text_column] + ([data.label_column] if self.labels is not None else [])
            ds = ds.select_columns(columns)
            if self.world > 1:
                from datasets.distributed import split_dataset_by_node

                # Whole shards per rank when they divide evenly, else every world-th row.
                ds = split_dataset_by_node(ds, rank=self.rank, world_size=self.world)
            opened.append(ds)
            order += [
                (source, i) for i in range(1 if self.limit else ds.n_shards)
            ]  # a row cap reads one logical shard
        if self.shuffle:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        return opened, order[worker::workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:
            torch.set_num_threads(1)  # the main process owns the cores for the model
        slot = (worker + self.slot_offset) % workers
        opened, shards = self._shards(slot, workers)
        position = self.resume.get(str(slot))
        bad: Counter[str] = Counter(position["bad_rows"]) if position else Counter()
        rows = position.get("rows", 0) if position else 0  # rows this slot has yielded in this epoch
        start_shard = position["shard_pos"] if position else 0
        for shard_pos in range(start_shard, len(shards)):
            source, index = shards[shard_pos]
            shard = self._shard(opened[source], index)
            resuming = position is not None and shard_pos == start_shard
            if resuming:
                assert position is not None
                shard.load_state_dict(position["chunk_state"])
            chunk_idx = position["chunk_idx"] if resuming and position else 0
            skip = position["batches_done"] if resuming and position else 0
            # `.iter(batch_size=...)` reads columnar chunks and, unlike `iter(shard)`, does not
            # re-split shards between DataLoader workers (we assigned them ourselves above).
            chunks = shard.iter(batch_size=self.data.chunk_size)
            while True:
                chunk_state = shard.state_dict()
                chunk = next(chunks, None)
                if not chunk:
                    break
                batches = self._chunk_batches(
                    chunk, bad, self.sources[source][0], source * 100_000 + index, chunk_idx
                )
                for k, batch in enumerate(batches):
                    if k < skip:
                        continue
                    rows += len(batch["lengths"])
                    batch["position"] = {
                        "slot": slot,
                        "shard_pos": shard_pos,
                        "chunk_idx": chunk_idx,
                        "chunk_state": chunk_state,
                        "batches_done": k + 1,
                        "bad_rows": dict(bad),
                        "rows": rows,
                    }
                    yield batch
                skip = 0
                chunk_idx += 1
            position = None

    def _shard(self, ds: datasets.IterableDataset, index: int) -> datasets.IterableDataset:
        return ds if self.limit or ds.n_shards == 1 else ds.shard(num_shards=ds.n_shards, index=index)

    def count(self) -> tuple[int, int]:
        """(rows, batches) of one epoch on this rank, all worker slots together: the rows are read and
        checked as `__iter__` does, but nothing is tokenized. Under torchrun each rank counts its own part."""
        opened, shards = self._shards(0, 1)
        rows = batches = 0
        for source, index in shards:
            for chunk in self._shard(opened[source], index).iter(batch_size=self.data.chunk_size):
                n = len(self._usable_rows(chunk, Counter(), self.sources[source][0])[0])
                rows, batches = rows + n, batches + math.ceil(n / self.batch_size)
        return rows, batches

    def _usable_rows(
        self, chunk: dict[str, list[Any]], bad: Counter[str], data: DataConfig
    ) -> tuple[list[str], list[float | int]]:
        """The chunk's texts and targets that train, minus bad rows (counted in `bad`) and held-out rows."""
        texts: list[str] = []
        targets: list[float | int] = []
        column = chunk[data.text_column]
        for text, label in zip(
            column, chunk[data.label_column] if self.labels else [None] * len(column), strict=True
        ):
            reason = bad_row_reason(text, label, self.labels is not None)
            target: float | int = -1
            if reason is None and self.heldout and is_heldout(text, self.heldout):
                continue  # kept for the held-out perplexity; never trained on
            if reason is None and self.labels is not None:
                found = self.labels.target(label)
                if found is None:
                    reason = (
                        "target that is not a number" if self.labels.task == "regression" else "unknown label"
                    )
                else:
                    target = found
            if reason:
                if data.on_bad_rows == "error":
                    known = f"; known labels: {self.labels.values}" if self.labels else ""
                    raise DataError(
                        f"split {self.split!r} of {data.path!r}: a row has {reason} "
                        f"(label {label!r}{known}). Fix the data or set data.on_bad_rows: skip."
                    )
                bad[reason] += 1
                continue
            texts.append(text)
            targets.append(target)
        return texts, targets

    def _chunk_batches(
        self, chunk: dict[str, list[Any]], bad: Counter[str], data: DataConfig, shard: int, chunk_idx: int
    ) -> list[dict[str, Any]]:
        """One chunk (column -> values) of one source -> shuffled, length-bucketed batches."""
        texts, targets = self._usable_rows(chunk, bad, data)
        if not texts:
            return []
        seqs = encode(self.tokenizer, texts, data)
        lengths = np.array([len(s) for s in seqs])
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, shard, chunk_idx])
            perm = rng.permutation(len(seqs))
            order = perm[np.argsort(lengths[perm], kind="stable")]  # random among equal lengths
        else:
            order = np.argsort(lengths, kind="stable")
        cuts = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            rng.shuffle(cuts)
        out = []
        for idx in cuts:
            ids, lens = pad([seqs[i] for i in idx])
            dtype = torch.float32 if self.labels and self.labels.task == "regression" else torch.long
            out.append(
                {"ids": ids, "lengths": lens, "labels": torch.tensor([targets[i] for i in idx], dtype=dtype)}
            )
        return out


# While the main process waits for a batch it looks at its stop signals this often (seconds).
WAIT_POLL = 0.25
# How long the main process waits for a killed worker to be gone (seconds).
REAP_TIMEOUT = 5.0
# This process's DataLoader iterators that started workers; `stop_workers` ends what is left of them.
_running: weakref.WeakSet[Any] = weakref.WeakSet()


def _worker_init(worker_id: int) -> None:
    # Ctrl-C, `kill -- -PGID` (systemd, Kubernetes) and closing the terminal signal the whole process
    # group; the main process decides when to stop (and saves last/), not the data workers.
    ignore_stop_signals()
    # A worker ends with the main process, however that ends (SIGKILL, OOM killer): an orphan would keep
    # reading, and hold the run folder's lock that it inherited.
    end_with_parent(signal.SIGKILL)
    # The model's OpenMP threads wait for each other at every time step: a worker that preempts
    # one of them stalls all of them. At low priority it runs in the gaps the model leaves.
    os.nice(19)


class _Loader(torch.utils.data.DataLoader):
    """A DataLoader whose workers are born deaf to the stop signals and are registered for `stop_workers`."""

    def __iter__(self) -> Any:
        if self.num_workers == 0:
            return super().__iter__()
        # Workers are forked with the stop signals blocked, and keep them blocked: a group signal that
        # arrives while one starts (before `_worker_init` runs there, when torch's own handler would
        # make it die) stays pending and is then dropped. The main process gets it when this returns.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            batches = super().__iter__()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _running.add(batches)
        return _Batches(batches)


_WAITING = object()  # no batch yet


class _Batches:
    """The batches of a loader with workers: torch's iterator, whose waits for a batch end after WAIT_POLL
    (`next_or_none` looks at its stop signals in between; plain iteration just waits again)."""

    def __init__(self, batches: Iterator[Any]) -> None:
        self.batches = batches

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> Any:
        while (batch := self.poll()) is _WAITING:
            pass
        return batch

    def poll(self) -> Any:
        """The next batch, or _WAITING when none came within WAIT_POLL; StopIteration at the end."""
        try:
            return next(self.batches)
        except RuntimeError as e:
            if str(e).startswith("DataLoader timed out"):
                return _WAITING
            raise


def make_loader(stream: BatchStream, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader that runs the stream in `num_workers` processes ahead of the model."""
    if num_workers > 0:
        # The parent trained the tokenizer with Rust threads; forked workers must not reuse that pool.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    return _Loader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=identity,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        # Its own generator: creating the iterator must not draw from the global RNG that dropout
        # uses, or a resumed run would see a shifted dropout stream.
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
        # A wait for the workers' next batch gives up after this long and starts again (`_Batches`), so
        # the main process can notice a stop signal while a worker is slow or stuck.
        timeout=WAIT_POLL if num_workers > 0 else 0,
    )


def next_or_none(batches: Iterator[dict[str, Any]], stop: Callable[[], bool]) -> dict[str, Any] | None:
    """The next batch, or None at the epoch's end, or None as soon as `stop()` is true while waiting for the
    data workers."""
    poll = getattr(batches, "poll", None)
    if poll is None:  # no workers: the batch is made here
        return None if stop() else next(batches, None)
    while not stop():
        try:
            batch = poll()
        except StopIteration:
            return None
        if batch is not _WAITING:
            return cast(dict[str, Any], batch)
    return None


def _kill(batches: Any) -> list[Any]:
    """SIGKILL the live workers of one DataLoader iterator (they ignore the stop signals and hold nothing
    that must be written); the killed ones."""
    if getattr(batches, "_worker_pids_set", False):
        # torch watches its workers (SIGCHLD) and would report a killed one as a failure
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False
    killed = []
    for worker in getattr(batches, "_workers", []):
        if worker.exitcode is None:  # alive, and not reaped: its pid is still its own
            with contextlib.suppress(OSError, ValueError, AssertionError):
                worker.kill()
                killed.append(worker)
    return killed


def stop_workers() -> None:
    """End at once every data worker this process still runs, and release their loaders' queues. A stopped
    run calls this rather than waiting for its workers, which may be busy or stuck for long; the batches
    they were making are made again on resume, from the saved position of the last trained batch."""
    for batches in list(_running):
        for worker in _kill(batches):
            worker.join(REAP_TIMEOUT)
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()  # torch's own clean-up; with the workers gone it waits for nothing
        _running.discard(batches)


def kill_workers() -> None:
    """SIGKILL every data worker this process runs, without waiting: for a process about to `os._exit`."""
    for batches in list(_running):
        _kill(batches)
