"""``/v2`` request bodies sent ``Content-Encoding: gzip`` or ``deflate``, inflated safely.

A compression bomb costs the body limit in memory once: bodies inflate one at a time, in a
thread, step by step, stopping as soon as the output passes the limit (design notes,
"Decompression").
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable
from typing import Any

from litestar import Request

from app.serving.errors import PayloadTooLarge
from app.web.errors import BodyBudgetFull, UnsupportedMediaType
from app.web.intake import HOLD_KEY
from app.web.oip.codec import Body
from workers import malloc
from workers.errors import MalformedRequest

INFLATE_SLICE = 1 << 20
"""Output bytes inflated per step: the running total is checked after each one."""
TRIM_AFTER = 16 << 20
"""Inflated bytes above which their memory is handed back to the kernel once freed."""
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _drop(pieces: list[bytes]) -> None:
    """Free inflated pieces one at a time, then give the memory back to the kernel.

    The event loop's thread can take the GIL between pieces (freeing 128 MiB at once holds it
    for ≈ 15 ms). The pieces live in this thread's malloc arena, which glibc trims only from
    its top: without ``malloc_trim`` a bomb left ≈ 190 MiB resident after it was refused.
    """
    size = sum(len(p) for p in pieces)
    while pieces:
        pieces.pop()
    if size > TRIM_AFTER:
        malloc.trim()


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Inflate ``body`` step by step, stopping as soon as the output passes ``limit``.

    At most ``limit`` bytes of output exist at any time, however small the input (a 1 MB gzip
    bomb expands to 1 GB). Runs in a thread: zlib releases the GIL while it inflates, and the
    output is kept as 1 MiB pieces (a growing buffer is copied and remapped with the GIL
    held, ≈ 10 ms at a time near 128 MiB), joined once only when the whole body fits.

    Raises:
        PayloadTooLarge: the inflated body exceeds ``limit``.
        MalformedRequest: not valid ``encoding`` data, or truncated.
    """
    inflater = zlib.decompressobj(_WBITS[encoding])
    pieces: list[bytes] = []
    total = 0
    data = body
    try:
        while True:
            # One byte past the limit is enough to know; never inflate more than that.
            want = min(INFLATE_SLICE, limit + 1 - total)
            piece = inflater.decompress(data, want)
            if total + len(piece) > limit:
                _drop(pieces)
                raise PayloadTooLarge(
                    f"the {encoding} body inflates to more than {limit} bytes (stopped there)"
                )
            pieces.append(piece)
            total += len(piece)
            data = inflater.unconsumed_tail
            if inflater.eof or (not data and len(piece) < want):
                break
    except zlib.error as exc:
        _drop(pieces)
        raise MalformedRequest(f"the body is not valid {encoding} data: {exc}") from exc
    if not inflater.eof:
        _drop(pieces)
        raise MalformedRequest(f"the {encoding} body is truncated")
    if len(pieces) == 1:
        return pieces[0]
    body = b"".join(pieces)
    _drop(pieces)
    return body


async def read_body(
    request: Request[Any, Any, Any], limit: int, inflating: asyncio.Semaphore
) -> Body:
    """The request body, inflated (off the event loop) when sent gzip- or deflate-encoded.

    ``inflating`` lets one body inflate at a time, so compression bombs sent together cost
    the limit in memory once, not once each.

    Raises:
        UnsupportedMediaType: another content encoding.
        PayloadTooLarge: the inflated body exceeds ``limit``.
        MalformedRequest: the encoded body is corrupt or truncated.
    """
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in _WBITS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate"
        )
    async with inflating:
        inflated = await asyncio.to_thread(inflate, body, encoding, limit)
    hold: Callable[[int], bool] | None = request.scope.get(HOLD_KEY)  # type: ignore[assignment]
    if hold is not None and not hold(len(inflated) - len(body)):
        # The budget counted the encoded bytes; the inflated ones live as long as the request.
        raise BodyBudgetFull(
            f"the body inflates to {len(inflated)} bytes, more than this replica's body budget "
            "has free now; retry shortly",
            retry_after=1,
        )
    return inflated
