"""The HTTP server around the app: uvicorn, one process or several on the one port.

With --workers N > 1, uvicorn's multiprocess supervisor (uvicorn.supervisors.Multiprocess) starts N
worker processes, checks they answer, and replaces one that dies; each worker loads the model on its
own --threads. On Linux each worker listens on a socket of its own, all on the same port with
SO_REUSEPORT, and the kernel spreads the connections over them (one_socket_each); elsewhere they
share one socket. /metrics sums every worker's series
(metrics.py); /ready, /info and /health describe the worker that answers.

Slow clients: a connection must deliver a request's headers within --read-timeout-s of its first
byte (of connecting, for the first request), or it is answered 408 and closed; the body gets as long
again (requests.read_body); an idle keep-alive connection is closed after uvicorn's keep-alive
timeout.

SIGTERM or Ctrl-C: /ready answers 503 "shutting down" and new /predict and /explain requests get
503 with Retry-After (the socket stays open meanwhile), the requests in flight finish, for up to
--grace-s; those still unanswered then get a 503, the worker closes its connections and exits. With
several workers, one that has finished its requests goes on answering 503 until every worker has (or
--grace-s is over): a worker that closed its socket early would strand the connections the kernel had
already queued on it, and they would be reset instead of answered. The command exits 0 within
--grace-s + 2 s, even when a forward pass is still running (the model's threads do not hold the
exit). A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.supervisors.multiprocess import Multiprocess, Process

from seqtrain.errors import CheckpointError, SeqtrainError
from seqtrain.inference.io import Predictor
from seqtrain.serve.app import CONNECTIONS, AppFactory, Connections, Service
from seqtrain.serve.metrics import MULTIPROC_ENV
from seqtrain.serve.options import ServeOptions
from seqtrain.serve.requests import error_body
from seqtrain.serve.target import check_target

logger = logging.getLogger("uvicorn.error")
SHUTDOWN_S = 1.0  # after the grace period: uvicorn closes the connections, the lifespan ends
FAILURE_FILE = "failure-{pid}.txt"  # in the metrics folder: why a worker could not load TARGET


# --------------------------------------------------------------------------- slow clients


class ReadTimeout:
    """For uvicorn's HTTP protocol classes: the read timeout for a request's headers, and the count
    of this worker's open connections (app.Connections, found in the lifespan state)."""

    cycle: Any
    transport: Any
    loop: asyncio.AbstractEventLoop
    app_state: dict[str, Any]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self.read_timer: asyncio.TimerHandle | None = None
        self.timed_cycle: Any = None
        self.bytes_seen = False
        self.counter: Connections | None = self.app_state.get(CONNECTIONS)
        if self.counter is not None:
            self.counter.opened()
        self.arm()

    def data_received(self, data: bytes) -> None:
        if self.read_timer is None and self.between_requests():
            self.arm()
        self.bytes_seen = True
        super().data_received(data)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None
        if self.counter is not None:
            self.counter.closed()
            self.counter = None
        super().connection_lost(exc)  # type: ignore[misc]

    def between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def arm(self) -> None:
        timeout = self.counter.read_timeout_s if self.counter is not None else None
        if timeout is None:
            return
        self.timed_cycle, self.bytes_seen = self.cycle, False
        self.read_timer = self.loop.call_later(timeout, self.read_timed_out, timeout)

    def read_timed_out(self, timeout: float) -> None:
        self.read_timer = None
        if self.transport.is_closing() or self.cycle is not self.timed_cycle or not self.between_requests():
            return  # a request's headers arrived in time
        if self.bytes_seen:
            body = error_body(
                408, f"the request's headers did not arrive within {timeout:g} s (--read-timeout-s)."
            )
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
        self.transport.close()


class GuardedH11(ReadTimeout, H11Protocol):
    """uvicorn's h11 protocol, with the read timeout."""


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpTools(ReadTimeout, HttpToolsProtocol):
        """uvicorn's httptools protocol (the fast parser), with the read timeout."""

    FASTEST: type[asyncio.Protocol] = GuardedHttpTools
except ImportError:  # pragma: no cover - the serve extra installs httptools
    FASTEST = GuardedH11

PROTOCOLS: dict[str, type[asyncio.Protocol]] = {"h11": GuardedH11, "httptools": FASTEST, "auto": FASTEST}


# --------------------------------------------------------------------------- one worker


