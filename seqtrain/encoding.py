"""Text and labels to numbers and back, without torch: what training, `eval` and `predict` share.

    encode             texts -> token ids, truncated to data.max_length (head, tail or head+tail),
                       or to data.ngram_max_length for a model whose n-gram path reads further
    truncate           the head / tail / head+tail rule on one text's ids
    pad                right-pad token ids into numpy arrays: ids (B, T), lengths (B,)
    sorted_batches     length-sorted batches of encoded texts, for eval, predict and serve
    BatchCost          a model's cost per call and per step, to cut a server's batches by length
    Labels             what the label column means: class names and values, or regression statistics
    read_run_files     the tokenizer.json and labels.json a run (or an export folder) holds

Nothing here imports torch, so `seqtrain predict` on an ONNX export folder starts in a fraction
of a second (torch's import alone takes longer than that); data.py wraps the numpy
batches into tensors for the torch paths.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from seqtrain.errors import CheckpointError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from seqtrain.config import DataConfig

PAD, UNK = "<pad>", "<unk>"
PAD_ID, UNK_ID = 0, 1
CHARS_PER_TOKEN = 32  # texts are clipped to max_length * this many characters before tokenizing


# --------------------------------------------------------------------------- texts


def read_length(data: DataConfig) -> int:
    """Tokens kept of each text: data.max_length, or data.ngram_max_length where the n-gram path reads
    further (the model then cuts the recurrent path's max_length tokens from them)."""
    return data.ngram_max_length or data.max_length


def clip(text: str, data: DataConfig) -> str:
    """Cut absurdly long texts before tokenizing, so a 10-million-character row costs nothing."""
    budget = read_length(data) * CHARS_PER_TOKEN
    if len(text) <= budget:
        return text
    if data.truncation == "head":
        return text[:budget]
    if data.truncation == "tail":
        return text[-budget:]
    return text[: budget // 2] + " " + text[-budget // 2 :]


def encode(tokenizer: Tokenizer, texts: list[str], data: DataConfig) -> list[list[int]]:
    """Token ids, truncated to `read_length(data)`; an empty result becomes a single <unk>."""
    # encode_batch_fast skips character offsets, which nothing here reads: the same ids for a third
    # less CPU (5,000 IMDB reviews: 1.06 instead of 1.65 CPU-seconds on one thread)
    encodings = tokenizer.encode_batch_fast([clip(t, data) for t in texts], add_special_tokens=False)
    n = read_length(data)
    return [truncate(e.ids, n, data.truncation) or [UNK_ID] for e in encodings]


def truncate(ids: list[int], max_length: int, truncation: str) -> list[int]:
    """At most `max_length` of `ids`: the first (head), the last (tail), or the first
    max_length - max_length // 2 and the last max_length // 2 (head+tail). The rule every reader of a
    text follows (explain maps tokens through it; model.recurrent_view is its tensor form)."""
    if len(ids) <= max_length:
        return ids
    if truncation == "head":
        return ids[:max_length]
    if truncation == "tail":
        return ids[-max_length:]
    return ids[: max_length - max_length // 2] + ids[len(ids) - max_length // 2 :]


def pad(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to the longest: ids (B, T) and lengths (B,), int64."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    ids = np.full((len(seqs), int(lengths.max())), PAD_ID, dtype=np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
    return ids, lengths


def sorted_batches(
    seqs: list[list[int]], batch_size: int, cost: BatchCost | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """For eval, predict and serve: (row indices, ids, lengths) of batches of similar length.

    The texts are sorted by length and cut every `batch_size`; with a `cost`, each of those batches
    is cut further wherever several smaller batches cost the model less than one padded batch."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        for part in cost.split(lengths[idx]) if cost else [slice(None)]:
            ids, batch_lengths = pad([seqs[i] for i in idx[part]])
            yield idx[part], ids, batch_lengths


@dataclass(frozen=True)
class BatchCost:
    """What one forward pass costs, in units of one text's time step: `per_call` for the call itself,
    and for B texts padded to T steps, T * (per_step + B).

    A server's batch holds whatever texts arrived together. Padding them all to the longest costs
    several times the work of batches sorted over many texts (BENCHMARKS.md), while each
    extra, smaller batch costs a call and, at every step, the work that does not grow with B. `serve`
    measures both constants on its model at start-up (serve.measure_cost)."""

    per_call: float
    per_step: float

    def split(self, lengths: np.ndarray) -> list[slice]:
        """Cut ascending `lengths` into consecutive groups of least total cost (dynamic programming:
        best[j] is the least cost of the first j texts, whose last group is texts i..j-1)."""
        n = len(lengths)
        best = np.zeros(n + 1)
        first = np.zeros(n + 1, dtype=np.int64)
        starts = np.arange(n)
        for j in range(1, n + 1):
            costs = best[:j] + self.per_call + lengths[j - 1] * (self.per_step + (j - starts[:j]))
            first[j] = int(np.argmin(costs))  # the first of equal costs: the biggest last group
            best[j] = costs[first[j]]
        groups = []
        while n > 0:
            groups.append(slice(int(first[n]), n))
            n = int(first[n])
        return groups[::-1]


# --------------------------------------------------------------------------- labels


@dataclass
class Labels:
    """What the label column means.

    classification: class names in index order, the raw dataset value that maps to each index,
    and the training count of each class (for class weights).
    regression: one number per row; `mean`/`std` of the training targets (for standardising) and
    whether they are all integers (then the rounded prediction's accuracy is reported too).
    """

    names: list[str]
    values: list[Any]
    task: str = "classification"
    counts: list[int] = field(default_factory=list)
    mean: float = 0.0
    std: float = 1.0
    integer: bool = False
    low: float = 0.0
    high: float = 0.0
    _index: dict[Any, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {v: i for i, v in enumerate(self.values)}

    @property
    def outputs(self) -> int:
        """Width of the model's last layer."""
        if self.task == "regression":
            return len(self.values) or 1  # the distribution head has one output per target value
        return len(self.names)

    @property
    def probs_width(self) -> int:
        """Width of what `predict` reports per text: class probabilities, or 1 regression score."""
        return 1 if self.task == "regression" else len(self.names)

    def target(self, value: Any) -> float | int | None:
        """Training target for a raw label value; None when it is not a known class / not a number."""
        if self.task == "regression":
            return number(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return self._index.get(value)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "task": self.task,
            "names": self.names,
            "values": self.values,
            "counts": self.counts,
        }
        if self.task == "regression":
            d.update(mean=self.mean, std=self.std, integer=self.integer, low=self.low, high=self.high)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Labels:
        return cls(
            names=list(d["names"]),
            values=list(d["values"]),
            task=d.get("task", "classification"),
            counts=list(d.get("counts", [])),
            mean=d.get("mean", 0.0),
            std=d.get("std", 1.0),
            integer=d.get("integer", False),
            low=d.get("low", 0.0),
            high=d.get("high", 0.0),
        )


def number(value: Any) -> float | None:
    """A regression target: ints, floats and numeric strings; None for anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        try:
            x = float(value)
        except ValueError:
            return None
        return x if math.isfinite(x) else None
    return None


def load_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer  # here, not at the top: `seqtrain --help` need not load it

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise CheckpointError(f"cannot read the tokenizer {path}: {e}") from None


def read_labels(path: Path) -> Labels:
    """A run's (or an export folder's) labels.json, checked: a file that is not JSON, or not the object
    `seqtrain train` writes, is a CheckpointError that names the file and the fault, never a traceback
    later (predict, explain, eval, export and serve all read labels.json through here)."""

    def damaged(what: str) -> CheckpointError:
        return CheckpointError(
            f"{path} is damaged: {what}. It is written by `seqtrain train` (an export folder holds a copy of "
            "its run's): restore it from a copy, or train the run again."
        )

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a complete seqtrain run.") from None
    except UnicodeDecodeError:
        raise damaged("it is not UTF-8 text") from None
    except ValueError as e:
        raise damaged(f"it is not JSON ({e})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(raw, dict):
        raise damaged(f"it holds a JSON {type(raw).__name__}, not an object with 'names' and 'values'")
    task = raw.get("task", "classification")
    if task not in ("classification", "regression"):
        raise damaged(f"'task' is {task!r}, not 'classification' or 'regression'")
    names, values = raw.get("names"), raw.get("values")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise damaged("'names' is not a non-empty list of strings")
    if not isinstance(values, list) or not all(v is None or isinstance(v, str | int | float) for v in values):
        raise damaged("'values' is not a list of label values")
    if task == "classification" and (len(names) < 2 or len(values) != len(names)):
        raise damaged(
            f"it names {len(names)} classes with {len(values)} values; a classifier needs at least two "
            "classes, one value each"
        )
    counts = raw.get("counts", [])
    if not isinstance(counts, list) or not all(
        isinstance(c, int) and not isinstance(c, bool) for c in counts
    ):
        raise damaged("'counts' is not a list of integers")
    for key in ("mean", "std", "low", "high"):
        x = raw.get(key, 0.0)
        if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
            raise damaged(f"{key!r} is {x!r}, not a finite number")
    if task == "regression" and not raw.get("std", 1.0) > 0:
        raise damaged(f"'std' is {raw.get('std')!r}; the targets' standard deviation must be positive")
    if not isinstance(raw.get("integer", False), bool):
        raise damaged("'integer' is not true or false")
    return Labels.from_json(raw)


def read_run_files(run_dir: Path) -> tuple[Tokenizer, Labels]:
    """The tokenizer and labels a training run wrote (JSON only)."""
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    return tokenizer, read_labels(run_dir / "labels.json")
