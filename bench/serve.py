"""`make bench-serve`: texts/s and latency of `seqtrain serve` under concurrent clients, beside two ceilings.

    python -m bench.serve TARGET [TARGET ...] [--seconds 20] [--concurrency 1 8 64] [--workers N]
        [--max-batch-size 64] [--threads T] [--soak 100000] [--no-onnx] [--onnx-concurrency 64]
        [--explain-seconds 10] [--python-client] [--output BENCHMARKS.md]

TARGET is a run directory or an ONNX export folder; its texts are the run's eval split (SST-2
validation sentences for the quickstart). Two ceilings, side by side, each measured again for 3 s
right before each load (so that each ratio compares figures taken under the same load from other
processes), in texts/s and in CPU time per text (process_time: every thread):

- sorted: the batched forward pass alone on the texts already tokenized, in this process on the
  model's default threads: `seqtrain predict`'s way, chunks of 2,048 texts sorted by length and cut
  into batches of --max-batch-size. No server can reach it: it sorts texts that have not arrived.
- arrival order, N x 1: the server's N worker processes, each a model on one thread batching its
  share of the texts in the order they come, at most its share of the clients per batch (at 64
  clients and 2 workers: 32), each batch cut by length as the server cuts it (encoding.BatchCost).
  That is what `serve --workers N` can reach; the ratio to it is the server's overhead.

`seqtrain serve TARGET --port 0` runs in a subprocess. The load generator is wrk (Debian's package,
`make wrk`; a Lua script POSTs {"text": ...} bodies, one connection per client); without it, or with
--python-client, the Python client (aiohttp, N clients over --client-processes processes) is the
fallback, and the output says so: it costs several times wrk's CPU per request, taken from the server
on a small machine. Besides texts/s and latency, the CPU time of the server (with its workers) and
of the clients is read from /proc, so a table can say whether the server or the load generator (or
other processes) ran out of CPU. Each worker's share of the requests is read from /metrics
(seqtrain_worker_requests, one series per worker pid), and its open connections half-way through.

After each run directory, its ONNX export (`seqtrain export RUN --format onnx`, into a temporary
folder) is served the same way at --onnx-concurrency clients, against the ceilings of that export
(the same two, on onnxruntime). Unless --no-onnx.

On each run directory, with wrk: /predict at EXPLAIN_CLIENTS clients for --explain-seconds, idle,
then again while one client per worker sends /explain requests one after another, each the first
eval texts that fit serve's default /explain budgets: the p99 of each and their ratio.

Then, on the first TARGET, the soak: --soak requests (100,000 by default; 0 skips it) at
--soak-concurrency clients, one in 100 malformed (see MALFORMED): every answer's status is checked,
and the server's resident memory is read at the 10,000th request and at the end.

The table goes into --output (BENCHMARKS.md) between `<!-- bench.serve:begin -->` and
`<!-- bench.serve:end -->`; prose around the markers is kept. Traffic goes to 127.0.0.1 only, and
each load is bounded in time and in requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bench import common

MAX_REQUESTS = 500_000  # per load: a bound whatever the speed
HEADING = "## Serve under load"
CEILING_SECONDS = 3.0


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


class Ceiling:
    """Texts/s of the batched forward pass alone: the model loaded once, the texts tokenized once,
    outside the clock."""

    def __init__(self, target: Path, texts: list[str], batch_size: int) -> None:
        from seqtrain.encoding import encode
        from seqtrain.serve import load_target, measure_cost

        self.run, _ = load_target(target)
        self.seqs = encode(self.run.tokenizer, texts, self.run.config.data)
        self.batch_size = batch_size
        self.run.probs(self.seqs[:batch_size], batch_size)  # warm up
        self.cost = measure_cost(self.run, batch_size)  # how the server cuts its batches by length

    def measure(self, arrival_order: bool = False, seconds: float = CEILING_SECONDS) -> tuple[float, float]:
        """(texts/s, CPU microseconds per text): chunks of 2,048 texts sorted by length (predict's
        chunk), or batches in arrival order, each cut by length as the server cuts them."""
        step = self.batch_size if arrival_order else 2048
        done, start, cpu = 0, time.perf_counter(), time.process_time()  # every thread of the process
        while time.perf_counter() - start < seconds:
            for i in range(0, len(self.seqs), step):
                part = self.seqs[i : i + step]
                self.run.probs(part, self.batch_size, self.cost if arrival_order else None)
                done += len(part)
                if time.perf_counter() - start >= seconds:
                    break
        return done / (time.perf_counter() - start), 1e6 * (time.process_time() - cpu) / done


_MODEL: dict[str, Any] = {}  # in each process of the N x 1 ceiling: its model and its share, encoded


def arrival_prepare(target: Path, texts: list[str]) -> None:
    """One process of the N x 1-thread ceiling: the model on one thread, its share of the texts encoded."""
    from seqtrain.encoding import encode
    from seqtrain.serve import load_target

    run, _ = load_target(target, threads=1)
    _MODEL.update(run=run, seqs=encode(run.tokenizer, texts, run.config.data), costs={})


def arrival_part(batch_size: int, seconds: float, start: float) -> tuple[int, float]:
    """Batches of `batch_size` of this process's share in arrival order, each cut by length as the
    server cuts it, from time.time() `start` for `seconds`: (texts, CPU seconds of the process)."""
    from seqtrain.serve import measure_cost

    run, seqs, costs = _MODEL["run"], _MODEL["seqs"], _MODEL["costs"]
    if batch_size not in costs:
        costs[batch_size] = measure_cost(run, batch_size)
        run.probs(seqs[:batch_size], batch_size, costs[batch_size])  # warm up
    time.sleep(max(0.0, start - time.time()))
    done, cpu, stop = 0, time.process_time(), start + seconds
    while time.time() < stop:
        for i in range(0, len(seqs), batch_size):
            part = seqs[i : i + batch_size]
            run.probs(part, batch_size, costs[batch_size])
            done += len(part)
            if time.time() >= stop:
                break
    return done, time.process_time() - cpu


def one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"


class ArrivalCeiling:
    """Texts/s of N processes x 1 thread, each batching its share of the texts in arrival order: what
    `serve --workers N` can reach (no sorting of texts that have not arrived, no HTTP)."""

    def __init__(self, target: Path, texts: list[str], workers: int) -> None:
        self.workers = workers
        self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=one_thread)
        self.pool.starmap(arrival_prepare, [(target, texts[i::workers]) for i in range(workers)])

    def measure(self, batch_size: int, seconds: float = CEILING_SECONDS) -> tuple[float, float]:
        """(texts/s, CPU µs per text) with batches of `batch_size` in every process."""
        self.pool.starmap(arrival_part, [(batch_size, 0.0, 0.0)] * self.workers)  # cost measured, warm
        start = time.time() + 0.3
        parts = self.pool.starmap(arrival_part, [(batch_size, seconds, start)] * self.workers)
        done = sum(d for d, _ in parts)
        return done / seconds, 1e6 * sum(c for _, c in parts) / max(done, 1)

    def close(self) -> None:
        self.pool.terminate()


async def load(url: str, texts: list[str], concurrency: int, stop: float, offset: int = 0) -> dict[str, Any]:
    """`concurrency` clients on a connection each, one request after another, until time.time() `stop`."""
    import aiohttp  # its client costs a fraction of httpx's CPU per request

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(offset, offset + MAX_REQUESTS))

    async def client(session: aiohttp.ClientSession) -> None:
        for i in counter:
            if time.time() >= stop:
                return
            t0 = time.perf_counter()
            async with session.post(url + "/predict", json={"text": texts[i % len(texts)]}) as r:
                await r.read()
            latencies.append(time.perf_counter() - t0)
            statuses[r.status] = statuses.get(r.status, 0) + 1

    connector = aiohttp.TCPConnector(limit=concurrency)  # sets TCP_NODELAY
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
    return {"latencies": latencies, "statuses": statuses}


def client_process(
    url: str, texts: list[str], concurrency: int, start: float, stop: float, offset: int
) -> Any:
    """One load-generator process: wait for the common start, load until `stop`, return what it saw
    and the CPU seconds it used meanwhile."""
    time.sleep(max(0.0, start - time.time()))
    cpu = time.process_time()
    found = asyncio.run(load(url, texts, concurrency, stop, offset))
    found["cpu_s"] = time.process_time() - cpu
    found["end"] = time.time()
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its worker processes, all their threads, from /proc."""
    total = 0
    for p in server_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds all CPUs spent busy (or stolen) since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")


