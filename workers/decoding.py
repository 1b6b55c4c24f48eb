"""The one decoding boundary for request bodies: every decoder failure becomes a 4xx.

A body decoder can fail in more ways than ``msgspec.DecodeError``: nesting deeper than the
interpreter's recursion limit (inside a field the schema does not know, so no type stops it)
raises ``RecursionError``; a number with hundreds of digits raises ``OverflowError`` or
``ValueError`` once something converts it; a malformed value can raise ``TypeError``. All of
them are the client's fault, so :func:`decode` maps *any* exception a decoder raises to
:class:`~workers.errors.MalformedRequest` (400) or, for schema violations, keeps the field
path. Nesting is bounded by msgspec itself (it checks the recursion limit before each level,
in C, so a deep document costs one failed descent, never a crash), and JSON numbers are
bounded by CPython's integer digit limit; this module turns both into a clear message.

Each rejected body is logged on one line (no traceback: it is not a server fault).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import msgspec

from workers.errors import MalformedRequest

log = logging.getLogger("heimdall.decoding")

T = TypeVar("T")
Format = Literal["JSON", "MessagePack"]


def _field_path(message: str) -> tuple[str, str | None]:
    """Split msgspec's ``"... - at `$.a[0]`"`` into the message and the path."""
    if " - at `" in message:
        text, path = message.rsplit(" - at `", 1)
        return text, path.rstrip("`")
    return message, None


def _reason(exc: BaseException, what: str) -> str:
    """A client-facing sentence for a decoder failure that is not a schema violation."""
    if isinstance(exc, RecursionError):
        return f"{what} is nested too deeply; flatten it"
    if isinstance(exc, OverflowError | ValueError) and "digit" in str(exc).lower():
        return f"{what} holds a number with too many digits"
    if isinstance(exc, OverflowError):
        return f"{what} holds a number out of range"
    if isinstance(exc, MemoryError):
        return f"{what} is too large to decode"
    return f"{what} is not valid: {exc}"


def reject(
    exc: BaseException, what: str, where: str = "", fmt: Format = "JSON"
) -> MalformedRequest:
    """The 400 for a decoder failure of any type, logged on one line.

    Args:
        exc: what the decoder raised.
        what: the thing being decoded, for the message (``"the body"``, ``"input 'x'"``).
        where: request method and path, for the log line.
        fmt: the wire format, named when the bytes do not parse.
    """
    if isinstance(exc, msgspec.ValidationError):
        text, path = _field_path(str(exc))
        # msgspec names no path for the document itself (a missing top-level field): "$",
        # as the same fault in a batch item is "$.items[i]".
        error = MalformedRequest(text + _hint(text), field=path or "$")
    elif isinstance(exc, msgspec.DecodeError):
        error = MalformedRequest(f"{what} is not valid {fmt}: {exc}")
    else:
        error = MalformedRequest(_reason(exc, what))
    log.info(
        "rejected body %s: %s (%s)", where or "-", error.detail, type(exc).__name__
    )  # one line, no traceback: a client fault
    return error


def _hint(message: str) -> str:
    if "base64" in message:
        return "; iq must be base64 of little-endian complex64 bytes"
    return ""


def decode(
    decoder: Callable[[Any], T],
    body: bytes | bytearray | memoryview,
    what: str,
    where: str = "",
    fmt: Format = "JSON",
) -> T:
    """Run ``decoder`` on ``body``; any failure becomes :class:`MalformedRequest` (400).

    Args:
        decoder: a reused msgspec decoder's ``decode`` (or any callable on bytes).
        body: the bytes to decode.
        what: the thing being decoded, for the message (``"the JSON body"``).
        where: request method and path, for the one log line of a rejection.
        fmt: the wire format, named when the bytes do not parse.

    Raises:
        MalformedRequest: the decoder raised anything at all.
    """
    try:
        return decoder(body)
    except Exception as exc:  # any decoder failure (RecursionError included) is the client's
        raise reject(exc, what, where, fmt) from exc
