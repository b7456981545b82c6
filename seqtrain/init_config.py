"""`seqtrain init`: look at a dataset and write a commented starter config for it.

Everything is read through `data.open_split` (streaming), so a Hub id, a local folder and data
files are inspected the same way, and only a capped sample of the training split is read.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from seqtrain.config import DataConfig
from seqtrain.data import _data_files, open_split
from seqtrain.errors import DataError

COMMON_SPLITS = ["train", "validation", "valid", "dev", "test"]
EVAL_PREFERENCE = ["validation", "valid", "dev"]  # never test: without these, part of train is held out
VALIDATION_SPLIT = 0.1  # data.validation_split written when the data has no validation split
LABEL_NAMES = [
    "label",
    "labels",
    "sentiment",
    "target",
    "class",
    "category",
    "polarity",
    "rating",
    "stars",
    "score",
    "y",
]
MAX_CLASSES = 100  # more distinct values than this in a non-float column: not a label column
# train.epochs: enough passes for about TARGET_STEPS steps of 64 texts, within [MIN_EPOCHS, MAX_EPOCHS]
TARGET_STEPS, MIN_EPOCHS, MAX_EPOCHS = 1500, 3, 10
ROW_COUNT_CAP = 200_000  # counting the training rows stops here (the recipe is the same above it)


def find_splits(path: str) -> list[str]:
    """Split names: data files are one split ("train"); else the builder's data files;
    else probe common names."""
    if _data_files(path):
        return ["train"]
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        builder = datasets.load_dataset_builder(path)
        names = list(builder.info.splits or {}) or list(builder.config.data_files or {})
        if names:
            return [str(n) for n in names]
    except Exception:  # offline Hub id, script datasets, odd layouts: fall back to probing
        pass
    found: list[str] = []
    first_error: DataError | None = None
    for name in COMMON_SPLITS:
        try:
            next(iter(open_split(DataConfig(path=path), name, limit=1)))
            found.append(name)
        except DataError as e:
            first_error = first_error or e
        except StopIteration:  # an empty split
            continue
    if not found:
        if first_error is not None and "does not exist" in str(first_error):
            raise first_error
        raise DataError(f"cannot find any split ({', '.join(COMMON_SPLITS)}) in {path!r}: {first_error}")
    return found


def _percentiles(values: list[int]) -> dict[str, int]:
    arr = np.asarray(values or [0])
    p50, p90, p99 = (math.ceil(v) for v in np.percentile(arr, [50, 90, 99]))
    return {"p50": p50, "p90": p90, "p99": p99, "max": int(arr.max())}


def _type_name(feature: Any, values: list[Any]) -> str:
    if feature is not None and hasattr(feature, "names"):
        return "class label"
    dtype = getattr(feature, "dtype", None)
    if dtype:
        return str(dtype)
    kinds = {type(v).__name__ for v in values if v is not None}
    return "/".join(sorted(kinds)) or "empty"


def _guess_text_column(columns: dict[str, list[Any]]) -> str | None:
    """The string column with the longest average text."""
    best, best_len = None, 0.0
    for name, values in columns.items():
        strings = [v for v in values if isinstance(v, str)]
        if len(strings) < 0.9 * max(1, sum(v is not None for v in values)):
            continue
        avg = sum(len(s) for s in strings) / max(1, len(strings))
        if avg > best_len:
            best, best_len = name, avg
    return best


def _guess_label_column(
    columns: dict[str, list[Any]], features: dict[str, Any], text_column: str
) -> str | None:
    """A ClassLabel column, else a usual label name, else the column with fewest distinct values (2..100)."""
    others = [c for c in columns if c != text_column]
    for c in others:
        if hasattr(features.get(c), "names"):
            return c
    lowered = {c.lower(): c for c in others}
    for name in LABEL_NAMES:
        if name in lowered:
            return lowered[name]
    candidates = []
    for c in others:
        distinct = {v for v in columns[c] if v is not None and not isinstance(v, list | dict)}
        if 2 <= len(distinct) <= MAX_CLASSES:
            candidates.append((len(distinct), c))
    return min(candidates)[1] if candidates else None


def _is_regression(values: list[Any]) -> bool:
    """Floats that are not all whole numbers, or many distinct numbers: a score to regress, not classes."""
    numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    if not numbers or len(numbers) < len([v for v in values if v is not None]):
        return False
    fractional = any(isinstance(v, float) and not v.is_integer() for v in numbers)
    return fractional or len(set(numbers)) > MAX_CLASSES


def _sorted_values(values: list[Any]) -> list[Any]:
    """Distinct label values in the order seqtrain numbers them (sorted; by text when types mix)."""
    distinct = {int(v) if isinstance(v, float) and v.is_integer() else v for v in values}
    return sorted(distinct, key=lambda v: (isinstance(v, str), v))  # as data.resolve_labels orders them


def _nice_ceil(x: float, step: int) -> int:
    return int(math.ceil(x / step) * step)


def inspect_dataset(
    path: str, text_column: str | None = None, label_column: str | None = None, sample: int = 5000
) -> dict[str, Any]:
    """Splits, columns, guessed text and label columns, labels,
    and text lengths from a sample of the training split."""
    from tokenizers import normalizers, pre_tokenizers

    splits = find_splits(path)
    train_split = "train" if "train" in splits else splits[0]
    eval_split = next((s for s in EVAL_PREFERENCE if s in splits), None)
    ds = open_split(DataConfig(path=path), train_split, limit=sample)
    features = dict(ds.features or {})
    columns: dict[str, list[Any]] = {}
    for chunk in ds.iter(batch_size=1000):
        for name, values in chunk.items():
            columns.setdefault(name, []).extend(values)
    if not columns:
        raise DataError(f"split {train_split!r} of {path!r} is empty.")
    rows = len(next(iter(columns.values())))
    for key, col in (("--text-column", text_column), ("--label-column", label_column)):
        if col is not None and col not in columns:
            raise DataError(
                f"{key} {col!r} is not a column of {path!r}; its columns are: {', '.join(columns)}."
            )
    text_col = text_column or _guess_text_column(columns)
    if text_col is None:
        raise DataError(
            f"no column of {path!r} holds strings ({', '.join(columns)}); name it with --text-column."
        )
    label_col = label_column or _guess_label_column(columns, features, text_col)
    if label_col is None or label_col == text_col:
        raise DataError(
            f"cannot tell which column of {path!r} holds the labels ({', '.join(columns)}); "
            "name it with --label-column."
        )

    # Count tokens the way the word tokenizer will (normalize, lowercase, split words and punctuation).
    norm = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    pre = pre_tokenizers.Whitespace()
    words, tokens = [], []
    vocab: Counter[str] = Counter()
    for text in columns[text_col]:
        if not isinstance(text, str):
            continue
        words.append(len(text.split()))
        pieces = [p for p, _ in pre.pre_tokenize_str(norm.normalize_str(text))]
        tokens.append(len(pieces))
        vocab.update(pieces)

    labels = [v for v in columns[label_col] if v is not None]
    regression = _is_regression(labels)
    class_names = getattr(features.get(label_col), "names", None)
    label_counts: dict[str, int] = {}
    if not regression:
        counts = Counter(int(v) if isinstance(v, float) and v.is_integer() else v for v in labels)
        for value in _sorted_values(list(counts)):
            known = class_names and isinstance(value, int) and 0 <= value < len(class_names)
            label_counts[str(class_names[value] if known else value)] = counts[value]  # type: ignore[index]

    tok = _percentiles(tokens)
    seen_twice = sum(1 for c in vocab.values() if c >= 2)
    whole_split = rows < sample
    # The sample sees only part of the vocabulary of a large split; vocabularies grow roughly with
    # the square root of the text read, and 2x covers the common case of a split 4x the sample.
    estimate = (seen_twice if whole_split else 2 * seen_twice) + 2
    vocab_size = min(30_000, _nice_ceil(estimate, 1000 if estimate > 2000 else 100))  # 30k: enough for IMDB
    max_length = max(16, _nice_ceil(tok["p90"], 16))
    notes = []
    if eval_split is None:
        notes.append(
            f"no validation split in {splits}: the config holds out {VALIDATION_SPLIT:.0%} "
            f"of {train_split!r} (data.validation_split) to evaluate on; "
            "a test split is read only by `seqtrain eval --split test`."
        )
    if not regression and len(label_counts) < 2:
        notes.append(
            f"column {label_col!r} holds a single value in the sample: a classifier needs two or more labels."
        )
    if not regression and label_counts:
        most, least = max(label_counts.values()), min(label_counts.values())
        if most > 5 * least:
            notes.append(
                f"labels are imbalanced ({most:,} vs {least:,} rows in the sample): "
                "the config sets train.class_weights: balanced."
            )
    return {
        "path": path,
        "splits": splits,
        "split": train_split,
        "train_split": train_split,
        "eval_split": eval_split or "validation",
        "validation_split": None if eval_split else VALIDATION_SPLIT,
        "rows_read": rows,
        "whole_split": whole_split,
        "train_rows": count_train_rows(path, train_split, rows, whole_split),
        "columns": {c: _type_name(features.get(c), columns[c][:100]) for c in columns},
        "text_column": text_col,
        "label_column": label_col,
        "task": "regression" if regression else "classification",
        "label_counts": label_counts,
        "class_names": class_names,
        "label_values": _sorted_values(labels) if not regression else [],
        "text_column_guessed": text_column is None,
        "words": _percentiles(words),
        "tokens": tok,
        "distinct_tokens": len(vocab),
        "distinct_tokens_min2": seen_twice,
        "max_length": max_length,
        "truncation": "head+tail" if tok["p99"] > 2 * max_length else "head",
        "vocab_size": vocab_size,
        "notes": notes,
        "imbalanced": any("imbalanced" in n for n in notes),
    }


def _scalar(value: Any) -> str:
    """A YAML scalar, quoted only when it must be (a flow list of one item, without the brackets)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def _line(code: str, comment: str = "") -> str:
    """One YAML line, its comment aligned at column 30 so the file reads as a table."""
    return (f"{code:<29} # {comment}" if comment else code) + "\n"


