"""The ASGI app of one worker process: POST /predict as plain ASGI, the other routes through FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import Gauge
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from seqtrain import __version__
from seqtrain.inference.io import Predictor
from seqtrain.inference.target import load_target
from seqtrain.serve.batcher import Batcher
from seqtrain.serve.metrics import CONTENT_TYPE, Instrument, Metrics
from seqtrain.serve.options import ServeOptions
from seqtrain.serve.requests import (
    ApiError,
    answer,
    error_body,
    error_response,
    json_lines,
    parse_request,
    read_body,
)
from seqtrain.serve.target import describe

T = TypeVar("T")
PAGE = files("seqtrain.serve").joinpath("page.html").read_text(encoding="utf-8")
CONNECTIONS = "seqtrain.connections"  # the lifespan state's key for this worker's Connections


class Connections:
    """Open HTTP connections of this worker (http.ReadTimeout counts them): how many requests could
    still join a micro-batch; also in /metrics (seqtrain_worker_connections)."""

    def __init__(self, read_timeout_s: float | None = None, gauge: Gauge | None = None) -> None:
        self.open = 0
        self.read_timeout_s = read_timeout_s  # for a request's headers (None: no limit)
        self.gauge = gauge

    def opened(self) -> None:
        self.open += 1
        if self.gauge is not None:
            self.gauge.inc()

    def closed(self) -> None:
        self.open -= 1
        if self.gauge is not None:
            self.gauge.dec()


class Service:
    """The ASGI app. POST /predict, the hot path, is plain ASGI: the body is read, checked and parsed
    here (the same checks and messages as everywhere), its texts go to the batcher, and the answer's
    bytes are written straight back. Every other route goes through FastAPI.

    The server listens before the model is loaded: lifespan start-up only starts the loading (on the
    model's thread), so /health answers at once and /ready says "loading" (503) until the model is
    loaded and has run once. If loading fails, `on_failure` gets the error (the server stops).

    Shutting down (http.Server calls `begin_shutdown`, then `drain`): /ready answers 503 "shutting
    down", new /predict and /explain requests 503 with Retry-After, the admitted ones finish; those
    still unanswered when the grace period ends get a 503 too."""

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
        self.connections = Connections(opts.read_timeout_s, self.metrics.worker_connections)
        self.batcher: Batcher | None = None
        self.info: dict[str, Any] | None = None
        self.failure: BaseException | None = None
        self.in_flight = 0  # /predict and /explain requests admitted and not yet answered
        self.waiting: set[asyncio.Future[Any]] = set()  # their results, to cut off after the grace period
        self.cut_off: str | None = None  # once set, the answer to every request still waiting
        self.api = self.fastapi()
        self.counted = {
            status: self.metrics.requests.labels("/predict", str(status))
            for status in (200, 400, 408, 413, 422, 500, 503)
        }
        self.timed = self.metrics.latency.labels("/predict")

    def load_target(self) -> Predictor:
        from seqtrain import console

        # looked up now: tests replace it
        run, warnings = load_target(self.target, self.opts.checkpoint, self.opts.model_threads)
        for w in warnings:
            console.warn(w)
        return run

    @property
    def busy(self) -> bool:
        """The model's threads are still computing."""
        b = self.batcher
        return b is not None and (b.model_thread.busy or b.explain_thread.busy)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/predict" and scope["method"] == "POST":
            await self.predict(scope, receive, send)
            return
        if scope["type"] == "lifespan" and "state" in scope:
            scope["state"][CONNECTIONS] = self.connections  # for the connections' protocol objects
        await self.api(scope, receive, send)

    async def watch(self, future: asyncio.Future[T]) -> T:
        """The future's result, unless the grace period ends first (then 503)."""
        if self.cut_off is not None:
            future.cancel()
            raise ApiError(503, self.cut_off, {"Connection": "close"})
        self.waiting.add(future)
        try:
            return await future
        finally:
            self.waiting.discard(future)

    def admitted(self) -> bool:
        """Count a request in flight unless the server is shutting down (it is then answered 503)."""
        if self.batcher is not None and self.batcher.closing:
            return False
        self.in_flight += 1
        return True

    async def predict(self, scope: Scope, receive: Receive, send: Send) -> None:
        start, status, answered = time.perf_counter(), 500, False
        body: bytes | None = b""
        counted = self.admitted()
        try:
            if self.batcher is None:
                raise ApiError(503, "the server is starting.", {"Retry-After": "1"})
            self.batcher.check_open(counted)
            body = await read_body(scope, receive, self.opts.max_bytes, self.opts.read_timeout_s)
            if body is None:
                return  # the client went away: nobody to answer
            texts, top_k, single = parse_request(body, self.opts.max_texts)
            lines = await self.watch(self.batcher.submit(texts, top_k, counted))
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
            if counted:
                self.in_flight -= 1
            if body is not None:
                counter = self.counted.get(status) or self.metrics.requests.labels("/predict", str(status))
                counter.inc()
                self.timed.observe(time.perf_counter() - start)

    async def explain(self, request: Request) -> Response:
        counted = self.admitted()
        try:
            if self.batcher is None:
                raise ApiError(503, "the server is starting.", {"Retry-After": "1"})
            self.batcher.check_open(counted)
            opts = self.opts
            body = await read_body(request.scope, request.receive, opts.max_bytes, opts.read_timeout_s)
            texts, top_k, single = parse_request(body or b"", opts.explain_max_texts, "--explain-max-texts")
            if top_k is not None:
                raise ApiError(422, "'top_k' is for /predict; /explain explains the predicted class.")
            lines = await self.watch(self.batcher.explain(texts, counted))
            return Response(json_lines(lines, single, "explanations"), media_type="application/json")
        finally:
            if counted:
                self.in_flight -= 1

    async def start(self, batcher: Batcher) -> None:
        from seqtrain import console

        try:
            await batcher.start(self.load)
            self.info = describe(batcher.model, self.target, self.opts, batcher.cost)
            batcher.ready = True  # /ready, /predict, /explain: from now on
            self.metrics.ready.set(1)
        except Exception as e:
            self.failure = e
            if self.on_failure:
                self.on_failure(e)
            return
        console.info(f"ready: {self.target} loaded ({self.info['backend']}, {self.info['checkpoint']})")

    def begin_shutdown(self) -> None:
        """/ready answers 503 "shutting down", and new /predict and /explain requests 503."""
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.closing = True
            self.batcher.wake.set()

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for the requests in flight; answer those still waiting 503. How many."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        if not self.in_flight:
            return 0
        self.cut_off = (
            f"the server is shutting down and this request did not finish within --grace-s ({grace_s:g} s)."
        )
        left = len(self.waiting)
        for future in list(self.waiting):
            if not future.done():
                future.set_exception(ApiError(503, self.cut_off, {"Connection": "close"}))
        await asyncio.sleep(0.05)  # their handlers write the answers
        return left

    def fastapi(self) -> ASGIApp:
        """The routes other than POST /predict."""
        service, opts, metrics = self, self.opts, self.metrics

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            # created inside the server's event loop
            batcher = Batcher(opts, metrics, lambda: service.connections.open)
            service.batcher = batcher
            loading = asyncio.create_task(service.start(batcher))
            task = asyncio.create_task(batcher.loop())
            yield
            if not loading.done():  # stopped while loading: the load itself finishes on its thread
                loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await loading
            await batcher.close(task, 1.0 if service.cut_off else float(opts.grace_s))

        app = FastAPI(
            title="seqtrain",
            version=__version__,
            lifespan=lifespan,
            docs_url="/docs" if opts.docs else None,  # FastAPI's page loads its scripts from a CDN
            redoc_url=None,
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
            return await service.explain(request)

        @app.get("/health")
        async def health() -> dict[str, Any]:
            """Liveness, and the step of the checkpoint this worker serves (null while it loads)."""
            return {"status": "ok", "step": service.info["step"] if service.info else None}

        @app.get("/ready")
        async def ready() -> JSONResponse:
            """{"status": "ready"} (200), or 503 with "loading", "shutting down" or "failed"."""
            batcher = service.batcher
            if batcher is not None and batcher.ready and not batcher.closing:
                return JSONResponse({"status": "ready"})
            if batcher is not None and batcher.closing:
                return JSONResponse(
                    {"status": "shutting down"}, 503, {"Retry-After": "1", "Connection": "close"}
                )
            state = "failed" if service.failure else "loading"
            return JSONResponse({"status": state}, 503, {"Retry-After": "1"})

        @app.get("/info")
        async def info() -> dict[str, Any]:
            if service.info is None:
                raise ApiError(503, "the model is still loading; retry shortly.", {"Retry-After": "1"})
            return service.info

        @app.get("/metrics")
        async def metrics_() -> Response:
            return Response(metrics.exposition(), media_type=CONTENT_TYPE)

        @app.get("/", response_class=HTMLResponse)
        async def page() -> HTMLResponse:
            return HTMLResponse(PAGE)

        return app


@dataclass
class AppFactory:
    """What a worker process is given (picklable): it builds the worker's Service there."""

    target: Path
    opts: ServeOptions
    on_failure: Callable[[BaseException], None] | None = None  # set in the worker (http.Server)
    service: Service | None = None

    def __call__(self) -> Service:
        self.service = Service(self.target, self.opts, on_failure=self.on_failure)
        return self.service
