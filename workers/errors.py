"""The service's error taxonomy, free of any web framework.

Each class carries the HTTP status and a short title; the HTTP layer renders them as RFC 9457
problem details. Errors raised inside worker processes cross the process boundary as data
(:class:`workers.messages.ItemError`) and are rebuilt here by :func:`from_code`. This module
holds the base class and what the pool and its workers raise (workers decode and check
``/v1/predict`` bodies, so :class:`MalformedRequest` is here too); errors about the feedback
store live in app/serving/errors.py, those of HTTP itself (media types,
body intake) in app/web/errors.py.
"""

from __future__ import annotations

from http import HTTPStatus

PROBLEM_TYPE_PREFIX = "urn:heimdall:problem:"

_BY_CODE: dict[str, type[ServiceError]] = {}
"""Every error class by code; a subclass registers itself when its module is imported."""


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
        _BY_CODE.setdefault(cls.code, cls)

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


class Overloaded(ServiceError):
    """The dispatch queue is full; retry later (503 with Retry-After)."""

    status = HTTPStatus.SERVICE_UNAVAILABLE
    title = "Overloaded"
    code = "overloaded"


class MalformedRequest(ServiceError):
    """The body cannot be decoded into the request schema (400)."""

    status = HTTPStatus.BAD_REQUEST
    title = "Malformed request"
    code = "malformed"


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


def from_code(code: str, detail: str, field: str | None = None) -> ServiceError:
    """Rebuild an error that crossed a process boundary as ``(code, detail, field)``.

    Workers send only the codes defined here; an unknown code is a generic 500.
    """
    return _BY_CODE.get(code, ServiceError)(detail, field=field)