def starter_yaml(
    s: dict[str, Any], name: str, init_from: str | None = None, pretrained: dict[str, Any] | None = None
) -> str:
    """The commented config; every value comes from the dataset summary or a sensible default. With
    `init_from`, the tokenizer and the encoder's shapes are the pretrained run's (`pretrained`, its
    config)."""
    w, t = s["words"], s["tokens"]
    regression = s["task"] == "regression"
    lines = [
        f"# Starter config written by `seqtrain init {s['path']}` "
        f"from the first {s['rows_read']:,} rows of {s['split']!r}.\n",
        "# Every key is documented by `seqtrain config-help`; "
        "override any with key=value on the command line.\n",
        f"# Text length in the sample: words p50 {w['p50']}, p90 {w['p90']}, p99 {w['p99']}; "
        f"tokens p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}.\n",
        _line(f"name: {_scalar(name)}", "the run directory is runs/<name>"),
        _line("seed: 0"),
        _line("data:"),
        _line(f"  path: {_scalar(s['path'])}"),
        _line(
            f"  text_column: {_scalar(s['text_column'])}",
            "the string column with the longest texts" if s["text_column_guessed"] else "",
        ),
        _line(f"  label_column: {_scalar(s['label_column'])}"),
    ]
    if regression:
        lines.append(
            "  # the labels are numbers with fractions or many values: "
            "the model regresses them (model.task)\n"
        )
    elif s["class_names"]:
        lines.append(
            "  # the labels are a ClassLabel feature; "
            f"its names are used: {_scalar(list(s['class_names']))}\n"
        )
    else:
        values = s["label_values"]
        more = " ..." if len(values) > 20 else ""
        lines += [
            f"  # label values in the sample: {_scalar(values[:20])}{more}; name them in this order, e.g.\n",
            f"  # label_names: {_scalar([f'class_{v}' for v in values[:20]])}{more}\n",
        ]
    lines += [
        _line(f"  train_split: {_scalar(s['train_split'])}"),
        *(
            [
                _line(
                    f"  validation_split: {s['validation_split']}",
                    f"no validation split: {s['validation_split']:.0%} of "
                    f"{s['train_split']} (by a hash of each text) is held out and evaluated",
                )
            ]
            if s.get("validation_split")
            else []
        ),
        _line(
            f"  eval_split: {_scalar(s['eval_split'])}",
            f"splits found: {', '.join(s['splits'])}"
            + (
                "; the held-out part's name (test is read only by `seqtrain eval --split test`)"
                if s.get("validation_split")
                else ""
            ),
        ),
        _line(
            f"  max_length: {s['max_length']}",
            f"tokens; about 90% of texts fit (p90 {t['p90']}), longer ones are cut",
        ),
        _line(
            f"  truncation: {s['truncation']}",
            "long tail: keep the start and the end of long texts"
            if s["truncation"] == "head+tail"
            else "keep the first max_length tokens",
        ),
        _line("  on_bad_rows: skip", "count and skip empty texts and missing labels instead of stopping"),
        _line(
            "tokenizer:",
            f"the pretrained run's: {init_from} (model.init_from reuses its tokenizer)" if init_from else "",
        ),
    ]
    if pretrained is not None:
        tok = pretrained["tokenizer"]
        lines += [
            _line(f"  {key}: {_scalar(tok[key])}")
            for key in ("kind", "vocab_size", "min_frequency", "lowercase")
        ]
    else:
        lines += [
            _line("  kind: word", "or bpe: subwords, so rare and misspelt words are not <unk>"),
            _line(
                f"  vocab_size: {s['vocab_size']}",
                f"{s['distinct_tokens_min2']:,} tokens seen twice or more in the sample"
                + ("" if s["whole_split"] else ", more in the whole split"),
            ),
            _line("  min_frequency: 2", "rarer tokens become <unk>"),
            _line("  lowercase: true"),
        ]
    lines.append(_line("model:"))
    if regression:
        lines.append(_line("  task: regression"))
    vectors = pretrained is not None and pretrained.get("pretrain", {}).get("objective") == "vectors"
    recipe = starter_recipe(s)
    if pretrained is not None:
        model = pretrained["model"]
        lines.append(
            _line(
                f"  init_from: {_scalar(init_from)}",
                "start the embeddings from its word vectors"
                if vectors
                else "start the embeddings and recurrent layers from it",
            )
        )
    if pretrained is not None and not vectors:
        lines += [
            _line(
                f"  {key}: {_scalar(model[key])}",
                "the pretrained encoder's; must match it" if key == "cell" else "",
            )
            for key in ("cell", "embedding_dim", "hidden_size", "num_layers", "bidirectional")
        ]
    else:
        dim = model["embedding_dim"] if vectors else 128
        lines += [
            _line("  cell: lstm", "rnn | lstm | gru"),
            _line(f"  embedding_dim: {dim}", "the word vectors'; must match them" if vectors else ""),
            _line("  hidden_size: 128"),
            _line("  num_layers: 1"),
            _line("  bidirectional: true", "read each text both ways"),
        ]
    lines += [
        _line("  pooling: max", "last | mean | max | attention"),
        _line("  dropout: 0.3"),
        _line("  embedding_dropout: 0.2", "small datasets overfit the embeddings first"),
        _line(
            "  word_dropout: 0.2", "training only: a fifth of the words become <unk>, so none decides alone"
        ),
        _line(
            f"  ngrams: {recipe['ngrams']}",
            "a linear model over the uni- and bigrams beside the recurrent one, averaged with it",
        ),
        _line("train:"),
        _line("  batch_size: 64"),
        _line(
            f"  epochs: {recipe['epochs']}",
            f"about {recipe['steps']:,} steps over ~{recipe['rows']:,} rows; early stopping ends it sooner",
        ),
        _line("  lr: 0.002"),
        _line("  warmup_steps: 100"),
        _line("  lr_schedule: linear", "constant | linear | cosine, after warm-up"),
        _line("  grad_clip: 1.0", "recurrent gradients explode"),
        _line(
            f"  patience: {recipe['patience']}",
            f"stop after {recipe['patience']} evaluations without improvement",
        ),
    ]
    if not regression:
        lines.append(
            _line("  label_smoothing: 0.1", "keeps the recurrent path's logits from outgrowing the n-grams'")
        )
    if s["imbalanced"]:
        lines.append(_line("  class_weights: balanced", "the labels are imbalanced in the sample"))
    lines.append(_line("  device: auto", "CUDA when present, else the CPU"))
    return "".join(lines)


