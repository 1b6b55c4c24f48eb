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
- ASGI lifespan runs from Granian's RSGI hooks: startup in ``__rsgi_init__`` (a failure
  stops the HTTP process, as Granian does for ASGI), shutdown in ``__rsgi_del__`` after
  Granian has drained the in-flight requests (app/web/lifespan.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from granian._granian import RSGIProtocolClosed as ProtocolClosed

from app.web import intake
from app.web.errors import BodyBudgetFull, IncompleteBody
from app.web.intake import HOLD_KEY, BodyBudget, BodyClock, IntakeLimits, UploadGate
from app.web.lifespan import ASGI_VERSION, ASGIApp, Lifespan, LifespanFailed, Message, flush_logs
from workers import malloc
from workers.errors import ServiceError

log = logging.getLogger("heimdall.rsgi")

_PATH_SAFE = "/!$&'()*+,;=:@-._~"  # RFC 3986 pchar and "/": left as they are in raw_path


def _address(value: str) -> tuple[str, int] | None:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


class _Exchange:
    """One request: the ASGI ``receive``/``send`` pair over an RSGI protocol object.

    Body reads go through the intake rules (app/web/intake.py): a deadline from the request's
    arrival and the minimum rate, and a failed read (client gone, body cut short, deadline
    missed) raises a client error the application renders as a 4xx problem.
    """

    __slots__ = (
        "_chunks",
        "_prefetched",
        "body_done",
        "budget",
        "clock",
        "failed",
        "has_body",
        "headers",
        "length",
        "on_body_end",
        "one_piece",
        "proto",
        "received",
        "reserved",
        "sent",
        "status",
        "stream",
    )

    def __init__(
        self,
        proto: Any,
        one_piece: bool,
        has_body: bool,
        clock: BodyClock,
        length: int | None,
        on_body_end: Callable[[str | None, str], None],
        budget: BodyBudget,
    ) -> None:
        self.proto = proto
        self.budget = budget
        self.reserved = 0
        """Bytes of ``budget`` this request holds until its answer is sent."""
        self.one_piece = one_piece
        self.has_body = has_body
        self.clock = clock
        self.length = length
        self.on_body_end = on_body_end
        """Called once when the body is in (``None``) or failed (the error code, detail)."""
        self.received = 0
        self.failed = False
        self.status = 500
        self.headers: list[tuple[str, str]] = []
        self.stream: Any = None
        self.sent = False
        self.body_done = False
        self._chunks: Any = None
        self._prefetched: bytes | ServiceError | None = None

    def hold(self, nbytes: int) -> bool:
        """Hold ``nbytes`` more of the budget until the answer is sent; False if they do not fit."""
        if not self.budget.take(nbytes, own=self.reserved):
            return False
        self.reserved += nbytes
        return True

    async def prefetch(self) -> None:
        """Read a one-piece body before the application runs.

        A client that stalls mid-upload then holds this small coroutine, not the
        application's whole call stack (routing, middleware, the handler's frames): about
        half the memory per stalled connection. The outcome (the body, or the client error
        of a failed read) is handed to the application at its first ``receive``.
        """
        try:
            self._prefetched = await self._read_whole()
        except ServiceError as exc:
            self._prefetched = exc

    async def receive(self) -> Message:
        if self.body_done:
            # Granian's disconnect awaitable ignores cancellation: wait on it through a task so
            # a caller that stops listening (Litestar, once a streamed answer is sent) can.
            disconnected = asyncio.ensure_future(self.proto.client_disconnect())
            try:
                await asyncio.wait((disconnected,))
            except asyncio.CancelledError:
                disconnected.cancel()
                raise
            return {"type": "http.disconnect"}
        if not self.has_body:
            self.body_done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        try:
            if self.one_piece:
                body = self._prefetched
                self._prefetched = None
                if body is None:
                    body = await self._read_whole()
                elif isinstance(body, ServiceError):
                    raise body
                self._finish(None)
                return {"type": "http.request", "body": body, "more_body": False}
            chunk = await self._read_chunk()
        except ServiceError as exc:
            self._finish(exc)
            raise
        if chunk is None:
            self._finish(None)
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.request", "body": chunk, "more_body": True}

    def _finish(self, error: ServiceError | None) -> None:
        self.body_done = True
        if error is not None:
            self.failed = True
        self.on_body_end(error.code if error else None, error.detail if error else "")

    async def _read_whole(self) -> bytes:
        length = self.length or 0
        try:
            arrived, body = await intake.within(self.clock.deadline(length), self.proto)
        except ProtocolClosed:
            raise IncompleteBody(
                "the connection closed before the whole body arrived"
                + (f" ({length} bytes announced)" if self.length is not None else "")
            ) from None
        if not arrived or body is None:
            raise self.clock.expired(0, self.length)
        self.received = len(body)
        if not self.hold(len(body)):  # counted once in: an upload holds only what it sent
            raise BodyBudgetFull(self.budget.detail(len(body)), retry_after=1)
        return bytes(body)  # already bytes: no copy

    async def _read_chunk(self) -> bytes | None:
        """The next data chunk; None once the body is complete.

        Granian yields the body's data chunks, then one empty chunk at the end; a body that
        fails (connection closed, chunked body without its last chunk) yields an empty chunk
        for the failure and another for the end — so after the first empty chunk, one more
        read tells a complete body (end of iteration) from a failed one.
        """
        if self._chunks is None:
            self._chunks = self.proto.__aiter__()
        for attempt in range(2):
            deadline = self.clock.deadline(self.received + 1)
            arrived, chunk = await intake.within(deadline, lambda: intake.next_chunk(self._chunks))
            if not arrived:
                raise self.clock.expired(self.received, self.length)
            if chunk:
                if attempt:  # data after the end marker: not a body Granian ever yields
                    break
                if not self.hold(len(chunk)):
                    raise BodyBudgetFull(self.budget.detail(len(chunk)), retry_after=1)
                self.received += len(chunk)
                return chunk
            if chunk is None:  # end of iteration
                if attempt == 0 or (self.length is not None and self.received != self.length):
                    break
                return None
        raise IncompleteBody(
            f"the body ended after {self.received} bytes without being complete (connection "
            "closed, or a chunked body without its terminating chunk; trailers are not accepted)"
        )

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = [
                (name.decode("latin-1"), value.decode("latin-1"))
                for name, value in message.get("headers", ())
            ]
            if self.failed:  # the rest of a failed body is unread: this connection is done
                self.headers.append(("connection", "close"))
        elif kind == "http.response.body":
            body = message.get("body", b"")
            if not isinstance(body, bytes):
                body = bytes(body)
            more = bool(message.get("more_body", False))
            if self.stream is None:
                if not more:
                    self.proto.response_bytes(self.status, self.headers, body)
                    self.sent = True
                    return
                self.stream = self.proto.response_stream(self.status, self.headers)
                self.sent = True
            if body:
                await self.stream.send_bytes(body)
            if not more:
                self.stream = None  # Granian ends the chunked answer when its transport is freed


class RSGIFront:
    """An RSGI application (``__rsgi__`` and its init/del hooks) in front of an ASGI app."""

    def __init__(
        self,
        app: ASGIApp,
        one_piece_limit: int,
        intake: IntakeLimits | None = None,
        on_client_fault: Callable[[str], None] | None = None,
        body_limit: Callable[[str, str], int | None] | None = None,
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
        """
        self.app = app
        self.one_piece_limit = one_piece_limit
        self.intake = intake or IntakeLimits()
        self.uploads = UploadGate(self.intake.max_uploads, on_drained=_trim_after_burst)
        self.budget = BodyBudget(self.intake.max_body_bytes_in_flight)
        self.on_client_fault = on_client_fault
        self.body_limit = body_limit
        self.lifespan = Lifespan(app)

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
        asgi_scope: dict[str, Any] = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": scope.http_version,
            "server": _address(scope.server),
            "client": _address(scope.client),
            "scheme": scope.scheme,
            "method": scope.method,
            "root_path": "",
            "path": path,
            # RSGI does not keep the raw target: re-encode the decoded path (UTF-8, quoted).
            "raw_path": quote(path, safe=_PATH_SAFE).encode("ascii"),
            "query_string": scope.query_string.encode("utf-8"),
            # Granian hands over only header values it could decode; they are ASCII.
            "headers": [
                (name.encode("latin-1"), value.encode("utf-8")) for name, value in headers.items()
            ],
            "state": self.lifespan.state.copy(),
        }
        if has_body and not self.uploads.enter():
            detail = f"{self.uploads.limit} uploads are in progress on this replica; retry shortly"
            self._unread(proto, scope.method, path, detail, "uploads_full")
            return
        exchange = _Exchange(
            proto,
            one_piece,
            has_body,
            BodyClock(self.intake, asyncio.get_running_loop().time()),
            announced,
            self._body_end(scope.method, path) if has_body else _no_body,
            self.budget,
        )
        asgi_scope[HOLD_KEY] = exchange.hold
        try:
            if has_body and one_piece:
                await exchange.prefetch()
            await self.app(asgi_scope, exchange.receive, exchange.send)
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


def _trim_after_burst() -> None:
    """Hand the heap a burst of uploads freed back to the kernel, off the event loop."""
    log.info("upload burst over: returning freed memory to the kernel")
    future = asyncio.get_running_loop().run_in_executor(None, malloc.trim)
    future.add_done_callback(intake.retrieve)


def _no_body(code: str | None, detail: str) -> None:
    """Body-end callback of a request without a body."""
