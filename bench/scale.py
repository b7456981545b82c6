"""Constant memory on large streams (issue 7): `make bench-scale`, or `python -m bench.scale`.

Writes a 10x copy of data/imdb's training split (200,000 reviews, the 20,000 repeated ten times
in 40 parquet shards) under bench/out/, then trains one epoch on the 1x and on the 10x stream,
each in its own process, and reports peak resident memory (ru_maxrss of the child) and wall time.
A small GRU keeps the run short; the data path (streaming, vocabulary pass, tokenizing, bucketing)
is what is measured, and it is the same for every model.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from bench.common import write_between_markers

ROOT = Path(__file__).resolve().parent.parent
HEADING = "## Memory at scale (make bench-scale)"


def imdb_dir() -> Path:
    for p in (ROOT / "data" / "imdb", ROOT.parent / "shared" / "data" / "imdb"):
        if p.is_dir():
            return p
    raise SystemExit("no IMDB data: run `make data`")


def make_scaled(src: Path, dest: Path, factor: int) -> None:
    """factor x the training split as parquet shards, plus the validation split as it is."""
    if (dest / "done").exists():
        return
    dest.mkdir(parents=True, exist_ok=True)
    shards = sorted(src.glob("train-*.parquet"))
    n = len(shards) * factor
    for i in range(factor):
        for j, shard in enumerate(shards):
            k = i * len(shards) + j
            pq.write_table(pq.read_table(shard), dest / f"train-{k:05d}-of-{n:05d}.parquet")
    for v in src.glob("validation-*.parquet"):
        pq.write_table(pq.read_table(v).slice(0, 500), dest / v.name)
    (dest / "done").write_text("")


def run(data: Path, out: Path) -> dict[str, float]:
    cfg = {
        "name": "scale", "output_dir": str(out), "seed": 0,
        "data": {"path": str(data), "max_length": 400, "num_workers": 0},
        "tokenizer": {"vocab_size": 30000},
        "model": {"cell": "gru", "embedding_dim": 32, "hidden_size": 32},
        "train": {"batch_size": 64, "epochs": 1, "eval_every": 0, "log_every": 200, "num_threads": 1},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    code = (
        "import resource, sys, time; from seqtrain.config import load_config; from seqtrain.train import train;"
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
    src = imdb_dir()
    scaled = work / f"imdb{a.factor}x"
    make_scaled(src, scaled, a.factor)
    one = work / "imdb1x"
    make_scaled(src, one, 1)
    results = {}
    for name, data in (("1x", one), (f"{a.factor}x", scaled)):
        out = work / f"scale-run-{name}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        results[name] = run(data, out)
        print(name, results[name], flush=True)
    r1, rn = results["1x"], results[f"{a.factor}x"]
    mem, t = rn["peak_rss_mb"] / r1["peak_rss_mb"], rn["seconds"] / r1["seconds"]
    table = "\n".join([
        f"One epoch of a small GRU (embedding 32, hidden 32, max_length 400) on data/imdb's training split "
        f"and on a {a.factor}x copy of it, each in its own process. Target: peak memory within 1.15x.", "",
        "| stream | rows | wall time | peak RSS |", "|---|---:|---:|---:|",
        f"| 1x | {r1['rows']:,} | {r1['seconds']:.0f} s | {r1['peak_rss_mb']:.0f} MB |",
        f"| {a.factor}x | {rn['rows']:,} | {rn['seconds']:.0f} s | {rn['peak_rss_mb']:.0f} MB |",
        f"| ratio | {rn['rows'] / r1['rows']:.1f} | {t:.2f} | **{mem:.3f}** {'✓' if mem <= 1.15 else '✗'} |", "",
        f"Machine: {platform.machine()}, {platform.python_version()}; {datetime.now(timezone.utc):%Y-%m-%d}; "
        f"command: `make bench-scale`.",
    ])
    print(table)
    write_between_markers(a.output, HEADING, "bench.scale", table)
    return 0 if mem <= 1.15 else 1


if __name__ == "__main__":
    sys.exit(main())
