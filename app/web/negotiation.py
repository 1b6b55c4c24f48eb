"""Content negotiation of /v1: the body's media type (415) and the answer's (406).

Shared by the Litestar routes and the direct route of the RSGI front (app/web/direct.py), so
both refuse and choose alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from litestar import Request

from app.web.errors import NotAcceptable, UnsupportedMediaType

JSON = "application/json"
MSGPACK = "application/msgpack"
PROBLEM = "application/problem+json"
_MSGPACK_TYPES = {"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"}


def body_is_msgpack(request: Request[Any, Any, Any]) -> bool:
    """Whether the body is MessagePack (True) or JSON (False).

    Raises:
        UnsupportedMediaType: any other content type, or a content coding.
    """
    return media_is_msgpack(
        request.headers.get("content-type", ""), request.headers.getall("content-encoding", [])
    )


def media_is_msgpack(content_type: str, content_codings: list[str]) -> bool:
    """Whether a body so labelled is MessagePack (True) or JSON (False).

    ``content_codings``: every ``Content-Encoding`` value of the request.

    Raises:
        UnsupportedMediaType: any other content type, or a content coding.
    """
    # Every Content-Encoding header and list item (`identity` then `gzip` is still gzip).
    codings = ",".join(content_codings).lower().split(",")
    coding = ", ".join(c.strip() for c in codings if c.strip() not in ("identity", ""))
    if coding:
        # Not decoded here: a gzip body was read as JSON (400), a plain one labelled br as-is.
        raise UnsupportedMediaType(
            f"Content-Encoding {coding!r} is not supported on /v1; send the body unencoded "
            "(only /v2 accepts gzip and deflate)"
        )
    media = content_type.split(";")[0].strip().lower()
    if media in _MSGPACK_TYPES:
        return True
    if media in ("application/json", "") or media.endswith("+json"):
        return False
    raise UnsupportedMediaType(
        f"Content-Type {media!r} is not supported; send application/json or application/msgpack"
    )


def wants_msgpack(request: Request[Any, Any, Any]) -> bool:
    """Whether the client asked for a MessagePack answer.

    Raises:
        NotAcceptable: the client accepts neither JSON nor MessagePack.
    """
    return prefers_msgpack(request.headers.get("accept", ""))


def _accept_ranges(accept: str) -> list[tuple[str, float]]:
    """``Accept`` as ``(media range, q)`` pairs; a malformed q counts as 1 (lenient)."""
    ranges = []
    for part in accept.lower().split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if not media:
            continue
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = min(1.0, max(0.0, float(value)))
                except ValueError:
                    q = 1.0
        ranges.append((media, q))
    return ranges


def _quality(ranges: list[tuple[str, float]], names: Callable[[str], bool]) -> tuple[float, int]:
    """Quality of the media type(s) ``names`` matches: the most specific range wins (RFC 9110).

    Returns ``(q, specificity)`` with specificity 2 for an exact match, 1 for ``application/*``,
    0 for ``*/*`` and -1 when nothing matches (q 0).
    """
    best: tuple[float, int] = (0.0, -1)
    for media, q in ranges:
        specificity = 2 if names(media) else 1 if media == "application/*" else 0
        if media not in ("*/*", "application/*") and specificity != 2:
            continue
        if specificity > best[1]:
            best = (q, specificity)
    return best


def prefers_msgpack(accept: str) -> bool:
    """Whether an ``Accept`` header prefers MessagePack over JSON (q-values honoured).

    The higher q wins; ``q=0`` excludes a type; on equal q a type named explicitly beats a
    wildcard and otherwise JSON wins. No ``Accept`` means JSON.

    Raises:
        NotAcceptable: neither JSON nor MessagePack is acceptable.
    """
    if not accept.strip():
        return False
    ranges = _accept_ranges(accept)
    json_q = _quality(ranges, lambda m: m == JSON or m.endswith("+json"))
    msgpack_q = _quality(ranges, lambda m: m in _MSGPACK_TYPES)
    if json_q[0] <= 0 and msgpack_q[0] <= 0:
        raise NotAcceptable("this endpoint answers application/json or application/msgpack")
    return msgpack_q > json_q
