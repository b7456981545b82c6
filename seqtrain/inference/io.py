"""Prediction I/O for pipelines: read texts from anywhere as a stream, write results in order.

The model behind it is a `Predictor`: a trained run on torch (inference.run.Run) or an ONNX export
folder on onnxruntime (inference.onnx.ExportedRun, no torch import). This module imports neither.
`seqtrain predict`, `explain` and `serve` read and write through it.

Inputs: stdin or .txt (a line each), .jsonl, .csv, .parquet, or a dataset (Hub id, folder, files).
Malformed lines (not UTF-8, not JSON, no text, a CSV row with more or fewer fields than its
header) are reported with their line numbers and skipped, or stop everything with `strict`. Blank
lines of stdin and .txt are predicted as empty texts, so the output keeps one line per input line;
their line numbers are reported too. An `id` column is carried through when present.
"""

from __future__ import annotations

import csv
import itertools
import json
import queue
import sys
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import numpy as np

from seqtrain import badrows
from seqtrain.config import Config, DataConfig
from seqtrain.encoding import BatchCost, Labels, encode
from seqtrain.errors import DataError, SeqtrainError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Record = tuple[str, Any]  # (text, id or None)


class MalformedInput(SeqtrainError):
    pass


class Predictor(Protocol):
    """What prediction needs from a model: how to encode text, what the outputs mean, and the outputs."""

    config: Config
    tokenizer: Tokenizer
    labels: Labels

    def probs(self, seqs: list[list[int]], batch_size: int, cost: BatchCost | None = None) -> np.ndarray:
        """(N, C) class probabilities, or (N, 1) regression scores, in the order of `seqs`; batched as
        encoding.sorted_batches(seqs, batch_size, cost) cuts them."""
        ...


