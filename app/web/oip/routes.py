"""The ``/v2`` route handlers: decode a body, call the inference service, encode the answer.

Routing between versions, readiness, deadlines and counters are the inference service's
(app/serving/service.py), as for ``/v1``; this module adds only what the protocol says: the
one model name this server answers to, metadata, readiness bodies and the tensor codec.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath

from app.serving.service import InferenceService
from app.web.oip.codec import (
    HEADER_LENGTH,
    JSON,
    MAX_BATCH,
    Body,
    decode_body,
    encode_answer,
    model_metadata,
    prepare,
    triton_config,
)
from app.web.oip.errors import EXCEPTION_HANDLERS
from app.web.oip.inflate import read_body
from app.web.oip.schemas import (
    EXTENSIONS,
    SERVER_NAME,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    TritonConfig,
)
from workers.errors import NotFound

OFFLOAD_BYTES = 1 << 20
"""Bodies larger than this are decoded in a thread so the event loop keeps serving."""
NOT_READY = {"Retry-After": "2"}


def server_version() -> str:
    """Installed package version of the server."""
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "0"


class OipProtocol:
    """The protocol's operations over the inference service (no HTTP here but status)."""

    def __init__(self, service: InferenceService, model_name: str) -> None:
        """Keep the service and the one model name this server answers to."""
        self.service = service
        self.model_name = model_name

    def _check_name(self, name: str) -> None:
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")

    def metadata(self, name: str, version: str | None) -> ModelMetadata:
        """Model metadata; without a version, the one with the largest routing weight.

        Raises:
            NotFound: unknown model name, or the version is not resident here.
            NotReady: no version is given and none is routed yet.
        """
        self._check_name(name)
        chosen = version or self.service.main_version()
        ctx = self.service.resolve(name, chosen, None)
        versions = self.service.resident_versions() if version is None else [ctx.version]
        return model_metadata(ctx, versions)

    def model_ready(self, name: str, version: str | None) -> bool:
        """Whether the routed versions (or the given one) are served by a ready worker."""
        self._check_name(name)
        if version is None:
            return self.service.ready()[0]
        self.service.resolve(name, version, None)
        return self.service.version_ready(version)

    async def infer(
        self, name: str, version: str | None, body: Body, header_length: str | None
    ) -> Response[bytes]:
        """Decode and validate, run on the service's tensor-in path, encode the outputs."""
        started = time.perf_counter()
        self._check_name(name)
        offload = len(body) > OFFLOAD_BYTES
        if offload:
            request, binary = await asyncio.to_thread(decode_body, body, header_length)
        else:
            request, binary = decode_body(body, header_length)
        ctx = self.service.resolve(name, version, request.id)
        spec = ctx.package.spec
        # Held while a large body is prepared in a thread (see InferenceService.predict).
        with self.service.pool.holding(ctx.version):
            if offload:
                prepared = await asyncio.to_thread(prepare, request, binary, spec)
            else:
                prepared = prepare(request, binary, spec)
            outputs = await self.service.infer(ctx, prepared.inputs, started)
        return encode_answer(prepared, outputs, spec, ctx)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        msgspec.json.encode(value), status_code=status, media_type=JSON, headers=headers
    )