def starter_recipe(s: dict[str, Any]) -> dict[str, int]:
    """Epochs and patience by dataset size: small datasets need more passes to take enough steps
    (BENCHMARKS.md, "A small dataset through init"); the n-gram path is on."""
    rows = int(s.get("train_rows") or s["rows_read"])
    steps_per_epoch = max(1, math.ceil(rows * (1 - (s.get("validation_split") or 0.0)) / 64))
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(TARGET_STEPS / steps_per_epoch)))
    return {
        "ngrams": 2,
        "epochs": epochs,
        "patience": 3 if epochs > MIN_EPOCHS else 2,
        "steps": epochs * steps_per_epoch,
        "rows": rows,
    }


def count_train_rows(path: str, split: str, sampled: int, whole: bool) -> int:
    """Rows of the training split: the sample when it read them all, else one streamed pass (capped)."""
    if whole:
        return sampled
    rows = 0
    for chunk in open_split(DataConfig(path=path), split, limit=ROW_COUNT_CAP).iter(batch_size=4096):
        rows += len(next(iter(chunk.values())))
    return rows


def _refuse_classifier_run(run_dir: Path) -> None:
    """--init-from names a `seqtrain train` run (run.json without a pretrain kind): train would refuse the
    config, so init does at once."""
    import json

    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no run.json to tell: model.init_from's own checks speak at train time
    if isinstance(info, dict) and info.get("kind", "classifier") == "classifier":
        raise DataError(
            f"--init-from {str(run_dir)!r} is a classifier run (written by `seqtrain train`), not a "
            "`seqtrain pretrain` run: fine-tuning starts from a pretrained language model. Give the folder "
            "of a `seqtrain pretrain` run, or leave --init-from out."
        )


