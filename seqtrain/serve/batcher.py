"""Micro-batching in one worker process, and /explain beside it without stalling /predict.

Request handlers put their texts in one bounded queue. When the model is free, the batcher takes up
to `max_batch_size` texts, after waiting up to `max_wait_ms` for more to arrive, counted from when
the model became free (or from the first text's arrival, if later). The wait ends early once every
open connection of this worker has its request waiting (no other text can come) or the batch is
full. The batch then runs through what `inference.io.predict_stream` does with a chunk and
`inference.io.to_record` (the code path of `seqtrain predict`: the same encoding, the same length-sorted
batches, the same rounding), each micro-batch sorted and cut wherever smaller forward passes cost
less than one padded to the longest text (encoding.BatchCost, measured on the model at start-up).
Each request gets back only its own results, in order.

/explain requests have their own bounded queue (--explain-queue), their own thread (one explained
at a time) and a budget of texts and tokens per request. Occlusion runs many forward passes; they
go through the model in slices sized (from the slices timed so far) to take about EXPLAIN_SLICE_S,
and, while /predict is busy, they take at most EXPLAIN_SHARE of the model's time (Gate), so a
/predict batch waits for at most one slice, and rarely. The model computes one thing at a time in
a worker: a worker uses the cores its --threads give it, /explain included.

The model's threads are daemon threads: a forward pass that outlives the grace period after SIGTERM
does not hold the process's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from seqtrain.encoding import BatchCost, encode, read_length
from seqtrain.inference.io import Predictor, to_record
from seqtrain.serve.metrics import Metrics
from seqtrain.serve.options import ServeOptions
from seqtrain.serve.requests import ApiError
from seqtrain.serve.target import measure_cost

T = TypeVar("T")
EXPLAIN_SLICE_S = 0.002  # what one /explain forward pass aims to take: the most a /predict batch waits
EXPLAIN_SLICE_TOKENS = 512  # padded tokens (rows x longest row) of the first /explain pass: none timed yet
EXPLAIN_SHARE = 0.1  # of the model's time /explain may take from a busy /predict (all of an idle one)
EXPLAIN_BATCH = 256  # rows per length-sorted batch, as `seqtrain explain` batches them


def predict_texts(
    run: Predictor, texts: list[str], batch_size: int, cost: BatchCost | None = None
) -> np.ndarray:
    """What `predict.predict_stream` does with one chunk of texts: encode them, then the model on
    length-sorted batches, so the probabilities are the ones `seqtrain predict` writes (to float
    rounding: `cost` cuts the batches further by length). On the calling thread: predict_stream's
    read-ahead thread would add a thread start and two hand-offs to every micro-batch."""
    return run.probs(encode(run.tokenizer, texts, run.config.data), batch_size, cost)


class ModelThread:
    """One daemon thread that runs the calls given to it, one at a time, in order."""

    def __init__(self, name: str) -> None:
        self.calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.busy = False  # a call is running
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (item := self.calls.get()) is not None:
            fn, args, future, loop = item
            self.busy = True
            try:
                result, error = fn(*args), None
            except BaseException as e:
                result, error = None, e
            finally:
                self.busy = False
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, future, result, error)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` on the thread; the future (of the running loop) gets its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.calls.put((fn, args, future, loop))
        return future

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await self.submit(fn, *args)

    def stop(self) -> None:
        self.calls.put(None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Gate:
    """The model computes one thing at a time: /predict batches first. An /explain slice starts when
    no batch runs or waits for the model; and while /predict is busy (a batch is queued, or one ran
    since the last slice), only once it has rested (1 / share - 1) times as long as its last slice
    took, so /explain takes at most `share` of the model (and of the worker's core) from a busy
    /predict, and all of an idle one."""

    def __init__(self, pending: Callable[[], int], share: float = EXPLAIN_SHARE) -> None:
        self.cond = threading.Condition()
        self.busy = False
        self.urgent = 0  # /predict batches waiting for the model
        self.batches = 0  # /predict batches run so far
        self.pending, self.share = pending, share
        self.seen = 0  # `batches` when the last /explain slice ended
        self.rest_until = 0.0  # monotonic: when /explain may take the model from a busy /predict again

    @contextlib.contextmanager
    def first(self) -> Iterator[None]:
        with self.cond:
            self.urgent += 1
            while self.busy:
                self.cond.wait()
            self.urgent -= 1
            self.busy = True
            self.batches += 1
        try:
            yield
        finally:
            self._release()

    @contextlib.contextmanager
    def after(self) -> Iterator[None]:
        with self.cond:
            while True:
                if self.busy or self.urgent:
                    self.cond.wait()
                    continue
                left = self.rest_until - time.monotonic()
                if left <= 0 or not (self.pending() or self.batches != self.seen):
                    break
                self.cond.wait(min(left, 0.002))  # a queued batch does not notify: look again shortly
            self.busy = True
        began = time.monotonic()
        try:
            yield
        finally:
            ended = time.monotonic()
            with self.cond:
                self.seen = self.batches
                self.rest_until = ended + (ended - began) * (1 / self.share - 1)
            self._release()

    def _release(self) -> None:
        with self.cond:
            self.busy = False
            self.cond.notify_all()


class SliceSize:
    """Padded tokens per /explain forward pass (rows x longest row), set from the passes timed so far
    so that one takes about `seconds`: the same wait for /predict whether the model is a small GRU on
    sentences or an LSTM on long reviews, and whether the machine is free or loaded."""

    def __init__(self, seconds: float, tokens: float) -> None:
        self.seconds, self.tokens = seconds, tokens

    def rows(self, longest: int) -> int:
        return max(1, int(self.tokens) // max(longest, 1))

    def timed(self, tokens: int, elapsed: float) -> None:
        """A pass of `tokens` padded tokens took `elapsed` s: halfway to the size that takes `seconds`."""
        if elapsed > 0:
            self.tokens = min(max((self.tokens + tokens * self.seconds / elapsed) / 2, 1.0), float(1 << 20))


@dataclass
class GatedModel:
    """The model as /explain sees it: forward passes in slices, each through the gate's `after`,
    batched as `seqtrain explain` batches them (length-sorted, EXPLAIN_BATCH rows) and then cut to
    `size`'s padded tokens."""

    run: Predictor
    gate: Gate
    size: SliceSize

    @property
    def config(self) -> Any:
        return self.run.config

    @property
    def tokenizer(self) -> Any:
        return self.run.tokenizer

    @property
    def labels(self) -> Any:
        return self.run.labels

    def probs(self, seqs: list[list[int]], batch_size: int, cost: BatchCost | None = None) -> np.ndarray:
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        order = np.argsort(lengths, kind="stable")
        out: np.ndarray | None = None
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            at = 0
            while at < len(idx):
                longest = int(lengths[idx[-1]])
                part = idx[at : at + self.size.rows(longest)]
                at += len(part)
                with self.gate.after():
                    began = time.perf_counter()
                    probs = self.run.probs([seqs[i] for i in part], len(part))
                    self.size.timed(len(part) * longest, time.perf_counter() - began)
                if out is None:
                    out = np.zeros((len(seqs), probs.shape[1]), np.float32)
                out[part] = probs
        return out if out is not None else np.zeros((0, self.run.labels.probs_width), np.float32)


@dataclass
class Job:
    texts: list[str]
    top_k: int | None
    future: asyncio.Future[list[str]]
    arrived: float  # loop.time()


@dataclass
class Batcher:
    """Coalesces the texts of concurrent requests into forward passes on the model's thread; runs
    /explain requests on a thread of their own, through the same gate."""

    opts: ServeOptions
    metrics: Metrics
    connections: Callable[[], int] = lambda: 1 << 30  # open connections of this worker
    run: Predictor | None = None  # None while the model loads
    cost: BatchCost | None = None  # measured once the model is loaded
    jobs: deque[Job] = field(default_factory=deque)
    waiting: int = 0  # texts in `jobs`
    explaining: int = 0  # /explain requests waiting or running
    closing: bool = False  # new requests are refused (503); those admitted before still run
    stopping: bool = False  # the batcher's loop ends once the queue is empty
    ready: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    model_thread: ModelThread = field(default_factory=lambda: ModelThread("seqtrain-model"))
    explain_thread: ModelThread = field(default_factory=lambda: ModelThread("seqtrain-explain"))
    gate: Gate = field(init=False)
    slices: SliceSize = field(init=False)  # of /explain's forward passes, kept from one request to the next
    running: bool = False  # a batch is on the model's thread

    def __post_init__(self) -> None:
        self.gate = Gate(lambda: self.waiting)
        self.slices = SliceSize(EXPLAIN_SLICE_S, EXPLAIN_SLICE_TOKENS)

    @property
    def model(self) -> Predictor:
        if self.run is None:
            raise RuntimeError("the model is not loaded yet")
        return self.run

    @property
    def idle(self) -> bool:
        """No text waits or runs, no /explain request either."""
        return not self.jobs and not self.running and not self.explaining

    def admit(self, n: int, admitted: bool = False) -> None:
        """503 unless `n` more texts fit in the queue (and the server is not shutting down, unless the
        request was `admitted` before)."""
        self.check_open(admitted)
        if (queued := self.waiting) + n > self.opts.max_queue:
            raise ApiError(
                503,
                f"the queue is full ({queued} of {self.opts.max_queue} texts waiting); retry shortly.",
                {"Retry-After": "1"},
            )

    def check_open(self, admitted: bool = False) -> None:
        if self.closing and not admitted:
            raise ApiError(503, "the server is shutting down.", {"Retry-After": "1", "Connection": "close"})
        if not self.ready:
            raise ApiError(503, "the model is still loading; retry shortly.", {"Retry-After": "1"})

    def submit(
        self, texts: list[str], top_k: int | None, admitted: bool = False
    ) -> asyncio.Future[list[str]]:
        """Queue a request's texts; its future gets one JSON line per text, in order."""
        self.admit(len(texts), admitted)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[str]] = loop.create_future()
        self.jobs.append(Job(texts, top_k, future, loop.time()))
        self._count(len(texts))
        self.wake.set()
        return future

    def _count(self, n: int) -> None:
        self.waiting += n
        self.metrics.queue.set(self.waiting)

    async def start(self, load: Callable[[], Predictor]) -> None:
        """Load the model on its thread and run it once, so that the first real request pays no lazy
        initialisation. The event loop answers meanwhile; `ready` is set by the caller."""
        self.run = await self.model_thread.call(load)
        await self.model_thread.call(predict_texts, self.model, ["warm up"], 1)
        self.cost = await self.model_thread.call(measure_cost, self.model, self.opts.max_batch_size)

    async def loop(self) -> None:
        """Until close(): take the oldest jobs as one batch, run it, hand each job its results."""
        loop = asyncio.get_running_loop()
        free_since = loop.time()
        while self.jobs or not self.stopping:
            if not self.jobs:
                self.wake.clear()
                await self.wake.wait()
                continue
            deadline = max(self.jobs[0].arrived, free_since) + self.opts.max_wait_ms / 1000
            while (
                self.waiting < self.opts.max_batch_size
                and len(self.jobs) < self.connections()
                and not self.stopping
                and (left := deadline - loop.time()) > 0
            ):
                self.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), left)
            batch = self._take()
            if batch:
                await self._run(batch)
            free_since = loop.time()

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
        results: list[list[str] | None]
        self.running = True
        try:
            try:
                results = list(await self.model_thread.call(self.forward, batch))
            except Exception:
                if len(batch) == 1:
                    results = [None]
                else:  # again one job at a time: only the request that breaks the model fails
                    results = [await self.model_thread.call(self._forward_alone, job) for job in batch]
        finally:
            self.running = False
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
        """On the model's thread: predict's code path on all the batch's texts, split back per job."""
        texts = [t for job in batch for t in job.texts]
        self.metrics.batch.observe(len(texts))
        run = self.model
        with self.gate.first():
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
        self.metrics.worker_requests.inc(len(batch))
        return out

    def check_explain(self, texts: list[str], admitted: bool = False) -> None:
        """413 past the /explain budget of tokens, 503 when this worker's /explain queue is full."""
        self.check_open(admitted)
        run = self.model
        tokens = sum(len(ids) for ids in encode(run.tokenizer, texts, run.config.data))
        if tokens > self.opts.explain_max_tokens:
            raise ApiError(
                413,
                f"the texts hold {tokens:,} tokens (as the model reads them, up to "
                f"{read_length(run.config.data)} each); /explain takes at most "
                f"{self.opts.explain_max_tokens:,} per request (--explain-max-tokens).",
            )
        if self.explaining >= self.opts.explain_queue:
            raise ApiError(
                503,
                f"{self.explaining} /explain requests are waiting or running (--explain-queue "
                f"{self.opts.explain_queue}); retry shortly.",
                {"Retry-After": "1"},
            )

    def explain(self, texts: list[str], admitted: bool = False) -> asyncio.Future[list[str]]:
        """`seqtrain explain --format jsonl` lines (occlusion) of `texts`, computed on the /explain
        thread in slices that give way to /predict batches."""
        from seqtrain import explain

        self.check_explain(texts, admitted)
        gated = GatedModel(self.model, self.gate, self.slices)

        def run() -> list[str]:
            return [
                json.dumps(explain.to_record(ex, gated, "occlusion"))  # type: ignore[arg-type]
                for ex in explain.explain_texts(gated, texts, batch_size=EXPLAIN_BATCH)  # type: ignore[arg-type]
            ]

        self.explaining += 1
        self.metrics.explaining.set(self.explaining)
        future = self.explain_thread.submit(run)

        def done(_: asyncio.Future[list[str]]) -> None:
            self.explaining -= 1
            self.metrics.explaining.set(self.explaining)

        future.add_done_callback(done)
        return future

    async def close(self, task: asyncio.Task[None], timeout_s: float) -> None:
        """Stop taking requests, finish the queued ones (for up to `timeout_s`), stop the threads (a
        call still running is left to its daemon thread)."""
        self.closing = self.stopping = True
        self.wake.set()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(task, timeout_s)
        self.model_thread.stop()
        self.explain_thread.stop()
