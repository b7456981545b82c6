"""Constant memory on large streams: `make bench-scale`, or `python -m bench.scale`.

Builds two training streams under bench/out/ and trains one epoch on each, each in its own process,
reporting peak resident memory (ru_maxrss of the child) and wall time:

  1x   data/imdb's labelled training split (20,000 reviews);
  Nx   N x 20,000 rows of distinct text: the 20,000 labelled reviews, then the 49,751 of
       data/imdb-unlabeled (together 69,751 real reviews, 3.5x), then variants of those reviews in
       which about one word in ten (of four letters or more) gets a typo (two letters swapped, one
       dropped, doubled or replaced), so every copy brings new tokens for the vocabulary pass to count.

Rows with no label (the unlabeled reviews and their variants) get label `i % 2`: what is measured is
the data path (streaming, vocabulary pass, tokenizing, bucketing), not accuracy, and it is the same
for every model, so a small GRU keeps the run short.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from bench.common import ROOT, check, data_path, write_between_markers

HEADING = "## Memory at scale (make bench-scale)"
TARGET_MEMORY = 1.15  # peak RSS of the large stream over the 1x one
SHARD_ROWS = 5000  # the labelled split's shard size
TYPO_RATE = 0.1  # share of the words of 4+ characters that a variant changes
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def typo(word: str, rng: random.Random) -> str:
    """A misspelling of `word` (4+ characters; its first and last characters stay), never `word` itself."""
    j = rng.randrange(1, len(word) - 2)
    kind = rng.randrange(4)
    if kind == 0 and word[j] != word[j + 1]:
        return word[:j] + word[j + 1] + word[j] + word[j + 2 :]  # swap two neighbours
    if kind == 1:
        return word[:j] + word[j + 1 :]  # drop one
    if kind == 3:
        return word[:j] + rng.choice(LETTERS.replace(word[j], "")) + word[j + 1 :]  # replace one
    return word[: j + 1] + word[j:]  # double one


def variant(text: str, copy: int, row: int) -> tuple[str, int]:
    """`text` with about TYPO_RATE of its long words misspelt (at least one), seeded by (copy, row);
    and how many were."""
    rng = random.Random(copy * 1_000_003 + row)
    words = text.split(" ")
    long = [i for i, w in enumerate(words) if len(w) >= 4]
    picked = [i for i in long if rng.random() < TYPO_RATE] or long[:1]
    for i in picked:
        words[i] = typo(words[i], rng)
    return " ".join(words), len(picked)


def real_reviews(labelled: Path, unlabeled: Path | None) -> list[tuple[str, int]]:
    """(text, label) of the labelled training split, then of the unlabeled reviews (label i % 2)."""
    rows: list[tuple[str, int]] = []
    for shard in sorted(labelled.glob("train-*.parquet")):
        t = pq.read_table(shard, columns=["text", "label"])
        rows += zip(t.column("text").to_pylist(), t.column("label").to_pylist(), strict=True)
    if unlabeled is not None:
        texts = [
            t
            for shard in sorted(unlabeled.glob("train-*.parquet"))
            for t in pq.read_table(shard).column("text").to_pylist()
        ]
        rows += [(text, i % 2) for i, text in enumerate(texts)]
    return rows


def scaled_rows(real: list[tuple[str, int]], n: int, stats: dict[str, int]) -> Iterator[tuple[str, int]]:
    """The first n rows of: the real reviews, then variant 1 of each, variant 2 of each, ..."""
    for k in range(n):
        copy, i = divmod(k, len(real))
        text, label = real[i]
        if copy:
            text, changed = variant(text, copy, i)
            stats["variant_rows"] += 1
            stats["changed_words"] += changed
        yield text, label


def make_scaled(labelled: Path, unlabeled: Path | None, dest: Path, factor: int) -> dict[str, int]:
    """factor x the labelled training split's rows as parquet shards (distinct text, see the module's
    docstring), plus the first 500 validation rows; returns the row counts (kept in dest/done)."""
    if (dest / "done").exists():
        return json.loads((dest / "done").read_text() or "{}")
    dest.mkdir(parents=True, exist_ok=True)
    real = real_reviews(labelled, unlabeled if factor > 1 else None)
    n = factor * sum(pq.ParquetFile(f).metadata.num_rows for f in labelled.glob("train-*.parquet"))
    stats = {"rows": n, "real_rows": min(n, len(real)), "variant_rows": 0, "changed_words": 0}
    shards = -(-n // SHARD_ROWS)
    rows = scaled_rows(real, n, stats)
    for s in range(shards):
        part = [next(rows) for _ in range(min(SHARD_ROWS, n - s * SHARD_ROWS))]
        table = pa.table({"text": [t for t, _ in part], "label": pa.array([y for _, y in part], pa.int64())})
        pq.write_table(table, dest / f"train-{s:05d}-of-{shards:05d}.parquet")
    for v in labelled.glob("validation-*.parquet"):
        pq.write_table(pq.read_table(v, columns=["text", "label"]).slice(0, 500), dest / v.name)
    (dest / "done").write_text(json.dumps(stats))
    return stats


def run(data: Path, out: Path) -> dict[str, float]:
    cfg = {
        "name": "scale",
        "output_dir": str(out),
        "seed": 0,
        "data": {"path": str(data), "max_length": 400, "num_workers": 0},
        "tokenizer": {"vocab_size": 30000},
        "model": {"cell": "gru", "embedding_dim": 32, "hidden_size": 32},
        "train": {"batch_size": 64, "epochs": 1, "eval_every": 0, "log_every": 200, "num_threads": 1},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    code = (
        "import resource, sys, time; from seqtrain.config import load_config; "
        "from seqtrain.train import train;"
        "t = time.perf_counter(); train(load_config(sys.argv[1])); "
        "print('RESULT', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    _, seconds, rss_kb = line.split()
    rows = json.loads((out / "run.json").read_text())["num_train_examples"]
    return {"seconds": float(seconds), "peak_rss_mb": int(rss_kb) / 1024, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--factor", type=int, default=10)
    p.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    a = p.parse_args(argv)
    work = ROOT / "bench" / "out"
    labelled, unlabeled = data_path("imdb"), data_path("imdb-unlabeled")
    streams = {"1x": work / "imdb1x", f"{a.factor}x": work / f"imdb{a.factor}x-distinct"}
    counts = {
        name: make_scaled(labelled, unlabeled, d, 1 if name == "1x" else a.factor)
        for name, d in streams.items()
    }
    results = {}
    for name, data in streams.items():
        out = work / f"scale-run-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        results[name] = run(data, out)
        print(name, results[name], counts[name], flush=True)
    r1, rn, cn = results["1x"], results[f"{a.factor}x"], counts[f"{a.factor}x"]
    mem, t = rn["peak_rss_mb"] / r1["peak_rss_mb"], rn["seconds"] / r1["seconds"]
    block = "\n".join(
        [
            f"One epoch of a small GRU (embedding 32, hidden 32, max_length 400) on data/imdb's training "
            f"split and on a {a.factor}x stream of distinct text ({cn['real_rows']:,} real reviews: the "
            f"labelled ones and data/imdb-unlabeled; then {cn['variant_rows']:,} variants with "
            f"{cn['changed_words']:,} misspelt words "
            f"in all, see bench/scale.py), each in its own process. Target: peak memory within 1.15x.",
            "",
            "| stream | rows | wall time | peak RSS |",
            "|---|---:|---:|---:|",
            f"| 1x | {r1['rows']:,} | {r1['seconds']:.0f} s | {r1['peak_rss_mb']:.0f} MB |",
            f"| {a.factor}x | {rn['rows']:,} | {rn['seconds']:.0f} s | {rn['peak_rss_mb']:.0f} MB |",
            f"| ratio | {rn['rows'] / r1['rows']:.1f} | {t:.2f} | **{mem:.3f}** "
            f"{check(mem, TARGET_MEMORY, at_least=False)} |",
            "",
            f"Machine: {platform.machine()}, {platform.python_version()}; "
            f"{datetime.now(timezone.utc):%Y-%m-%d}; command: `make bench-scale`.",
        ]
    )
    print(block)
    write_between_markers(a.output, HEADING, "bench.scale", block)
    return 0 if mem <= TARGET_MEMORY else 1


if __name__ == "__main__":
    sys.exit(main())