def write_starter(
    path: str,
    output: Path,
    text_column: str | None = None,
    label_column: str | None = None,
    sample: int = 5000,
    force: bool = False,
    init_from: str | None = None,
) -> dict[str, Any]:
    """Inspect `path`, write the starter config to `output` (never over an existing file unless `force`).
    `init_from`: a `seqtrain pretrain` run directory to fine-tune from (its tokenizer and shapes)."""
    if output.exists() and not force:
        raise DataError(f"{output} already exists; pick another --output or pass --force to overwrite it.")
    pretrained = None
    if init_from is not None:
        run_config = Path(init_from) / "config.yaml"
        if not run_config.is_file() or not (Path(init_from) / "tokenizer.json").is_file():
            raise DataError(
                f"--init-from {init_from!r} is not a `seqtrain pretrain` run directory (no config.yaml and "
                "tokenizer.json there)."
            )
        _refuse_classifier_run(Path(init_from))
        pretrained = yaml.safe_load(run_config.read_text())
    summary = inspect_dataset(path, text_column, label_column, sample)
    name = Path(path.rstrip("/")).stem.replace(" ", "-") or "run"
    text = starter_yaml(summary, name, init_from, pretrained)
    if pretrained is not None:  # what the config says: the pretrained run's tokenizer, not the sample's
        summary["vocab_size"] = pretrained["tokenizer"]["vocab_size"]
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return summary
