"""CPU speed of seqtrain against plain PyTorch (issue 3): `make bench`, or `python -m bench.bench`.

For each recurrent cell (LSTM, GRU, RNN) at embedding 128, hidden 256, batch 64, max_length 400,
unidirectional, pooling `last`, on data/imdb, it measures real (non-padding) tokens per second of:

  (a) seqtrain's own training loop, end to end: `seqtrain.train.train(cfg)` streams, tokenizes,
      batches (with seqtrain's default data.num_workers), runs forward, backward and the optimizer step. The rate is read
      from the run's metrics.jsonl "train" lines after the warm-up steps.
  (b) the textbook reference: pre-tokenised tensors, random batches, `pack_padded_sequence`,
      the last hidden state h_n -> Linear, cross-entropy, AdamW.
  (c) the same reference on the same random batches, padded and not packed (the output at each
      row's last real step is gathered).
  (d) the ceiling: bare Embedding -> nn.LSTM/GRU/RNN -> Linear, forward + backward + AdamW, on
      exactly the batches seqtrain fed in (a) (rebuilt with seqtrain's BatchStream, untimed).

(a) and (d) run as back-to-back pairs, --repeat times (3 by default); the table shows the median
rate of each and the median of the pairs' a/d ratios, so one slow minute of a shared machine does
not decide the ratio. And, for prediction, texts per second of `seqtrain predict RUN_DIR --input FILE.txt` as a
subprocess (start-up, loading, tokenizing and writing JSONL included) on the 5,000 validation
reviews, against the bare forward-only kernel on the same length-sorted batches of 256. Finally
the wall time of `seqtrain --help`.

The results are printed and written to BENCHMARKS.md under `## CPU speed (make bench)` (only that
section is replaced). `--quick` is a smoke run of well under a minute; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_sequence

from seqtrain.config import Config, from_dict, physical_cores
from seqtrain.data import BatchStream, open_split, sorted_batches
from seqtrain.encoding import PAD_ID, UNK_ID, Labels, encode
from seqtrain.metrics import read_metrics
from seqtrain.train import train as seqtrain_train

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## CPU speed (make bench)"
CELLS: dict[str, Callable[..., nn.RNNBase]] = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}

# The shapes issue 3 fixes (--quick cuts texts to QUICK_MAX_LENGTH tokens instead of MAX_LENGTH).
EMBEDDING, HIDDEN, BATCH, MAX_LENGTH = 128, 256, 64, 400
PREDICT_BATCH, PREDICT_CHUNK = 256, 2048  # what `seqtrain predict` uses (cli -> predict_stream)

# Targets shown next to the ratios.
TARGET_A_B, TARGET_A_C, TARGET_A_D, TARGET_PREDICT, TARGET_HELP_S = 15.0, 1.3, 0.90, 0.85, 0.3

# The environment we were started with: train() sets TOKENIZERS_PARALLELISM=false in this process
# for its DataLoader worker, and the subprocesses we time must not inherit that.
START_ENV = dict(os.environ)


_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    cells: list[str]
    warmup: int  # (a), (c), (d): steps run before the clock starts
    steps: int  # (a), (c), (d): measured steps
    packed_warmup: int  # (b) is ~17x slower, so it gets its own, smaller counts
    packed_steps: int
    predict_texts: int | None  # validation reviews for the predict benchmark (None: all 5,000)
    help_runs: int
    repeat: int  # (a)-(d) pairs per cell; the table reports medians
    max_train_examples: int | None  # None (the full training stream) except in --quick
    max_length: int  # MAX_LENGTH except in --quick
    quick: bool


@dataclass(frozen=True)
class Counts:
    warmup: int
    steps: int
    packed_warmup: int
    packed_steps: int
    predict_texts: int | None
    help_runs: int
    repeat: int


# Full run: ~10-15 minutes on an idle 2-core machine, most of it in (b) and the three (a)-(d) pairs.
# A chunk of 4,096 rows makes 64 batches, so warm-up 3 + 64 measured steps cross one chunk boundary
# (a new chunk is tokenized). Three pairs: one 64-step sample of a fast cell (RNN: 0.13 s a step)
# swung a/d between 0.81 and 1.16 from run to run; the median of three is what we report.
FULL = Counts(warmup=3, steps=64, packed_warmup=1, packed_steps=5, predict_texts=None, help_runs=5, repeat=3)
QUICK = Counts(warmup=1, steps=2, packed_warmup=0, packed_steps=1, predict_texts=256, help_runs=2, repeat=1)
# --quick only: a short training stream (the vocabulary pass takes a second) and short texts (one
# packed LSTM step on 64 x 400 tokens takes 20-40 s on 2 cores; on 64 x 64 a few seconds).
QUICK_TRAIN_EXAMPLES, QUICK_MAX_LENGTH = 1024, 64


def parse_args(argv: list[str] | None) -> tuple[Settings, Path]:
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run (< 1 minute): tiny step counts, meaningless numbers")
    p.add_argument("--cells", nargs="+", default=None, help="cells to run (lstm gru rnn; commas also work)")
    p.add_argument("--steps", type=int, default=None, help=f"measured steps of (a), (c), (d) (default {FULL.steps})")
    p.add_argument("--warmup", type=int, default=None, help=f"warm-up steps of (a), (c), (d) (default {FULL.warmup})")
    p.add_argument("--packed-steps", type=int, default=None, help=f"measured steps of (b) (default {FULL.packed_steps})")
    p.add_argument("--packed-warmup", type=int, default=None, help=f"warm-up steps of (b) (default {FULL.packed_warmup})")
    p.add_argument("--repeat", type=int, default=None, help=f"(a)-(d) pairs per cell, medians reported (default {FULL.repeat})")
    p.add_argument("--predict-texts", type=int, default=None, help="validation reviews to predict (default: all)")
    p.add_argument("--output", type=Path, default=None,
                   help="markdown file to write (default: BENCHMARKS.md; with --quick: bench/out/BENCHMARKS.quick.md)")
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
    output = a.output or (ROOT / "bench" / "out" / "BENCHMARKS.quick.md" if a.quick else ROOT / "BENCHMARKS.md")
    return s, output


def data_path() -> Path:
    for p in (ROOT / "data" / "imdb", ROOT.parent / "shared" / "data" / "imdb"):
        if p.is_dir():
            return p
    raise SystemExit("bench: no IMDB data in data/imdb or ../shared/data/imdb (run `make data`).")


def bench_config(cell: str, data: Path, run_dir: Path, s: Settings) -> Config:
    """The issue-3 model, trained by seqtrain for warm-up + measured steps, evaluation made free."""
    log_every = math.gcd(s.warmup, s.steps) if s.warmup else s.steps  # a log line lands on step `warmup`
    return from_dict({
        "name": f"bench-{cell}",
        "output_dir": str(run_dir),
        "seed": 0,
        "data": {
            "path": str(data), "label_names": ["negative", "positive"], "max_length": s.max_length,
            "truncation": "head", "max_eval_examples": 64,  # data.num_workers: seqtrain's default for this machine
            "max_train_examples": s.max_train_examples,
        },
        "model": {
            "cell": cell, "embedding_dim": EMBEDDING, "hidden_size": HIDDEN, "num_layers": 1,
            "bidirectional": False, "pooling": "last",
        },
        "train": {
            "batch_size": BATCH, "max_steps": s.warmup + s.steps, "log_every": log_every,
            "eval_every": 10**9, "device": "cpu", "num_threads": physical_cores(),
        },
    })


# --------------------------------------------------------------------------- batches and timing


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) int64, right-padded with PAD_ID
    lengths: torch.Tensor  # (B,) int64, real tokens per row
    labels: torch.Tensor  # (B,) int64

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def padded(self) -> int:
        return self.ids.numel()


@dataclass
class Rate:
    tokens: int  # real tokens in the measured steps
    padded: int  # B * T summed over the measured steps
    seconds: float
    wait: float = 0.0  # seconds spent waiting for data (seqtrain only)
    shapes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def per_sec(self) -> float:
        return self.tokens / self.seconds

    @property
    def padding(self) -> float:
        return 1.0 - self.tokens / self.padded

    @property
    def data_wait(self) -> float:
        return self.wait / self.seconds


def timed_steps(step: Callable[[Batch], None], batches: list[Batch], warmup: int) -> Rate:
    """Run `step` on the first `warmup` batches untimed, then time it on the rest."""
    for b in batches[:warmup]:
        step(b)
    measured = batches[warmup:]
    t0 = time.perf_counter()
    for b in measured:
        step(b)
    seconds = time.perf_counter() - t0
    return Rate(sum(b.tokens for b in measured), sum(b.padded for b in measured), seconds,
                shapes=[tuple(b.ids.shape) for b in measured])  # type: ignore[misc]


# --------------------------------------------------------------------------- (a) seqtrain


def seqtrain_batches(cfg: Config, labels: Labels, n: int) -> list[Batch]:
    """The first `n` batches seqtrain's training stream yields for epoch 0 (rebuilt, not timed).

    With 0 or 1 DataLoader worker, the shards are read in the seeded order, exactly as this
    in-process iteration does; the tokenizer is the run's own tokenizer.json.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(cfg.run_dir / "tokenizer.json"))
    stream = BatchStream(cfg.data, cfg.data.train_split, tokenizer, labels, cfg.train.batch_size, shuffle=True,
                         seed=cfg.seed, epoch=0, limit=cfg.data.max_train_examples)
    out: list[Batch] = []
    for item in stream:
        out.append(Batch(item["ids"], item["lengths"], item["labels"]))
        if len(out) == n:
            return out
    raise SystemExit(f"bench: the training stream has only {len(out)} batches per epoch; use fewer steps than {n}.")


