"""`seqtrain predict`: the model loaded (a run directory on torch, or an ONNX export folder without
torch), texts read from arguments, a file or a dataset, one result per text written in input order."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from seqtrain import console
from seqtrain.errors import ConfigError
from seqtrain.inference.io import open_output, read_dataset, read_inputs, warn_malformed, write_predictions
from seqtrain.inference.target import load_target


def predict_command(
    run_dir: Path,
    texts: list[str] | None,
    input: str | None,
    data: str | None,
    split: str,
    output: str,
    fmt: str,
    text_column: str,
    id_column: str,
    checkpoint: str,
    batch_size: int,
    strict: bool,
    top_k: int | None,
    threshold: float | None,
) -> int:
    """`seqtrain predict` once its options are checked: load the run (or the export, without torch), read
    the inputs, write one result per text in order, report skipped and blank lines. Returns the count."""
    run, warnings = load_target(run_dir, checkpoint, what="`seqtrain predict`")  # an export: no torch
    for w in warnings:
        console.warn(w)
    if threshold is not None and (run.labels.task != "classification" or len(run.labels.names) != 2):
        raise ConfigError("--threshold applies to binary classification only.")
    bad: list[str] = []
    blank: list[int] = []
    records: Iterable[tuple[str, Any]]
    if data is not None:
        records = read_dataset(run.config.data, data, split, text_column, id_column, bad)
    elif input is not None:
        records = read_inputs(input, text_column, id_column, bad, strict, blank)
    else:
        records = ((t, None) for t in texts or [])
    sink = sys.stdout if output == "-" else open_output(output)
    try:
        chunk = 4 * batch_size if input == "-" else max(2048, 4 * batch_size)  # stdin: answer sooner
        n = write_predictions(
            run, records, sink, fmt, top_k=top_k, threshold=threshold, batch_size=batch_size, chunk=chunk
        )
    finally:
        if sink is not sys.stdout:
            sink.close()
    warn_malformed(bad)
    if blank:
        console.warn(
            f"line{'s' * (len(blank) > 1)} {', '.join(map(str, blank[:20]))}{' ...' * (len(blank) > 20)} "
            f"{'are' if len(blank) > 1 else 'is'} blank: "
            "predicted as empty texts, one output line per input line."
        )
    if output != "-":
        console.info(f"wrote {n:,} predictions to {output}")
    return n
