"""CPU speed of seqtrain against plain PyTorch: `make bench`, or `python -m bench.bench`.

For each recurrent cell (LSTM, GRU, RNN) at embedding 128, hidden 256, batch 64, max_length 400,
unidirectional, pooling `last`, on data/imdb, it runs three benchmarks:

  bench/train_speed.py    training tokens/s: (a) seqtrain's loop against (b), (c) textbook loops
                          and (d) the bare kernel loop on the same batches, as back-to-back pairs
  bench/predict_speed.py  texts/s of `seqtrain predict` (run directory and ONNX export) against the
                          bare forward and each engine's own forward on the same batches
  bench/startup.py        the wall time of `seqtrain --help`

The results are printed and written to BENCHMARKS.md between the `<!-- bench.bench:begin -->` and
`<!-- bench.bench:end -->` markers under `## CPU speed (make bench)`; what lies outside the markers
(notes, hand-run tables) is kept. `--quick` is a smoke run of well under a minute; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.common import (
    ROOT,
    cpu_model,
    cpu_snapshot,
    data_path,
    md_table,
    others_share,
    package_version,
    plain_table,
    say,
    write_between_markers,
)
from bench.predict_speed import PREDICT_LEGEND, PredictResult, bench_predict, predict_table
from bench.reference import BATCH, CELLS, EMBEDDING, HIDDEN, MAX_LENGTH, read_split
from bench.startup import help_seconds, startup_table
from bench.train_speed import (
    FULL,
    QUICK,
    QUICK_MAX_LENGTH,
    QUICK_TRAIN_EXAMPLES,
    TRAIN_LEGEND,
    Settings,
    TrainResult,
    bench_config,
    bench_training,
    train_table,
)
from seqtrain.machine import physical_cores

SECTION = "## CPU speed (make bench)"
MARKERS = "bench.bench"  # <!-- bench.bench:begin --> ... <!-- bench.bench:end -->
OTHERS_WARN = 0.05  # flag cells during which other processes used more than this share of the CPUs


def parse_args(argv: list[str] | None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="smoke run (< 1 minute): tiny step counts, meaningless numbers"
    )
    p.add_argument("--cells", nargs="+", default=None, help="cells to run (lstm gru rnn; commas also work)")
    p.add_argument(
        "--steps", type=int, default=None, help=f"measured steps of (a), (c), (d) (default {FULL.steps})"
    )
    p.add_argument(
        "--warmup", type=int, default=None, help=f"warm-up steps of (a), (c), (d) (default {FULL.warmup})"
    )
    p.add_argument(
        "--packed-steps", type=int, default=None, help=f"measured steps of (b) (default {FULL.packed_steps})"
    )
    p.add_argument(
        "--packed-warmup", type=int, default=None, help=f"warm-up steps of (b) (default {FULL.packed_warmup})"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"(a)-(d) pairs per cell, medians reported (default {FULL.repeat})",
    )
    p.add_argument(
        "--predict-texts", type=int, default=None, help="validation reviews to predict (default: all)"
    )
    p.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown file to write (default: BENCHMARKS.md; with --quick: bench/out/BENCHMARKS.quick.md)",
    )
    a = p.parse_args(argv)
    profile = QUICK if a.quick else FULL
    cells = [c for item in (a.cells or list(CELLS)) for c in item.split(",") if c]
    for c in cells:
        if c not in CELLS:
            p.error(f"unknown cell {c!r}; choose from {', '.join(CELLS)}")

    s = Settings(
        cells=cells,
        warmup=profile.warmup if a.warmup is None else a.warmup,
        steps=profile.steps if a.steps is None else a.steps,
        packed_warmup=profile.packed_warmup if a.packed_warmup is None else a.packed_warmup,
        packed_steps=profile.packed_steps if a.packed_steps is None else a.packed_steps,
        predict_texts=profile.predict_texts if a.predict_texts is None else a.predict_texts,
        help_runs=profile.help_runs,
        repeat=profile.repeat if a.repeat is None else a.repeat,
        max_train_examples=QUICK_TRAIN_EXAMPLES if a.quick else None,
        max_length=QUICK_MAX_LENGTH if a.quick else MAX_LENGTH,
        quick=a.quick,
    )
    if s.steps < 1 or s.packed_steps < 1 or s.repeat < 1 or s.warmup < 0 or s.packed_warmup < 0:
        p.error("step counts and --repeat must be >= 1 (warm-ups >= 0)")
    output = a.output or (
        ROOT / "bench" / "out" / "BENCHMARKS.quick.md" if a.quick else ROOT / "BENCHMARKS.md"
    )
    return s, output


@dataclass
class CellResult:
    train: TrainResult
    predict: list[PredictResult]


def tables(results: list[CellResult], help_s: float) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for the training and prediction tables and the --help line."""
    return [
        train_table([r.train for r in results]),
        predict_table([(r.train.cell, r.predict) for r in results]),
        startup_table(help_s),
    ]