def measure_load(
    url: str, texts: list[str], concurrency: int, processes: int, seconds: float, server_pid: int
) -> dict[str, Any]:
    """`concurrency` clients spread over `processes` processes for `seconds`; texts/s, latency, and
    where the CPU went (the server, the clients, everything else on the machine)."""
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(time.sleep, [0.0] * processes)  # started and imported before the clock
        start = time.time() + 0.5
        stop = start + seconds
        pending = [
            pool.apply_async(client_process, (url, texts, n, start, stop, i * 100_003))
            for i, n in enumerate(shares)
        ]
        time.sleep(max(0.0, start - time.time()))
        server0, busy0, me0, wall0 = cpu_seconds(server_pid), machine_busy(), time.process_time(), time.time()
        parts = [p.get(timeout=seconds + 120) for p in pending]
        server1, busy1, me1 = cpu_seconds(server_pid), machine_busy(), time.process_time()
    wall = max(p["end"] for p in parts) - wall0
    latencies = np.array([x for p in parts for x in p["latencies"]]) * 1000
    statuses: dict[int, int] = {}
    for p in parts:
        for code, n in p["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    server_cpu, clients_cpu = server1 - server0, sum(p["cpu_s"] for p in parts)
    others = (busy1 - busy0) - server_cpu - clients_cpu - (me1 - me0)
    return {
        "concurrency": concurrency,
        "client_processes": processes,
        "requests": len(latencies),
        "texts_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "statuses": statuses,
        "server_us_per_text": 1e6 * server_cpu / max(len(latencies), 1),
        "clients_us_per_text": 1e6 * clients_cpu / max(len(latencies), 1),
        "server_cores": server_cpu / wall,
        "clients_cores": clients_cpu / wall,
        "others_cores": max(0.0, others) / wall,
    }


def lua_string(text: bytes) -> str:
    """`text` as a Lua string literal (printable ASCII as is, every other byte as a decimal escape)."""
    return '"' + "".join(chr(b) if 32 <= b < 127 and b not in (34, 92) else f"\\{b:03d}" for b in text) + '"'


WRK_SCRIPT = """
local bodies = {%s}
local i = 0
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function init(args) i = math.random(#bodies) end
function request()
  i = i %% #bodies + 1
  return wrk.format(nil, "/predict", nil, bodies[i])
end
"""


def wrk_ms(value: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def measure_wrk(
    url: str, texts: list[str], concurrency: int, seconds: float, server_pid: int, script: Path
) -> dict[str, Any]:
    """`concurrency` connections of wrk (the C load generator; Debian's package) for `seconds`, each
    POSTing {"text": ...} one after another; texts/s, latency, and where the CPU went."""
    if not script.exists():
        bodies = ",".join(lua_string(json.dumps({"text": t}).encode()) for t in texts[:4096])
        script.write_text(WRK_SCRIPT % bodies)
    threads = min(2, concurrency)
    command = ["wrk", "-t", str(threads), "-c", str(concurrency), "-d", f"{seconds:g}s", "--latency"]
    command += ["--timeout", "30s", "-s", str(script), url]
    server0, busy0, wall0 = cpu_seconds(server_pid), machine_busy(), time.time()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    _, _, usage = os.wait4(proc.pid, 0)
    wall = time.time() - wall0
    server_cpu, clients_cpu = cpu_seconds(server_pid) - server0, usage.ru_utime + usage.ru_stime
    out = proc.stdout.read() if proc.stdout else ""
    found = {p: re.search(rf"^\s+{p}%\s+(\S+)$", out, re.M) for p in ("50", "99")}
    total = re.search(r"(\d+) requests in", out)
    if not total or not found["50"] or not found["99"]:
        sys.exit(f"cannot read wrk's output:\n{out}")
    requests = int(total.group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    statuses = {200: requests - (int(bad.group(1)) if bad else 0)}
    if bad:
        statuses[0] = int(bad.group(1))  # wrk counts them without their codes
    others = (machine_busy() - busy0) - server_cpu - clients_cpu
    return {
        "concurrency": concurrency,
        "client_processes": f"wrk -t{threads}",
        "requests": requests,
        "texts_per_s": requests / seconds,
        "p50_ms": wrk_ms(found["50"].group(1)),
        "p99_ms": wrk_ms(found["99"].group(1)),
        "statuses": statuses,
        "socket_errors": errors.group(1) if errors else None,
        "server_us_per_text": 1e6 * server_cpu / max(requests, 1),
        "clients_us_per_text": 1e6 * clients_cpu / max(requests, 1),
        "server_cores": server_cpu / wall,
        "clients_cores": clients_cpu / wall,
        "others_cores": max(0.0, others) / wall,
    }


def server_pids(pid: int) -> list[int]:
    """The server process and its workers (children), for their CPU time."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid, *map(int, children)]


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
    url: str, texts: list[str], total: int, concurrency: int, pid: int, max_seconds: float = 3600
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
        "answered": 0,
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
            headers = {"Content-Type": "application/json"}
            async with session.post(url + "/predict", data=body, headers=headers) as r:
                await r.read()
            found["answered"] += 1
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
    found["malformed_sent"] = sum(1 for i in range(found["answered"]) if i % 100 == 99)
    found["rss_growth"] = (
        found["rss_mb_at_end"] / found["rss_mb_at_mark"] - 1 if found["rss_mb_at_mark"] else None
    )
    return found


def per_worker(url: str, name: str) -> dict[str, float]:
    """One series of /metrics per worker process: {pid: value}."""
    import httpx

    text = httpx.get(url + "/metrics").text
    return {pid: float(v) for pid, v in re.findall("^" + name + r'\{pid="(\d+)"\} (\S+)$', text, re.M)}


def read_connections(url: str, into: dict[str, float]) -> None:
    into.update(per_worker(url, "seqtrain_worker_connections"))


def shares(values: list[float]) -> str:
    """Each worker's share of the total, largest first: '52/48%'."""
    total = sum(values) or 1.0
    return "/".join(f"{100 * v / total:.0f}" for v in sorted(values, reverse=True)) + "%"


def scrape(url: str) -> tuple[float, float]:
    """Texts predicted and forward passes run so far, from /metrics."""
    import httpx

    text = httpx.get(url + "/metrics").text
    found = [re.search(rf"^seqtrain_batch_texts_{k} (\S+)$", text, re.M) for k in ("sum", "count")]
    total, count = (float(m.group(1)) if m else 0.0 for m in found)
    return total, count


def wait_ready(url: str, proc: subprocess.Popen[str], seconds: float = 120) -> dict[str, Any]:
    """/info, once every worker answers it (the server listens first and each worker loads the model
    meanwhile; a request on a new connection may reach any worker, so a worker still loading would
    otherwise take part of the first load's connections, or answer this /info with a 503)."""
    import httpx

    deadline = time.monotonic() + seconds
    ready: dict[int, dict[str, Any]] = {}  # pid -> that worker's /info
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            answer = httpx.get(url + "/info", timeout=5)  # a new connection each time
            if answer.status_code == 200:
                info: dict[str, Any] = answer.json()
                ready[info["pid"]] = info
                if len(ready) >= int(info.get("workers") or 1):
                    return info
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    sys.exit("the server did not become ready")


def start_server(target: Path, args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    command = [sys.executable, "-m", "seqtrain", "serve", str(target), "--port", "0"]
    command += ["--max-batch-size", str(args.max_batch_size)]
    command += ["--max-wait-ms", str(args.max_wait_ms)] if args.max_wait_ms is not None else []
    command += ["--threads", str(args.threads)] if args.threads else []
    command += ["--workers", str(args.workers)] if args.workers else []
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    while not (found := re.search(r"http://127\.0\.0\.1:(\d+)", line := proc.stderr.readline())):
        if not line:
            sys.exit("the server did not start")
    stderr = proc.stderr
    threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()  # never a full pipe
    return proc, f"http://127.0.0.1:{found.group(1)}"


def bench_target(
    target: Path,
    args: argparse.Namespace,
    soak_requests: int,
    concurrency: list[int] | None = None,
    explain_seconds: float = 0.0,
) -> dict[str, Any]:
    """The ceilings and every load on one target (`concurrency`, else --concurrency), then (if
    asked) /predict's latency with /explain running beside it, and the soak."""
    texts = eval_texts(target)
    top = Ceiling(target, texts, args.max_batch_size)
    print(f"{target}: {len(texts):,} texts; sorted ceiling {top.measure()[0]:,.0f} texts/s", flush=True)
    proc, url = start_server(target, args)
    rows, soaked, arrival_top, explained = [], None, None, None
    script = Path(tempfile.mkdtemp(prefix="bench-serve-")) / "bodies.lua"
    try:
        info = wait_ready(url, proc)
        workers = int(info.get("workers") or 1)
        arrival_top = ArrivalCeiling(target, texts, workers)
        asyncio.run(load(url, texts, 1, time.time() + 1.0))  # warm up
        for n in concurrency or args.concurrency:
            for p in [0] if args.wrk else sorted({min(p, n) for p in args.client_processes}):
                # just before, under the same load from other processes; a worker's batch holds at most
                # its share of the clients
                cap = min(args.max_batch_size, -(-n // workers))
                (ceiling, ceiling_us), (arrival, arrival_us) = top.measure(), arrival_top.measure(cap)
                before, served = scrape(url), per_worker(url, "seqtrain_worker_requests")
                connections: dict[str, float] = {}  # each worker's, half-way through the load
                halfway = threading.Timer(args.seconds / 2, read_connections, (url, connections))
                halfway.start()
                if args.wrk:
                    row = measure_wrk(url, texts, n, args.seconds, proc.pid, script)
                else:
                    row = measure_load(url, texts, n, p, args.seconds, proc.pid)
                halfway.join()
                after = scrape(url)
                row["mean_batch"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                row["worker_requests"] = [
                    v - served.get(pid, 0.0) for pid, v in per_worker(url, "seqtrain_worker_requests").items()
                ]
                row["worker_connections"] = list(connections.values())
                row.update(ceiling=ceiling, ceiling_us=ceiling_us, arrival=arrival, arrival_us=arrival_us)
                row["of_ceiling"] = row["texts_per_s"] / ceiling
                row["of_arrival"] = row["texts_per_s"] / arrival
                rows.append(row)
                print(
                    f"  {n:>3} clients ({row['client_processes']}): {row['texts_per_s']:8,.0f} texts/s "
                    f"({row['of_arrival']:.2f}x the arrival-order {workers}x1 ceiling of {arrival:,.0f} "
                    f"[batches of {cap}], {row['of_ceiling']:.2f}x the sorted one of {ceiling:,.0f})  "
                    f"p50 {row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:6.2f} ms  mean batch "
                    f"{row['mean_batch']:5.1f}  CPU us/text: server {row['server_us_per_text']:.0f}, "
                    f"clients {row['clients_us_per_text']:.0f}, ceilings {arrival_us:.0f} and "
                    f"{ceiling_us:.0f}; cores: server {row['server_cores']:.2f}, clients "
                    f"{row['clients_cores']:.2f}, others {row['others_cores']:.2f}  "
                    f"per worker: requests {shares(row['worker_requests'])} "
                    f"{[int(v) for v in row['worker_requests']]}, connections half-way "
                    f"{[int(v) for v in row['worker_connections']]}  statuses {row['statuses']}",
                    flush=True,
                )
        if explain_seconds and args.wrk:
            explained = explain_phase(url, texts, top, explain_seconds, proc.pid, script)
            print("  " + explain_line(explained), flush=True)
        if soak_requests:
            soaked = asyncio.run(soak(url, texts, soak_requests, args.soak_concurrency, proc.pid))
            print("  " + soak_line(soaked, args.soak_concurrency), flush=True)
    finally:
        if arrival_top is not None:
            arrival_top.close()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    print(f"  server exit code after SIGTERM: {code}", flush=True)
    model = info_model(target)
    return {"target": str(target), "texts": len(texts), "info": info, "model": model, "loads": rows,
            "soak": soaked, "explain": explained, "exit_code": code}  # fmt: skip


EXPLAIN_CLIENTS = 8  # /predict clients while /explain runs


def explain_body(texts: list[str], top: Ceiling, max_texts: int = 16, max_tokens: int = 2048) -> list[str]:
    """The first eval texts that fit one /explain request under serve's default budgets (texts, and
    tokens as the model reads them)."""
    body: list[str] = []
    tokens = 0
    for text, seq in zip(texts, top.seqs, strict=True):
        if len(body) == max_texts or tokens + len(seq) > max_tokens:
            break
        body.append(text)
        tokens += len(seq)
    return body


def explain_phase(
    url: str, texts: list[str], top: Ceiling, seconds: float, server_pid: int, script: Path
) -> dict[str, Any]:
    """/predict at EXPLAIN_CLIENTS wrk clients for `seconds`, idle, then again with one client per
    worker process sending /explain requests one after another (each a full budget of texts): the
    p99 of each, and how many explanations ran meanwhile."""
    import httpx

    idle = measure_wrk(url, texts, EXPLAIN_CLIENTS, seconds, server_pid, script)
    body = {"texts": explain_body(texts, top)}
    workers = int(httpx.get(url + "/info").json()["workers"])
    clients: dict[int, httpx.Client] = {}  # a keep-alive connection on each worker
    for _ in range(50 * workers):
        if len(clients) == workers:
            break
        client = httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=1))
        pid = int(client.get("/info").json()["pid"])
        if pid in clients:
            client.close()
        else:
            clients[pid] = client
    stop = threading.Event()
    found: dict[str, Any] = {"statuses": {}, "seconds": []}

    def explainer(client: httpx.Client) -> None:
        while not stop.is_set():
            start = time.perf_counter()
            status = client.post("/explain", json=body).status_code
            found["statuses"][status] = found["statuses"].get(status, 0) + 1
            found["seconds"].append(time.perf_counter() - start)

    running = [threading.Thread(target=explainer, args=(c,), daemon=True) for c in clients.values()]
    for t in running:
        t.start()
    time.sleep(0.5)  # the first explanations under way
    busy = measure_wrk(url, texts, EXPLAIN_CLIENTS, seconds, server_pid, script)
    stop.set()
    for t in running:
        t.join(timeout=180)
    for c in clients.values():
        c.close()
    return {
        "clients": EXPLAIN_CLIENTS,
        "idle": idle,
        "busy": busy,
        "ratio": busy["p99_ms"] / idle["p99_ms"],
        "explain_texts": len(body["texts"]),
        "explain_workers": len(clients),
        "explain_statuses": found["statuses"],
        "explain_s": float(np.median(found["seconds"])) if found["seconds"] else float("nan"),
    }


def explain_line(e: dict[str, Any]) -> str:
    idle, busy = e["idle"], e["busy"]
    return (
        f"/predict at {e['clients']} clients, p99 {idle['p99_ms']:.1f} ms idle, {busy['p99_ms']:.1f} ms "
        f"while /explain runs on {e['explain_workers']} worker(s) ({e['ratio']:.2f}x; ≤ 2 "
        f"{common.check(e['ratio'], 2, False)}); p50 {idle['p50_ms']:.1f} and {busy['p50_ms']:.1f} ms; "
        f"{idle['texts_per_s']:,.0f} and {busy['texts_per_s']:,.0f} texts/s; /explain of "
        f"{e['explain_texts']} texts: {e['explain_statuses']}, {e['explain_s']:.2f} s median"
    )


def info_model(target: Path) -> str:
    from seqtrain.config import from_dict, read_yaml

    cfg = from_dict(read_yaml(target / "config.yaml"))
    m = cfg.model
    both = "bidirectional " if m.bidirectional else ""
    return f"{both}{m.cell.upper()} {m.hidden_size}, max_length {cfg.data.max_length}"


def soak_line(s: dict[str, Any], concurrency: int) -> str:
    wrong = s["malformed_wrong"]
    return (
        f"soak: {s['answered']:,} of {s['requests']:,} requests answered at {concurrency} clients in "
        f"{s['seconds']:.0f} s: {s['server_errors']} 5xx; {s['malformed_right']} of {s['malformed_sent']} "
        f"malformed ones answered with their 4xx{f' (wrong: {wrong[:5]})' if wrong else ''}; the good ones "
        f"{s['good']}; the server's resident memory {s['rss_mb_at_mark']:.1f} MB at request "
        f"{s['mark']:,}, {s['rss_mb_at_end']:.1f} MB at the end ({100 * (s['rss_growth'] or 0):+.2f}%)"
    )


def table(results: list[dict[str, Any]], args: argparse.Namespace, command: str, minutes: float) -> str:
    load0, load1 = args.load_average, os.getloadavg()[0]
    lines = [
        f"Generated by `{command}`; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {common.cpu_model()}, "
        f"{os.cpu_count()} CPUs; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"{minutes:.1f} min; load average {load0:.1f} at the start, {load1:.1f} at the end.",
        "",
        "| target (model; texts) | clients | texts/s | ceilings just before: arrival order, sorted | "
        "ratio to each | p50 ms | p99 ms | mean batch | requests per worker | CPU µs per text: server, "
        "clients; ceilings | cores: server, clients, others |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        info = r["info"]
        name = f"{Path(r['target']).name} ({info['backend']}, {r['model']}; {r['texts']:,})"
        for row in r["loads"]:
            bad = {k: v for k, v in row["statuses"].items() if k != 200}
            lines.append(
                f"| {name} | {row['concurrency']} | {row['texts_per_s']:,.0f} | "
                f"{row['arrival']:,.0f}, {row['ceiling']:,.0f} | {row['of_arrival']:.2f}, "
                f"{row['of_ceiling']:.2f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | "
                f"{row['mean_batch']:.1f} | {shares(row['worker_requests'])} | "
                f"{row['server_us_per_text']:,.0f}, {row['clients_us_per_text']:,.0f}; "
                f"{row['arrival_us']:,.0f}, {row['ceiling_us']:,.0f} | {row['server_cores']:.2f}, "
                f"{row['clients_cores']:.2f}, {row['others_cores']:.2f}"
                f"{f' (not 200: {bad})' if bad else ''} |"
            )
            name = ""
    lines.append("")
    for r in results:
        name = f"{Path(r['target']).name} ({r['info']['backend']})"
        lines.append(f"- {name}: exit {r['exit_code']} after SIGTERM.")
        if r["explain"]:
            lines.append(f"- {name}, {explain_line(r['explain'])}.")
        if r["soak"]:
            s = r["soak"]
            ok = (
                s["server_errors"] == 0
                and s["malformed_right"] == s["malformed_sent"]
                and s["answered"] == s["requests"]
                and (s["rss_growth"] or 0) <= 0.05
            )
            lines.append(f"- {name}, {soak_line(s, args.soak_concurrency)} {'✓' if ok else '✗'}.")
    return "\n".join(lines)


def export_onnx(run_dir: Path, folder: Path) -> Path:
    """`seqtrain export RUN --format onnx` into folder/<run name>."""
    out = folder / run_dir.name
    command = [sys.executable, "-m", "seqtrain", "export", str(run_dir), "--format", "onnx"]
    subprocess.run([*command, "--output", str(out)], check=True, stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("targets", type=Path, nargs="+", metavar="TARGET")
    parser.add_argument("--seconds", type=float, default=20.0, help="per load")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument(
        "--client-processes", type=int, nargs="+", default=[1], help="each load once per number given"
    )
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, help="the server's --max-wait-ms (default: serve's)")
    parser.add_argument("--threads", type=int, help="the server's --threads (default: serve's)")
    parser.add_argument("--workers", type=int, help="the server's --workers (default: serve's)")
    parser.add_argument(
        "--python-client",
        action="store_true",
        help="load with the Python client (aiohttp) even when wrk is installed",
    )
    parser.add_argument(
        "--soak", type=int, default=100_000, help="requests, 1%% malformed, on the first TARGET (0: none)"
    )
    parser.add_argument("--soak-concurrency", type=int, default=8)
    parser.add_argument(
        "--onnx",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after each run directory, its ONNX export (seqtrain export) at --onnx-concurrency clients",
    )
    parser.add_argument("--onnx-concurrency", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--explain-seconds",
        type=float,
        default=10.0,
        help=f"on each run directory: /predict at {EXPLAIN_CLIENTS} clients this long idle, then as long "
        "with /explain running (wrk only; 0: skip)",
    )
    parser.add_argument("--output", type=Path, default=common.ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.load_average = os.getloadavg()[0]
    args.wrk = not args.python_client and shutil.which("wrk") is not None
    if not args.wrk:
        print(
            "the load comes from the Python client (aiohttp), which costs several times the CPU per "
            "request of wrk and takes it from the server: "
            + ("asked for with --python-client" if args.python_client else "wrk is not installed (make wrk)"),
            flush=True,
        )
    command = shlex.join(["python", "-m", "bench.serve", *sys.argv[1:]])
    start = time.perf_counter()
    results = []
    exports = Path(tempfile.mkdtemp(prefix="bench-serve-onnx-"))
    for i, target in enumerate(args.targets):
        results.append(bench_target(target, args, args.soak if i == 0 else 0, None, args.explain_seconds))
        if args.onnx and (target / "checkpoints").is_dir():
            onnx = export_onnx(target, exports)
            results.append(bench_target(onnx, args, 0, args.onnx_concurrency))
    shutil.rmtree(exports, ignore_errors=True)
    block = table(results, args, command, (time.perf_counter() - start) / 60)
    common.write_between_markers(args.output, HEADING, "bench.serve", block)
    print(f"wrote the table into {args.output}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
