"""Body intake for the RSGI front: read deadlines, a minimum data rate and an upload cap.

Granian hands a request to the application once its headers are read; the body follows at
the client's pace. Without limits a client that sends headers and then stalls (or trickles a
byte a second) holds a connection, an application slot and a coroutine forever, and a
thousand of them starve every other client. Here:

- **Deadline.** The whole body must arrive by ``start + min(timeout, grace + length / rate)``:
  after ``grace`` seconds the client must have kept up an average of ``rate`` bytes per second.
  With a ``Content-Length`` the deadline is known at once (one timer for a one-piece read); a
  chunked body is checked before each chunk with the bytes received so far. Past it the read
  is cancelled (Granian drops the body), the client gets 408 and the connection is closed.
- **Upload cap.** At most ``max_uploads`` requests may be receiving a body at once; one more is
  answered 503 with ``Retry-After`` and ``Connection: close`` before any of its body is read,
  which frees its connection. Requests without a body (health checks, metadata) never wait for
  an upload slot, and Granian's connection limit is kept above the cap (checked at start), so
  stalled uploads cannot take the last connections.
- **Route limits.** A body announced larger than its route accepts (``request_max_body_size``
  of the POST handler the path names) is answered 413 at once, before any of it is read and
  before the application runs; a body sent to a route that takes none is never read here.
- **Byte budget.** The bytes of the bodies this HTTP process holds are counted as they arrive
  (a one-piece body once read, a streamed one chunk by chunk) until the answer is sent, so
  queued and computing requests count, an upload only with what it sent. A body that would
  take the total past ``max_body_bytes_in_flight`` is answered 503 with ``Retry-After``,
  which bounds the memory a burst of large batches can take whatever their number, while
  stalled uploads hold nothing of it (their cost is bounded by the upload cap and deadline).
- **Aborts.** A client that closes before sending its whole body, or a chunked body that ends
  without its terminating chunk, is an :class:`~workers.errors.IncompleteBody` (400), counted
  and logged on one line — never a 500 with a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from app.web.errors import BodyTimeout
from workers.errors import problem_type_of

T = TypeVar("T")


@dataclass(frozen=True)
class IntakeLimits:
    """How long and how slowly a body may arrive, and how many may arrive at once."""

    timeout_s: float = 60.0
    """Longest time any body may take."""
    grace_s: float = 5.0
    """Time before the minimum rate applies (connection set-up, slow start)."""
    min_rate_bytes_s: float = 16 * 1024
    """Average rate a body must keep up after the grace time."""
    max_uploads: int = 2048
    """Requests receiving a body at once; more are answered 503."""
    max_body_bytes_in_flight: int = 256 * 1024 * 1024
    """Bytes of bodies held at once, as they arrive until the answer; more are answered 503."""


class BodyClock:
    """The read deadline of one request's body, from its arrival."""

    __slots__ = ("limits", "started")

    def __init__(self, limits: IntakeLimits, started: float) -> None:
        """Start the clock at ``started`` (``loop.time()`` when the request arrived)."""
        self.limits = limits
        self.started = started

    def deadline(self, length: int) -> float:
        """Loop time by which ``length`` bytes must have arrived."""
        limits = self.limits
        allowed = limits.grace_s + length / limits.min_rate_bytes_s
        return self.started + min(limits.timeout_s, allowed)

    def expired(self, received: int, length: int | None) -> BodyTimeout:
        """The 408 for a body that missed its deadline."""
        limits = self.limits
        of = f" of {length}" if length is not None else ""
        return BodyTimeout(
            f"the body did not arrive in time: {received}{of} bytes after "
            f"{asyncio.get_running_loop().time() - self.started:.1f} s; send it within "
            f"{limits.timeout_s:g} s and, after the first {limits.grace_s:g} s, at "
            f"{limits.min_rate_bytes_s:g} bytes/s or faster"
        )


def retrieve(task: asyncio.Future[Any]) -> None:
    """Consume the outcome of a read nobody waits for any more (no 'never retrieved' log)."""
    if not task.cancelled():
        task.exception()


