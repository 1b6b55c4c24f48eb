"""Serve the ASGI application through Granian's RSGI interface.

Granian's ASGI interface hands a request body to the application in ≈38 kB ``http.request``
messages (hyper's read size): a 306 kB prediction body is 8–9 messages, each a dict, a future
and an event-loop wake-up — about 0.1 ms of CPU per request more than RSGI, where one
``await protocol()`` returns the whole body, collected in Rust (docs/benchmarks.md). This
front translates RSGI to ASGI for the Litestar app so the app and its tests stay plain ASGI:

- A body its route takes, announced up to ``one_piece_limit``, is read in one piece before
  the application runs; one announced over the route's limit is answered 413 unread; others
  (chunked, larger, or for a route that takes none) stream when the application reads them.
  Intake rules (app/web/intake.py): a deadline and a minimum rate (408), an upload cap and a
  byte budget (503), a body cut short is an ``IncompleteBody`` (400); one log line each.
- After the body, ``receive`` waits for the client to disconnect (``http.disconnect``).
- A response sent in one ``http.response.body`` message goes out with ``response_bytes``; one
  sent in several is streamed.
- A *direct route* (``direct``, by method and path) answers a one-piece body itself, without
  the ASGI application: ``POST /v1/predict`` (app/web/direct.py). It reads the body through
  the same :class:`app.web.exchange.Exchange`, so the intake rules are the same.
- ASGI lifespan runs from Granian's RSGI hooks: startup in ``__rsgi_init__`` (a failure
  stops the HTTP process, as Granian does for ASGI), shutdown in ``__rsgi_del__`` after
  Granian has drained the in-flight requests (app/web/lifespan.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import quote

from app.web import intake
from app.web.exchange import Exchange
from app.web.intake import HOLD_KEY, BodyBudget, BodyClock, IntakeLimits, UploadGate
from app.web.lifespan import ASGI_VERSION, ASGIApp, Lifespan, LifespanFailed, flush_logs
from workers import malloc

log = logging.getLogger("heimdall.rsgi")

DirectRoute = Callable[
    [Any, Callable[[], Awaitable[bytes]]], Awaitable[tuple[int, list[tuple[str, str]], bytes]]
]
"""A route the front answers itself: ``route(rsgi_scope, read)`` → status, headers, body."""

_PATH_SAFE = "/!$&'()*+,;=:@-._~"  # RFC 3986 pchar and "/": left as they are in raw_path


def address(value: str) -> tuple[str, int] | None:
    """An RSGI ``host:port`` as ASGI's ``(host, port)`` (None when it is not one)."""
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class RSGIFront:
    """An RSGI application (``__rsgi__`` and its init/del hooks) in front of an ASGI app."""

    def __init__(
        self,
        app: ASGIApp,
        one_piece_limit: int,
        intake: IntakeLimits | None = None,
        on_client_fault: Callable[[str], None] | None = None,
        body_limit: Callable[[str, str], int | None] | None = None,
        direct: Mapping[tuple[str, str], DirectRoute] | None = None,
    ) -> None:
        """Serve ``app``.

        Args:
            app: the ASGI application.
            one_piece_limit: bodies up to this many bytes (with ``Content-Length``) are read in
                one call before the application runs; larger or chunked ones are streamed.
            body_limit: the largest body of the route a method and path name (None: the route
                takes none); a larger announced body is answered 413 unread. Without it every
                body is the application's to check.
            intake: read deadline, minimum rate and upload cap (app/web/intake.py).
            on_client_fault: counts a request refused for the client's behaviour, by reason
                (``incomplete_body``, ``body_timeout``, ``uploads_full``,
                ``body_budget_full``).
            direct: routes by (method, path) that answer a one-piece body themselves, without
                the ASGI application (app/web/direct.py); any other request of theirs (no
                body, chunked, too large to read in one piece) goes to the application.
        """
        self.app = app
        self.one_piece_limit = one_piece_limit
        self.intake = intake or IntakeLimits()
        self.uploads = UploadGate(self.intake.max_uploads, on_drained=_trim_after_burst)
        self.budget = BodyBudget(self.intake.max_body_bytes_in_flight)
        self.on_client_fault = on_client_fault
        self.body_limit = body_limit
        self.lifespan = Lifespan(app)
        self.direct = dict(direct or {})

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the application's lifespan startup before Granian accepts connections."""
        try:
            loop.run_until_complete(self.lifespan.startup())
        except LifespanFailed:
            log.exception("application startup failed")
            flush_logs()
            raise SystemExit(1) from None

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run the lifespan shutdown once Granian has drained the requests."""
        try:
            loop.run_until_complete(self.lifespan.shutdown())
        except LifespanFailed:
            log.exception("application shutdown failed")

    async def __rsgi__(self, scope: Any, proto: Any) -> None:
        """Handle one RSGI request (HTTP only: websockets are off)."""
        if scope.proto != "http":
            return
        headers = scope.headers
        length = headers.get("content-length")
        # A body only with Content-Length or Transfer-Encoding (RFC 9112 6.3): reads wait else.
        has_body = length != "0" and (length is not None or "transfer-encoding" in headers)
        announced = int(length) if length is not None and length.isdigit() else None
        limit, takes_body = None, has_body  # without a route table the application checks
        if has_body and self.body_limit is not None:
            limit = self.body_limit(scope.method, scope.path)
            takes_body = limit is not None  # a body sent to a route that takes none: unread
        if limit is not None and announced is not None and announced > limit:
            self._unread(
                proto, scope.method, scope.path, intake.too_large(announced, limit), "too_large"
            )
            return
        one_piece = not has_body or (
            takes_body and announced is not None and announced <= self.one_piece_limit
        )
        path = scope.path  # Granian has percent-decoded it (as ASGI's "path" is)
        direct = self.direct.get((scope.method, path)) if has_body and one_piece else None
        if has_body and not self.uploads.enter():
            detail = f"{self.uploads.limit} uploads are in progress on this replica; retry shortly"
            self._unread(proto, scope.method, path, detail, "uploads_full")
            return
        exchange = Exchange(
            proto,
            one_piece,
            has_body,
            BodyClock(self.intake, asyncio.get_running_loop().time()),
            announced,
            self._body_end(scope.method, path) if has_body else _no_body,
            self.budget,
        )
        try:
            if has_body and one_piece:
                await exchange.prefetch()
            if direct is not None:
                await _answer_directly(direct, scope, exchange)
            else:
                await self.app(self._asgi_scope(scope, exchange), exchange.receive, exchange.send)
        except Exception:
            log.exception("unhandled error in %s %s", scope.method, path)
            if not exchange.sent:
                proto.response_empty(500, [])
            return
        finally:
            self.budget.give(exchange.reserved)
            if has_body and not exchange.body_done:  # answered without reading it all
                exchange.body_done = True
                self.uploads.leave()
        if not exchange.sent:
            proto.response_empty(500, [])

    def _asgi_scope(self, scope: Any, exchange: Exchange) -> dict[str, Any]:
        """The ASGI scope of an RSGI request."""
        path = scope.path
        return {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": scope.http_version,
            "server": address(scope.server),
            "client": address(scope.client),
            "scheme": scope.scheme,
            "method": scope.method,
            "root_path": "",
            "path": path,
            # RSGI does not keep the raw target: re-encode the decoded path (UTF-8, quoted).
            "raw_path": quote(path, safe=_PATH_SAFE).encode("ascii"),
            "query_string": scope.query_string.encode("utf-8"),
            # Granian hands over only header values it could decode; they are ASCII.
            "headers": [
                (name.encode("latin-1"), value.encode("utf-8"))
                for name, value in scope.headers.items()
            ],
            "state": self.lifespan.state.copy(),
            HOLD_KEY: exchange.hold,
        }

    def _body_end(self, method: str, path: str) -> Callable[[str | None, str], None]:
        """The callback that frees the upload slot and reports a failed body (one log line)."""

        def end(code: str | None, detail: str) -> None:
            self.uploads.leave()
            if code is not None:
                log.info("client fault on %s %s: %s (%s)", method, path, detail, code)
                if self.on_client_fault is not None:
                    self.on_client_fault(code)

        return end

    def _unread(self, proto: Any, method: str, path: str, detail: str, reason: str) -> None:
        """Answer before reading the body: 413 (over the route's limit) or 503 (no slot)."""
        log.info("client fault on %s %s: %s (%s)", method, path, detail, reason)
        if self.on_client_fault is not None and reason != "too_large":
            self.on_client_fault(reason)
        status, headers, body = intake.refusal(path, detail, reason)
        proto.response_bytes(status, headers, body)


async def _answer_directly(route: DirectRoute, scope: Any, exchange: Exchange) -> None:
    """Let a direct route answer: it reads the body through the exchange's intake rules."""

    async def read() -> bytes:
        body: bytes = (await exchange.receive())["body"]
        return body

    status, headers, body = await route(scope, read)
    if exchange.failed:  # the rest of a failed body is unread: this connection is done
        headers.append(("connection", "close"))
    exchange.proto.response_bytes(status, headers, body)
    exchange.sent = True


def _trim_after_burst() -> None:
    """Hand the heap a burst of uploads freed back to the kernel, off the event loop."""
    log.info("upload burst over: returning freed memory to the kernel")
    future = asyncio.get_running_loop().run_in_executor(None, malloc.trim)
    future.add_done_callback(intake.retrieve)


def _no_body(code: str | None, detail: str) -> None:
    """Body-end callback of a request without a body."""
