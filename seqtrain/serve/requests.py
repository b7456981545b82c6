"""Reading and checking a request body, and writing an answer: the same checks and messages on every route.

Bad input answers with a JSON error ({"error": message, "status": code}): too many texts or bytes is
413, a body that is not UTF-8 (or holds lone surrogates) is 400, a body that is not JSON (nested too
deeply included) or has the wrong shape is 422, a body that does not arrive within --read-timeout-s
is 408 (and the connection is closed).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

REQUEST_KEYS = ("text", "texts", "top_k")
JSON_HEADER = (b"content-type", b"application/json")


class ApiError(Exception):
    """An answer other than 200: becomes {"error": message, "status": status}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def read_body(scope: Scope, receive: Receive, max_bytes: int, timeout_s: float) -> bytes | None:
    """The request body, or ApiError 413 past `max_bytes`, 408 when it takes longer than `timeout_s`
    to arrive; None when the client went away."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if value.isdigit() and int(value) > max_bytes:
                raise ApiError(
                    413,
                    f"the request body has {int(value):,} bytes; the limit is {max_bytes:,} (--max-bytes).",
                )
            break
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks: list[bytes] = []
    size = 0
    while True:  # a chunked body without Content-Length is cut off at the limit too
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            raise ApiError(
                408,
                f"the request body did not arrive within {timeout_s:g} s (--read-timeout-s).",
                {"Connection": "close"},
            ) from None
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(
                413,
                f"the request body has more than {max_bytes:,} bytes (--max-bytes).",
                {"Connection": "close"},
            )
        if not message.get("more_body", False):
            return b"".join([*chunks, chunk]) if chunks else chunk
        chunks.append(chunk)


def parse_request(
    body: bytes, max_texts: int, what: str = "--max-texts"
) -> tuple[list[str], int | None, bool]:
    """(texts, top_k, whether one "text" was sent) from a /predict or /explain body, or ApiError
    400/413/422. Whatever the body holds, the answer is one of those, never a 500."""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 ({e.reason} at byte {e.start}).") from None
    try:
        obj = json.loads(decoded)
    except RecursionError:
        raise ApiError(422, "the request body is not JSON seqtrain reads: it is nested too deeply.") from None
    except ValueError as e:
        raise ApiError(422, f"the request body is not JSON: {e}.") from None
    except Exception as e:  # anything else the decoder raises is still the body's fault
        raise ApiError(422, f"the request body cannot be read as JSON ({type(e).__name__}).") from None
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
        raise ApiError(413, f"{len(texts):,} texts in one request; the limit is {max_texts:,} ({what}).")
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
        raise ApiError(422, f"'top_k' must be a positive integer, got {short_json(top_k)}.")
    return texts, top_k, single


def short_json(value: Any, limit: int = 60) -> str:
    """A value as JSON for a message, cut at `limit` characters (a deep value is not rendered)."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        return json_type(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


async def answer(send: Send, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    """One whole HTTP response, written straight to the ASGI server."""
    head = [JSON_HEADER, (b"content-length", str(len(body)).encode())]
    head += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
