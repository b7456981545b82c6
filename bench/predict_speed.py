"""Predict speed, for `make bench`: `seqtrain predict` end to end against the forward passes alone.

For a trained run it times, on the same validation reviews:

  - `seqtrain predict TARGET --input FILE.txt` as a subprocess (start-up, loading, tokenizing and
    writing JSONL included), TARGET being the run directory (torch) and its ONNX export
    (onnxruntime, no torch), and the same command on a one-line file (the fixed cost);
  - the bare forward: a fresh `Reference` (Embedding -> cell -> Linear) under `torch.inference_mode`
    on the batches predict builds, tokenized ahead of time. The ratio's denominator, the same for
    both engines; a reference point, not an upper bound (onnxruntime has run faster);
  - each engine's own forward alone on those batches: the run's model as `seqtrain predict` calls it
    (model, then softmax), and onnxruntime running the exported model.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import START_ENV, check
from bench.reference import fresh_model
from seqtrain.config import Config, DataConfig
from seqtrain.data import sorted_batches
from seqtrain.encoding import encode
from seqtrain.export import export_run
from seqtrain.inference.run import load_run
from seqtrain.losses import to_probs

PREDICT_BATCH, PREDICT_CHUNK = 256, 2048  # what `seqtrain predict` uses (cli -> predict_stream)
TARGET_PREDICT = 0.85

Batches = list[tuple[torch.Tensor, torch.Tensor]]  # (ids (B, T), lengths (B,)) each


@dataclass
class PredictResult:
    engine: str  # what `seqtrain predict` ran: the run directory (torch) or its ONNX export (onnxruntime)
    texts: int
    cli_seconds: float
    bare_seconds: float  # the bare torch forward on the same batches: the same for both engines
    startup_seconds: float  # the same command on a one-line file: start-up, imports, loading the run
    engine_seconds: float  # this engine's own forward-only time on the same batches

    @property
    def cli_per_sec(self) -> float:
        return self.texts / self.cli_seconds

    @property
    def bare_per_sec(self) -> float:
        return self.texts / self.bare_seconds


def predict_wall(target: Path, lines: list[str], out: Path) -> float:
    """Wall seconds of `seqtrain predict TARGET` on `lines` (one text a line), checking it answered each."""
    txt = out.with_suffix(".txt")
    txt.write_text("".join(" ".join(t.splitlines()) + "\n" for t in lines), encoding="utf-8")
    cmd = [
        str(Path(sys.executable).parent / "seqtrain"),
        "predict",
        str(target),
        "--input",
        str(txt),
        "--output",
        str(out),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=START_ENV, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"bench: {shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    n_out = sum(1 for _ in out.open(encoding="utf-8"))
    if n_out != len(lines):
        raise SystemExit(f"bench: seqtrain predict wrote {n_out} results for {len(lines)} texts.")
    return seconds


def predict_batches(tokenizer_json: Path, texts: list[str], data: DataConfig) -> Batches:
    """The batches predict builds: chunks of 2,048 texts in input order, each sorted by length and cut
    into batches of 256."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    batches: Batches = []
    for start in range(0, len(texts), PREDICT_CHUNK):
        seqs = encode(tokenizer, texts[start : start + PREDICT_CHUNK], data)
        batches += [(ids, lengths) for _, ids, lengths in sorted_batches(seqs, PREDICT_BATCH)]
    return batches


def forward_seconds(forward: Callable[[torch.Tensor, torch.Tensor], object], batches: Batches) -> float:
    """Seconds of `forward` over all batches, after one untimed warm-up batch."""
    with torch.inference_mode():
        forward(*batches[0])
        t0 = time.perf_counter()
        for ids, lengths in batches:
            forward(ids, lengths)
        return time.perf_counter() - t0


def bare_forward_seconds(cell: str, vocab_size: int, batches: Batches) -> float:
    model = fresh_model(cell, vocab_size).eval()
    return forward_seconds(
        lambda ids, lengths: torch.softmax(model.forward_padded(ids, lengths), -1), batches
    )


def torch_forward_seconds(run_dir: Path, batches: Batches) -> float:
    """The run's own model, loaded as `seqtrain predict` loads it, called as it calls it
    (inference.run.probs_of: the model, then to_probs)."""
    run, _ = load_run(run_dir)
    return forward_seconds(
        lambda ids, lengths: to_probs(run.model(ids, lengths), run.labels, run.config), batches
    )


