"""Errors about a request's content and the feedback store, below HTTP.

Raised by the serving core (and by the HTTP edge when it decodes a body); rendered as
problem details like every :class:`~workers.errors.ServiceError`.
"""

from __future__ import annotations

from http import HTTPStatus

from workers.errors import NotFound, ServiceError


class PayloadTooLarge(ServiceError):
    """The body or the batch exceeds a configured limit (413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    title = "Payload too large"
    code = "too_large"


class UnknownRequest(NotFound):
    """Feedback names a request id this service has no answer for (404)."""

    title = "Unknown request id"
    code = "unknown_request"
    problem_type = "urn:heimdall:problem:unknown-request"


class ExpiredRequest(NotFound):
    """Feedback arrives after the answer's retention window (404)."""

    title = "Expired request id"
    code = "expired_request"
    problem_type = "urn:heimdall:problem:expired-request"


class Forbidden(ServiceError):
    """The operation is turned off on this service (403)."""

    status = HTTPStatus.FORBIDDEN
    title = "Forbidden"
    code = "forbidden"


class Conflict(ServiceError):
    """The request contradicts what was recorded before (409)."""

    status = HTTPStatus.CONFLICT
    title = "Conflict"
    code = "conflict"


class TooManyRequests(ServiceError):
    """The client exceeded its rate limit; retry after ``retry_after`` seconds (429)."""

    status = HTTPStatus.TOO_MANY_REQUESTS
    title = "Too many requests"
    code = "rate_limited"


class StoreUnavailable(ServiceError):
    """The shared store (Redis) the operation needs is down or slow (503)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    title = "Store unavailable"
    code = "store_unavailable"
