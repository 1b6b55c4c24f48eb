"""``POST /v1/predict`` answered by the RSGI front itself, without ASGI or Litestar (issue 23).

The service's hottest route does little in the HTTP process (its body goes to a worker
undecoded), so the layers around it were most of that process's work: measured on the AMD EPYC
VM, the RSGI→ASGI translation, Litestar's routing, request and response objects and the two
middlewares cost ≈ 0.3 of 0.88 CPU ms per request (docs/benchmarks.md, "The hot route without
Litestar"). Here the front hands the route its already-read body and sends what it returns.

Every contract of the Litestar route holds because the same pieces are called, not copied:
content negotiation (app/web/negotiation.py: 406 before 415 before the body), the intake
rules (the front reads the body as for any route: 408, 400, 503), the service's
``predict``, problem details through ``problem_from`` with ``Retry-After``, the
``X-Request-ID`` echo and log scope, the server span and ``http.server.request.duration``
(app/web/tracing.py's :class:`ServerSpans`), the access log line. tests/e2e/test_direct_route.py
holds the two paths to the same answers (timings aside) over real HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from app.serving.answers import problem_from
from app.serving.service import InferenceService
from app.web.negotiation import JSON, MSGPACK, PROBLEM, media_is_msgpack, prefers_msgpack
from app.web.request_context import log_access, request_id_from
from app.web.routes import INTERNAL_PROBLEM
from app.web.rsgi import address
from app.web.tracing import PROPAGATION_HEADERS, ServerSpans, request_attributes
from telemetry.logs import request_scope
from workers.errors import ServiceError
from workers.request import JSON_BODY, MSGPACK_BODY

log = logging.getLogger("heimdall.http")

ROUTE = "/v1/predict"

Answer = tuple[int, list[tuple[str, str]], bytes]
"""Status, headers and body of a response."""

_json = msgspec.json.Encoder()
_msgpack = msgspec.msgpack.Encoder()
_INTERNAL = _json.encode(INTERNAL_PROBLEM)


class DirectPredict:
    """``POST /v1/predict`` for :class:`app.web.rsgi.RSGIFront`."""

    def __init__(self, service: InferenceService, spans: ServerSpans | None, access: bool) -> None:
        """Answer with ``service``.

        ``spans`` (None without telemetry) traces and times each request; ``access`` writes
        the access log line.
        """
        self.service = service
        self.spans = spans
        self.access = access

    async def __call__(self, scope: Any, read: Callable[[], Awaitable[bytes]]) -> Answer:
        """Answer one request; ``read()`` gives its body or raises the intake's client error."""
        started = time.perf_counter()
        head = _Headers(scope.headers)
        request_id = request_id_from(head.first.get("x-request-id"))
        with request_scope(request_id) as trace_ids:
            opened = None
            if self.spans is not None:
                opened = self.spans.begin(
                    "POST",
                    head.carrier,
                    lambda method: request_attributes(_asgi_view(scope, head), method),
                )
            status = 500
            try:
                status, answer_headers, body = await self._answer(head, read)
            finally:
                if opened is not None and self.spans is not None:
                    self.spans.end(opened, status, ROUTE, scope.scheme)
            if self.access:
                log_access("POST", ROUTE, status, time.perf_counter() - started, trace_ids)
        answer_headers.append(("x-request-id", request_id))
        return status, answer_headers, body

    async def _answer(self, head: _Headers, read: Callable[[], Awaitable[bytes]]) -> Answer:
        try:
            msgpack = prefers_msgpack(head.first.get("accept", ""))  # 406 before the body
            msgpack_body = media_is_msgpack(head.first.get("content-type", ""), head.codings)
            body = await read()
            result = await self.service.predict(body, MSGPACK_BODY if msgpack_body else JSON_BODY)
        except ServiceError as exc:
            answer = [("content-type", PROBLEM)]
            if exc.retry_after:
                answer.append(("retry-after", str(exc.retry_after)))
            return int(exc.status), answer, _json.encode(problem_from(exc))
        except Exception:
            log.exception("unhandled error on POST %s", ROUTE)
            return 500, [("content-type", PROBLEM)], _INTERNAL
        if msgpack:
            return 200, [("content-type", MSGPACK)], _msgpack.encode(result)
        return 200, [("content-type", JSON)], _json.encode(result)


_FIRST = frozenset({"x-request-id", "accept", "content-type", "user-agent"})
_TRACE = frozenset(PROPAGATION_HEADERS)


class _Headers:
    """The request headers the route reads, taken as the ASGI side takes them.

    From Granian's ``items()``, the list the ASGI scope is built from (a copy whose value is
    not text is left out of it, so the next copy counts; ``get`` would answer None for the
    name instead): the first copy of a single-valued header (as Litestar's ``get`` and
    ``request_id_of``), every ``Content-Encoding``, the last copy of a propagation header (as
    the ASGI middleware's carrier). Found by an outside review: with ``get``, an ``Accept``
    holding byte 0xE9 and then ``Accept: text/html`` was answered 200 here, 406 by Litestar.
    """

    __slots__ = ("carrier", "codings", "first")

    def __init__(self, headers: Any) -> None:
        self.first: dict[str, str] = {}
        self.codings: list[str] = []
        self.carrier: dict[str, str] | None = None
        for name, value in headers.items():
            if name in _FIRST:
                self.first.setdefault(name, value)
            elif name == "content-encoding":
                self.codings.append(value)
            elif name in _TRACE:
                if self.carrier is None:
                    self.carrier = {}
                self.carrier[name] = value


def _asgi_view(scope: Any, head: _Headers) -> dict[str, Any]:
    """The few ASGI scope keys a recorded span's attributes read, from an RSGI scope."""
    agent = head.first.get("user-agent")
    return {
        "method": scope.method,
        "path": scope.path,
        "scheme": scope.scheme,
        "http_version": scope.http_version,
        "server": address(scope.server),
        "client": address(scope.client),
        "headers": [(b"user-agent", agent.encode("latin-1"))] if agent is not None else [],
    }