def predict_stream(
    run: Predictor, texts: Iterable[str], chunk: int = 2048, batch_size: int = 256
) -> Iterator[tuple[str, np.ndarray]]:
    """(text, probs) in input order, reading `chunk` texts at a time so output streams.

    A helper thread reads and tokenizes the next chunk (HF tokenizers runs outside the GIL) while
    the model runs on this one. It is a daemon thread, so a consumer that stops early never waits on it.
    """
    source = iter(texts)
    ahead: queue.Queue[tuple[list[str], list[list[int]]] | BaseException | None] = queue.Queue(maxsize=1)

    def read_ahead() -> None:
        try:
            while buf := list(itertools.islice(source, chunk)):
                ahead.put((buf, encode(run.tokenizer, buf, run.config.data)))
            ahead.put(None)
        except BaseException as e:  # handed to the consumer, raised there
            ahead.put(e)

    threading.Thread(target=read_ahead, name="seqtrain-read-ahead", daemon=True).start()
    while (item := ahead.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        buf, seqs = item
        yield from zip(buf, run.probs(seqs, batch_size), strict=True)


def _bad(bad: list[str], msg: str, strict: bool) -> None:
    if strict:
        raise MalformedInput(
            f"{msg}. Fix the input, or drop --strict to skip such lines and predict the rest."
        )
    bad.append(msg)


def _decoded_lines(raw: IO[bytes], bad: list[str], strict: bool) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line; a line that is not UTF-8 is reported, not fatal."""
    for n, line in enumerate(raw, 1):
        try:
            yield n, line.decode("utf-8")
        except UnicodeDecodeError as e:
            _bad(bad, f"line {n}: not valid UTF-8 ({e.reason} at byte {e.start})", strict)


def read_inputs(
    path: str,
    text_column: str,
    id_column: str,
    bad: list[str],
    strict: bool = False,
    blank: list[int] | None = None,
) -> Iterator[Record]:
    """Stream (text, id) from stdin (-) or a .txt, .jsonl, .csv or .parquet file."""
    suffix = Path(path).suffix.lower() if path != "-" else ".txt"
    if path != "-" and Path(path).is_dir():
        raise SeqtrainError(
            f"--input {path!r} is a folder; give a file (.txt, .jsonl, .csv, .parquet) or - for stdin."
        )
    if path != "-" and not Path(path).is_file():
        raise SeqtrainError(f"--input {path!r} does not exist.")
    if suffix == ".parquet":
        yield from _read_parquet(path, text_column, id_column, bad, strict)
        return
    raw = sys.stdin.buffer if path == "-" else open(path, "rb")  # noqa: SIM115
    try:
        lines = _decoded_lines(raw, bad, strict)
        if suffix in (".csv", ".tsv"):
            yield from _read_csv(
                path, lines, text_column, id_column, bad, strict, "\t" if suffix == ".tsv" else ","
            )
        elif suffix in (".jsonl", ".json"):
            for n, line in lines:
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                text = obj.get(text_column) if isinstance(obj, dict) else None
                if not isinstance(text, str) or not text.strip():
                    _bad(bad, f"line {n}: not a JSON object with a non-empty string {text_column!r}", strict)
                    continue
                yield text, obj.get(id_column) if isinstance(obj, dict) else None
        else:
            for n, line in lines:  # blank lines too: the output keeps one line per input line
                line = line.rstrip("\r\n")
                if not line.strip() and blank is not None:
                    blank.append(n)
                yield line, None
    finally:
        if raw is not sys.stdin.buffer:
            raw.close()


def _read_csv(
    path: str,
    lines: Iterator[tuple[int, str]],
    text_column: str,
    id_column: str,
    bad: list[str],
    strict: bool,
    delimiter: str,
) -> Iterator[Record]:
    current = [0]

    def text_lines() -> Iterator[str]:
        for n, line in lines:
            current[0] = n
            yield line

    reader = csv.DictReader(text_lines(), delimiter=delimiter)
    if reader.fieldnames is None or text_column not in reader.fieldnames:
        raise SeqtrainError(
            f"{path}: no column {text_column!r} (columns: {reader.fieldnames}); use --text-column."
        )
    width = len(reader.fieldnames)
    for row in reader:
        fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None) or [])
        if fields != width:  # a ragged row: which field is the text is anyone's guess
            _bad(bad, f"line {current[0]}: {fields} fields, the header has {width}", strict)
            continue
        text = row.get(text_column)
        if not text or not text.strip():
            _bad(bad, f"line {current[0]}: empty {text_column!r}", strict)
            continue
        yield text, row.get(id_column)


def _read_parquet(
    path: str, text_column: str, id_column: str, bad: list[str], strict: bool
) -> Iterator[Record]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    if text_column not in names:
        raise SeqtrainError(f"{path}: no column {text_column!r} (columns: {names}); use --text-column.")
    columns = [text_column] + ([id_column] if id_column in names else [])
    row = 0
    for batch in f.iter_batches(batch_size=2048, columns=columns):  # a row group at a time: constant memory
        d = batch.to_pydict()
        ids = d.get(id_column, [None] * batch.num_rows)
        for text, id_ in zip(d[text_column], ids, strict=True):
            row += 1
            if not isinstance(text, str) or not text.strip():
                _bad(bad, f"row {row}: empty or null {text_column!r}", strict)
                continue
            yield text, id_


def read_dataset(
    data: DataConfig, path: str, split: str, text_column: str, id_column: str, bad: list[str] | None = None
) -> Iterator[Record]:
    """Stream (text, id) from a split of a dataset, as training would read it."""
    from seqtrain.data import open_split

    ds = open_split(
        replace(data, path=path, eval_path=None, text_column=text_column, validation_split=None), split
    )
    columns = list(ds.column_names or [])
    if columns and text_column not in columns:
        raise DataError(
            f"split {split!r} of {path!r} has no column {text_column!r}; "
            f"its columns: {', '.join(columns)}. Use --text-column."
        )
    for n, row in enumerate(badrows.guarded(ds, path, split), 1):
        text = row.get(text_column)
        if isinstance(text, str) and text.strip():
            yield text, row.get(id_column)
        elif bad is not None:
            bad.append(f"row {n}: empty or null {text_column!r}")


def to_record(
    labels: Labels, text: str, probs: np.ndarray, top_k: int | None = None, threshold: float | None = None
) -> dict[str, Any]:
    """What `predict` writes for one text (and `serve` answers):
    {"text", "label", "probs"[, "top_k"]} or {"text", "score"}."""
    names = labels.names
    record: dict[str, Any] = {"text": text}
    if labels.task == "regression":
        record["score"] = round(float(probs[0]), 6)
        return record
    k = int(probs.argmax()) if threshold is None else int(probs[1] >= threshold)
    record["label"] = names[k]
    record["probs"] = {name: round(float(p), 6) for name, p in zip(names, probs, strict=True)}
    if top_k:
        order = probs.argsort()[::-1][:top_k]
        record["top_k"] = [{"label": names[j], "prob": round(float(probs[j]), 6)} for j in order]
    return record


def check_output(output: str) -> None:
    """Fail before any work when --output cannot be written: a folder, or a file in a missing folder."""
    if output == "-":
        return
    path = Path(output)
    if path.is_dir():
        raise SeqtrainError(
            f"--output {output!r} is a folder; give a file name, e.g. {str(path / 'predictions.jsonl')!r}."
        )
    if not path.parent.is_dir():
        raise SeqtrainError(
            f"--output {output!r}: the folder {str(path.parent)!r} does not exist; create it first."
        )


def open_output(output: str) -> IO[str]:
    check_output(output)
    try:
        return open(output, "w", encoding="utf-8", newline="")
    except OSError as e:
        raise SeqtrainError(f"cannot write --output {output!r}: {e.strerror or e}") from None


def write_predictions(
    run: Predictor,
    records: Iterator[Record],
    sink: IO[str],
    fmt: str,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    batch_size: int = 256,
    chunk: int = 2048,
) -> int:
    """Predict in input order and write JSONL or CSV as results come; returns the count.

    Texts are read `chunk` at a time and sorted by length inside each chunk: a bigger chunk pads
    less, a smaller one answers sooner (the CLI uses 4 x batch_size for stdin).
    """
    names = run.labels.names
    regression = run.labels.task == "regression"
    writer = csv.writer(sink) if fmt == "csv" else None
    ids: deque[Any] = deque()  # ids of texts read but not yet written: memory stays flat on endless input

    def texts() -> Iterator[str]:
        for text, id_ in records:
            ids.append(id_)
            yield text

    with_id: bool | None = None
    n = 0
    for text, probs in predict_stream(run, texts(), chunk=chunk, batch_size=batch_size):
        id_ = ids.popleft()
        if with_id is None:
            with_id = id_ is not None
            if writer:
                head = ["score"] if regression else ["label", *(f"prob_{name}" for name in names)]
                writer.writerow((["id"] if with_id else []) + ["text", *head])
        record: dict[str, Any] = {"id": id_} if with_id else {}
        record.update(to_record(run.labels, text, probs, top_k, threshold))
        if writer:
            row = [record["id"]] if with_id else []
            row += (
                [text, record["score"]]
                if regression
                else [text, record["label"], *(f"{p:.6f}" for p in probs)]
            )
            writer.writerow(row)
        else:
            sink.write(json.dumps(record) + "\n")
        n += 1
        if (n % 256) == 0:
            sink.flush()
    sink.flush()
    return n


def warn_malformed(bad: list[str]) -> None:
    """The input lines `predict` and `explain` skipped, with their reasons (the first 10)."""
    from seqtrain import console

    if bad:
        console.warn(
            f"skipped {len(bad)} malformed input line(s): "
            + "; ".join(bad[:10])
            + (" ..." if len(bad) > 10 else "")
        )