def environment(s: Settings, data: Path) -> list[str]:
    exe = Path(sys.executable)
    exe_shown = os.path.relpath(exe, Path.cwd()) if exe.is_relative_to(Path.cwd()) else str(exe)
    command = shlex.join([exe_shown, "-m", "bench.bench", *sys.argv[1:]])
    return [
        f"- Machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} logical / "
        f"{physical_cores()} physical cores (torch threads: {torch.get_num_threads()})",
        f"- Versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"seqtrain {package_version('seqtrain')}, datasets {package_version('datasets')}, "
        f"tokenizers {package_version('tokenizers')}",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}` (`make bench`)",
        f"- Setup: IMDB ({os.path.relpath(data, ROOT) if data.is_relative_to(ROOT) else data}), "
        f"embedding {EMBEDDING}, hidden {HIDDEN}, batch {BATCH}, max_length {s.max_length}, "
        "unidirectional, pooling last, fp32. "
        f"(a), (c), (d): {s.warmup} warm-up + {s.steps} measured steps; "
        f"(b): {s.packed_warmup} + {s.packed_steps}; "
        f"(a) and (d): {s.repeat} back-to-back pair{'s' if s.repeat > 1 else ''} per cell."
        + (f" Training stream cut to {s.max_train_examples} rows." if s.max_train_examples else ""),
    ]


def markdown(
    s: Settings, data: Path, parts: list[tuple[str, list[str], list[list[str]]]], notes: list[str]
) -> str:
    """The generated block (the heading and the markers are bench.common's)."""
    md = [*environment(s, data), ""]
    if s.quick:
        md += ["**Smoke run (`--quick`): these numbers are not measurements.**", ""]
    for title, header, rows in parts:
        md += [f"**{title}**", "", md_table(header, rows), ""]
    md += [TRAIN_LEGEND, "", PREDICT_LEGEND, ""]
    md += [f"Note: {n}" for n in notes]
    return "\n".join(md).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    s, output = parse_args(argv)
    torch.set_num_threads(physical_cores())
    data = data_path()
    started = time.perf_counter()
    results: list[CellResult] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="seqtrain-bench-") as tmp_name:
        tmp = Path(tmp_name)
        probe = bench_config(s.cells[0], data, tmp / "probe", s)
        say("reading the training and validation splits (untimed)")
        train_split = read_split(probe, "train", s.max_train_examples)
        valid_texts = read_split(probe, "validation", s.predict_texts)[0]
        seqs_cache: dict[str, list[list[int]]] = {}
        for cell in s.cells:
            snap = cpu_snapshot()
            train, cfg = bench_training(cell, s, data, tmp, train_split, seqs_cache, notes)
            say(f"{cell}: seqtrain predict on {len(valid_texts):,} validation reviews")
            predict = bench_predict(cfg, valid_texts, tmp)
            for p in predict:
                say(
                    f"{cell}: predict on the {p.engine}: {p.cli_per_sec:,.0f} texts/s, "
                    f"bare forward {p.bare_per_sec:,.0f}, "
                    f"engine's forward {p.texts / p.engine_seconds:,.0f} texts/s"
                )
            train.others = others_share(snap, cpu_snapshot())
            if train.others is not None and train.others > OTHERS_WARN:
                notes.append(
                    f"{cell}: other processes used {train.others:.0%} of the CPUs meanwhile; "
                    "its numbers are unreliable."
                )
            results.append(CellResult(train, predict))
            torch.set_num_threads(physical_cores())  # keep every variant on the same thread count
    say(f"`seqtrain --help` x{s.help_runs}")
    parts = tables(results, help_seconds(s.help_runs))
    print()
    for title, header, rows in parts:
        print(title)
        print(plain_table(header, rows))
        print()
    for note in notes:
        print(f"note: {note}")
    write_between_markers(output, SECTION, MARKERS, markdown(s, data, parts, notes))
    say(f"wrote {output} ({time.perf_counter() - started:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