def metadata_routes(oip: OipProtocol) -> list[HTTPRouteHandler]:
    """Server and model metadata, and Triton's configuration (read by perf_analyzer)."""
    common: dict[str, Any] = {"exception_handlers": EXCEPTION_HANDLERS, "tags": ["v2"]}

    @get("/v2", summary="Server metadata (OIP)", **common)
    async def server_metadata() -> Response[ServerMetadata]:
        return Response(ServerMetadata(SERVER_NAME, server_version(), EXTENSIONS), media_type=JSON)

    @get("/v2/models/{name:str}", summary="Model metadata (OIP)", **common)
    async def model_metadata(name: FromPath[str]) -> Response[ModelMetadata]:
        return Response(oip.metadata(name, None), media_type=JSON)

    @get(
        "/v2/models/{name:str}/versions/{version:str}",
        summary="Model version metadata (OIP)",
        **common,
    )
    async def version_metadata(
        name: FromPath[str], version: FromPath[str]
    ) -> Response[ModelMetadata]:
        return Response(oip.metadata(name, version), media_type=JSON)

    @get("/v2/models/{name:str}/config", summary="Model configuration (Triton)", **common)
    async def model_config(name: FromPath[str]) -> Response[TritonConfig]:
        return Response(triton_config(name, oip.metadata(name, None), MAX_BATCH), media_type=JSON)

    @get(
        "/v2/models/{name:str}/versions/{version:str}/config",
        summary="Model version configuration (Triton)",
        **common,
    )
    async def version_config(name: FromPath[str], version: FromPath[str]) -> Response[TritonConfig]:
        config = triton_config(name, oip.metadata(name, version), MAX_BATCH)
        return Response(config, media_type=JSON)

    return [server_metadata, model_metadata, version_metadata, model_config, version_config]


def health_routes(
    oip: OipProtocol, readiness: Callable[[], tuple[bool, Any]]
) -> list[HTTPRouteHandler]:
    """Server liveness and readiness, model (version) readiness: 503 + Retry-After when not."""
    common: dict[str, Any] = {"exception_handlers": EXCEPTION_HANDLERS, "tags": ["v2"]}

    @get("/v2/health/live", summary="Server live (OIP)", **common)
    async def live() -> Response[ServerLive]:
        return Response(ServerLive(live=True), media_type=JSON)

    @get("/v2/health/ready", summary="Server ready (OIP)", **common)
    async def ready() -> Response[ServerReady]:
        ok = readiness()[0]
        return Response(
            ServerReady(ready=ok),
            status_code=200 if ok else 503,
            media_type=JSON,
            headers=None if ok else NOT_READY,
        )

    def model_readiness(name: str, version: str | None) -> Response[ModelReady]:
        ok = oip.model_ready(name, version)
        return Response(
            ModelReady(name, ok, version if version else msgspec.UNSET),
            status_code=200 if ok else 503,
            media_type=JSON,
            headers=None if ok else NOT_READY,
        )

    @get("/v2/models/{name:str}/ready", summary="Model ready (OIP)", **common)
    async def model_ready(name: FromPath[str]) -> Response[ModelReady]:
        return model_readiness(name, None)

    @get(
        "/v2/models/{name:str}/versions/{version:str}/ready",
        summary="Model version ready (OIP)",
        **common,
    )
    async def version_ready(name: FromPath[str], version: FromPath[str]) -> Response[ModelReady]:
        return model_readiness(name, version)

    return [live, ready, model_ready, version_ready]


def build_oip_routes(
    service: InferenceService,
    *,
    model_name: str,
    readiness: Callable[[], tuple[bool, Any]],
    max_body: int,
) -> list[HTTPRouteHandler]:
    """Route handlers of the ``/v2`` protocol over ``service``.

    ``readiness`` is the replica's (``/v2/health/ready``); ``max_body`` bounds an infer body,
    inflated or not.
    """
    oip = OipProtocol(service, model_name)
    inflating = asyncio.Semaphore(1)
    common: dict[str, Any] = {"exception_handlers": EXCEPTION_HANDLERS, "tags": ["v2"]}

    @post(
        "/v2/models/{name:str}/infer",
        summary="Infer (OIP)",
        status_code=200,
        request_max_body_size=max_body,
        **common,
    )
    async def infer(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
        body = await read_body(request, max_body, inflating)
        return await oip.infer(name, None, body, request.headers.get(HEADER_LENGTH))

    @post(
        "/v2/models/{name:str}/versions/{version:str}/infer",
        summary="Infer on a version (OIP)",
        status_code=200,
        request_max_body_size=max_body,
        **common,
    )
    async def infer_version(
        request: Request[Any, Any, Any], name: FromPath[str], version: FromPath[str]
    ) -> Response[bytes]:
        body = await read_body(request, max_body, inflating)
        return await oip.infer(name, version, body, request.headers.get(HEADER_LENGTH))

    return [*health_routes(oip, readiness), *metadata_routes(oip), infer, infer_version]