class Server(uvicorn.Server):
    """uvicorn's server, with the shutdown described above: a first SIGTERM or SIGINT drains before
    uvicorn closes the socket, and is not raised again afterwards (uvicorn >= 0.29 re-raises it, so
    the process would die by the signal); a model that fails to load stops it (`failure`)."""

    failure: BaseException | None = None

    def __init__(
        self,
        config: uvicorn.Config,
        service: Service | None = None,
        drained: Drained | None = None,
        slot: int = 0,
    ) -> None:
        super().__init__(config)
        self.service = service
        self.drained = drained  # with several workers: which of them are done (this one is `slot`)
        self.slot = slot
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining: asyncio.Task[None] | None = None
        if isinstance(config.app, AppFactory):
            config.app.on_failure = self.fail

    def fail(self, error: BaseException) -> None:
        self.failure = error
        self.should_exit = True

    @property
    def app(self) -> Service | None:
        if self.service is None and isinstance(self.config.app, AppFactory):
            return self.config.app.service
        return self.service

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.draining is not None or self.loop is None or self.app is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self.loop.call_soon_threadsafe(self.start_draining)

    def start_draining(self) -> None:
        if self.draining is None:
            self.draining = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        service = self.app
        assert service is not None
        service.begin_shutdown()
        grace_s = float(service.opts.grace_s)
        deadline = asyncio.get_running_loop().time() + grace_s
        cut = await service.drain(grace_s)
        if cut:
            logger.warning(f"{cut} request(s) did not finish within --grace-s; they were answered 503")
        if self.drained is not None:  # the others may still be busy: keep answering 503 until they are done
            self.drained.done(self.slot)
            while not self.drained.everyone() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
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

    def exit_now_if_busy(self) -> None:
        """After the shutdown: a forward pass still running on a daemon thread must not hold the
        process (the interpreter's exit would wait on or crash under it): exit at once."""
        service = self.app
        if service is not None and service.busy and threading.current_thread() is threading.main_thread():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


def listen(host: str, port: int, *, reuse_port: bool = False, backlog: int | None = None) -> socket.socket:
    """Bind before loading anything else, so a busy port is a one-line error; `reuse_port`: one of the
    workers' sockets on the same port (one_socket_each); `backlog`: listening already, with that many
    connections waiting to be accepted."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, and without it a
    # keep-alive response (headers and body: two writes) waits for the client's delayed ACK, 40 ms each time
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        if backlog is not None:
            sock.listen(backlog)
    except OSError as e:
        sock.close()
        raise CheckpointError(f"cannot listen on {host}:{port}: {e.strerror} (--host, --port).") from None
    sock.set_inheritable(True)
    return sock


BACKLOG = 2048  # connections waiting to be accepted, per listening socket


def one_socket_each(sock: socket.socket, count: int) -> list[socket.socket]:
    """`count` listening sockets on the address `sock` is bound to, one per worker, each with
    SO_REUSEPORT: the kernel spreads new connections over them (by a hash of the client's address and
    port). On one shared socket, whichever worker wakes first accepts every connection waiting, so at a
    few keep-alive clients one worker took nearly all of them and the other idled. `sock` (bound
    without SO_REUSEPORT, so that a port in use, by a server with SO_REUSEPORT too, was refused) is
    closed and its port taken at once. They listen here: a connection that reaches a worker still
    starting, or one being replaced, waits for it. Not on Linux (where SO_REUSEPORT does not spread
    connections, or is missing): [sock], shared."""
    if count < 2 or not sys.platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT"):
        return [sock]
    host, port = sock.getsockname()[:2]
    sock.close()
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sockets.append(listen(host, port, reuse_port=True, backlog=BACKLOG))
    except CheckpointError:
        for each in sockets:
            each.close()
        raise
    return sockets


def fastest(module: str, name: str) -> str:
    """uvicorn's `loop` setting: the C implementation when it is installed, else uvicorn's own."""
    try:
        __import__(module)
    except ImportError:
        return "auto"
    return name


def server_config(app: Any, opts: ServeOptions, overrides: dict[str, Any] | None = None) -> uvicorn.Config:
    """uvloop and httptools when installed (the serve extra has them), with the read timeout; no
    access log; a backlog of BACKLOG connections."""
    settings: dict[str, Any] = {
        "loop": fastest("uvloop", "uvloop"),
        "http": "httptools",
        "backlog": BACKLOG,
        "proxy_headers": False,  # no X-Forwarded-* rewriting on every request: there is no access log
        **(overrides or {}),
    }
    if isinstance(settings["http"], str):
        settings["http"] = PROTOCOLS.get(settings["http"], FASTEST)
    return uvicorn.Config(
        app,
        log_level=opts.log_level,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(SHUTDOWN_S),
        h11_max_incomplete_event_size=64 * 1024,  # request line and headers (h11; httptools has its own)
        factory=isinstance(app, AppFactory),
        **settings,
    )


def make_server(
    target: Path,
    opts: ServeOptions,
    load: Callable[[], Predictor] | None = None,
    uvicorn_config: dict[str, Any] | None = None,
) -> Server:
    """One worker in this process: uvicorn on the app (server_config's settings, `uvicorn_config`'s
    over them)."""
    service = Service(target, opts, load)
    server = Server(server_config(service, opts, uvicorn_config), service)
    service.on_failure = server.fail
    return server


# --------------------------------------------------------------------------- several workers


class Drained:
    """Which workers are done after SIGTERM, one flag per worker slot in shared memory (passed to each
    worker process as it starts): a worker sets its own once its requests are finished, the supervisor
    sets the flag of a worker that has exited (one that died or stopped while loading has nothing left
    to answer, and the others must not wait the whole grace period for it)."""

    def __init__(self, workers: int) -> None:
        self.flags = multiprocessing.get_context("spawn").Array("b", workers)

    def done(self, slot: int) -> None:
        self.flags[slot] = 1

    def everyone(self) -> bool:
        return all(self.flags[:])


class WorkerProcess(Process):
    """A uvicorn worker process that runs this module's Server (the shutdown above) and reports a
    TARGET that fails to load: exit code STARTUP_FAILURE, the message in FAILURE_FILE."""

    drained: Drained | None = None  # set before start(), with its slot: the process takes them along
    slot = 0

    @property
    def server(self) -> Server:
        if self._server is None:
            self._server = Server(self.config, drained=self.drained, slot=self.slot)
        assert isinstance(self._server, Server)
        return self._server

    def target(self, sockets: list[socket.socket] | None = None) -> None:  # pragma: no cover - a child
        super().target(sockets)
        server = self.server
        if server.failure is not None:
            folder = os.environ.get(MULTIPROC_ENV)
            if folder:
                message = (
                    str(server.failure) if isinstance(server.failure, SeqtrainError) else repr(server.failure)
                )
                Path(folder, FAILURE_FILE.format(pid=os.getpid())).write_text(message)
            sys.stderr.flush()
            os._exit(STARTUP_FAILURE)
        server.exit_now_if_busy()


class Workers(Multiprocess):
    """uvicorn's supervisor, starting WorkerProcess, each on its own socket of `sockets` when there is
    one per worker (one_socket_each; a worker replaced takes over its socket), else all on the one;
    after SIGTERM it waits for the workers up to the grace period and a little more, then kills what
    is left."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket], grace_s: float) -> None:
        super().__init__(config, sockets)
        self.grace_s = grace_s
        self.drained = Drained(self.processes_num)

    def start_one(self, slot: int) -> WorkerProcess:
        own = len(self.sockets) == self.processes_num
        process = WorkerProcess(self.config, [self.sockets[slot]] if own else self.sockets)
        process.drained, process.slot = self.drained, slot
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self.start_one(slot) for slot in range(self.processes_num)]

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for idx, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: kill it
            process.join()
            mark_dead(process.pid)
            if process.exitcode == STARTUP_FAILURE:
                logger.error(f"worker {process.pid} could not load the model; stopping")
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            logger.warning(f"worker {process.pid} died (exit code {process.exitcode}); starting another")
            self.processes[idx] = self.start_one(idx)

    def handle_hup(self) -> None:
        logger.warning("SIGHUP ignored: restart `seqtrain serve` to load a new checkpoint")

    def handle_ttin(self) -> None:
        logger.warning("SIGTTIN ignored: the number of workers is --workers")

    def handle_ttou(self) -> None:
        logger.warning("SIGTTOU ignored: the number of workers is --workers")

    def join_all(self) -> None:
        deadline = time.monotonic() + self.grace_s + SHUTDOWN_S + 0.5
        while time.monotonic() < deadline and any(p.process.is_alive() for p in self.processes):
            for slot, process in enumerate(self.processes):
                if not process.process.is_alive():
                    self.drained.done(slot)  # gone: the others need not wait for it
            time.sleep(0.05)
        for process in self.processes:
            if process.process.is_alive():
                logger.error(f"worker {process.pid} did not stop within --grace-s; killing it")
                process.kill()
                process.process.join()

    def failures(self, folder: Path) -> list[str]:
        """What the workers that could not load the model said."""
        return [p.read_text() for p in sorted(folder.glob(FAILURE_FILE.format(pid="*")))]


def mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges from /metrics."""
    if pid is not None and os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid)


# --------------------------------------------------------------------------- the command


def serve(target: Path, opts: ServeOptions) -> None:
    """Check TARGET, listen, start the workers, which load TARGET in the background (/ready: 503
    "loading", then 200); serve until SIGTERM or Ctrl-C, finish the requests in flight, return. A
    model that fails to load stops it with its error."""
    from seqtrain import console

    opts.check()
    warnings = check_target(target, opts.checkpoint)
    sock = listen(opts.host, opts.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    workers = opts.worker_count
    console.info(
        f"listening on {url}: {target} (POST /predict, a page at /), {workers} worker"
        f"{'s' if workers > 1 else ''} x {opts.model_threads} thread{'s' if opts.model_threads > 1 else ''};"
        " SIGTERM or Ctrl-C stops"
    )
    for w in warnings:
        console.warn(w)
    if workers == 1:
        server = make_server(target, opts)
        server.run(sockets=[sock])
        if server.failure is not None:
            raise server.failure
        console.info("stopped")
        server.exit_now_if_busy()
        return
    with tempfile.TemporaryDirectory(prefix="seqtrain-serve-") as folder:
        sockets = one_socket_each(sock, workers)
        previous = os.environ.get(MULTIPROC_ENV)
        os.environ[MULTIPROC_ENV] = folder  # read by the workers' prometheus_client
        try:
            config = server_config(AppFactory(target, opts), opts)
            config.workers = workers
            supervisor = Workers(config, sockets, opts.grace_s)
            supervisor.run()
        finally:
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous
            for each in sockets:
                each.close()
        failed = supervisor.failures(Path(folder))
    if failed:
        raise CheckpointError(failed[0])
    if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
        raise CheckpointError("a worker could not start (see the messages above).")
    console.info("stopped")
