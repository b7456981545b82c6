"""`seqtrain serve TARGET`: a long-lived HTTP server that loads the model once and batches requests.

    POST /predict   {"texts": [...]} -> {"predictions": [...]}; {"text": "..."} -> one prediction;
                    optional "top_k". Each prediction is exactly the line `seqtrain predict` writes.
    POST /explain   the same bodies (no top_k) -> what `seqtrain explain --format jsonl` writes (occlusion):
                    the prediction and each token with its character offsets and score
    GET  /health    liveness, and the step of the checkpoint served (null while loading)
    GET  /ready     {"status": "ready"} once the model is loaded and warmed up; 503 {"status": "loading"}
                    before (the server listens first and loads in the background), "shutting down" after
                    SIGTERM
    GET  /info      labels, task, checkpoint and step, max_length, limits, workers, pid and versions
    GET  /metrics   Prometheus text, summed over the workers: requests by endpoint and status, latency,
                    texts per forward pass, texts waiting
    GET  /          a page to try the model: the label, a bar per class, the words that drove it

--workers processes (default: one per physical core, each model on one thread) listen on the one port
(on Linux each on its own socket, the kernel spreading the connections; http.py); each batches its
own requests (batcher.py). Overload and bad input answer with a
JSON error ({"error": message, "status": code}) and touch no other request (requests.py): a full
queue is 503 with Retry-After (so memory stays flat under a flood), too many texts, tokens or bytes
is 413, a body that is not UTF-8 is 400, a body that is not JSON or has the wrong shape is 422, a
client too slow to send its request is 408.

TARGET is a run directory (torch) or an ONNX export folder (onnxruntime; torch is never imported).
It is checked before the workers start; each worker loads it while the server already answers
(/health, /ready, /metrics); a TARGET that fails to load stops the server, and `serve` raises its
error.

    options.py   ServeOptions: the command's options
    target.py    checking and describing TARGET (inference/target.py loads it)
    requests.py  reading and checking request bodies, writing answers
    batcher.py   micro-batching and /explain in one worker
    metrics.py   Prometheus series, one worker's or all workers' summed
    app.py       the ASGI app of one worker (page.html at /)
    http.py      uvicorn: read timeouts, the shutdown, several workers, the command itself
"""

from __future__ import annotations

from seqtrain.inference.target import load_target
from seqtrain.serve.batcher import Batcher, predict_texts
from seqtrain.serve.http import Server, listen, make_server, serve
from seqtrain.serve.options import ServeOptions
from seqtrain.serve.requests import ApiError, parse_request
from seqtrain.serve.target import check_target, describe, measure_cost

__all__ = [
    "ApiError",
    "Batcher",
    "ServeOptions",
    "Server",
    "check_target",
    "describe",
    "listen",
    "load_target",
    "make_server",
    "measure_cost",
    "parse_request",
    "predict_texts",
    "serve",
]
