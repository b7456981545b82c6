"""Training speed: seqtrain's loop against plain PyTorch on the same model, for `make bench`.

For one recurrent cell at the issue-3 shapes it measures real (non-padding) tokens per second of:

  (a) seqtrain's own training loop, end to end: `seqtrain.train.train(cfg)` streams, tokenizes,
      batches (with seqtrain's default data.num_workers), runs forward, backward, clipping and the
      optimizer step. The rate is read from the run's metrics.jsonl "train" lines after warm-up.
  (b) the textbook reference: pre-tokenised tensors, random batches, `pack_padded_sequence`,
      the last hidden state h_n -> Linear, cross-entropy, AdamW.
  (c) the same reference on the same random batches, padded and not packed (the output at each
      row's last real step is gathered).
  (d) the bare kernel loop: Embedding -> nn.LSTM/GRU/RNN -> Linear, forward + backward + fused
      AdamW, on exactly the batches seqtrain fed in (a) (rebuilt with seqtrain's BatchStream,
      untimed). It skips work seqtrain's step does (dropout, gradient clipping, weight-decay
      groups, logging), yet it is not a ceiling: (a) has measured above (d) (GRU pairs 1.19, 0.91,
      1.00). a/d says how close seqtrain runs to the bare loop, not to a limit.

(a) and (d) run as back-to-back pairs, --repeat times; the table shows the median rate of each and
the median of the pairs' a/d ratios, so one slow minute of a shared machine does not decide it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.common import check, say
from bench.reference import (
    BATCH,
    EMBEDDING,
    HIDDEN,
    Batch,
    Rate,
    fresh_model,
    median_rate,
    pretokenize,
    random_batches,
    timed_steps,
    training_step,
)
from seqtrain.checkpoint import TrainState
from seqtrain.config import Config, from_dict
from seqtrain.encoding import Labels
from seqtrain.machine import physical_cores
from seqtrain.metrics import read_metrics
from seqtrain.train import train as seqtrain_train
from seqtrain.train import train_stream

# Targets shown next to the ratios.
TARGET_A_B, TARGET_A_C, TARGET_A_D = 15.0, 1.3, 0.90


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


def bench_config(cell: str, data: Path, run_dir: Path, s: Settings) -> Config:
    """The issue-3 model, trained by seqtrain for warm-up + measured steps, evaluation made free."""
    log_every = math.gcd(s.warmup, s.steps) if s.warmup else s.steps  # a log line lands on step `warmup`
    return from_dict(
        {
            "name": f"bench-{cell}",
            "output_dir": str(run_dir),
            "seed": 0,
            "data": {
                "path": str(data),
                "label_names": ["negative", "positive"],
                "max_length": s.max_length,
                "truncation": "head",
                "max_eval_examples": 64,  # data.num_workers: seqtrain's default for this machine
                "max_train_examples": s.max_train_examples,
            },
            "model": {
                "cell": cell,
                "embedding_dim": EMBEDDING,
                "hidden_size": HIDDEN,
                "num_layers": 1,
                "bidirectional": False,
                "pooling": "last",
            },
            "train": {
                "batch_size": BATCH,
                "max_steps": s.warmup + s.steps,
                "log_every": log_every,
                "eval_every": 10**9,
                "device": "cpu",
                "num_threads": physical_cores(),
            },
        }
    )


def seqtrain_batches(cfg: Config, labels: Labels, n: int) -> list[Batch]:
    """The first `n` batches seqtrain's training stream yields for epoch 0 (rebuilt, not timed).

    With 0 or 1 DataLoader worker, the shards are read in the seeded order, exactly as this
    in-process iteration does; the tokenizer is the run's own tokenizer.json.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(cfg.run_dir / "tokenizer.json"))
    stream = train_stream(cfg, tokenizer, labels, TrainState(), rank=0, world=1)  # epoch 0, from the start
    out: list[Batch] = []
    for item in stream:
        out.append(Batch(item["ids"], item["lengths"], item["labels"]))
        if len(out) == n:
            return out
    raise SystemExit(
        f"bench: the training stream has only {len(out)} batches per epoch; use fewer steps than {n}."
    )


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
        rate.shapes += [(b.ids.shape[0], b.ids.shape[1]) for b in window]
        if abs((1 - tokens / padded) - line["padding"]) > 1e-9:
            notes.append(
                f"{cfg.model.cell}: window ending at step {step} logged padding {line['padding']:.6f} "
                f"but the rebuilt batches give {1 - tokens / padded:.6f}; "
                "(d) may not use seqtrain's exact batches."
            )
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
        notes.append(f"{cfg.model.cell}: the bare loop's batch shapes differ from seqtrain's measured ones.")
    return a, d, notes


@dataclass
class TrainResult:
    cell: str
    a: Rate  # the median of the (a) runs
    b: Rate
    c: Rate
    d: Rate  # the median of the (d) runs
    ad_pairs: list[float]  # a/d of each back-to-back pair; the table's a/d is their median
    others: float | None = (
        None  # CPU share other processes took while this cell ran (filled in by bench.bench)
    )


