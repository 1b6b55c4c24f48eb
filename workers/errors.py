"""The service's error taxonomy, free of any web framework.

Each class carries the HTTP status and a short title; the HTTP layer renders them as RFC 9457
problem details. Errors raised inside worker processes cross the process boundary as data
(:class:`workers.messages.ItemError`) and are rebuilt here by :func:`from_code`.
"""

from __future__ import annotations

from http import HTTPStatus

PROBLEM_TYPE_PREFIX = "urn:heimdall:problem:"


def problem_type_of(code: str) -> str:
    """The RFC 9457 problem ``type`` URI of an error code (``no_signal`` → ``…:no-signal``)."""
    return PROBLEM_TYPE_PREFIX + code.replace("_", "-")


class ServiceError(Exception):
    """Base class: a failure the client is told about with a status and a reason."""

    status: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR
    title = "Internal error"
    code = "internal"
    problem_type = "urn:heimdall:problem:internal"
    """RFC 9457 ``type``: ``urn:heimdall:problem:<code>`` (``_`` written ``-``), one per class.

    Clients branch on ``type`` rather than on ``title`` text; subclasses get theirs from
    their ``code`` unless they name one.
    """

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "problem_type" not in cls.__dict__:
            cls.problem_type = problem_type_of(cls.code)

    def __init__(self, detail: str, *, field: str | None = None, retry_after: int | None = None):
        """Create the error.

        Args:
            detail: what went wrong and what to fix, for the client.
            field: JSON path of the offending field (``$.receivers[2].iq``), if any.
            retry_after: seconds after which a retry may succeed (503 answers).
        """
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.retry_after = retry_after


class InvalidInput(ServiceError):
    """The request is well-formed but its content does not fit the model (422)."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    title = "Invalid input"
    code = "invalid_input"


class NoSignal(InvalidInput):
    """Too few receivers detect a signal to localise anything (422, type ``…:no-signal``)."""

    title = "No signal"
    code = "no_signal"


class MalformedRequest(ServiceError):
    """The body cannot be decoded into the request schema (400)."""

    status = HTTPStatus.BAD_REQUEST
    title = "Malformed request"
    code = "malformed"


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


class PayloadTooLarge(ServiceError):
    """The body or the batch exceeds a configured limit (413)."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
    title = "Payload too large"
    code = "too_large"


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


class NonFiniteOutput(ServiceError):
    """The model produced NaN or infinity for these (finite) inputs; not answered as data (422).

    The inputs are outside what the model can compute, so the client is told which output of
    which item, instead of receiving ``null`` or a position at infinity.
    """

    status = HTTPStatus.UNPROCESSABLE_ENTITY
    title = "Non-finite model output"
    code = "nonfinite_output"


class NotFound(ServiceError):
    """An unknown model or version (404)."""

    status = HTTPStatus.NOT_FOUND
    title = "Not found"
    code = "not_found"


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


class Overloaded(ServiceError):
    """The dispatch queue is full; retry later (503 with Retry-After)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    title = "Overloaded"
    code = "overloaded"


class NotReady(ServiceError):
    """No worker serves the routed model version yet, or the pool is shutting down (503)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    title = "Not ready"
    code = "not_ready"


class DeadlineExceeded(ServiceError):
    """The request's deadline passed before a worker could take it (504)."""

    status = HTTPStatus.GATEWAY_TIMEOUT
    title = "Deadline exceeded"
    code = "deadline"


class WorkerFailure(ServiceError):
    """A worker died twice under the same request; it was not answered (503)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    title = "Worker failure"
    code = "worker_failure"


class ModelLoadError(ServiceError):
    """A model version could not be fetched, verified, loaded or validated."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    title = "Model load failed"
    code = "model_load"


_BY_CODE: dict[str, type[ServiceError]] = {
    cls.code: cls
    for cls in (
        ServiceError,
        InvalidInput,
        NoSignal,
        MalformedRequest,
        UnsupportedMediaType,
        NotAcceptable,
        PayloadTooLarge,
        IncompleteBody,
        BodyTimeout,
        NonFiniteOutput,
        NotFound,
        UnknownRequest,
        ExpiredRequest,
        Forbidden,
        Conflict,
        TooManyRequests,
        StoreUnavailable,
        Overloaded,
        NotReady,
        DeadlineExceeded,
        WorkerFailure,
        ModelLoadError,
    )
}


def from_code(code: str, detail: str, field: str | None = None) -> ServiceError:
    """Rebuild an error that crossed a process boundary as ``(code, detail, field)``."""
    return _BY_CODE.get(code, ServiceError)(detail, field=field)
