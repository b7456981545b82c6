"""Prometheus series, and the middleware that counts and times every HTTP answer.

With several workers, every worker writes its series to files in PROMETHEUS_MULTIPROC_DIR
(prometheus_client's multiprocess mode; `serve` sets it to a temporary folder) and /metrics, whichever
worker answers it, sums them over all workers, except seqtrain_worker_connections and
seqtrain_worker_requests: one series per live worker, labelled with its pid, to show how the
connections and the load are spread. With one process in a thread (the tests), each app keeps its
series in a registry of its own.
"""

from __future__ import annotations

import os
import time
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

ENDPOINTS = ("/", "/predict", "/explain", "/health", "/ready", "/info", "/metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.shared = os.environ.get(MULTIPROC_ENV)
        self.registry = CollectorRegistry()  # this process's series (in multiprocess mode: not exported)
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

        def gauge(name: str, text: str, mode: Literal["livesum", "liveall"] = "livesum") -> Gauge:
            """Summed over the live workers ("livesum"), or one series per live worker ("liveall")."""
            return Gauge(name, text, registry=r, multiprocess_mode=mode)

        self.queue = gauge("seqtrain_queue_texts", "Texts waiting for the model.")
        self.explaining = gauge("seqtrain_explain_requests", "/explain requests waiting or running.")
        self.ready = gauge(
            "seqtrain_ready_workers", "Worker processes whose model is loaded and not shutting down."
        )
        self.texts = Counter("seqtrain_texts", "Texts predicted.", registry=r)
        # one series per worker (a pid label): how the connections and the load are spread
        self.worker_connections = gauge(
            "seqtrain_worker_connections", "Open HTTP connections of each worker process.", "liveall"
        )
        self.worker_requests = gauge(
            "seqtrain_worker_requests",
            "/predict requests each worker process has run through its model.",
            "liveall",
        )

    def exposition(self) -> bytes:
        """The Prometheus text: this process's series, or every worker's summed."""
        if not self.shared:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, self.shared)
        return generate_latest(registry)


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
