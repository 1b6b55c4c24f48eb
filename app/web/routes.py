"""HTTP routes: decode the body, call one service method, encode the answer.

Bodies are JSON or MessagePack (``Content-Type``); answers follow ``Accept``. Every error is
an RFC 9457 problem-details document.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Container
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from app.registry.known import KnownVersions
from app.serving.answers import problem_from
from app.serving.errors import PayloadTooLarge
from app.serving.feedback import FeedbackService
from app.serving.schemas import (
    BatchRequest,
    BatchResponse,
    FeedbackRequest,
    FieldError,
    Problem,
)
from app.serving.service import InferenceService
from app.serving.status import ModelsState, Readiness
from app.web.negotiation import (
    JSON,
    MSGPACK,
    PROBLEM,
    body_is_msgpack,
    wants_msgpack,
)
from workers import decoding
from workers.decoding import Format
from workers.errors import NotFound, ServiceError, problem_type_of
from workers.request import JSON_BODY, MSGPACK_BODY

log = logging.getLogger("heimdall.http")


_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()
_decoders: dict[tuple[type, bool], Any] = {}


def _decoder(kind: type, msgpack: bool) -> Any:
    key = (kind, msgpack)
    if key not in _decoders:
        _decoders[key] = msgspec.msgpack.Decoder(kind) if msgpack else msgspec.json.Decoder(kind)
    return _decoders[key]


OFFLOAD_BYTES = 1 << 20
"""Bodies larger than this are decoded in a thread (as ``/v2`` does)."""


async def decode_body(request: Request[Any, Any, Any], kind: type) -> Any:
    """Decode the body into ``kind`` through the one decoding boundary (workers/decoding.py).

    Raises:
        MalformedRequest: undecodable or schema-violating body (with the field path), whatever
            the decoder raised.
    """
    msgpack = body_is_msgpack(request)
    body = await request.body()
    fmt: Format = "MessagePack" if msgpack else "JSON"
    where = f"{request.method} {request.url.path}"
    decode = _decoder(kind, msgpack).decode
    if len(body) > OFFLOAD_BYTES:
        # A 64 MB batch takes ~0.2 s to decode: in a thread the loop keeps answering (the GIL
        # is handed over every few ms) instead of holding health checks for all of it.
        return await asyncio.to_thread(decoding.decode, decode, body, "the body", where, fmt)
    return decoding.decode(decode, body, "the body", where, fmt)


def encode(
    request: Request[Any, Any, Any], value: Any, status: int = 200, msgpack: bool | None = None
) -> Response[bytes]:
    """Encode ``value`` as MessagePack or JSON according to ``Accept`` (or ``msgpack``)."""
    if wants_msgpack(request) if msgpack is None else msgpack:
        return Response(_msgpack_encoder.encode(value), status_code=status, media_type=MSGPACK)
    return Response(_json_encoder.encode(value), status_code=status, media_type=JSON)


def problem_response(problem: Problem, headers: dict[str, str] | None = None) -> Response[bytes]:
    """Render a problem-details document."""
    return Response(
        _json_encoder.encode(problem),
        status_code=problem.status,
        media_type=PROBLEM,
        headers=headers,
    )


def service_error_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """ServiceError → problem details (with Retry-After for 503)."""
    assert isinstance(exc, ServiceError)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return problem_response(problem_from(exc), headers)


def http_error_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Framework HTTP errors (404, 405, 413, parameter validation) → problem details."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    detail = str(exc.detail)
    errors: list[FieldError] = []
    if status == 413:
        detail = f"{detail}: the body exceeds this endpoint's size limit"
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict):
            errors.append(FieldError(str(item.get("key", "")), str(item.get("message", ""))))
    headers = dict(exc.headers or {})
    title = {404: "Not found", 405: "Method not allowed", 413: "Payload too large"}.get(
        status, "Bad request" if status < 500 else "Server error"
    )
    kind = _FRAMEWORK_PROBLEMS.get(status, "malformed" if status < 500 else "internal")
    problem = Problem(title, status, detail, type=problem_type_of(kind), errors=errors)
    return problem_response(problem, headers or None)


_FRAMEWORK_PROBLEMS = {
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    415: "unsupported_media_type",
}
"""Problem codes of Litestar's own HTTP errors, matching the service's where they overlap."""


INTERNAL_PROBLEM = Problem(
    "Internal error",
    HTTP_500_INTERNAL_SERVER_ERROR,
    "an unexpected error occurred; it has been logged",
    type=problem_type_of("internal"),
)
"""The answer to anything unexpected (the direct route's too)."""


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Anything unexpected: log it with the request path, answer a 500 problem."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(INTERNAL_PROBLEM)


def metrics_route(scrape: Callable[[], Awaitable[bytes]]) -> HTTPRouteHandler:
    """``GET /metrics``: Prometheus exposition of the replica's OpenTelemetry metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST

    # Litestar appends "; charset=utf-8" to text/* itself: name it once.
    media_type = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")

    @get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response[bytes]:
        return Response(await scrape(), media_type=media_type)

    return metrics


def client_address(request: Request[Any, Any, Any]) -> str:
    """The peer address a rate limit applies to (the proxy's, behind one)."""
    client = request.client
    return client.host if client is not None else "unknown"


def require_version_number(version: str) -> None:
    """Refuse a path segment that is no version number (`abc`, `..` got 200 with zeros).

    Raises:
        NotFound: not ASCII digits.
    """
    if not (version.isascii() and version.isdigit()) or version != str(int(version)):
        raise NotFound(f"{version!r} is not a version number (digits, no leading zero)")
    if int(version) >= 2**63:  # beyond any registry's version numbers (SQLite INTEGER)
        raise NotFound(f"{version!r} is not a version number this registry can have")


async def require_registered(version: str, resident: Container[str], known: KnownVersions) -> None:
    """Refuse a version number the registry never had (a resident one is known).

    When the registry cannot be asked, the version is given the benefit of the doubt.

    Raises:
        NotFound: not a version number, or not in the registry.
    """
    require_version_number(version)
    if version not in resident and await known.exists(version) is False:
        raise NotFound(f"version {version} is not in the registry")


def build_routes(
    service: InferenceService,
    feedback: FeedbackService,
    *,
    models_state: Callable[[], ModelsState],
    live: Callable[[], dict[str, dict[str, Any]]],
    readiness: Callable[[], tuple[bool, Readiness]],
    max_body: int,
    max_batch_body: int,
    known: KnownVersions,
) -> list[HTTPRouteHandler]:
    """The /v1 and /health route handlers bound to ``service``."""

    @post(
        "/v1/predict",
        request_max_body_size=max_body,
        summary="Localise one transmitter",
        status_code=200,
    )
    async def predict(request: Request[Any, Any, Any]) -> Response[bytes]:
        msgpack = wants_msgpack(request)  # 406 before reading the body
        encoding = MSGPACK_BODY if body_is_msgpack(request) else JSON_BODY
        body = await request.body()  # undecoded: a pool worker decodes it (issue 23)
        return encode(request, await service.predict(body, encoding), msgpack=msgpack)

    @post(
        "/v1/predict/batch",
        request_max_body_size=max_batch_body,
        status_code=200,
        summary="Localise up to 256 transmitters",
    )
    async def predict_batch(request: Request[Any, Any, Any]) -> Response[bytes]:
        msgpack = wants_msgpack(request)  # 406 before reading the body
        body = await decode_body(request, BatchRequest)
        result = BatchResponse(await service.predict_batch(body.items))
        return encode(request, result, msgpack=msgpack)

    @post(
        "/v1/feedback",
        request_max_body_size=64 * 1024,
        summary="Ground truth for an earlier answer",
        status_code=200,
    )
    async def post_feedback(request: Request[Any, Any, Any]) -> Response[bytes]:
        msgpack = wants_msgpack(request)
        body = await decode_body(request, FeedbackRequest)
        result = await feedback.submit(body, client_address(request))
        return encode(request, result, msgpack=msgpack)

    @get("/v1/models/{version:str}/field", summary="Field figures of one version")
    async def model_field(
        request: Request[Any, Any, Any], version: FromPath[str]
    ) -> Response[bytes]:
        await require_registered(version, service.contexts, known)
        model = next(iter(service.contexts.values())).name if service.contexts else ""
        figures = await feedback.figures(model, version) if model else None
        if figures is None:
            raise NotFound("field figures need Redis, feedback turned on and a loaded model")
        return encode(request, figures)

    @get("/v1/models", summary="Serving state")
    async def models(request: Request[Any, Any, Any]) -> Response[bytes]:
        return encode(request, models_state())

    @get("/v1/models/{version:str}", summary="One model version")
    async def model_version(
        request: Request[Any, Any, Any], version: FromPath[str]
    ) -> Response[bytes]:
        ctx = service.contexts.get(version)
        if ctx is None:
            raise NotFound(
                f"version {version} is not resident on this replica "
                f"(resident: {', '.join(sorted(service.contexts)) or 'none'})"
            )
        field: dict[str, Any] | None
        try:
            field = await feedback.figures(ctx.name, version)
        except ServiceError as exc:
            field = {"error": exc.detail}
        described = msgspec.structs.replace(ctx.describe(live().get(version)), field=field)
        return encode(request, described)

    @get("/health/live", summary="Liveness")
    async def health_live() -> Response[bytes]:
        return Response(b'{"status":"live"}', media_type=JSON)

    @get("/health/ready", summary="Readiness")
    async def health_ready() -> Response[bytes]:
        ok, details = readiness()
        return Response(
            _json_encoder.encode(details),
            media_type=JSON,
            status_code=200 if ok else 503,
            headers=None if ok else {"Retry-After": "2"},
        )

    return [
        predict,
        predict_batch,
        post_feedback,
        model_field,
        models,
        model_version,
        health_live,
        health_ready,
    ]


__all__ = [
    "PayloadTooLarge",
    "build_routes",
    "http_error_handler",
    "internal_error_handler",
    "service_error_handler",
]
