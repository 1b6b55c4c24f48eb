"""One RSGI request seen as an ASGI ``receive``/``send`` pair, with the body intake rules.

Split from app/web/rsgi.py (the front): the front builds one :class:`Exchange` per request and
hands the application its ``receive`` and ``send``, or lets a direct route read through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from granian._granian import RSGIProtocolClosed as ProtocolClosed

from app.web import intake
from app.web.errors import BodyBudgetFull, IncompleteBody
from app.web.intake import BodyBudget, BodyClock
from app.web.lifespan import Message
from workers.errors import ServiceError


class Exchange:
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
        """ASGI ``receive``: the body (read through the intake rules), then the disconnect."""
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
        """ASGI ``send``: one-message answers go out whole, others are streamed."""
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