def bench_seqtrain(cfg: Config, s: Settings) -> tuple[Rate, list[Batch], list[str]]:
    """(a): train for warm-up + measured steps; the rate of the post-warm-up metrics.jsonl windows.

    A "train" line holds tokens_per_sec, padding and data_wait of the `log_every` steps since the
    previous line, but not the token count or the seconds. Rebuilding the batches gives each
    window's real tokens, so seconds = tokens / tokens_per_sec, and the windows are combined as
    total tokens / total seconds (not an average of rates). Each window's padding recomputed from the
    rebuilt batches must equal the logged one: that checks they are the batches seqtrain trained on.
    """
    from seqtrain import console

    console.out.quiet = True  # the final eval report would land on stdout, in the middle of our tables
    try:
        seqtrain_train(cfg)
    finally:
        console.out.quiet = False
    labels = Labels.from_json(json.loads((cfg.run_dir / "labels.json").read_text()))
    batches = seqtrain_batches(cfg, labels, s.warmup + s.steps)
    lines = [r for r in read_metrics(cfg.run_dir / "metrics.jsonl") if r.get("split") == "train"]
    notes: list[str] = []
    rate = Rate(0, 0, 0.0)
    prev = 0
    for line in lines:
        step = int(line["step"])
        window = batches[prev:step]
        prev = step
        if step <= s.warmup:
            continue
        tokens, padded = sum(b.tokens for b in window), sum(b.padded for b in window)
        seconds = tokens / line["tokens_per_sec"]
        rate.tokens += tokens
        rate.padded += padded
        rate.seconds += seconds
        rate.wait += line["data_wait"] * seconds
        rate.shapes += [tuple(b.ids.shape) for b in window]  # type: ignore[misc]
        if abs((1 - tokens / padded) - line["padding"]) > 1e-9:
            notes.append(f"{cfg.model.cell}: window ending at step {step} logged padding {line['padding']:.6f} but the "
                         f"rebuilt batches give {1 - tokens / padded:.6f}; (d) may not use seqtrain's exact batches.")
    if prev != s.warmup + s.steps or not rate.shapes:
        raise SystemExit(f"bench: metrics.jsonl ends at step {prev}, expected {s.warmup + s.steps}.")
    return rate, batches, notes


