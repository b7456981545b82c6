"""`seqtrain serve`: real HTTP against a real server on a free 127.0.0.1 port, over a tiny run trained on
real SST-2 rows. The server runs in a thread of this process (uvicorn, the app `serve` builds), or, for
SIGTERM, as `python -m seqtrain serve` in a subprocess. Every request loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from seqtrain.cli import app
from tests.conftest import REAL_DATA, tiny_config, write_yaml

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
import httpx

from seqtrain.encoding import BatchCost
from seqtrain.machine import physical_cores
from seqtrain.serve import ServeOptions, listen, load_target, make_server, measure_cost

runner = CliRunner()
SST2 = REAL_DATA / "sst2"
pytestmark = pytest.mark.skipif(not SST2.is_dir(), reason="needs ../shared/data/sst2 or data/sst2")
LIMITS: dict[str, Any] = {
    "max_texts": 64,
    "max_bytes": 20_000,
    "max_batch_size": 32,
    "max_wait_ms": 20.0,
    "explain_max_tokens": 512,
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bidirectional GRU trained for 60 steps on 2,000 SST-2 rows (a few seconds), through the CLI."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_config(
        SST2,
        tmp / "run",
        data={
            "text_column": "sentence",
            "label_names": ["negative", "positive"],
            "max_train_examples": 2000,
            "max_eval_examples": 200,
        },
        tokenizer={"vocab_size": 3000},
        model={"bidirectional": True, "pooling": "max"},
        train={"max_steps": 60, "eval_every": 0},
    )
    write_yaml(tmp / "tiny.yaml", cfg)
    result = runner.invoke(app, ["train", str(tmp / "tiny.yaml")])
    assert result.exit_code == 0, result.output
    return tmp / "run"


def sst2_texts(n: int, start: int = 0) -> list[str]:
    rows = pq.read_table(SST2 / "validation-00000-of-00001.parquet").column("sentence").to_pylist()
    return rows[start : start + n]


def edge_texts() -> list[str]:
    """Texts of every kind: empty, one (unknown) token, non-ASCII, newlines, past max_length (64)."""
    return [
        "",
        "great",
        "zxqv unheard-of wordz",
        "café – naïve 😀 film",
        "first line\nsecond line",
        " ".join(["a gorgeous , witty film"] * 30),
    ]


def predict_cli(target: Path, texts: list[str], *extra: str) -> list[dict[str, Any]]:
    result = runner.invoke(app, ["predict", str(target), *texts, *extra])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


@contextmanager
def serving(
    target: Path,
    uvicorn_config: dict[str, str] | None = None,
    *,
    load: Callable[[], Any] | None = None,
    **options: Any,
) -> Iterator[str]:
    """The server `seqtrain serve` runs, in a thread of this process, on a free port; yields its URL
    once it listens and /ready says the model is loaded (at once, when `load` replaces the loading)."""
    opts = ServeOptions(port=0, log_level="warning", **options)
    opts.check()
    sock = listen(opts.host, 0)
    server = make_server(target, opts, load=load, uvicorn_config=uvicorn_config)
    ready = load is None
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    u = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 30
    while not server.started or (ready and httpx.get(u + "/ready", timeout=10).status_code != 200):
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield u
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def url(run_dir: Path) -> Iterator[str]:
    with serving(run_dir, **LIMITS) as u:
        yield u


def post(url: str, body: Any, path: str = "/predict") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, timeout=30)


async def post_all(url: str, bodies: list[Any]) -> list[httpx.Response]:
    """All the requests at once, each on its own connection."""
    limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        return await asyncio.gather(*(client.post("/predict", json=body) for body in bodies))


def metric(url: str, name: str) -> float:
    """One sample of /metrics, e.g. 'seqtrain_requests_total{endpoint="/predict",status="413"}'
    (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    found = re.search("^" + re.escape(name) + r" (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# --------------------------------------------------------------------------- the answers


def test_predict_answers_exactly_what_seqtrain_predict_writes(run_dir: Path, url: str) -> None:
    texts = sst2_texts(50) + edge_texts()
    # the same texts in the same length-sorted batches (max_batch_size 32 = --batch-size 32): bit for bit
    expected = predict_cli(run_dir, texts, "--batch-size", "32")
    got = post(url, {"texts": texts})
    assert got.status_code == 200 and got.headers["content-type"] == "application/json"
    assert got.json() == {"predictions": expected}
    with_top = predict_cli(run_dir, texts[:5], "--top-k", "1", "--batch-size", "32")
    assert post(url, {"texts": texts[:5], "top_k": 1}).json()["predictions"] == with_top
    # {"text": ...} answers the line itself, byte for byte
    cli = runner.invoke(app, ["predict", str(run_dir), texts[0]])
    assert post(url, {"text": texts[0]}).text == cli.stdout.strip()


def test_explain_answers_what_seqtrain_explain_writes(run_dir: Path, url: str) -> None:
    texts = [*sst2_texts(3), "café – naïve 😀 film", "great"]
    result = runner.invoke(app, ["explain", str(run_dir), *texts, "--format", "jsonl"])
    assert result.exit_code == 0, result.output
    expected = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(expected) == len(texts) and all(e["tokens"] for e in expected)
    assert post(url, {"texts": texts}, path="/explain").json() == {"explanations": expected}
    assert post(url, {"text": texts[3]}, path="/explain").json() == expected[3]
    refused = post(url, {"text": "great", "top_k": 1}, path="/explain")
    assert refused.status_code == 422 and "/predict" in refused.json()["error"]


def test_concurrent_requests_are_batched_together_and_each_gets_its_own_results(
    run_dir: Path, url: str
) -> None:
    pool = sst2_texts(120, start=100)
    # 24 requests of 1 to 9 texts of different lengths, all at once
    bodies = [{"texts": pool[5 * i : 5 * i + 1 + i % 9]} for i in range(24)]
    expected = {r["text"]: r for r in predict_cli(run_dir, [t for b in bodies for t in b["texts"]])}
    forward_passes = metric(url, "seqtrain_batch_texts_count")
    responses = asyncio.run(post_all(url, bodies))
    assert [r.status_code for r in responses] == [200] * 24
    for body, response in zip(bodies, responses, strict=True):
        got = response.json()["predictions"]
        assert [g["text"] for g in got] == body["texts"]  # its own texts, in its order
        for g in got:
            # batched with other requests' texts, a row can differ in the last float bits (~3e-8), never more
            assert g["probs"] == pytest.approx(expected[g["text"]]["probs"], abs=2e-6)
            if abs(g["probs"]["positive"] - 0.5) > 1e-5:
                assert g["label"] == expected[g["text"]]["label"]
    passes = metric(url, "seqtrain_batch_texts_count") - forward_passes
    assert 1 <= passes < 24, f"{passes} forward passes for 24 concurrent requests: nothing was batched"


BAD = [  # (body, status, words in the message)
    (b'{"texts": ["unclosed"', 422, "not JSON"),
    (b'["a list"]', 422, "is an array, not an object"),
    (b'{"texts": "a string"}', 422, "non-empty list"),
    (b'{"texts": []}', 422, "non-empty list"),
    (b'{"texts": ["fine", 3]}', 422, "texts[1] is a number, not a string"),
    (b'{"text": null}', 422, "'text' is null, not a string"),
    (b'{"text": "a", "texts": ["b"]}', 422, "exactly one"),
    (b'{"txt": "typo"}', 422, "unknown key(s) 'txt'"),
    (b'{"text": "a", "top_k": 0}', 422, "'top_k' must be a positive integer"),
    (b'{"text": "a", "top_k": true}', 422, "'top_k'"),
    (b'{"text": "a", "top_k": "2"}', 422, "'top_k'"),
    (b'{"text": "caf\xe9"}', 400, "not valid UTF-8"),
    (b'{"text": "\\ud800 lone surrogate"}', 400, "lone surrogate"),
    (json.dumps({"texts": ["x"] * 65}).encode(), 413, "65 texts"),
    (json.dumps({"text": "x" * 20_001}).encode(), 413, "limit is 20,000"),
    (b'{"text": "a", "top_k": ' + b"[" * 9_000 + b"]" * 9_000 + b"}", 422, "nested too deeply"),
    (b"[" * 19_000, 422, "nested too deeply"),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD, ids=[f"{s}-{w}" for _, s, w in BAD])
def test_bad_input_gets_a_json_error_and_leaves_the_server_working(
    url: str, body: bytes, status: int, words: str
) -> None:
    before = metric(url, f'seqtrain_requests_total{{endpoint="/predict",status="{status}"}}')
    got = post(url, body)
    assert got.status_code == status
    assert got.json()["status"] == status and words in got.json()["error"], got.json()
    assert metric(url, f'seqtrain_requests_total{{endpoint="/predict",status="{status}"}}') == before + 1
    assert post(url, {"text": "still fine"}).status_code == 200


def test_a_chunked_body_past_the_limit_is_cut_off(url: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the server counts what arrives
        yield b'{"text": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    got = httpx.post(url + "/predict", content=chunks(), timeout=30)
    assert got.status_code == 413 and "more than 20,000 bytes" in got.json()["error"]


def test_other_paths_and_methods_answer_json_too(url: str) -> None:
    assert httpx.get(url + "/nowhere").json() == {"error": "Not Found", "status": 404}
    # FastAPI's /docs page loads its scripts from a CDN: off unless --docs
    assert httpx.get(url + "/docs").status_code == 404
    got = httpx.get(url + "/predict")
    assert got.status_code == 405 and got.json()["status"] == 405


def test_a_full_queue_answers_503_with_retry_after(run_dir: Path) -> None:
    # room for 4 texts; the batcher holds them for 1 s (max_wait_ms) hoping for more; 12 requests of 2 texts
    with serving(run_dir, max_queue=4, max_texts=4, max_wait_ms=1000.0, max_batch_size=64) as u:
        bodies = [{"texts": [f"request {i}", "the same second text"]} for i in range(12)]
        with ThreadPoolExecutor(1) as ex:
            flood = ex.submit(asyncio.run, post_all(u, bodies))
            deadline = time.monotonic() + 10
            while metric(u, 'seqtrain_requests_total{endpoint="/predict",status="503"}') < 10:
                assert time.monotonic() < deadline, "no 503s"
                time.sleep(0.02)
            assert metric(u, "seqtrain_queue_texts") == 4  # the two accepted requests wait, nothing else
            responses = flood.result(timeout=30)
        codes = [r.status_code for r in responses]
        assert sorted(codes) == [200] * 2 + [503] * 10, codes
        for r in responses:
            if r.status_code == 503:
                assert r.headers["retry-after"] == "1" and "queue is full" in r.json()["error"]
            else:
                assert [p["text"] for p in r.json()["predictions"]] == json.loads(r.request.content)["texts"]
        assert post(u, {"texts": ["after the flood", "it drains"]}).status_code == 200


def test_a_request_that_breaks_the_model_fails_alone(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from seqtrain.serve import batcher

    def fragile(run: Any, texts: list[str], batch_size: int, cost: Any = None) -> Any:
        if "BOOM" in texts:
            raise RuntimeError("the model broke")
        return predict_texts(run, texts, batch_size, cost)

    predict_texts = batcher.predict_texts
    monkeypatch.setattr(batcher, "predict_texts", fragile)
    with serving(run_dir, max_wait_ms=300.0) as u:  # the four requests share a batch, which fails
        bodies = [
            {"texts": ["good", "fine"]},
            {"texts": ["still good", "BOOM"]},
            {"text": "great"},
            {"texts": ["dull"]},
        ]
        responses = asyncio.run(post_all(u, bodies))
        assert metric(u, "seqtrain_batch_texts_count") == 1 + 4  # the shared batch, then each request alone
    assert [r.status_code for r in responses] == [200, 500, 200, 200]
    assert responses[1].json() == {"error": "the model failed on this request's texts.", "status": 500}
    assert [p["text"] for p in responses[0].json()["predictions"]] == ["good", "fine"]
    assert responses[2].json()["text"] == "great"


def test_mixed_lengths_are_cut_into_batches_by_the_measured_cost(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Texts that arrive together are padded to the longest; with its BatchCost the server cuts a
    micro-batch of many short texts and a few long ones into a batch of each, and every text keeps
    its own result. (The cost is fixed here; measure_cost has its own test.)"""
    from seqtrain import model
    from seqtrain.serve import batcher

    monkeypatch.setattr(batcher, "measure_cost", lambda run, batch_size: BatchCost(per_call=5, per_step=1))

    shapes: list[tuple[int, int]] = []
    model_forward = model.Classifier.forward

    def forward(self: Any, ids: Any, lengths: Any) -> Any:
        shapes.append(tuple(ids.shape))
        return model_forward(self, ids, lengths)

    short, long = ["good"] * 12, [" ".join(["a long and rather dull film"] * 10)] * 2
    expected = {r["text"]: r for r in predict_cli(run_dir, ["good", long[0]])}
    with serving(run_dir, max_wait_ms=500.0) as u:
        monkeypatch.setattr(model.Classifier, "forward", forward)
        got = post(u, {"texts": short[:6] + long + short[6:]}).json()["predictions"]
    assert [g["text"] for g in got] == short[:6] + long + short[6:]
    for g in got:
        assert g["probs"] == pytest.approx(expected[g["text"]]["probs"], abs=2e-6)
    # the 12 one-word texts in one batch, the 2 long ones in another: not one (14, 60) batch
    assert shapes == [(12, 1), (2, 60)], shapes


def test_measure_cost_recovers_the_cost_per_call_and_per_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in model that takes exactly per_call + T * (per_step + B) units on a batch, on a clock of
    its own (a busy-wait on the real one reads high whenever the test is preempted), the first timing of
    each kind a slow outlier that the best of the repeats must ignore."""
    from seqtrain.serve import target

    per_call, per_step = 500, 3
    clock = [0.0]
    seen: set[tuple[int, int]] = set()

    class Timed:
        def probs(self, seqs: list[list[int]], batch_size: int, cost: Any = None) -> Any:
            shape = (len(seqs), len(seqs[0]))
            clock[0] += per_call + shape[1] * (per_step + shape[0]) + (0 if shape in seen else 10_000)
            seen.add(shape)

    monkeypatch.setattr(target, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    cost = measure_cost(Timed(), 64)  # type: ignore[arg-type]
    assert cost is not None
    assert cost.per_call == pytest.approx(per_call, rel=0.01) and cost.per_step == pytest.approx(
        per_step, abs=0.05
    )
    assert measure_cost(Timed(), 1) is None  # batches of one text: nothing to cut


# --------------------------------------------------------------------------- the other endpoints


def test_health_ready_info_metrics_and_the_page(run_dir: Path, url: str) -> None:
    best = (run_dir / "best").resolve().name  # step-00000060
    assert httpx.get(url + "/health").json() == {"status": "ok", "step": int(best.split("-")[1])}
    assert httpx.get(url + "/ready").json() == {"status": "ready"}
    info = httpx.get(url + "/info").json()
    assert info["labels"] == ["negative", "positive"] and info["task"] == "classification"
    assert info["checkpoint"] == best and info["step"] == int(best.split("-")[1]) and info["max_length"] == 64
    assert info["ngram_max_length"] is None  # the n-gram path, when on, reads the same tokens
    assert info["backend"] == "torch" and {"seqtrain", "torch", "fastapi", "uvicorn"} <= set(info["versions"])
    assert info["limits"]["max_texts"] == 64
    assert info["threads"] == ServeOptions().model_threads and info["pid"] == os.getpid()
    assert info["workers"] == physical_cores() and info["limits"]["explain_max_tokens"] == 512
    # measured at start-up: a call costs more than one text's step, and so does each step of a batch
    assert info["batch_cost"]["per_call"] > 1 and info["batch_cost"]["per_step"] >= 0
    post(url, {"texts": ["one", "two", "three"]})
    metrics = httpx.get(url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for series in (
        'seqtrain_requests_total{endpoint="/predict",status="200"}',
        'seqtrain_request_seconds_bucket{endpoint="/predict",le="0.1"}',
        'seqtrain_batch_texts_bucket{le="4.0"}',
        "seqtrain_queue_texts",
        "seqtrain_ready_workers",
        "seqtrain_texts_total",
    ):
        assert metric(url, series) > 0 or series == "seqtrain_queue_texts", series
    page = httpx.get(url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (
        '<textarea id="text"' in page.text and 'post("predict"' in page.text and 'post("explain"' in page.text
    )


def test_ready_says_loading_until_the_model_is_loaded_while_health_answers(run_dir: Path) -> None:
    """The server listens first and loads the model on its worker thread; here the loading waits for
    the test's go-ahead, so "loading" is seen for certain."""
    go = threading.Event()

    def slow_load() -> Any:
        assert go.wait(30), "the test never let the model load"
        return load_target(run_dir)[0]

    with serving(run_dir, load=slow_load) as u:
        try:
            for _ in range(3):  # not a race: nothing loads until `go`
                assert httpx.get(u + "/health").json() == {"status": "ok", "step": None}
                loading = httpx.get(u + "/ready")
                assert loading.status_code == 503 and loading.json() == {"status": "loading"}
                assert loading.headers["retry-after"] == "1"
            early = post(u, {"text": "too early"})
            assert early.status_code == 503 and early.headers["retry-after"] == "1"
            assert early.json() == {"error": "the model is still loading; retry shortly.", "status": 503}
            info = httpx.get(u + "/info")
            assert info.status_code == 503 and "loading" in info.json()["error"]
        finally:
            go.set()
        deadline = time.monotonic() + 30
        while (ready := httpx.get(u + "/ready")).status_code != 200:
            assert ready.json() == {"status": "loading"} and time.monotonic() < deadline
            time.sleep(0.02)
        assert ready.json() == {"status": "ready"}
        assert post(u, {"text": "in time"}).json() == predict_cli(run_dir, ["in time"])[0]
        assert httpx.get(u + "/info").json()["labels"] == ["negative", "positive"]


SLOW_LOAD = """
import pathlib, sys, time
import seqtrain.serve.app
from seqtrain.cli import main

real, gate = seqtrain.serve.app.load_target, pathlib.Path(sys.argv.pop(1))

def load_target(*args, **kwargs):  # the model loads only once the test creates the gate file
    deadline = time.monotonic() + 60
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return real(*args, **kwargs)

seqtrain.serve.app.load_target = load_target
sys.argv = ["seqtrain", *sys.argv[1:]]
main()
"""


@pytest.mark.subprocess
def test_the_command_listens_before_the_model_loads(run_dir: Path, tmp_path: Path) -> None:
    """`seqtrain serve` itself (a subprocess; its loading held back by a test-only wrapper, as
    tests/fault_entry.py does for training): /ready is 503 "loading", then 200; SIGTERM exits 0."""
    gate = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    command = [sys.executable, "-c", SLOW_LOAD, str(gate), "serve", str(run_dir), "--port", "0"]
    command += ["--workers", "1"]  # the wrapper replaces the loading in this process only
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert found, line
        u = f"http://127.0.0.1:{found.group(1)}"
        deadline = time.monotonic() + 30
        while True:  # the port is bound before uvicorn starts: wait for its first answer
            try:
                loading = httpx.get(u + "/ready", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, "the server never answered"
                time.sleep(0.05)
        assert loading.status_code == 503 and loading.json() == {"status": "loading"}
        assert httpx.get(u + "/health").status_code == 200
        gate.touch()
        while (ready := httpx.get(u + "/ready", timeout=5)).status_code != 200:
            assert ready.json() == {"status": "loading"} and time.monotonic() < deadline + 30
            time.sleep(0.05)
        assert post(u, {"text": "loaded"}).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
        assert "ready:" in rest and "stopped" in rest, rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_keep_alive_answers_do_not_wait_for_a_delayed_ack(run_dir: Path) -> None:
    """On asyncio's own loop and h11 (what runs without uvloop and httptools, e.g. on Windows), a socket
    without TCP_NODELAY holds each answer's body until the client's delayed ACK of its headers: 40 ms."""
    with serving(run_dir, {"loop": "asyncio", "http": "h11"}) as u, httpx.Client(base_url=u) as keep_alive:
        times = []
        for _ in range(9):
            start = time.perf_counter()
            keep_alive.get("/health")
            times.append(time.perf_counter() - start)
    assert min(times[1:]) < 0.035, times  # the first on a connection is acknowledged at once


@pytest.mark.browser
def test_the_page_shows_the_prediction_in_a_real_browser(run_dir: Path, url: str, tmp_path: Path) -> None:
    """Headless Chromium (Debian's chromium and chromium-driver: `make browser-deps`) driven by selenium."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("needs Debian's chromium and chromium-driver: make browser-deps")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=900,700",
    ):
        options.add_argument(arg)
    browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
    try:
        browser.get(url + "/")
        WebDriverWait(browser, 20).until(lambda b: "classification" in b.find_element(By.ID, "model").text)
        # offsets count code points; JavaScript strings count UTF-16 units
        text = "a gorgeous, witty film 😀 café"
        browser.execute_script(
            "document.getElementById('text').value = arguments[0]", text
        )  # chromedriver types BMP only
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "label").text)
        expected = predict_cli(run_dir, [text])[0]
        assert browser.find_element(By.ID, "label").text == expected["label"]
        rows = [r.text.split("\n") for r in browser.find_elements(By.CSS_SELECTOR, "#bars .row")]
        assert rows == [[name, f"{p:.3f}"] for name, p in expected["probs"].items()]
        # the words that drove it, highlighted: each token's span holds that token's text
        WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#words span"))
        tokens = post(url, {"text": text}, path="/explain").json()["tokens"]
        spans = browser.find_elements(By.CSS_SELECTOR, "#words span")
        assert [s.text for s in spans] == [t["text"] for t in tokens] and len(tokens) >= 5
        assert browser.find_element(By.ID, "words").text == text
        browser.save_screenshot(str(tmp_path / "page.png"))
        browser.execute_script(
            'document.getElementById("text").value = "x".repeat(20001)'
        )  # past --max-bytes
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 20).until(lambda b: "limit is 20,000" in b.find_element(By.ID, "error").text)
    finally:
        browser.quit()


# --------------------------------------------------------------------------- the command


def test_serve_without_the_extra_says_how_to_install_it(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi raises ImportError
    for name in [m for m in sys.modules if m == "seqtrain.serve" or m.startswith("seqtrain.serve.")]:
        monkeypatch.delitem(sys.modules, name)
    result = runner.invoke(app, ["serve", str(run_dir)])
    assert result.exit_code == 1 and "pip install 'seqtrain[serve]'" in result.output
    assert "Traceback" not in result.output


def test_serve_refuses_bad_options_and_a_busy_port(run_dir: Path) -> None:
    for args, words in (
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-queue", "4"], "--max-queue (4)"),
        (["--checkpoint", "worst"], "--checkpoint"),
        (["--threads", "0"], "--threads must be at least 1"),
    ):
        result = runner.invoke(app, ["serve", str(run_dir), *args])
        assert result.exit_code == 2 and words in result.output, result.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = runner.invoke(app, ["serve", str(run_dir), "--port", str(busy.getsockname()[1])])
    assert result.exit_code == 1 and "cannot listen on 127.0.0.1" in result.output
    result = runner.invoke(app, ["serve", str(run_dir.parent / "nope"), "--port", "0"])
    assert result.exit_code == 1 and "does not exist" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="one socket per worker on Linux only")
def test_one_socket_each_closes_the_sockets_it_opened_when_one_cannot_listen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The third of three workers' sockets fails to bind: a one-line error, and the two already
    listening are closed (not left holding the port)."""
    import seqtrain.serve.http as http
    from seqtrain.errors import SeqtrainError

    opened: list[socket.socket] = []
    real = http.listen

    def listen_twice(host: str, port: int, **kwargs: Any) -> socket.socket:
        if len(opened) == 2:
            raise http.CheckpointError(f"cannot listen on {host}:{port}: Address already in use")
        opened.append(real(host, port, **kwargs))
        return opened[-1]

    monkeypatch.setattr(http, "listen", listen_twice)
    with pytest.raises(SeqtrainError, match="cannot listen"):
        http.one_socket_each(real("127.0.0.1", 0), 3)
    assert len(opened) == 2 and all(each.fileno() == -1 for each in opened)


@pytest.fixture(scope="module")
def onnx_dir(run_dir: Path) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from seqtrain.export import export_run

    export_run(run_dir, "onnx", run_dir.parent / "onnx")
    return run_dir.parent / "onnx"


def start_command(
    target: Path, *options: str, script: str | None = None
) -> tuple[subprocess.Popen[str], str]:
    """`seqtrain serve TARGET --port 0 OPTIONS` in a subprocess (or `script` with those arguments);
    its URL once it is ready."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    head = [sys.executable, "-c", script] if script else [sys.executable, "-m", "seqtrain"]
    proc = subprocess.Popen(
        [*head, "serve", str(target), "--port", "0", *options], stderr=subprocess.PIPE, text=True, env=env
    )
    assert proc.stderr is not None
    lines: list[str] = []
    while not (found := re.search(r"http://127\.0\.0\.1:(\d+)", lines[-1] if lines else "")):
        lines.append(proc.stderr.readline())
        assert lines[-1] and len(lines) < 20, lines  # the address comes first, or after a few warnings
    u = f"http://127.0.0.1:{found.group(1)}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(u + "/ready", timeout=1).status_code == 200:
                return proc, u
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, "the server did not become ready"
        time.sleep(0.05)


@contextmanager
def stopped_at_the_end(proc: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def half_sent(u: str, body: bytes, sent: int) -> socket.socket:
    """A POST /predict whose headers and first `sent` bytes of body are on their way; the rest later."""
    port = int(u.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body[:sent])
    return sock


def read_answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """The status and JSON body of the one answer on `sock` (read until the server closes it)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
        if length and len(rest) >= int(length.group(1)):
            break
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(rest)


@pytest.mark.subprocess
@pytest.mark.parametrize(("kind", "workers"), [("run", "1"), ("onnx", "2")])
def test_sigterm_says_shutting_down_finishes_the_request_in_flight_and_exits_0(
    kind: str, workers: str, run_dir: Path, request: pytest.FixtureRequest
) -> None:
    """After SIGTERM, while a request is still in flight (its body half sent): /ready answers 503
    "shutting down", a new /predict 503 with Retry-After; the request in flight is answered; exit 0."""
    target = run_dir if kind == "run" else request.getfixturevalue("onnx_dir")
    proc, u = start_command(target, "--workers", workers)
    with stopped_at_the_end(proc):
        if kind == "onnx" and sys.platform == "linux":  # the ONNX folder runs on onnxruntime alone
            while (info := httpx.get(u + "/info")).status_code == 503:  # the other worker: loading
                time.sleep(0.05)
            for pid in [proc.pid, info.json()["pid"]]:
                assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
        texts = sst2_texts(3)
        body = json.dumps({"texts": texts}).encode()
        sock = half_sent(u, body, 10)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (ready := httpx.get(u + "/ready", timeout=5)).status_code == 200:
            assert time.monotonic() < deadline, "/ready still says ready after SIGTERM"
            time.sleep(0.02)
        assert ready.status_code == 503 and ready.json() == {"status": "shutting down"}
        refused = post(u, {"text": "too late"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"] == "the server is shutting down."
        if workers != "1":
            # The worker without the request in flight is done by now; new connections, spread by the
            # kernel over both workers' sockets, must still be answered (not queued on a socket nobody
            # accepts from any more, and reset at the exit).
            time.sleep(1.5)
            late = [httpx.post(u + "/predict", json={"text": "later"}, timeout=5) for _ in range(8)]
            assert [answer.status_code for answer in late] == [503] * 8
        sock.sendall(body[10:])
        status, answer = read_answer(sock)
        sock.close()
        assert status == 200 and [p["text"] for p in answer["predictions"]] == texts
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(u + "/health", timeout=2)
    if kind == "onnx":
        assert answer["predictions"] == predict_cli(target, texts, "--batch-size", "64")


STALLED_MODEL = """
import sys, time
import seqtrain.serve.batcher as batcher
from seqtrain.cli import main

real = batcher.predict_texts

def predict_texts(run, texts, *args):  # a forward pass that never ends (for a test)
    if "STALL" in texts:
        time.sleep(600)
    return real(run, texts, *args)

batcher.predict_texts = predict_texts
sys.argv = ["seqtrain", *sys.argv[1:]]
main()
"""


@pytest.mark.subprocess
def test_grace_bounds_the_exit_even_when_a_forward_pass_never_ends(run_dir: Path) -> None:
    """SIGTERM with --grace-s 1 while the model is stuck: the stuck request gets 503 at the end of the
    grace period, and the command exits 0 within grace + 2 s."""
    proc, u = start_command(run_dir, "--workers", "1", "--grace-s", "1", script=STALLED_MODEL)
    with stopped_at_the_end(proc), ThreadPoolExecutor(1) as ex:
        stuck = ex.submit(post, u, {"texts": ["STALL"]})
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        took = time.monotonic() - start
        answer = stuck.result(timeout=10)
    assert code == 0 and took < 1 + 2, took
    assert answer.status_code == 503 and "within --grace-s (1 s)" in answer.json()["error"]


@pytest.mark.subprocess
def test_workers_share_the_socket_and_metrics_sum_over_them(run_dir: Path) -> None:
    """--workers 2: two model processes behind one port; /metrics (whichever answers) counts every
    worker's requests; /info is the answering worker's own."""
    proc, u = start_command(run_dir, "--workers", "2")
    with stopped_at_the_end(proc):
        deadline = time.monotonic() + 60
        while metric(u, "seqtrain_ready_workers") < 2:  # /ready answers for the worker it reaches
            assert time.monotonic() < deadline, "the second worker did not become ready"
            time.sleep(0.05)
        bodies = [{"text": t} for t in sst2_texts(40)]
        for _ in range(3):  # 40 requests at once, on 40 connections: both workers take some
            assert {r.status_code for r in asyncio.run(post_all(u, bodies))} == {200}
        pids = {httpx.get(u + "/info").json()["pid"] for _ in range(20)}
        info = httpx.get(u + "/info").json()
        assert info["workers"] == 2 and info["threads"] == 1 and proc.pid not in pids
        counts = [metric(u, 'seqtrain_requests_total{endpoint="/predict",status="200"}') for _ in range(10)]
        assert counts == [120.0] * 10, counts  # summed, whichever worker answered
        assert metric(u, "seqtrain_texts_total") == 120
        # A worker that dies while the others drain (here: stopped, then killed after SIGTERM) has nothing
        # left to answer: the other must not wait the whole grace period (30 s) for it.
        assert len(pids) == 2
        gone = min(pids)
        os.kill(gone, signal.SIGSTOP)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        os.kill(gone, signal.SIGKILL)
        assert proc.wait(timeout=40) == 0
        assert time.monotonic() - start < 10, time.monotonic() - start


def per_worker(url: str, name: str) -> dict[str, float]:
    """One series of /metrics per worker: {pid: value}."""
    text = httpx.get(url + "/metrics", timeout=10).text
    return {pid: float(v) for pid, v in re.findall("^" + name + r'\{pid="(\d+)"\} (\S+)$', text, re.M)}


def keep_alive_clients(url: str, clients: int, requests: int) -> list[int]:
    """`clients` keep-alive connections opened at once (as a load generator or a proxy's pool opens
    them: all waiting to be accepted together), each asking /info which worker holds it and then
    POSTing `requests` texts one after another; the pid of each connection's worker."""
    port = int(url.rsplit(":", 1)[1])
    pool = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(clients)]
    pids = []
    try:
        for sock in pool:
            sock.sendall(b"GET /info HTTP/1.1\r\nHost: x\r\n\r\n")
            status, answer = read_answer(sock)
            assert status == 200
            pids.append(int(answer["pid"]))
        for text in sst2_texts(requests):
            body = json.dumps({"text": text}).encode()
            for sock in pool:
                head = f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
                sock.sendall(head.encode() + body)
                assert read_answer(sock)[0] == 200
    finally:
        for sock in pool:
            sock.close()
    return pids


@pytest.mark.subprocess
def test_both_workers_serve_a_few_keep_alive_clients(run_dir: Path) -> None:
    """--workers 2 and 8 keep-alive connections opened at once (a few clients, or a proxy's pool): both
    workers serve requests, and /metrics counts each worker's. On one shared listening socket the
    worker that woke first accepted every connection waiting, and the other core idled."""
    proc, u = start_command(run_dir, "--workers", "2")
    with stopped_at_the_end(proc):
        deadline = time.monotonic() + 60
        while metric(u, "seqtrain_ready_workers") < 2:
            assert time.monotonic() < deadline, "the second worker did not become ready"
            time.sleep(0.05)
        # the kernel spreads connections by a hash: all 8 on one worker has odds of 1 in 128 a round
        for _ in range(3):
            before = per_worker(u, "seqtrain_worker_requests")
            pids = keep_alive_clients(u, 8, 5)
            if len(set(pids)) == 2:
                break
        assert len(set(pids)) == 2, f"all 8 connections went to worker {pids[0]}"
        served = per_worker(u, "seqtrain_worker_requests")
        assert set(served) == {str(p) for p in set(pids)}
        for pid in set(pids):  # each worker ran exactly its connections' requests
            assert served[str(pid)] - before.get(str(pid), 0) == 5 * pids.count(pid), (served, pids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# --------------------------------------------------------------------------- hostile clients


class SlowModel:
    """The tiny run, but each forward pass costs 0.5 ms per text more: an /explain of many texts
    takes seconds (its occlusion runs thousands of rows), a /predict of one text a millisecond."""

    def __init__(self, run: Any) -> None:
        self.run, self.config, self.tokenizer, self.labels = run, run.config, run.tokenizer, run.labels

    def probs(self, seqs: list[list[int]], batch_size: int, cost: Any = None) -> Any:
        time.sleep(0.0005 * len(seqs))
        return self.run.probs(seqs, batch_size, cost)


def test_a_long_explain_does_not_stall_predict(run_dir: Path) -> None:
    texts = [" ".join(["a long and rather dull film"] * 12)] * 40  # 40 x 64 tokens: 2,600 occlusion rows
    with serving(
        run_dir,
        load=lambda: SlowModel(load_target(run_dir)[0]),
        explain_max_texts=64,
        explain_max_tokens=100_000,
    ) as u:
        while httpx.get(u + "/ready").status_code != 200:
            time.sleep(0.02)
        with ThreadPoolExecutor(1) as ex:
            explaining = ex.submit(post, u, {"texts": texts}, "/explain")
            time.sleep(0.2)
            times = []
            for i in range(10):
                start = time.perf_counter()
                assert post(u, {"text": f"a short one {i}"}).status_code == 200
                times.append(time.perf_counter() - start)
            assert not explaining.done(), "the explanation was too quick to test anything"
            assert max(times) < 0.3, times  # not the seconds the explanation takes
            assert explaining.result(timeout=60).status_code == 200


def test_explain_takes_at_most_its_share_of_a_busy_model() -> None:
    """Closed-loop clients leave the queue empty for a moment between /predict batches (the answers
    are on their way, the next requests not yet in): an /explain slice must not start in every such
    gap, or /predict gets half the model and its latency doubles. The model's time is checked here
    with the gate alone: back-to-back batches of 1 ms, 0.3 ms apart, against slices of 1 ms."""
    from seqtrain.serve.batcher import EXPLAIN_SHARE, Gate

    gate = Gate(lambda: 0)  # nothing queued: the gaps
    stop = time.monotonic() + 1.0
    held = {"predict": 0.0, "explain": 0.0}

    def run(kind: str) -> None:
        while time.monotonic() < stop:
            with gate.first() if kind == "predict" else gate.after():
                began = time.monotonic()
                time.sleep(0.001)
                held[kind] += time.monotonic() - began
            if kind == "predict":
                time.sleep(0.0003)

    threads = [threading.Thread(target=run, args=(kind,)) for kind in held]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    share = held["explain"] / (held["explain"] + held["predict"])
    assert 0 < share <= 2.5 * EXPLAIN_SHARE, held  # and /explain still gets its share


def test_explain_has_its_own_budget_and_queue(run_dir: Path, url: str) -> None:
    many = post(url, {"texts": ["good"] * 17}, path="/explain")
    assert many.status_code == 413 and "--explain-max-texts" in many.json()["error"]
    long = post(url, {"texts": [" ".join(["word"] * 60)] * 16}, path="/explain")  # 16 x 60 tokens
    assert long.status_code == 413 and "--explain-max-tokens" in long.json()["error"]
    assert "the texts hold 960 tokens" in long.json()["error"]
    with serving(
        run_dir, load=lambda: SlowModel(load_target(run_dir)[0]), explain_queue=1, explain_max_tokens=100_000
    ) as u:
        while httpx.get(u + "/ready").status_code != 200:
            time.sleep(0.02)
        with ThreadPoolExecutor(1) as ex:
            first = ex.submit(post, u, {"texts": ["a long and rather dull film " * 10] * 16}, "/explain")
            deadline = time.monotonic() + 10
            while metric(u, "seqtrain_explain_requests") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            second = post(u, {"text": "queued"}, path="/explain")
            assert second.status_code == 503 and "--explain-queue 1" in second.json()["error"]
            assert first.result(timeout=60).status_code == 200


def test_slow_clients_are_timed_out(run_dir: Path) -> None:
    """A client that sends half its headers, or half its body, or nothing, loses its connection
    after --read-timeout-s (with a JSON 408 when it sent something); the others are served."""
    with serving(run_dir, read_timeout_s=0.5, **LIMITS) as u:
        port = int(u.rsplit(":", 1)[1])
        headers = socket.create_connection(("127.0.0.1", port), timeout=5)
        headers.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Len")
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        body = half_sent(u, b'{"text": "never finished"}', 5)
        body.settimeout(5)
        assert post(u, {"text": "a patient client"}).status_code == 200
        start = time.monotonic()
        status, answer = read_answer(headers)
        assert status == 408 and "headers did not arrive within 0.5 s (--read-timeout-s)" in answer["error"]
        status, answer = read_answer(body)
        assert status == 408 and "body did not arrive within 0.5 s" in answer["error"]
        assert body.recv(100) == b""  # and closed
        assert silent.recv(100) == b""  # closed, nothing to answer
        assert time.monotonic() - start < 2
        for s in (headers, silent, body):
            s.close()
        # one that sends each header slowly, a byte at a time, is cut off too
        trickle = socket.create_connection(("127.0.0.1", port), timeout=5)
        with pytest.raises(OSError):
            for byte in b"POST /predict HTTP/1.1\r\nHost: slow\r\n" * 10:
                trickle.sendall(bytes([byte]))
                time.sleep(0.02)
        trickle.close()


def test_serve_refuses_a_target_it_cannot_serve(run_dir: Path, tmp_path: Path) -> None:
    """A file, a damaged labels.json (not JSON, or the wrong object): one line naming it, exit 1."""
    result = runner.invoke(app, ["serve", "/etc/passwd", "--port", "0"])
    assert result.exit_code == 1 and "is a file, not a run directory" in result.output
    for content in ('{"x": 1}', "not json {"):
        copy = tmp_path / f"copy-{len(content)}"
        shutil.copytree(run_dir, copy, symlinks=True)
        (copy / "labels.json").write_text(content)
        result = runner.invoke(app, ["serve", str(copy), "--port", "0"])
        assert result.exit_code == 1 and "labels.json is damaged" in result.output, result.output
        assert "Traceback" not in result.output


def test_a_run_still_training_is_served_with_a_warning(run_dir: Path, tmp_path: Path) -> None:
    from seqtrain.serve import check_target

    copy = tmp_path / "training"
    shutil.copytree(run_dir, copy, symlinks=True)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "seqtrain", "train"])
    try:
        (copy / ".lock").write_text(f"{trainer.pid}\n")
        deadline = time.monotonic() + 30  # until the child has exec'd, /proc shows the parent's command
        while b"seqtrain" not in Path(f"/proc/{trainer.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "the stand-in trainer never started"
            time.sleep(0.05)
        (warning,) = check_target(copy)
        assert "still being trained" in warning and "/health" in warning
    finally:
        trainer.kill()
        trainer.wait()
    assert check_target(copy) == []  # the trainer is gone: the run is finished
