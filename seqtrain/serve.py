"""`seqtrain serve TARGET`: a long-lived HTTP server that loads the model once and batches requests.

    POST /predict   {"texts": [...]} -> {"predictions": [...]}; {"text": "..."} -> one prediction;
                    optional "top_k". Each prediction is exactly the line `seqtrain predict` writes.
    POST /explain   the same bodies (no top_k) -> what `seqtrain explain --format jsonl` writes (occlusion):
                    the prediction and each token with its character offsets and score
    GET  /health    liveness: the process answers
    GET  /ready     {"status": "ready"} once the model is loaded and warmed up; 503 {"status": "loading"}
                    before (the server listens first and loads in the background), "shutting down" after
    GET  /info      labels, task, checkpoint and step, max_length, limits and versions
    GET  /metrics   Prometheus text: requests by endpoint and status, latency, texts per forward
                    pass, texts waiting
    GET  /          a page to try the model: the label, a bar per class, the words that drove it

Micro-batching: request handlers put their texts in one bounded queue; a single batcher task takes
up to `max_batch_size` texts, waiting at most `max_wait_ms` after the oldest one arrived, and runs
them through what `predict.predict_stream` does with a chunk and `predict.to_record` (the code path
of `seqtrain predict`: the same encoding, the same length-sorted batches, the same rounding) on one
worker thread, while the event loop keeps accepting requests. Texts that arrive together are rarely
of one length, so each micro-batch is sorted and cut wherever smaller forward passes cost less than
one padded to the longest text (encoding.BatchCost, measured on the model at start-up). The model
runs on the physical cores less one (--threads): the last core answers HTTP. Each request gets back
only its own results, in order. POST /predict is plain ASGI in front of FastAPI (which serves the rest).

Overload and bad input answer with a JSON error ({"error": message, "status": code}) and touch no
other request: a full queue is 503 with Retry-After (so memory stays flat under a flood), too many
texts or bytes is 413, a body that is not UTF-8 (or holds lone surrogates) is 400, a body that is
not JSON or has the wrong shape is 422. SIGTERM or Ctrl-C stop accepting connections, let the
requests in flight finish (up to `grace_s`), and the command exits 0.

TARGET is a run directory (torch) or an ONNX export folder (onnxruntime; torch is never imported).
It loads on the model's worker thread while the server already answers (/health, /ready, /metrics);
a TARGET that fails to load stops the server, and `serve` raises its error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import re
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from seqtrain import __version__
from seqtrain.encoding import UNK_ID, BatchCost, encode
from seqtrain.errors import CheckpointError, ConfigError
from seqtrain.machine import physical_cores
from seqtrain.predict import Predictor, to_record

ENDPOINTS = ("/", "/predict", "/explain", "/health", "/ready", "/info", "/metrics")
REQUEST_KEYS = ("text", "texts", "top_k")


@dataclass
class ServeOptions:
    """What `seqtrain serve` takes besides TARGET (its --options, same names)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the one chosen is printed)
    max_batch_size: int = 64  # texts in one forward pass (cut further by length where that is cheaper)
    # how long the oldest waiting text may wait for others to join its batch (0: none; texts still
    # gather while the model runs, and a batch takes all that wait when it is free)
    max_wait_ms: float = 0.0
    max_queue: int = 1024  # texts waiting for the model; a request that would overflow it gets 503
    max_texts: int = 256  # texts in one request; more: 413
    max_bytes: int = 1_000_000  # bytes in one request body; more: 413
    checkpoint: str = "best"  # of a run directory: best or last
    grace_s: int = 30  # after SIGTERM, how long the requests in flight get to finish
    log_level: str = "info"
    # the model's threads; None: the physical cores less one, which is left to the event loop (with
    # every core on the model, the idle threads' spin-waiting took the core that answers HTTP)
    threads: int | None = None

    @property
    def model_threads(self) -> int:
        return self.threads or max(1, physical_cores() - 1)

    def check(self) -> None:
        """Raise ConfigError (exit code 2) naming the first option out of range."""
        problems = [
            (not 0 <= self.port <= 65535, f"--port must be in [0, 65535], got {self.port}."),
            (self.max_batch_size < 1, f"--max-batch-size must be at least 1, got {self.max_batch_size}."),
            (
                not 0 <= self.max_wait_ms <= 10_000,
                f"--max-wait-ms must be in [0, 10000], got {self.max_wait_ms}.",
            ),
            (self.max_texts < 1, f"--max-texts must be at least 1, got {self.max_texts}."),
            (
                self.max_queue < self.max_texts,
                f"--max-queue ({self.max_queue}) must be at least --max-texts ({self.max_texts}), "
                "or a full-size request could never fit.",
            ),
            (self.max_bytes < 16, f"--max-bytes must be at least 16, got {self.max_bytes}."),
            (
                self.checkpoint not in ("best", "last"),
                f"--checkpoint must be 'best' or 'last', got {self.checkpoint!r}.",
            ),
            (self.grace_s < 0, f"--grace-s must be at least 0, got {self.grace_s}."),
            (
                self.threads is not None and self.threads < 1,
                f"--threads must be at least 1, got {self.threads}.",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


class ApiError(Exception):
    """An answer other than 200: becomes {"error": message, "status": status}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


# --------------------------------------------------------------------------- the model


def load_target(
    target: Path, checkpoint: str = "best", threads: int | None = None
) -> tuple[Predictor, list[str]]:
    """A run directory on torch, or an ONNX export folder on onnxruntime (torch never imported), on
    `threads` threads (None: the library's default)."""
    from seqtrain.exported import is_export_folder, load_exported_run

    if not is_export_folder(target):
        import torch

        from seqtrain.inference import load_run

        if threads:
            torch.set_num_threads(threads)
        return load_run(target, checkpoint)
    if checkpoint != "best":
        raise ConfigError(
            "--checkpoint picks a checkpoint of a run directory; an export folder holds one model."
        )
    return load_exported_run(target, threads), []


def measure_cost(run: Predictor, batch_size: int, steps: int = 32, repeats: int = 5) -> BatchCost | None:
    """The model's BatchCost, from the best of `repeats` timings of batches of unknown tokens:
    1 text of 1 step, 1 text of `steps` and `batch_size` texts of `steps`. None for batches of one."""
    if batch_size < 2:
        return None

    def seconds(texts: int, length: int) -> float:
        seqs = [[UNK_ID] * length] * texts
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            run.probs(seqs, texts)
            best = min(best, time.perf_counter() - start)
        return best

    call, one, full = seconds(1, 1), seconds(1, steps), seconds(batch_size, steps)
    per_text_step = max((full - one) / (steps * (batch_size - 1)), 1e-9)  # what grows with B
    per_step = max((one - call) / (steps - 1) - per_text_step, 0.0)  # what does not
    return BatchCost(per_call=call / per_text_step, per_step=per_step / per_text_step)


def describe(
    run: Predictor, target: Path, opts: ServeOptions, cost: BatchCost | None = None
) -> dict[str, Any]:
    """What GET /info answers."""
    ckpt = getattr(run, "checkpoint", None)  # inference.Run: the checkpoint folder
    backend = "torch" if ckpt is not None else "onnxruntime"
    name = ckpt.name if isinstance(ckpt, Path) else None
    if name is None:
        with contextlib.suppress(OSError, ValueError):
            name = json.loads((target / "export.json").read_text()).get("checkpoint")
    step = re.search(r"(\d+)$", name or "")
    versions = {"seqtrain": __version__, "python": platform.python_version()}
    for package in (backend, "fastapi", "uvicorn", "uvloop", "httptools"):
        with contextlib.suppress(PackageNotFoundError):
            versions[package] = version(package)
    data = run.config.data
    return {
        "target": str(target),
        "backend": backend,
        "task": run.labels.task,
        "labels": run.labels.names,
        "checkpoint": name,
        "step": int(step.group(1)) if step else None,
        "max_length": data.max_length,
        "truncation": data.truncation,
        "limits": {k: v for k, v in asdict(opts).items() if k.startswith("max_")},
        "threads": opts.model_threads,
        "batch_cost": asdict(cost) if cost else None,  # in units of one text's time step
        "versions": versions,
    }


# --------------------------------------------------------------------------- metrics


class Metrics:
    """Prometheus series in a registry of their own (several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "seqtrain_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "seqtrain_request_seconds",
            "Time from request to response, by endpoint.",
            ["endpoint"],
            registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10),
        )
        self.batch = Histogram(
            "seqtrain_batch_texts",
            "Texts in each forward pass (micro-batch size).",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.queue = Gauge("seqtrain_queue_texts", "Texts waiting for the model.", registry=r)
        self.texts = Counter("seqtrain_texts", "Texts predicted.", registry=r)


class Instrument:
    """ASGI middleware: count every HTTP answer by endpoint and status, and time it."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


# --------------------------------------------------------------------------- micro-batching


def predict_texts(
    run: Predictor, texts: list[str], batch_size: int, cost: BatchCost | None = None
) -> np.ndarray:
    """What `predict.predict_stream` does with one chunk of texts: encode them, then the model on
    length-sorted batches, so the probabilities are the ones `seqtrain predict` writes (to float
    rounding: `cost` cuts the batches further by length). On the calling thread: predict_stream's
    read-ahead thread would add a thread start and two hand-offs to every micro-batch."""
    return run.probs(encode(run.tokenizer, texts, run.config.data), batch_size, cost)


@dataclass
class Job:
    texts: list[str]
    top_k: int | None
    future: asyncio.Future[list[str]]
    arrived: float  # loop.time()


@dataclass
class Batcher:
    """Coalesces the texts of concurrent requests into forward passes on one worker thread."""

    opts: ServeOptions
    metrics: Metrics
    run: Predictor | None = None  # None while the model loads
    cost: BatchCost | None = None  # measured once the model is loaded
    jobs: deque[Job] = field(default_factory=deque)
    waiting: int = 0  # texts in `jobs`
    explaining: int = 0  # texts of /explain requests, waiting or running
    closing: bool = False
    ready: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="seqtrain-serve")
    )

    @property
    def model(self) -> Predictor:
        if self.run is None:
            raise RuntimeError("the model is not loaded yet")
        return self.run

    def admit(self, n: int) -> None:
        """503 unless `n` more texts fit in the queue."""
        if self.closing or not self.ready:
            raise ApiError(
                503,
                "the server is shutting down."
                if self.closing
                else "the model is still loading; retry shortly.",
                {"Retry-After": "1"},
            )
        if (queued := self.waiting + self.explaining) + n > self.opts.max_queue:
            raise ApiError(
                503,
                f"the queue is full ({queued} of {self.opts.max_queue} texts waiting); retry shortly.",
                {"Retry-After": "1"},
            )

    def submit(self, texts: list[str], top_k: int | None) -> asyncio.Future[list[str]]:
        """Queue a request's texts; its future gets one JSON line per text, in order."""
        self.admit(len(texts))
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[str]] = loop.create_future()
        self.jobs.append(Job(texts, top_k, future, loop.time()))
        self._count(len(texts))
        self.wake.set()
        return future

    def _count(self, n: int, explain: bool = False) -> None:
        if explain:
            self.explaining += n
        else:
            self.waiting += n
        self.metrics.queue.set(self.waiting + self.explaining)

    async def start(self, load: Callable[[], Predictor]) -> None:
        """Load the model on the worker thread and run it once, so that the first real request pays
        no lazy initialisation. The event loop answers meanwhile; `ready` is set by the caller."""
        loop = asyncio.get_running_loop()
        self.run = await loop.run_in_executor(self.pool, load)
        await loop.run_in_executor(self.pool, predict_texts, self.model, ["warm up"], 1)
        self.cost = await loop.run_in_executor(self.pool, measure_cost, self.model, self.opts.max_batch_size)

    async def loop(self) -> None:
        """Until close(): take the oldest jobs as one batch, run it, hand each job its results."""
        loop = asyncio.get_running_loop()
        while self.jobs or not self.closing:
            if not self.jobs:
                self.wake.clear()
                await self.wake.wait()
                continue
            deadline = self.jobs[0].arrived + self.opts.max_wait_ms / 1000
            while (
                self.waiting < self.opts.max_batch_size
                and not self.closing
                and (left := deadline - loop.time()) > 0
            ):
                self.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), left)
            batch = self._take()
            if batch:
                await self._run(batch)

    def _take(self) -> list[Job]:
        """The oldest jobs up to max_batch_size texts (a bigger request goes alone); drops abandoned ones."""
        batch: list[Job] = []
        n = 0
        while self.jobs and (not batch or n + len(self.jobs[0].texts) <= self.opts.max_batch_size):
            job = self.jobs.popleft()
            self._count(-len(job.texts))
            if not job.future.done():  # a client that went away was cancelled
                batch.append(job)
                n += len(job.texts)
        return batch

    async def _run(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        results: list[list[str] | None]
        try:
            results = list(await loop.run_in_executor(self.pool, self.forward, batch))
        except Exception:
            if len(batch) == 1:
                results = [None]
            else:  # again one job at a time: only the request that breaks the model fails
                results = [await loop.run_in_executor(self.pool, self._forward_alone, job) for job in batch]
        for job, lines in zip(batch, results, strict=True):
            if job.future.done():
                continue
            if lines is None:
                job.future.set_exception(ApiError(500, "the model failed on this request's texts."))
            else:
                job.future.set_result(lines)

    def _forward_alone(self, job: Job) -> list[str] | None:
        try:
            return self.forward([job])[0]
        except Exception:
            return None

    def forward(self, batch: list[Job]) -> list[list[str]]:
        """On the worker thread: predict's code path on all the batch's texts, split back per job."""
        texts = [t for job in batch for t in job.texts]
        self.metrics.batch.observe(len(texts))
        run = self.model
        probs = predict_texts(run, texts, self.opts.max_batch_size, self.cost)
        rows = iter(zip(texts, probs, strict=True))
        out = []
        for job in batch:
            out.append(
                [
                    json.dumps(to_record(run.labels, text, probs, job.top_k))
                    for text, probs in (next(rows) for _ in job.texts)
                ]
            )
        self.metrics.texts.inc(len(texts))
        return out

    async def explain(self, texts: list[str]) -> list[str]:
        """`seqtrain explain --format jsonl` lines (occlusion: a forward pass per token), on the model's
        thread between batches; the texts count in the queue while they wait and run."""
        from seqtrain import explain

        def run() -> list[str]:
            return [
                json.dumps(explain.to_record(ex, self.model, "occlusion"))
                for ex in explain.explain_texts(self.model, texts)
            ]

        self.admit(len(texts))
        self._count(len(texts), explain=True)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, run)
        finally:
            self._count(-len(texts), explain=True)

    async def close(self, task: asyncio.Task[None]) -> None:
        """Stop taking requests, finish the queued ones, stop the worker."""
        self.closing = True
        self.wake.set()
        await task
        self.pool.shutdown(wait=True)