def time_pair(cfg: Config, s: Settings) -> tuple[Rate, Rate, list[str]]:
    """(a) then, right after, (d) on the exact batches (a) trained on: one back-to-back pair.

    Back to back, so the machine drifting between the two (run-to-run swings of +-5% here) does not
    land in a/d. Returns (a, d, notes).
    """
    a, batches, notes = bench_seqtrain(cfg, s)
    model = fresh_model(cfg.model.cell, json.loads((cfg.run_dir / "run.json").read_text())["vocab_size"])
    d = timed_steps(training_step(model, model.forward_padded, fused=True), batches, s.warmup)
    if sorted(d.shapes) != sorted(a.shapes):
        notes.append(f"{cfg.model.cell}: the ceiling's batch shapes differ from seqtrain's measured ones.")
    return a, d, notes


# --------------------------------------------------------------------------- (b), (c), (d) references


class Reference(nn.Module):
    """Embedding -> one nn.LSTM / nn.GRU / nn.RNN layer -> Linear, as a tutorial writes it."""

    def __init__(self, cell: str, vocab_size: int, num_classes: int = 2) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, EMBEDDING, padding_idx=PAD_ID)
        self.rnn = CELLS[cell](EMBEDDING, HIDDEN, batch_first=True)
        self.head = nn.Linear(HIDDEN, num_classes)

    def forward_packed(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(b): ids (B, T), lengths (B,) on the CPU -> logits (B, C) from the last hidden state h_n."""
        x = self.embedding(ids)  # (B, T, E)
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)  # LSTM: (h_n, c_n); GRU/RNN: h_n. h_n is (layers, B, H), in the batch's order
        h_n = h[0] if isinstance(h, tuple) else h
        return self.head(h_n[-1])  # (B, C)

    def forward_padded(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(c), (d) and the predict ceiling: ids (B, T) -> logits (B, C) from each row's last real step."""
        out, _ = self.rnn(self.embedding(ids))  # (B, T, H): padding is on the right, after the real steps
        last = out[torch.arange(ids.shape[0]), lengths - 1]  # (B, H)
        return self.head(last)  # (B, C)


def training_step(model: Reference, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  fused: bool = False) -> Callable[[Batch], None]:
    """Forward, cross-entropy, backward, AdamW step: nothing else (no clipping, no logging).

    The references (b, c) use AdamW as people write it; the ceiling (d) uses the fused AdamW that
    seqtrain uses, so that the ceiling is the fastest this kernel path can go.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=fused)

    def step(b: Batch) -> None:
        loss = F.cross_entropy(forward(b.ids, b.lengths), b.labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def fresh_model(cell: str, vocab_size: int) -> Reference:
    torch.manual_seed(0)
    return Reference(cell, vocab_size).train()


def random_batches(seqs: list[list[int]], labels: list[int], n: int, seed: int = 0) -> list[Batch]:
    """`n` batches of BATCH texts drawn at random (no length bucketing), right-padded to their longest."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        idx = rng.choice(len(seqs), size=BATCH, replace=False)
        ids = pad_sequence([torch.tensor(seqs[i]) for i in idx], batch_first=True, padding_value=PAD_ID)  # (B, T)
        lengths = torch.tensor([len(seqs[i]) for i in idx])  # (B,)
        out.append(Batch(ids, lengths, torch.tensor([labels[i] for i in idx])))
    return out


def read_split(cfg: Config, split: str, limit: int | None) -> tuple[list[str], list[int]]:
    """Texts and integer labels of a split, read with seqtrain's own reader (untimed)."""
    ds = open_split(cfg.data, split, limit).select_columns([cfg.data.text_column, cfg.data.label_column])
    texts, labels = [], []
    for row in ds:
        texts.append(row[cfg.data.text_column])
        labels.append(int(row[cfg.data.label_column]))
    return texts, labels


def pretokenize(tokenizer_json: Path, texts: list[str], max_length: int) -> list[list[int]]:
    """Token ids with the run's tokenizer, cut to `max_length` (the head), as a tutorial would."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [e.ids[:max_length] or [UNK_ID] for e in encodings]  # an empty text becomes one <unk>, as in seqtrain


# --------------------------------------------------------------------------- other work on the machine


@dataclass
class CpuSnapshot:
    busy: float  # CPU-seconds all CPUs spent busy (or stolen by the hypervisor) since boot
    ours: float  # CPU-seconds of this process and its reaped children (DataLoader worker, subprocesses)
    wall: float


def cpu_snapshot() -> CpuSnapshot | None:
    try:
        # cpu  user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    return CpuSnapshot(busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, time.perf_counter())


def others_share(start: CpuSnapshot | None, end: CpuSnapshot | None) -> float | None:
    """Share of the machine's CPU capacity used by other processes between two snapshots.

    The benchmark owns every core (torch threads = physical cores); anything else running makes
    the multi-threaded kernels wait on each other, and the numbers are then not worth keeping.
    """
    if start is None or end is None or end.wall <= start.wall:
        return None
    others = (end.busy - start.busy) - (end.ours - start.ours)
    return max(0.0, others) / ((end.wall - start.wall) * (os.cpu_count() or 1))


# --------------------------------------------------------------------------- prediction


@dataclass
class PredictResult:
    engine: str  # what `seqtrain predict` ran: the run directory (torch) or its ONNX export (onnxruntime)
    texts: int
    cli_seconds: float
    ceiling_seconds: float  # torch forward-only on the same batches: the ceiling of issue 3, the same for both engines
    startup_seconds: float  # the same command on a one-line file: start-up, imports, loading the run
    kernel_seconds: float  # this engine's forward-only time on the same batches

    @property
    def cli_per_sec(self) -> float:
        return self.texts / self.cli_seconds

    @property
    def ceiling_per_sec(self) -> float:
        return self.texts / self.ceiling_seconds


def bench_predict(cfg: Config, texts: list[str], tmp: Path) -> list[PredictResult]:
    """`seqtrain predict` end to end on the run directory and on its ONNX export, against the bare forward-only kernel."""
    from tokenizers import Tokenizer

    from seqtrain.export import export_run

    def run_predict(target: Path, lines: list[str], name: str) -> float:
        """Wall seconds of `seqtrain predict TARGET` on `lines` (one text a line), checking it answered each."""
        txt, out = tmp / f"{name}.txt", tmp / f"{name}-{cfg.model.cell}-{target.name}.jsonl"
        txt.write_text("".join(" ".join(t.splitlines()) + "\n" for t in lines), encoding="utf-8")
        cmd = [str(Path(sys.executable).parent / "seqtrain"), "predict", str(target), "--input", str(txt),
               "--output", str(out)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=START_ENV, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            raise SystemExit(f"bench: {shlex.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
        n_out = sum(1 for _ in out.open(encoding="utf-8"))
        if n_out != len(lines):
            raise SystemExit(f"bench: seqtrain predict wrote {n_out} results for {len(lines)} texts.")
        return seconds

    onnx_dir = tmp / f"onnx-{cfg.model.cell}"
    export_run(cfg.run_dir, "onnx", onnx_dir)  # untimed, as training is
    walls = {}
    for target in (cfg.run_dir, onnx_dir):
        walls[target] = (run_predict(target, texts, "reviews"),  # newlines inside a review become spaces
                         run_predict(target, texts[:1], "one-review"))

    # The ceiling: the batches predict builds (chunks of 2,048 texts in input order, each sorted by
    # length and cut into batches of 256), tokenized ahead of time; only the forward passes are timed.
    tokenizer = Tokenizer.from_file(str(cfg.run_dir / "tokenizer.json"))
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []  # ids (B, T), lengths (B,)
    for start in range(0, len(texts), PREDICT_CHUNK):
        seqs = encode(tokenizer, texts[start : start + PREDICT_CHUNK], cfg.data)
        batches += [(ids, lengths) for _, ids, lengths in sorted_batches(seqs, PREDICT_BATCH)]
    model = fresh_model(cfg.model.cell, tokenizer.get_vocab_size()).eval()
    with torch.inference_mode():
        model.forward_padded(*batches[0])  # warm-up
        t0 = time.perf_counter()
        for ids, lengths in batches:
            torch.softmax(model.forward_padded(ids, lengths), -1)  # (B, C)
        ceiling_seconds = time.perf_counter() - t0
    # onnxruntime's own forward-only time on the same batches (the exported seqtrain model: its
    # embedding, cell and head are the same shapes as the ceiling's)
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = [{"ids": ids.numpy(), "lengths": lengths.numpy()} for ids, lengths in batches]
    session.run(["probs"], feeds[0])  # warm-up
    t0 = time.perf_counter()
    for feed in feeds:
        session.run(["probs"], feed)
    ort_seconds = time.perf_counter() - t0
    (torch_wall, torch_start), (onnx_wall, onnx_start) = walls[cfg.run_dir], walls[onnx_dir]
    return [
        PredictResult("run directory (torch)", len(texts), torch_wall, ceiling_seconds, torch_start, ceiling_seconds),
        PredictResult("ONNX export (onnxruntime)", len(texts), onnx_wall, ceiling_seconds, onnx_start, ort_seconds),
    ]


def help_seconds(runs: int) -> float:
    """Median wall time of `seqtrain --help` as a fresh process."""
    cmd = [str(Path(sys.executable).parent / "seqtrain"), "--help"]
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=START_ENV, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# --------------------------------------------------------------------------- the run


@dataclass
class CellResult:
    cell: str
    a: Rate  # the median of the (a) runs
    b: Rate
    c: Rate
    d: Rate  # the median of the (d) runs
    ad_pairs: list[float]  # a/d of each back-to-back pair; the table's a/d is their median
    predict: list[PredictResult]
    others: float | None  # CPU share other processes took while this cell ran


OTHERS_WARN = 0.05  # flag cells during which other processes used more than this share of the CPUs


def bench_cell(cell: str, s: Settings, data: Path, tmp: Path, train_split: tuple[list[str], list[int]],
               valid_texts: list[str], seqs_cache: dict[str, list[list[int]]], notes: list[str]) -> CellResult:
    from tokenizers import Tokenizer

    snap = cpu_snapshot()
    a_runs: list[Rate] = []
    d_runs: list[Rate] = []
    for i in range(s.repeat):  # each pair trains a fresh run: same seed, so the same batches
        cfg = bench_config(cell, data, tmp / f"run-{cell}-{i}", s)
        say(f"{cell}: pair {i + 1}/{s.repeat}: (a) seqtrain train, {s.warmup} + {s.steps} steps, then (d)")
        a, d, pair_notes = time_pair(cfg, s)
        notes += [n for n in pair_notes if n not in notes]  # the pairs train on the same batches
        a_runs.append(a)
        d_runs.append(d)
        say(f"{cell}: pair {i + 1}: (a) {a.per_sec:,.0f}  (d) {d.per_sec:,.0f} tokens/s  a/d {a.per_sec / d.per_sec:.3f}"
            f"  (padding {a.padding:.1%}, data wait {a.data_wait:.1%})")
    a, d = median_rate(a_runs), median_rate(d_runs)
    ad_pairs = [x.per_sec / y.per_sec for x, y in zip(a_runs, d_runs, strict=True)]
    tokenizer_json = cfg.run_dir / "tokenizer.json"
    vocab_size = Tokenizer.from_file(str(tokenizer_json)).get_vocab_size()

    key = tokenizer_json.read_text()  # every cell trains the same vocabulary: tokenize the split once
    if key not in seqs_cache:
        say("tokenizing the training split for the references (untimed)")
        seqs_cache[key] = pretokenize(tokenizer_json, train_split[0], s.max_length)
    seqs, labels = seqs_cache[key], train_split[1]

    rand = random_batches(seqs, labels, max(s.packed_warmup + s.packed_steps, s.warmup + s.steps))
    say(f"{cell}: (b) packed reference, {s.packed_warmup} + {s.packed_steps} steps")
    m = fresh_model(cell, vocab_size)
    b = timed_steps(training_step(m, m.forward_packed), rand[: s.packed_warmup + s.packed_steps], s.packed_warmup)
    say(f"{cell}: (c) padded reference on random batches, {s.warmup} + {s.steps} steps")
    m = fresh_model(cell, vocab_size)
    c = timed_steps(training_step(m, m.forward_padded), rand[: s.warmup + s.steps], s.warmup)
    say(f"{cell}: (b) {b.per_sec:,.0f}  (c) {c.per_sec:,.0f}  (d) {d.per_sec:,.0f} tokens/s")

    say(f"{cell}: seqtrain predict on {len(valid_texts):,} validation reviews")
    pred = bench_predict(cfg, valid_texts, tmp)
    for p in pred:
        say(f"{cell}: predict on the {p.engine}: {p.cli_per_sec:,.0f} texts/s, ceiling {p.ceiling_per_sec:,.0f} texts/s")
    others = others_share(snap, cpu_snapshot())
    if others is not None and others > OTHERS_WARN:
        notes.append(f"{cell}: other processes used {others:.0%} of the CPUs meanwhile; its numbers are unreliable.")
    return CellResult(cell, a, b, c, d, ad_pairs, pred, others)


def median_rate(rates: list[Rate]) -> Rate:
    """The run with the median tokens/s (the lower middle one of an even count)."""
    return sorted(rates, key=lambda r: r.per_sec)[(len(rates) - 1) // 2]


# --------------------------------------------------------------------------- report


def check(value: float, target: float, at_least: bool = True) -> str:
    ok = value >= target if at_least else value <= target
    return "✓" if ok else "✗"


def tables(results: list[CellResult], help_s: float) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for the training and prediction tables and the --help line."""
    train_rows = []
    for r in results:
        ab, ac, ad = r.a.per_sec / r.b.per_sec, r.a.per_sec / r.c.per_sec, statistics.median(r.ad_pairs)
        train_rows.append([
            r.cell.upper(), f"{r.a.per_sec:,.0f}", f"{r.b.per_sec:,.0f}", f"{r.c.per_sec:,.0f}", f"{r.d.per_sec:,.0f}",
            f"{r.a.padding:.1%}", f"{r.c.padding:.1%}", f"{r.a.data_wait:.1%}",
            f"{ab:.1f} {check(ab, TARGET_A_B)}", f"{ac:.2f} {check(ac, TARGET_A_C)}", f"{ad:.2f} {check(ad, TARGET_A_D)}",
            " ".join(f"{x:.2f}" for x in r.ad_pairs),
            "?" if r.others is None else f"{r.others:.0%}",
        ])
    pred_rows = []
    for r in results:
        for p in r.predict:
            ratio = p.cli_per_sec / p.ceiling_per_sec
            pred_rows.append([
                r.cell.upper(), p.engine, f"{p.texts:,}", f"{p.cli_per_sec:,.0f}", f"{p.ceiling_per_sec:,.0f}",
                f"{ratio:.3f} {check(ratio, TARGET_PREDICT)}", f"{p.cli_seconds:.2f} s", f"{p.startup_seconds:.2f} s",
                f"{p.ceiling_seconds / after:.2f}" if (after := p.cli_seconds - p.startup_seconds) > 0 else "n/a",
                f"{p.texts / p.kernel_seconds:,.0f}",
            ])
    return [
        ("Training, real tokens per second",
         ["cell", "a seqtrain", "b packed ref", "c padded ref", "d ceiling", "padding a", "padding c", "data wait a",
          f"a/b (≥ {TARGET_A_B:g})", f"a/c (≥ {TARGET_A_C:g})", f"a/d (≥ {TARGET_A_D:.2f})", "a/d of each pair",
          "others' CPU"],
         train_rows),
        ("Prediction, texts per second",
         ["cell", "seqtrain predict on", "texts", "texts/s", "ceiling", f"ratio (≥ {TARGET_PREDICT:.2f})", "predict wall",
          "predict of 1 text", "ratio after start-up", "engine's forward alone"],
         pred_rows),
        ("CLI start-up",
         ["command", "median wall time", f"target (≤ {TARGET_HELP_S:g} s)"],
         [["seqtrain --help", f"{help_s:.3f} s", check(help_s, TARGET_HELP_S, at_least=False)]]),
    ]


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def environment(s: Settings, data: Path) -> list[str]:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    exe = Path(sys.executable)
    exe_shown = os.path.relpath(exe, Path.cwd()) if exe.is_relative_to(Path.cwd()) else str(exe)
    command = shlex.join([exe_shown, "-m", "bench.bench", *sys.argv[1:]])
    return [
        f"- Machine: {platform.platform()}, {cpu_model()}, {os.cpu_count()} logical / {physical_cores()} physical cores "
        f"(torch threads: {torch.get_num_threads()})",
        f"- Versions: python {platform.python_version()}, torch {torch.__version__}, seqtrain {version('seqtrain')}, "
        f"datasets {version('datasets')}, tokenizers {version('tokenizers')}",
        f"- Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}` (`make bench`)",
        f"- Setup: IMDB ({os.path.relpath(data, ROOT) if data.is_relative_to(ROOT) else data}), embedding {EMBEDDING}, "
        f"hidden {HIDDEN}, batch {BATCH}, max_length {s.max_length}, unidirectional, pooling last, fp32. "
        f"(a), (c), (d): {s.warmup} warm-up + {s.steps} measured steps; (b): {s.packed_warmup} + {s.packed_steps}; "
        f"(a) and (d): {s.repeat} back-to-back pair{'s' if s.repeat > 1 else ''} per cell."
        + (f" Training stream cut to {s.max_train_examples} rows." if s.max_train_examples else ""),
    ]


LEGEND = [
    "(a) `seqtrain.train.train` end to end (stream, tokenize, batch with the default data.num_workers, forward, backward, "
    "clip, AdamW), from metrics.jsonl after warm-up; (b) textbook loop: pre-tokenised tensors, random batches, "
    "`pack_padded_sequence`, h_n -> Linear, AdamW; (c) the same on the same random batches, padded, not packed; "
    "(d) ceiling: bare Embedding -> cell -> Linear, forward + backward + AdamW on the exact batches seqtrain "
    "trained on in (a). (a) and (d) show the median of their runs, and a/d is the median of the ratios of the "
    "back-to-back (a)-(d) pairs (listed in \"a/d of each pair\"). Tokens/s count real (non-padding) tokens. Padding: share of pad positions in the batches; "
    "data wait: share of (a)'s time spent waiting for the next batch. Others' CPU: share of the machine other "
    "processes used while the cell ran (from /proc/stat); above 5% the cell's numbers are not trustworthy.",
    "Prediction: `seqtrain predict TARGET --input reviews.txt --output out.jsonl` timed as a subprocess (start-up, "
    "loading, tokenizing, JSONL included) on the validation reviews, where TARGET is the run directory (torch) or "
    "its export from `seqtrain export --format onnx` (onnxruntime; torch is never imported), against the ceiling: "
    "forward-only Embedding -> cell -> Linear under `torch.inference_mode` on the same length-sorted batches of "
    "256. \"Engine's forward alone\" is texts/s of that engine's forward pass on those batches (for the ONNX row, "
    "onnxruntime running the exported model). The ratio subtracts nothing; "
    "\"predict of 1 text\" (the same command on a one-line file: start-up, imports, loading the run) shows how "
    "much of the wall time is fixed cost, and \"ratio after start-up\" is ceiling time / (predict wall - predict "
    "of 1 text): how close the pipeline (reading, tokenizing ahead in a helper thread, forward, JSONL) runs to the "
    "kernels once the process is up.",
]


def write_markdown(path: Path, section: str, heading: str = SECTION) -> None:
    """Replace the `heading` section of `path` (up to the next # or ## heading), keep the rest."""
    if not path.exists():
        path.write_text("# Benchmarks\n\n" + section + "\n", encoding="utf-8")
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    except StopIteration:
        text = "\n".join(lines).rstrip("\n")
        path.write_text(text + "\n\n" + section + "\n", encoding="utf-8")
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith(("# ", "## "))), len(lines))
    rest = lines[end:]
    new = lines[:start] + section.splitlines() + ([""] if rest else []) + rest
    path.write_text("\n".join(new) + "\n", encoding="utf-8")


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
            results.append(bench_cell(cell, s, data, tmp, train_split, valid_texts, seqs_cache, notes))
            torch.set_num_threads(physical_cores())  # keep every variant on the same thread count
    say(f"`seqtrain --help` x{s.help_runs}")
    help_s = help_seconds(s.help_runs)

    parts = tables(results, help_s)
    print()
    for title, header, rows in parts:
        print(title)
        print(plain_table(header, rows))
        print()
    for note in notes:
        print(f"note: {note}")
    md = [SECTION, "", *environment(s, data), ""]
    if s.quick:
        md += ["**Smoke run (`--quick`): these numbers are not measurements.**", ""]
    for title, header, rows in parts:
        md += [f"**{title}**", "", md_table(header, rows), ""]
    md += [*LEGEND[:1], "", *LEGEND[1:], ""]
    md += [f"Note: {n}" for n in notes]
    output.parent.mkdir(parents=True, exist_ok=True)
    write_markdown(output, "\n".join(md).rstrip("\n") + "\n")
    say(f"wrote {output} ({time.perf_counter() - started:.0f}s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
