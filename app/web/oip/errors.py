"""The protocol's error answers: ``{"error": message}`` with the error's status.

tritonclient and perf_analyzer cannot read problem details, so ``/v2`` paths answer every
error — the service's, the framework's (404, 405, 413) and unexpected ones — in this format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from workers.errors import ServiceError

log = logging.getLogger("heimdall.oip")

JSON = "application/json"
_json_encoder = msgspec.json.Encoder()


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> Response[bytes]:
    """The protocol's error body: ``{"error": message}``."""
    return Response(
        _json_encoder.encode({"error": message}),
        status_code=status,
        media_type=JSON,
        headers=headers,
    )


def oip_service_error_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """ServiceError → protocol error with its status (Retry-After on 503)."""
    if not isinstance(exc, ServiceError):
        return oip_internal_error_handler(_, exc)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    message = f"{exc.field}: {exc.detail}" if exc.field else exc.detail
    return error_response(int(exc.status), message, headers)


def oip_http_error_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Framework errors (413, path parameters) → protocol error."""
    if not isinstance(exc, HTTPException):
        return oip_internal_error_handler(_, exc)
    detail = str(exc.detail)
    if exc.status_code == 413:
        detail = f"{detail}: the body exceeds the /v2 infer size limit"
    return error_response(exc.status_code, detail, dict(exc.headers or {}) or None)


ExceptionHandler = Callable[[Request[Any, Any, Any], Exception], Response[bytes]]


def v2_aware(handler: ExceptionHandler) -> ExceptionHandler:
    """An app-level handler that answers ``/v2`` paths in the protocol's error format.

    The ``/v2`` routes carry their own handlers; this covers what reaches the application
    level on a ``/v2`` path: unknown paths (404), wrong methods (405) and the like, which
    tritonclient and perf_analyzer cannot read as problem details.
    """

    def dispatch(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        path = request.url.path
        if path == "/v2" or path.startswith("/v2/"):
            if isinstance(exc, HTTPException):
                return oip_http_error_handler(request, exc)
            return oip_service_error_handler(request, exc)
        return handler(request, exc)

    return dispatch


def oip_internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Anything unexpected: log it, answer a 500 protocol error."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "an unexpected error occurred; it has been logged")


EXCEPTION_HANDLERS: Mapping[type[Exception], Callable[..., Response[bytes]]] = {
    ServiceError: oip_service_error_handler,
    HTTPException: oip_http_error_handler,
    Exception: oip_internal_error_handler,
}
