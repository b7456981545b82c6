"""`make bench-serve`: texts/s and latency of `seqtrain serve` under concurrent clients, beside the ceiling.

    python -m bench.serve TARGET [--seconds 20] [--concurrency 1 8 64] [--max-batch-size 64] [--soak 100000]

TARGET is a run directory or an ONNX export folder. The texts are the run's eval split (SST-2
validation sentences for the quickstart). The ceiling is the batched forward pass alone on the same
texts, already tokenized, in batches of --max-batch-size, in this process before the server starts.
Then `seqtrain serve TARGET --port 0` runs in a subprocess, and for each concurrency N clients
(aiohttp, one connection each, in this process) each send {"text": ...} one after another for
--seconds. With --soak N, N more requests follow, one in 100 malformed (see MALFORMED). Traffic
goes to 127.0.0.1 only, and each load is bounded in time and in requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

MAX_REQUESTS = 500_000  # per load: a bound whatever the speed


def eval_texts(target: Path) -> list[str]:
    from seqtrain.config import from_dict, read_yaml

    data = from_dict(read_yaml(target / "config.yaml")).data
    files = sorted(Path(data.eval_path or data.path).glob(f"{data.eval_split}-*.parquet"))
    if not files:
        sys.exit(f"no {data.eval_split}-*.parquet under {data.eval_path or data.path}")
    return [
        t
        for f in files
        for t in pq.read_table(f, columns=[data.text_column]).column(0).to_pylist()
        if t and t.strip()
    ]


def ceiling(target: Path, texts: list[str], batch_size: int, seconds: float = 5.0) -> float:
    """Texts/s of the batched forward pass alone (tokenized once, outside the clock)."""
    from seqtrain.encoding import encode
    from seqtrain.serve import load_target

    run, _ = load_target(target)
    seqs = encode(run.tokenizer, texts, run.config.data)
    run.probs(seqs[:batch_size], batch_size)  # warm up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run.probs(seqs, batch_size)
        done += len(seqs)
    return done / (time.perf_counter() - start)


async def load(url: str, texts: list[str], concurrency: int, seconds: float) -> dict[str, Any]:
    """`concurrency` clients on a connection each, one request after another, for `seconds`."""
    import aiohttp  # its client costs a fraction of httpx's CPU per request: the server, not the client, is measured

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    stop = time.perf_counter() + seconds
    counter = iter(range(MAX_REQUESTS))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.perf_counter() >= stop:
                return
            t0 = time.perf_counter()
            async with session.post(url + "/predict", json={"text": texts[i % len(texts)]}) as r:
                await r.read()
            latencies.append(time.perf_counter() - t0)
            statuses[r.status] = statuses.get(r.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)  # sets TCP_NODELAY
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "texts_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "statuses": statuses,
    }


MALFORMED = [  # (body, the status it must get): one request in 100 during the soak
    (b'{"texts": ["unclosed"', 422),
    (b'{"text": "caf\xe9 in latin-1"}', 400),
    (b'{"texts": ["fine", 3]}', 422),
    (json.dumps({"texts": ["x"] * 257}).encode(), 413),
]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(
    url: str, texts: list[str], total: int, concurrency: int, pid: int, max_seconds: float = 900
) -> dict[str, Any]:
    """`total` requests, 1% of them malformed: no 5xx, each malformed one its 4xx, and the server's
    resident memory at the 10,000th request (or a tenth of the way) and at the end."""
    import aiohttp

    counter = iter(range(total))
    mark = min(10_000, total // 10)
    found: dict[str, Any] = {
        "good": {},
        "malformed_right": 0,
        "malformed_wrong": [],
        "server_errors": 0,
        "mark": mark,
        "rss_mb_at_mark": None,
    }
    stop = time.perf_counter() + max_seconds

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.perf_counter() >= stop:
                return
            if i == mark:
                found["rss_mb_at_mark"] = rss_mb(pid)
            bad = MALFORMED[(i // 100) % len(MALFORMED)] if i % 100 == 99 else None
            body = bad[0] if bad else json.dumps({"text": texts[i % len(texts)]}).encode()
            async with session.post(
                url + "/predict", data=body, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()
            found["server_errors"] += r.status >= 500
            if bad is None:
                found["good"][r.status] = found["good"].get(r.status, 0) + 1
            elif r.status == bad[1]:
                found["malformed_right"] += 1
            else:
                found["malformed_wrong"].append((bad[0][:40].decode("utf-8", "replace"), r.status))

    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    found.update(requests=total, seconds=time.perf_counter() - start, rss_mb_at_end=rss_mb(pid))
    found["rss_growth"] = (
        found["rss_mb_at_end"] / found["rss_mb_at_mark"] - 1 if found["rss_mb_at_mark"] else None
    )
    return found


def batch_sizes(url: str) -> tuple[float, float]:
    """Texts predicted and forward passes run so far, from /metrics."""
    import httpx

    text = httpx.get(url + "/metrics").text
    found = [re.search(rf"^seqtrain_batch_texts_{k} (\S+)$", text, re.M) for k in ("sum", "count")]
    total, count = (float(m.group(1)) if m else 0.0 for m in found)
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("target", type=Path)
    parser.add_argument("--seconds", type=float, default=20.0, help="per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=0.0)
    parser.add_argument(
        "--soak", type=int, default=0, help="then this many requests, 1%% malformed (issue 19: 100000)"
    )
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    texts = eval_texts(args.target)
    top = ceiling(args.target, texts, args.max_batch_size)
    print(
        f"{len(texts):,} texts; batched forward-only ceiling: {top:,.0f} texts/s (batches of {args.max_batch_size})",
        flush=True,
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "seqtrain",
            "serve",
            str(args.target),
            "--port",
            "0",
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-wait-ms",
            str(args.max_wait_ms),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    rows = []
    try:
        assert proc.stderr is not None
        while not (found := re.search(r"http://127\.0\.0\.1:(\d+)", line := proc.stderr.readline())):
            if not line:
                sys.exit("the server did not start")
        url = f"http://127.0.0.1:{found.group(1)}"
        asyncio.run(load(url, texts, 1, 1.0))  # warm up (the server waits for /ready before it listens)
        for n in args.concurrency:
            before = batch_sizes(url)
            row = asyncio.run(load(url, texts, n, args.seconds))
            after = batch_sizes(url)
            row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
            row["of_ceiling"] = row["texts_per_s"] / top
            rows.append(row)
            print(
                f"concurrency {n:>3}: {row['texts_per_s']:8,.0f} texts/s ({row['of_ceiling']:.2f}x ceiling)  "
                f"p50 {row['p50_ms']:6.1f} ms  p99 {row['p99_ms']:6.1f} ms  mean batch {row['mean_batch']:5.1f}  "
                f"statuses {row['statuses']}",
                flush=True,
            )
        if args.soak:
            result = asyncio.run(soak(url, texts, args.soak, args.soak_concurrency, proc.pid))
            rows.append({"soak": result})
            print(
                f"soak: {args.soak:,} requests at concurrency {args.soak_concurrency} in {result['seconds']:.0f} s: "
                f"{result['server_errors']} 5xx, {result['malformed_right']} malformed answered with their 4xx, "
                f"wrong answers {result['malformed_wrong'][:5]}, good {result['good']}; resident memory "
                f"{result['rss_mb_at_mark']:.1f} MB at request {result['mark']:,}, {result['rss_mb_at_end']:.1f} MB at the end "
                f"({100 * (result['rss_growth'] or 0):+.2f}%)",
                flush=True,
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    print(f"server exit code after SIGTERM: {code}")
    if args.json:
        args.json.write_text(
            json.dumps({"ceiling_texts_per_s": top, "loads": rows, "exit_code": code}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
