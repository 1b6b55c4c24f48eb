"""The RSGI front's direct ``POST /v1/predict`` against the Litestar route, over real HTTP.

A body sent with ``Content-Length`` (up to the route's limit) is answered by the direct route
(app/web/direct.py); the same body sent chunked streams through ASGI and Litestar. Every
answer a client can get must be the same from both: status, media type, ``Retry-After``,
``X-Request-ID`` and the document (timings aside).
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import pytest

from tests.support.procs import Server
from tests.support.rawhttp import exchange, parse, request_head
from training.simulate import heard_batch, request_payload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_BATCH = heard_batch(2, 9191)
_GOOD = request_payload(_BATCH, 0, cache=False)
_JSON = {"content-type": "application/json"}


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _with(path: list[Any], value: Any) -> bytes:
    body = json.loads(json.dumps(_GOOD))
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return _json(body)


def _msgpack_body() -> bytes:
    body = json.loads(json.dumps(_GOOD))
    for rx in body["receivers"]:
        rx["iq"] = base64.b64decode(rx["iq"])
    return msgspec.msgpack.encode(body)


CASES: dict[str, tuple[bytes, dict[str, str]]] = {
    "json": (_json(_GOOD), {**_JSON, "x-request-id": "direct-a"}),
    "msgpack in, msgpack out": (
        _msgpack_body(),
        {"content-type": "application/msgpack", "accept": "application/msgpack"},
    ),
    "id from the header": (_json({k: v for k, v in _GOOD.items() if k != "request_id"}), _JSON),
    "unsafe id replaced": (_json(_GOOD), {**_JSON, "x-request-id": "two words"}),
    "415 media type": (_json(_GOOD), {"content-type": "text/plain"}),
    "415 coding": (gzip.compress(_json(_GOOD)), {**_JSON, "content-encoding": "gzip"}),
    "406": (_json(_GOOD), {**_JSON, "accept": "text/html"}),
    "400 not json": (b'{"receivers": [', _JSON),
    "400 field path": (_with(["receivers", 1, "latitude"], 123.0), _JSON),
    "400 undecodable iq": (_with(["receivers", 0, "iq"], "not base64!"), _JSON),
    "422 sample rate": (_with(["sample_rate_hz"], 1.0), _JSON),
}


STATUS = {"415": 415, "406": 406, "400": 400, "422": 422}


def _chunks(body: bytes) -> Iterator[bytes]:
    yield body[: len(body) // 2]
    yield body[len(body) // 2 :]


def _seen(response: httpx.Response, header_id: str | None) -> dict[str, Any]:
    """What a client sees, with the parts that differ on every call made comparable."""
    media = response.headers.get("content-type", "")
    document = msgspec.msgpack.decode(response.content) if "msgpack" in media else response.json()
    request_id = response.headers.get("x-request-id", "")
    if header_id is None or header_id == "two words":  # generated: a fresh uuid4 hex each time
        assert len(request_id) == 32 and request_id != header_id
        if isinstance(document, dict) and document.get("request_id") == request_id:
            document["request_id"] = "<the generated id>"
        request_id = "<generated>"
    if isinstance(document, dict):
        document.pop("timing_ms", None)
    return {
        "status": response.status_code,
        "media": media,
        "retry-after": response.headers.get("retry-after"),
        "x-request-id": request_id,
        "document": document,
    }


@pytest.mark.parametrize("case", list(CASES))
def test_the_direct_route_answers_as_the_litestar_route_does(
    shared_server: Server, case: str
) -> None:
    body, headers = CASES[case]
    url = shared_server.url + "/v1/predict"
    with httpx.Client(timeout=60) as client:
        direct = client.post(url, content=body, headers=headers)
        streamed = client.post(url, content=_chunks(body), headers=headers)
    assert "content-length" not in streamed.request.headers  # chunked: the Litestar route
    header_id = headers.get("x-request-id")
    seen = _seen(direct, header_id)
    assert seen == _seen(streamed, header_id)
    assert seen["status"] == STATUS.get(case[:3], 200)
    if case == "id from the header":
        assert seen["document"]["request_id"] == "<the generated id>"


_JSON_TYPE = ("Content-Type", "application/json")
_UNREADABLE_FIRST = {  # a first copy that is not text, then a readable one (outside review)
    "accept": ([_JSON_TYPE, ("Accept", "\xe9"), ("Accept", "text/html")], 406),
    "content-type": ([("Content-Type", "\xe9"), ("Content-Type", "text/plain")], 415),
    "x-request-id": ([_JSON_TYPE, ("X-Request-ID", "\xe9\xe9"), ("X-Request-ID", "rv-2")], 200),
}


@pytest.mark.parametrize("name", list(_UNREADABLE_FIRST))
def test_repeated_headers_are_read_alike_on_both_routes(shared_server: Server, name: str) -> None:
    headers, status = _UNREADABLE_FIRST[name]
    body = _json({k: v for k, v in _GOOD.items() if k != "request_id"})
    framed = {
        "direct": ([*headers, ("Content-Length", str(len(body)))], body),
        "litestar": (
            [*headers, ("Transfer-Encoding", "chunked")],
            f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n",
        ),
    }
    seen = {}
    for route, (head, payload) in framed.items():
        raw = request_head("POST", "/v1/predict", [*head, ("Connection", "close")]) + payload
        (answer,), _ = parse(exchange(shared_server.port, raw, timeout=60))
        document = json.loads(answer.body)
        document.pop("timing_ms", None)
        seen[route] = (answer.status, answer.headers.get("content-type"), document)
        if name == "x-request-id":
            assert answer.headers["x-request-id"] == document["request_id"] == "rv-2", route
    assert seen["direct"] == seen["litestar"]
    assert seen["direct"][0] == status