# --------------------------------------------------------------------------- requests


async def read_body(scope: Scope, receive: Receive, max_bytes: int) -> bytes | None:
    """The request body, or ApiError 413 past `max_bytes`; None when the client went away."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > max_bytes:
                raise ApiError(
                    413,
                    f"the request body has {int(value):,} bytes; the limit is {max_bytes:,} (--max-bytes).",
                )
            break
    chunks: list[bytes] = []
    size = 0
    while True:  # a chunked body without Content-Length is cut off at the limit too
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"the request body has more than {max_bytes:,} bytes (--max-bytes).")
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk
        chunks.append(chunk)


def parse_request(body: bytes, max_texts: int) -> tuple[list[str], int | None, bool]:
    """(texts, top_k, whether one "text" was sent) from a /predict body, or ApiError 400/413/422."""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start}).") from None
    try:
        obj = json.loads(decoded)
    except ValueError as e:
        raise ApiError(422, f"the request body is not JSON: {e}.") from None
    shape = 'send {"texts": ["...", ...]} or {"text": "..."}, with an optional "top_k": K'
    if not isinstance(obj, dict):
        raise ApiError(422, f"the request body is {json_type(obj)}, not an object; {shape}.")
    if unknown := sorted(set(obj) - set(REQUEST_KEYS)):
        raise ApiError(422, f"unknown key(s) {', '.join(map(repr, unknown))}; {shape}.")
    if ("text" in obj) == ("texts" in obj):
        raise ApiError(422, f"give exactly one of 'text' and 'texts'; {shape}.")
    single = "text" in obj
    texts = [obj["text"]] if single else obj["texts"]
    if not isinstance(texts, list) or not texts:
        raise ApiError(422, f"'texts' must be a non-empty list of strings; {shape}.")
    if len(texts) > max_texts:
        raise ApiError(413, f"{len(texts):,} texts in one request; the limit is {max_texts:,} (--max-texts).")
    for i, text in enumerate(texts):
        where = "'text'" if single else f"texts[{i}]"
        if not isinstance(text, str):
            raise ApiError(422, f"{where} is {json_type(text)}, not a string.")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    400, f"{where} holds a lone surrogate (\\ud800-\\udfff escape): not valid Unicode."
                ) from None
    top_k = obj.get("top_k")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ApiError(422, f"'top_k' must be a positive integer, got {json.dumps(top_k)}.")
    return texts, top_k, single


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return names.get(type(value), "null")


def json_lines(lines: list[str], single: bool, key: str) -> bytes:
    """{"text": ...} gets its line itself; {"texts": [...]} gets {key: [lines]}."""
    return (lines[0] if single else f'{{"{key}": [' + ", ".join(lines) + "]}").encode()


def error_body(status: int, message: str) -> bytes:
    """{"error": message, "status": status}, rendered as FastAPI's JSONResponse renders it."""
    return json.dumps(
        {"error": message, "status": status}, ensure_ascii=False, separators=(",", ":")
    ).encode()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(status, message), status, headers, media_type="application/json")


