"""What `seqtrain serve` takes besides TARGET: its --options, under the same names."""

from __future__ import annotations

from dataclasses import dataclass

from seqtrain.errors import ConfigError
from seqtrain.machine import physical_cores


@dataclass(kw_only=True)
class ServeOptions:
    """The server's settings. Batch, queue and /explain limits hold per worker process."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (the one chosen is printed)
    max_batch_size: int = 64  # texts in one forward pass (cut further by length where that is cheaper)
    # how long a free worker waits for more texts to fill its batch, counted from when it became free
    # (or from the first text's arrival, if later); the wait ends early once every open connection of
    # that worker has its request waiting, or the batch is full
    max_wait_ms: float = 1.0
    max_queue: int = 1024  # texts waiting for the model; a request that would overflow it gets 503
    max_texts: int = 256  # texts in one request; more: 413
    max_bytes: int = 1_000_000  # bytes in one request body; more: 413
    checkpoint: str = "best"  # of a run directory: best or last
    grace_s: int = 30  # after SIGTERM, how long the requests in flight get to finish
    log_level: str = "info"
    threads: int | None = None  # each worker's model threads; None: see model_threads
    workers: int | None = None  # model processes on the one port; None: the physical cores
    # a client must send a request's headers, and then its body, within this many seconds
    read_timeout_s: float = 10.0
    explain_max_texts: int = 16  # texts in one /explain request; more: 413
    explain_max_tokens: int = 2048  # tokens (as the model reads them) in one /explain request; more: 413
    explain_queue: int = 4  # /explain requests waiting or running in a worker; more: 503
    docs: bool = False  # FastAPI's /docs page (it loads its scripts from a CDN)

    @property
    def worker_count(self) -> int:
        return self.workers or physical_cores()

    @property
    def model_threads(self) -> int:
        """--threads, or the physical cores less one (left to HTTP) shared by the workers: one
        thread each when there is a worker per core."""
        return self.threads or max(1, (physical_cores() - 1) // self.worker_count)

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
            (
                self.workers is not None and not 1 <= self.workers <= 256,
                f"--workers must be in [1, 256], got {self.workers}.",
            ),
            (
                not 0.05 <= self.read_timeout_s <= 3600,
                f"--read-timeout-s must be in [0.05, 3600], got {self.read_timeout_s}.",
            ),
            (
                self.explain_max_texts < 1,
                f"--explain-max-texts must be at least 1, got {self.explain_max_texts}.",
            ),
            (
                self.explain_max_tokens < 1,
                f"--explain-max-tokens must be at least 1, got {self.explain_max_tokens}.",
            ),
            (self.explain_queue < 1, f"--explain-queue must be at least 1, got {self.explain_queue}."),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)