async def within(deadline: float, read: Callable[[], Awaitable[T]]) -> tuple[bool, T | None]:
    """Await ``read()`` until ``deadline`` (loop time): ``(True, value)`` or ``(False, None)``.

    A read that misses the deadline is cancelled: Granian then drops the request body, and
    hyper closes the connection once the answer is written (a pending read would keep it
    open, holding one of Granian's connection slots, for as long as the client wants).
    """
    task: asyncio.Future[T] = asyncio.ensure_future(read())
    try:
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        done, _ = await asyncio.wait((task,), timeout=timeout)
    except BaseException:
        task.cancel()
        task.add_done_callback(retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(retrieve)
        return False, None
    return True, task.result()


class UploadGate:
    """Counts the requests receiving a body; refuses one beyond ``limit``.

    A burst of uploads leaves their buffers' memory freed inside the process (glibc keeps up
    to the trim threshold of free heap, 64 MiB by default, for the next requests). When the
    uploads in progress fall back to a few after a burst of at least ``limit // 8``,
    ``on_drained`` runs once, to hand that memory back (``malloc_trim`` in a thread).
    """

    __slots__ = ("active", "limit", "on_drained", "peak", "refused")

    DRAINED = 8
    """Uploads in progress at or below which a burst counts as over."""

    def __init__(self, limit: int, on_drained: Callable[[], None] | None = None) -> None:
        """Allow ``limit`` concurrent uploads."""
        self.limit = limit
        self.active = 0
        self.peak = 0
        self.refused = 0
        self.on_drained = on_drained

    def enter(self) -> bool:
        """Take a slot; False (and counted) when every slot is taken."""
        if self.active >= self.limit:
            self.refused += 1
            return False
        self.active += 1
        self.peak = max(self.peak, self.active)
        return True

    def leave(self) -> None:
        """Give a slot back; the end of a burst calls ``on_drained``."""
        self.active -= 1
        if self.active <= self.DRAINED and self.peak >= max(self.limit // 8, 2 * self.DRAINED):
            self.peak = self.active
            if self.on_drained is not None:
                self.on_drained()


class RouteLimits:
    """The largest body each body-taking route accepts, by method and path."""

    __slots__ = ("_routes",)

    def __init__(self, routes: list[tuple[str, set[str], int]]) -> None:
        """``routes``: (path template with ``{name:type}`` parameters, methods, byte limit)."""
        self._routes = [(_pattern(path), methods, limit) for path, methods, limit in routes]

    def __call__(self, method: str, path: str) -> int | None:
        """The limit of the route ``method path`` names; None when it takes no body.

        Paths are matched as the router matches them: repeated and trailing slashes ignored.
        """
        if "//" in path or (path.endswith("/") and len(path) > 1):
            path = _SLASHES.sub("/", path).rstrip("/") or "/"
        for pattern, methods, limit in self._routes:
            if method in methods and pattern.match(path):
                return limit
        return None


_SLASHES = re.compile("/{2,}")


def _pattern(template: str) -> re.Pattern[str]:
    """A path template's regular expression: each ``{parameter}`` segment is one segment."""
    segments = template.split("/")
    parts = [
        "[^/]+" if seg.startswith("{") and seg.endswith("}") else re.escape(seg) for seg in segments
    ]
    return re.compile("/".join(parts) + r"\Z")


HOLD_KEY = "heimdall.hold"
"""ASGI scope key of a request's ``hold(nbytes) -> bool``: more bytes for the request's life
from the budget (a ``/v2`` body inflated from a few kB); False when they do not fit."""


class BodyBudget:
    """Bytes of request bodies held, from admission until the answer is sent; capped."""

    __slots__ = ("held", "limit", "refused")

    def __init__(self, limit: int) -> None:
        """Allow ``limit`` bytes at once."""
        self.limit = limit
        self.held = 0
        self.refused = 0

    def take(self, nbytes: int, own: int = 0) -> bool:
        """Hold ``nbytes`` more; False (and counted) when that would pass the limit.

        A request that already holds everything held (``own``) always may: the body limits,
        which the budget is at least, cap it (413) rather than the budget (503).
        """
        if self.held + nbytes > self.limit and self.held > own:
            self.refused += 1
            return False
        self.held += nbytes
        return True

    def give(self, nbytes: int) -> None:
        """Give back bytes taken earlier."""
        self.held -= nbytes

    def detail(self, nbytes: int) -> str:
        """What a refused client is told."""
        return (
            f"this replica holds {self.held} bytes of request bodies (its budget is "
            f"{self.limit}); a body of {nbytes} bytes more does not fit; retry shortly"
        )


def too_large(announced: int, limit: int) -> str:
    """The detail of a 413 answered on the announced length."""
    return (
        f"the body ({announced} bytes announced) exceeds this endpoint's size limit of "
        f"{limit} bytes; send a smaller body (batches: fewer items)"
    )


def refusal(path: str, detail: str, reason: str) -> tuple[int, list[tuple[str, str]], bytes]:
    """An answer before any of the body is read: 413 (``too_large``) or 503 + Retry-After."""
    status, title = (413, "Body too large") if reason == "too_large" else (503, "Overloaded")
    body: dict[str, str | int]
    if path.startswith("/v2/"):  # the Open Inference Protocol's error shape
        body, media = {"error": detail}, "application/json"
    else:
        media = "application/problem+json"
        body = {
            "type": problem_type_of(reason),
            "title": title,
            "status": status,
            "detail": detail,
            "kind": "problem",
        }
    headers = [("content-type", media), ("connection", "close")]
    if status == 503:
        headers.append(("retry-after", "1"))
    return status, headers, json.dumps(body).encode()


async def next_chunk(chunks: Any) -> bytes | None:
    """The next chunk of a Granian body iterator, None at its end."""
    with contextlib.suppress(StopAsyncIteration):
        return bytes(await chunks.__anext__())
    return None