JSON_HEADER = (b"content-type", b"application/json")


async def answer(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    """One whole HTTP response, written straight to the ASGI server."""
    head = [JSON_HEADER, (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


# --------------------------------------------------------------------------- the app


class Service:
    """The ASGI app. POST /predict, the hot path, is plain ASGI: the body is read, checked and parsed
    here (the same checks and messages as everywhere), its texts go to the batcher, and the answer's
    bytes are written straight back. Every other route goes through FastAPI.

    The server listens before the model is loaded: lifespan start-up only starts the loading (on the
    model's worker thread), so /health answers at once and /ready says "loading" (503) until the model
    is loaded and has run once. If loading fails, `on_failure` gets the error (the server stops)."""

    def __init__(
        self,
        target: Path,
        opts: ServeOptions,
        load: Callable[[], Predictor] | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.target, self.opts, self.on_failure = target, opts, on_failure
        self.load = load or self.load_target
        self.metrics = Metrics()
        self.batcher: Batcher | None = None
        self.info: dict[str, Any] | None = None
        self.failure: BaseException | None = None
        self.api = self.fastapi()
        self.counted = {
            status: self.metrics.requests.labels("/predict", str(status))
            for status in (200, 400, 413, 422, 500, 503)
        }
        self.timed = self.metrics.latency.labels("/predict")

    def load_target(self) -> Predictor:
        from seqtrain import console

        # looked up now: tests replace it
        run, warnings = load_target(self.target, self.opts.checkpoint, self.opts.model_threads)
        for w in warnings:
            console.warn(w)
        return run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST":
            await self.predict(scope, receive, send)
        else:
            await self.api(scope, receive, send)

    async def predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, status, answered = time.perf_counter(), 500, False
        body: bytes | None = b""
        try:
            body = await read_body(scope, receive, self.opts.max_bytes)
            if body is None:
                return  # the client went away: nobody to answer
            texts, top_k, single = parse_request(body, self.opts.max_texts)
            if self.batcher is None:
                raise ApiError(503, "the server is starting.", {"Retry-After": "1"})
            lines = await self.batcher.submit(texts, top_k)
            status, answered = 200, True
            await answer(send, 200, json_lines(lines, single, "predictions"))
        except ApiError as e:
            status, answered = e.status, True
            await answer(send, status, error_body(status, e.message), e.headers)
        except Exception as e:  # a bug: a JSON 500 (FastAPI's would be plain text), and uvicorn logs it
            if not answered:
                await answer(send, 500, error_body(500, f"internal error ({type(e).__name__})."))
            raise
        finally:
            if body is not None:
                counter = self.counted.get(status) or self.metrics.requests.labels("/predict", str(status))
                counter.inc()
                self.timed.observe(time.perf_counter() - start)

    async def start(self, batcher: Batcher) -> None:
        from seqtrain import console

        try:
            await batcher.start(self.load)
            self.info = describe(batcher.model, self.target, self.opts, batcher.cost)
            batcher.ready = True  # /ready, /predict, /explain: from now on
        except Exception as e:
            self.failure = e
            if self.on_failure:
                self.on_failure(e)
            return
        console.info(f"ready: {self.target} loaded ({self.info['backend']}, {self.info['checkpoint']})")

    def fastapi(self) -> ASGIApp:
        """The routes other than POST /predict."""
        service, opts, metrics = self, self.opts, self.metrics

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            batcher = Batcher(opts, metrics)  # created inside the server's event loop
            service.batcher = batcher
            loading = asyncio.create_task(service.start(batcher))
            task = asyncio.create_task(batcher.loop())
            yield
            if not loading.done():  # stopped while loading: the load itself finishes on its thread
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await batcher.close(task)

        app = FastAPI(
            title="seqtrain", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None
        )
        app.add_middleware(Instrument, metrics=metrics)

        @app.exception_handler(ApiError)
        async def api_error(request: Request, e: ApiError) -> Response:
            return error_response(e.status, e.message, e.headers)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, e: StarletteHTTPException) -> Response:
            return error_response(e.status_code, str(e.detail), dict(e.headers or {}))

        @app.exception_handler(RequestValidationError)
        async def validation_error(request: Request, e: RequestValidationError) -> Response:
            return error_response(422, str(e.errors()))

        @app.post(
            "/predict",
            summary='{"texts": [...]} or {"text": "..."}, optional "top_k": the lines `seqtrain predict` '
            "writes (answered by the plain-ASGI path in front of this app; listed here for /docs)",
        )
        async def predict(request: Request) -> Response:
            raise RuntimeError("POST /predict is answered before FastAPI")  # pragma: no cover

        @app.post(
            "/explain",
            summary='{"texts": [...]} or {"text": "..."}: the lines `seqtrain explain --format jsonl` writes',
        )
        async def explain(request: Request) -> Response:
            body = await read_body(request.scope, request.receive, opts.max_bytes)
            texts, top_k, single = parse_request(body or b"", opts.max_texts)
            if top_k is not None:
                raise ApiError(422, "'top_k' is for /predict; /explain explains the predicted class.")
            if service.batcher is None:
                raise ApiError(503, "the server is starting.", {"Retry-After": "1"})
            lines = await service.batcher.explain(texts)
            return Response(json_lines(lines, single, "explanations"), media_type="application/json")

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/ready")
        async def ready() -> JSONResponse:
            """{"status": "ready"} (200), or 503 with "loading", "shutting down" or "failed"."""
            batcher = service.batcher
            if batcher is not None and batcher.ready and not batcher.closing:
                return JSONResponse({"status": "ready"})
            if batcher is not None and batcher.closing:
                state = "shutting down"
            else:
                state = "failed" if service.failure else "loading"
            return JSONResponse({"status": state}, 503, {"Retry-After": "1"})

        @app.get("/info")
        async def info() -> dict[str, Any]:
            if service.info is None:
                raise ApiError(503, "the model is still loading; retry shortly.", {"Retry-After": "1"})
            return service.info

        @app.get("/metrics")
        async def metrics_() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/", response_class=HTMLResponse)
        async def page() -> HTMLResponse:
            return HTMLResponse(PAGE)

        return app


# --------------------------------------------------------------------------- the server


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM or SIGINT it shut down on gracefully is not raised
    again afterwards (uvicorn >= 0.29 re-raises it, so the process would die by the signal), and that
    a model that fails to load stops it (`failure` holds the error)."""

    failure: BaseException | None = None

    def fail(self, error: BaseException) -> None:
        self.failure = error
        self.should_exit = True

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything else, so a busy port is a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it a
    # keep-alive response (headers and body: two writes) waits for the client's delayed ACK, 40 ms each time
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise CheckpointError(f"cannot listen on {host}:{port}: {e.strerror}.") from None
    sock.set_inheritable(True)
    return sock


def fastest(module: str, name: str) -> str:
    """uvicorn's `loop`/`http` setting: the C implementation when it is installed, else uvicorn's own."""
    try:
        __import__(module)
    except ImportError:
        return "auto"
    return name


def make_server(
    target: Path,
    opts: ServeOptions,
    load: Callable[[], Predictor] | None = None,
    uvicorn_config: dict[str, Any] | None = None,
) -> Server:
    """uvicorn on the app, with uvloop and httptools when installed (the serve extra has them), no
    access log, and a backlog of 2,048 connections."""
    service = Service(target, opts, load)
    settings: dict[str, Any] = {
        "loop": fastest("uvloop", "uvloop"),
        "http": fastest("httptools", "httptools"),
        "backlog": 2048,
        "proxy_headers": False,  # no X-Forwarded-* rewriting on every request: there is no access log
    }
    server = Server(
        uvicorn.Config(
            service,
            log_level=opts.log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=opts.grace_s,
            **{**settings, **(uvicorn_config or {})},
        )
    )
    service.on_failure = server.fail
    return server


def serve(target: Path, opts: ServeOptions) -> None:
    """Listen, load TARGET in the background (/ready: 503 "loading", then 200), serve until SIGTERM or
    Ctrl-C, finish the requests in flight, return. A model that fails to load stops it with its error."""
    from seqtrain import console

    opts.check()
    sock = listen(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    console.info(f"listening on {url}: {target} (POST /predict, a page at /); SIGTERM or Ctrl-C stops")
    server = make_server(target, opts)
    server.run(sockets=[sock])
    if server.failure is not None:
        raise server.failure
    console.info("stopped")


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>seqtrain</title>
<style>
  body { font: 16px/1.45 system-ui, sans-serif; max-width: 42rem; margin: 2rem auto; padding: 0 1rem;
         color: #222; }
  h1 { font-size: 1.3rem; } h1 small { color: #777; font-weight: normal; font-size: .85rem; }
  textarea { width: 100%; box-sizing: border-box; font: inherit; padding: .5rem; }
  button { font: inherit; padding: .35rem 1.2rem; margin-top: .5rem; }
  #label { font-size: 1.4rem; font-weight: 600; min-height: 2rem; }
  .row { display: grid; grid-template-columns: 8rem 1fr 4.5rem; gap: .5rem; align-items: center;
         margin: .2rem 0; }
  .track { background: #eee; height: 1rem; border-radius: 3px; overflow: hidden; }
  .fill { background: #4a7bd0; height: 100%; } .top .fill { background: #2c9a5a; }
  .num { text-align: right; font-variant-numeric: tabular-nums; } #error { color: #b00020; }
  #words { white-space: pre-wrap; margin-top: 1rem; } #words span { border-radius: 3px; }
  #why { color: #666; font-size: .85rem; }
</style>
</head>
<body>
<h1>seqtrain <small id="model"></small></h1>
<form id="form">
  <textarea id="text" rows="4" placeholder="Type a sentence, e.g. a gorgeous, witty film" required></textarea>
  <button id="submit" type="submit">Predict</button>
</form>
<p id="label" aria-live="polite"></p>
<div id="bars"></div>
<p id="why"></p>
<div id="words"></div>
<p id="error" role="alert"></p>
<script>
const $ = (id) => document.getElementById(id);
fetch("info").then((r) => r.json()).then((i) => {
  const labels = i.labels.join(", ") || "score";
  $("model").textContent = `${i.task}: ${labels} (${i.backend}, ${i.checkpoint || ""})`;
});
function bar(name, p, top) {
  const row = document.createElement("div"); row.className = "row" + (top ? " top" : "");
  const label = document.createElement("span"); label.textContent = name;
  const track = document.createElement("div"); track.className = "track";
  const fill = document.createElement("div"); fill.className = "fill";
  fill.style.width = (100 * p).toFixed(1) + "%";
  const num = document.createElement("span"); num.className = "num"; num.textContent = p.toFixed(3);
  track.append(fill); row.append(label, track, num); return row;
}
function highlight(ex) {  // tokens on a green (for) or red (against) background; offsets count code points
  const chars = Array.from(ex.text), parts = [];
  const top = Math.max(0, ...ex.tokens.map((t) => Math.abs(t.score))) || 1;
  let at = 0;
  for (const t of ex.tokens) {
    if (t.start > at) parts.push(document.createTextNode(chars.slice(at, t.start).join("")));
    const span = document.createElement("span");
    span.textContent = chars.slice(t.start, t.end).join("");
    const alpha = (0.65 * Math.abs(t.score) / top).toFixed(3);
    span.style.background = t.score >= 0 ? `rgba(0,150,0,${alpha})` : `rgba(210,0,0,${alpha})`;
    span.title = t.score.toFixed(4);
    parts.push(span); at = Math.max(at, t.end);
  }
  if (at < chars.length) parts.push(document.createTextNode(chars.slice(at).join("")));
  $("why").textContent = `Words for (green) and against (red) ${ex.explained}: ` +
    "the change of its probability when the word is unknown.";
  $("words").replaceChildren(...parts);
}
async function post(path, text) {
  const r = await fetch(path, {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({text}),
  });
  const d = await r.json();
  if (!r.ok) throw new Error(d.error);
  return d;
}
$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  for (const id of ["error", "label", "why"]) $(id).textContent = "";
  $("bars").replaceChildren(); $("words").replaceChildren();
  const text = $("text").value;
  try {
    const d = await post("predict", text);
    if ("score" in d) $("label").textContent = "score " + d.score;
    else {
      $("label").textContent = d.label;
      const bars = Object.entries(d.probs).map(([name, p]) => bar(name, p, name === d.label));
      $("bars").replaceChildren(...bars);
    }
    highlight(await post("explain", text));
  } catch (e) { $("error").textContent = e.message; }
});
</script>
</body>
</html>
"""