def bench_training(
    cell: str,
    s: Settings,
    data: Path,
    tmp: Path,
    train_split: tuple[list[str], list[int]],
    seqs_cache: dict[str, list[list[int]]],
    notes: list[str],
) -> tuple[TrainResult, Config]:
    """(a)-(d) for one cell; also returns the config of the last (a) run (the predict bench loads it)."""
    a_runs: list[Rate] = []
    d_runs: list[Rate] = []
    for i in range(s.repeat):  # each pair trains a fresh run: same seed, so the same batches
        cfg = bench_config(cell, data, tmp / f"run-{cell}-{i}", s)
        say(f"{cell}: pair {i + 1}/{s.repeat}: (a) seqtrain train, {s.warmup} + {s.steps} steps, then (d)")
        a, d, pair_notes = time_pair(cfg, s)
        notes += [n for n in pair_notes if n not in notes]  # the pairs train on the same batches
        a_runs.append(a)
        d_runs.append(d)
        say(
            f"{cell}: pair {i + 1}: (a) {a.per_sec:,.0f}  (d) {d.per_sec:,.0f} tokens/s  "
            f"a/d {a.per_sec / d.per_sec:.3f}"
            f"  (padding {a.padding:.1%}, data wait {a.data_wait:.1%})"
        )
    ad_pairs = [x.per_sec / y.per_sec for x, y in zip(a_runs, d_runs, strict=True)]
    tokenizer_json = cfg.run_dir / "tokenizer.json"
    vocab_size = json.loads((cfg.run_dir / "run.json").read_text())["vocab_size"]

    key = tokenizer_json.read_text()  # every cell trains the same vocabulary: tokenize the split once
    if key not in seqs_cache:
        say("tokenizing the training split for the references (untimed)")
        seqs_cache[key] = pretokenize(tokenizer_json, train_split[0], s.max_length)
    seqs, labels = seqs_cache[key], train_split[1]

    rand = random_batches(seqs, labels, max(s.packed_warmup + s.packed_steps, s.warmup + s.steps))
    say(f"{cell}: (b) packed reference, {s.packed_warmup} + {s.packed_steps} steps")
    m = fresh_model(cell, vocab_size)
    b = timed_steps(
        training_step(m, m.forward_packed), rand[: s.packed_warmup + s.packed_steps], s.packed_warmup
    )
    say(f"{cell}: (c) padded reference on random batches, {s.warmup} + {s.steps} steps")
    m = fresh_model(cell, vocab_size)
    c = timed_steps(training_step(m, m.forward_padded), rand[: s.warmup + s.steps], s.warmup)
    d = median_rate(d_runs)
    say(f"{cell}: (b) {b.per_sec:,.0f}  (c) {c.per_sec:,.0f}  (d) {d.per_sec:,.0f} tokens/s")
    return TrainResult(cell, median_rate(a_runs), b, c, d, ad_pairs), cfg


TRAIN_TITLE = "Training, real tokens per second"
TRAIN_HEADER = [
    "cell",
    "a seqtrain",
    "b packed ref",
    "c padded ref",
    "d bare loop",
    "padding a",
    "padding c",
    "data wait a",
    f"a/b (≥ {TARGET_A_B:g})",
    f"a/c (≥ {TARGET_A_C:g})",
    f"a/d (≥ {TARGET_A_D:.2f})",
    "a/d of each pair",
    "others' CPU",
]

TRAIN_LEGEND = (
    "(a) `seqtrain.train.train` end to end (stream, tokenize, batch with the default data.num_workers, "
    "forward, backward, clip, AdamW), from metrics.jsonl after warm-up; (b) textbook loop: pre-tokenised "
    "tensors, random batches, `pack_padded_sequence`, h_n -> Linear, AdamW; (c) the same on the same random "
    "batches, padded, not packed; (d) bare kernel loop: Embedding -> cell -> Linear, forward + backward + "
    "fused AdamW on the exact batches seqtrain trained on in (a), without what seqtrain's step adds (dropout "
    "0.2 before the head, gradient clipping, no weight decay on biases and embeddings, logging). (d) is a "
    "reference point, not a ceiling: (a) has measured above it (a GRU pair at 1.19). (a) and (d) show the "
    "median of their runs, and a/d is the median of the ratios of the back-to-back (a)-(d) pairs (listed in "
    '"a/d of each pair"). Tokens/s count real (non-padding) tokens. Padding: share of pad positions in the '
    "batches; data wait: share of (a)'s time spent waiting for the next batch. Others' CPU: share of the "
    "machine other processes used while the cell ran (from /proc/stat); above 5% the cell's numbers are not "
    "trustworthy."
)


def train_table(results: list[TrainResult]) -> tuple[str, list[str], list[list[str]]]:
    rows = []
    for r in results:
        ab, ac, ad = r.a.per_sec / r.b.per_sec, r.a.per_sec / r.c.per_sec, statistics.median(r.ad_pairs)
        rows.append(
            [
                r.cell.upper(),
                f"{r.a.per_sec:,.0f}",
                f"{r.b.per_sec:,.0f}",
                f"{r.c.per_sec:,.0f}",
                f"{r.d.per_sec:,.0f}",
                f"{r.a.padding:.1%}",
                f"{r.c.padding:.1%}",
                f"{r.a.data_wait:.1%}",
                f"{ab:.1f} {check(ab, TARGET_A_B)}",
                f"{ac:.2f} {check(ac, TARGET_A_C)}",
                f"{ad:.2f} {check(ad, TARGET_A_D)}",
                " ".join(f"{x:.2f}" for x in r.ad_pairs),
                "?" if r.others is None else f"{r.others:.0%}",
            ]
        )
    return TRAIN_TITLE, TRAIN_HEADER, rows
