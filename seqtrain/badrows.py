"""Data files that are broken in ways a user can fix: turned into messages that name the file and line.

    reading         a context manager: pandas/pyarrow/decoding errors while a split streams -> DataError
    csv_options     with data.on_bad_rows: skip, a CSV line with too many fields is skipped (pandas warns
                    with its line number) and bytes that are not UTF-8 mark their row, which is then
                    skipped and counted like any bad row ("text is not valid UTF-8")
    reader_options  the same for any file builder: .txt lines with such bytes too
    pretrain_keys   errors about pretrain.path's texts name the pretrain.* keys, not the data.* ones that
                    they are read with
    check_folder    a folder with no data files (only a README) is named as such
    label_problem   a label outside data.label_names, found row by row (so the message has the row)

Imports nothing heavy: data.py and inference/io.py call it.
"""

from __future__ import annotations

import codecs
import contextlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from seqtrain.errors import DataError

T = TypeVar("T")
BAD_UTF8 = "\U0010fffd"  # stands in for undecodable bytes; a private-use character real text does not hold
_HANDLER = "seqtrain-mark-bad-utf8"


def _mark(e: UnicodeError) -> tuple[str, int]:
    assert isinstance(e, UnicodeDecodeError)
    return BAD_UTF8, e.end


codecs.register_error(_HANDLER, _mark)


def csv_options(on_bad_rows: str) -> dict[str, Any]:
    """Extra `datasets` csv builder arguments for data.on_bad_rows."""
    if on_bad_rows != "skip":
        return {}
    return {"on_bad_lines": "warn", "encoding_errors": _HANDLER}


def reader_options(builder: str, on_bad_rows: str) -> dict[str, Any]:
    """Extra arguments of a `datasets` file builder (csv, text, ...) for data.on_bad_rows: with skip, a
    .txt line with bytes that are not UTF-8 is marked and skipped like a CSV row."""
    if builder == "csv":
        return csv_options(on_bad_rows)
    if builder == "text" and on_bad_rows == "skip":
        return {"encoding_errors": _HANDLER}
    return {}


def not_utf8(text: str) -> bool:
    return BAD_UTF8 in text


@contextlib.contextmanager
def reading(path: str, split: str) -> Iterator[None]:
    """Errors raised while a split streams (the files are read lazily) become a DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    except UnicodeDecodeError as e:
        raise DataError(
            f"split {split!r} of {path!r} is not valid UTF-8 ({e.reason} at byte {e.start} of a block). "
            "Convert the file to UTF-8, or set data.on_bad_rows: skip to skip the rows holding such bytes."
        ) from None
    except Exception as e:
        name = type(e).__name__
        module = type(e).__module__ or ""
        if not module.startswith(("pandas", "pyarrow", "datasets", "json")) and name not in (
            "ArrowInvalid",
            "ParserError",
        ):
            raise
        text = str(e).strip().splitlines()[-1] if str(e).strip() else name
        if "BatchSize must be greater than 0" in text:  # the parquet builder reads row groups of 0 rows
            raise DataError(f"split {split!r} of {path!r} is empty: a parquet file holds 0 rows.") from None
        if name == "EmptyDataError":
            raise DataError(
                f"split {split!r} of {path!r}: a file is empty (0 bytes, not even a header line)."
            ) from None
        hint = (
            " Fix the line, or set data.on_bad_rows: skip to skip such lines."
            if name == "ParserError"
            else ""
        )
        raise DataError(f"cannot read split {split!r} of {path!r}: {text}.{hint}") from None


@contextlib.contextmanager
def pretrain_keys(pre: Any, data: Any) -> Iterator[None]:
    """pretrain.path's texts are read as a copy of the data section (data.py's unlabeled_source), so the
    errors raised while reading them say data.path, data.text_column and data.train_split: said here with
    the pretrain keys to change instead. `pre`, `data`: the config's pretrain and data sections."""
    try:
        yield
    except DataError as e:
        if not pre.path:
            raise
        text = str(e)
        own_path = pre.path != data.path and repr(pre.path) in text
        own_column = pre.text_column != data.text_column and f"column {pre.text_column!r}" in text
        if not (own_path or own_column):
            raise
        text = re.sub(r"\bdata\.text_column\b", "pretrain.text_column", text)
        if own_path:
            text = re.sub(r"\bdata\.path\b", "pretrain.path", text)
            text = re.sub(r"\bdata\.train_split\b", "pretrain.split", text)
        raise DataError(text) from None


def check_folder(path: str) -> None:
    """A local dataset folder must hold something besides README files."""
    folder = Path(path)
    if not folder.is_dir():
        return
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    if all(p.name.upper().startswith("README") or p.suffix.lower() == ".md" for p in files):
        shown = ", ".join(sorted(p.name for p in files)[:5]) or "nothing"
        raise DataError(
            f"data.path {path!r}: the folder holds no data files ({shown}). "
            "Put the splits there as data files, e.g. train.parquet / validation.parquet, or train.csv, "
            "or point data.path at a file."
        )


def label_problem(label: Any, names: list[str] | None) -> str | None:
    """Why `label` is not one of data.label_names (integers index them), or None when it is
    (or no names are set)."""
    if not names:
        return None
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool):
        return None if 0 <= label < len(names) else f"label {label} outside 0..{len(names) - 1}"
    return None if label in names else f"label {label!r} not in data.label_names"


def split_path(data: Any, split: str) -> str:
    """The path open_split reads `split` from (data.eval_path for the eval split, when set)."""
    return str(data.eval_path if (split == data.eval_split and data.eval_path) else data.path)


def guarded(items: Iterable[T], path: str, split: str) -> Iterator[T]:
    """`items` (a stream over a split), with `reading`'s messages for errors raised while it is read."""
    with reading(path, split):
        yield from items
