"""Errors of HTTP itself: media types, content negotiation and body intake."""

from __future__ import annotations

from http import HTTPStatus

from workers.errors import ServiceError


class UnsupportedMediaType(ServiceError):
    """The body's media type is neither JSON nor MessagePack (415)."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE
    title = "Unsupported media type"
    code = "unsupported_media_type"


class NotAcceptable(ServiceError):
    """The client accepts no media type the service can answer with (406)."""

    status = HTTPStatus.NOT_ACCEPTABLE
    title = "Not acceptable"
    code = "not_acceptable"


class IncompleteBody(ServiceError):
    """The client closed the connection, or ended its body, before sending all of it (400)."""

    status = HTTPStatus.BAD_REQUEST
    title = "Incomplete body"
    code = "incomplete_body"


class BodyTimeout(ServiceError):
    """The body did not arrive within the read deadline or at the minimum data rate (408)."""

    status = HTTPStatus.REQUEST_TIMEOUT
    title = "Request timeout"
    code = "body_timeout"


class BodyBudgetFull(ServiceError):
    """The bodies held would pass ``HEIMDALL_MAX_BODY_BYTES_IN_FLIGHT`` (503, Retry-After)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    title = "Overloaded"
    code = "body_budget_full"
