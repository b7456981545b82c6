"""`seqtrain explain`: the model loaded (a run directory, or an ONNX export folder without torch),
texts read as `predict` reads them, explained and written in input order."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from seqtrain.explain.attribution import ExplainError, explain_stream
from seqtrain.explain.output import write_explanations


def explain_command(
    target: Path,
    texts: list[str],
    input: str | None,
    label: str | None,
    method: str,
    fmt: str,
    output: str,
    *,
    text_column: str = "text",
    id_column: str = "id",
    checkpoint: str = "best",
    batch_size: int = 256,
    steps: int = 32,
    strict: bool = False,
) -> None:
    """`seqtrain explain`: read texts as `predict` does, explain each, write them in order; texts/s on
    stderr."""
    from seqtrain import console
    from seqtrain.inference.io import check_output, open_output, read_inputs, warn_malformed
    from seqtrain.inference.onnx import ExportedRun
    from seqtrain.inference.target import load_target

    check_output(output)  # before loading anything
    model, warnings = load_target(target, checkpoint, what="`seqtrain explain`")
    for w in warnings:
        console.warn(w)
    index = None
    if label is not None:
        if model.labels.task == "regression":
            raise ExplainError("--label names a class; this run is a regression (its score is explained).")
        if label not in model.labels.names:
            raise ExplainError(
                f"--label {label!r} is not one of the run's labels: {', '.join(model.labels.names)}."
            )
        index = model.labels.names.index(label)
    if method == "integrated-gradients" and isinstance(model, ExportedRun):
        raise ExplainError(
            "integrated gradients needs the model's gradients: give the run directory, "
            "or use --method occlusion."
        )
    if method == "integrated-gradients" and model.config.model.ngrams:
        console.warn(
            "integrated gradients follow the embeddings, so they attribute the recurrent path's half of "
            "each prediction and none of the n-gram path's (model.ngrams); --method occlusion shows both."
        )
    bad: list[str] = []
    blank: list[int] = []
    records = (
        read_inputs(input, text_column, id_column, bad, strict, blank)
        if input is not None
        else ((t, None) for t in texts)
    )
    started = time.perf_counter()
    sink = sys.stdout if output == "-" else open_output(output)
    try:
        chunk = 64 if input == "-" else 512  # stdin: answer sooner
        n, tokens = write_explanations(
            model, explain_stream(model, records, method, index, chunk, batch_size, steps), sink, fmt, method
        )
    finally:
        if sink is not sys.stdout:
            sink.close()
    seconds = time.perf_counter() - started
    warn_malformed(bad)
    if blank:
        console.warn(
            f"blank input line(s) {', '.join(map(str, blank[:20]))}{' ...' if len(blank) > 20 else ''}: "
            "explained as empty texts (no tokens), one output line per input line."
        )
    where = f" to {output}" if output != "-" else ""
    console.info(
        f"explained {n:,} texts ({tokens:,} tokens) with {method}{where} in {seconds:.2f} s: "
        f"{n / max(seconds, 1e-9):,.1f} texts/s"
    )
