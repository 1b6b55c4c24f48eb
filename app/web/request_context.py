"""``X-Request-ID`` and the access log, around the whole ASGI application.

Outermost (also around Litestar's router, so unknown paths and framework errors get the
header too): the id a client sends in ``X-Request-ID`` (or a new one) is echoed on every
response, becomes the ``request_id`` of the request's log lines and of a prediction whose body
names none. With the access log on, one ``heimdall.access`` line per request names method,
path, status, duration, request id and trace id.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import Any

from telemetry.logs import request_scope

access_log = logging.getLogger("heimdall.access")

_HEADER = b"x-request-id"
HEAD_KEY = "heimdall.head"
"""Scope key set on a HEAD request answered by its GET route (telemetry names it HEAD)."""
_VALID_ID = re.compile(r"[A-Za-z0-9._:@/+=\-]{1,128}")
"""Ids we echo and log as they are: anything else (log injection, huge) is replaced."""


def request_id_of(headers: Any) -> str:
    """The id for the first ``X-Request-ID`` of an ASGI header list (see request_id_from)."""
    for name, value in headers:
        if name.lower() == _HEADER:
            return request_id_from(value.decode("latin-1"))
    return uuid.uuid4().hex


def request_id_from(value: str | None) -> str:
    """The client's ``X-Request-ID`` value when it is a sane token, else a new random id."""
    if value is not None and _VALID_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def log_access(method: str, path: str, status: int, seconds: float, trace_ids: list[str]) -> None:
    """The access log line of one request."""
    extra: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(seconds * 1e3, 3),
    }
    if trace_ids:
        extra["trace_id"], extra["span_id"] = trace_ids
    access_log.info("%s %s %d %.2fms", method, path, status, seconds * 1e3, extra=extra)


class RequestContext:
    """ASGI wrapper: request id in, ``X-Request-ID`` out, optional access log line."""

    def __init__(self, app: Any, *, access: bool = False) -> None:
        """Wrap ``app``; ``access`` turns the access log on."""
        self.app = app
        self.access = access

    def __getattr__(self, name: str) -> Any:
        # Tests and the RSGI front reach into the wrapped app (state, lifespan helpers).
        return getattr(self.app, name)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        """Run one request (other scopes, e.g. lifespan, pass straight through)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            # HEAD is GET without the body (RFC 9110 9.3.2): health checks and link checkers
            # use it. The GET route answers; hyper sends its headers and drops the body.
            scope = {**scope, "method": "GET", HEAD_KEY: True}
        request_id = request_id_of(scope["headers"])
        header = (_HEADER, request_id.encode("ascii"))
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        with request_scope(request_id) as trace_ids:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                if self.access:
                    self._log(scope, status, time.perf_counter() - started, trace_ids)

    @staticmethod
    def _log(scope: Any, status: int, seconds: float, trace_ids: list[str]) -> None:
        method = "HEAD" if scope.get(HEAD_KEY) else scope["method"]
        log_access(method, scope["path"], status, seconds, trace_ids)