def onnx_forward_seconds(onnx_dir: Path, batches: Batches) -> float:
    """onnxruntime running the exported model, one batch at a time."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = [{"ids": ids.numpy(), "lengths": lengths.numpy()} for ids, lengths in batches]
    session.run(["probs"], feeds[0])  # warm-up
    t0 = time.perf_counter()
    for feed in feeds:
        session.run(["probs"], feed)
    return time.perf_counter() - t0


def bench_predict(cfg: Config, texts: list[str], tmp: Path) -> list[PredictResult]:
    """`seqtrain predict` end to end on the run directory and on its ONNX export; the bare forward;
    each engine's own forward."""
    cell = cfg.model.cell
    onnx_dir = tmp / f"onnx-{cell}"
    export_run(cfg.run_dir, "onnx", onnx_dir)  # untimed, as training is
    walls = {
        target: (
            predict_wall(target, texts, tmp / f"reviews-{cell}-{target.name}.jsonl"),
            predict_wall(target, texts[:1], tmp / f"one-review-{cell}-{target.name}.jsonl"),
        )
        for target in (cfg.run_dir, onnx_dir)
    }  # newlines inside a review become spaces
    from tokenizers import Tokenizer

    tokenizer_json = cfg.run_dir / "tokenizer.json"
    batches = predict_batches(tokenizer_json, texts, cfg.data)
    bare = bare_forward_seconds(cell, Tokenizer.from_file(str(tokenizer_json)).get_vocab_size(), batches)
    engines = {
        cfg.run_dir: torch_forward_seconds(cfg.run_dir, batches),
        onnx_dir: onnx_forward_seconds(onnx_dir, batches),
    }
    names = {cfg.run_dir: "run directory (torch)", onnx_dir: "ONNX export (onnxruntime)"}
    return [PredictResult(names[t], len(texts), walls[t][0], bare, walls[t][1], engines[t]) for t in names]


PREDICT_TITLE = "Prediction, texts per second"
PREDICT_HEADER = [
    "cell",
    "seqtrain predict on",
    "texts",
    "texts/s",
    "bare forward",
    f"ratio (≥ {TARGET_PREDICT:.2f})",
    "predict wall",
    "predict of 1 text",
    "ratio after start-up",
    "engine's forward alone",
]

PREDICT_LEGEND = (
    "Prediction: `seqtrain predict TARGET --input reviews.txt --output out.jsonl` timed as a subprocess "
    "(start-up, loading, tokenizing, JSONL included) on the validation reviews, where TARGET is the run "
    "directory (torch) or its export from `seqtrain export --format onnx` (onnxruntime; torch is never "
    "imported), against the bare forward: a fresh Embedding -> cell -> Linear under `torch.inference_mode` "
    "on the same length-sorted batches of 256 (a reference point, not an upper bound). \"Engine's forward "
    "alone\" is texts/s of that engine's own forward pass on those batches: the run's model as `seqtrain "
    "predict` calls it (model, then softmax) for the torch row, onnxruntime running the exported model, one "
    'batch at a time, for the ONNX row. The ratio subtracts nothing; "predict of 1 text" (the same command '
    "on a one-line file: start-up, imports, loading the run) shows how much of the wall time is fixed cost, "
    'and "ratio after start-up" is bare forward time / (predict wall - predict of 1 text): how close the '
    "pipeline (reading, tokenizing ahead in a helper thread, forward, JSONL) runs to the kernels once the "
    "process is up."
)


def predict_table(results: list[tuple[str, list[PredictResult]]]) -> tuple[str, list[str], list[list[str]]]:
    """(title, header, rows) from (cell, its predict results) pairs."""
    rows = []
    for cell, predict in results:
        for p in predict:
            ratio = p.cli_per_sec / p.bare_per_sec
            after = p.cli_seconds - p.startup_seconds
            rows.append(
                [
                    cell.upper(),
                    p.engine,
                    f"{p.texts:,}",
                    f"{p.cli_per_sec:,.0f}",
                    f"{p.bare_per_sec:,.0f}",
                    f"{ratio:.3f} {check(ratio, TARGET_PREDICT)}",
                    f"{p.cli_seconds:.2f} s",
                    f"{p.startup_seconds:.2f} s",
                    f"{p.bare_seconds / after:.2f}" if after > 0 else "n/a",
                    f"{p.texts / p.engine_seconds:,.0f}",
                ]
            )
    return PREDICT_TITLE, PREDICT_HEADER, rows
