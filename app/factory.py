"""The one factory that builds the object graph: ``create_app(settings)``.

Nothing heavy happens at import time. The pool starts, the first model version loads and the
control-channel subscriber connects in the application's lifespan, inside the server process.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Litestar
from litestar.exceptions import HTTPException
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.plugins.opentelemetry import OpenTelemetryConfig

from app.control.plane import ControlPlane
from app.control.rollout import Rollout
from app.registry.client import ModelRegistry
from app.registry.known import KnownVersions
from app.serving.breaker import Breaker
from app.serving.cache import PredictionCache
from app.serving.feedback import FeedbackService
from app.serving.service import InferenceService
from app.serving.status import ModelsState, Readiness, RolloutOutcome
from app.settings import Settings, load_settings
from app.web.direct import ROUTE, DirectPredict
from app.web.intake import IntakeLimits, RouteLimits
from app.web.oip.errors import v2_aware
from app.web.oip.routes import build_oip_routes
from app.web.openapi import complete_openapi
from app.web.processes import LONE, HttpProcess
from app.web.request_context import RequestContext
from app.web.routes import (
    build_routes,
    http_error_handler,
    internal_error_handler,
    metrics_route,
    service_error_handler,
)
from app.web.rsgi import RSGIFront
from app.web.tracing import ServerSpans, server_span_middleware
from telemetry.exposition import PeerExposition, single
from telemetry.instruments import Telemetry
from telemetry.logs import configure_logging
from telemetry.providers import build_telemetry
from workers.errors import ServiceError
from workers.gcfreeze import freeze_startup_objects
from workers.pool import WorkerPool

log = logging.getLogger("heimdall.app")


def replica_name(settings: Settings, process: HttpProcess = LONE) -> str:
    """This replica's id in fleet status and telemetry (``/p<index>`` per HTTP process)."""
    return process.name(
        settings.server.replica_id or f"{socket.gethostname()}:{settings.server.port}:{os.getpid()}"
    )


class Components:
    """The collaborators of one replica, built by :func:`create_app`."""

    def __init__(
        self, settings: Settings, telemetry: Telemetry | None = None, process: HttpProcess = LONE
    ) -> None:
        """Build (not start) every component.

        ``telemetry`` replaces the default providers; ``process`` places this HTTP process in
        its replica.
        """
        self.settings = settings
        self.process = process
        self.replica = replica_name(settings, process)
        self._announce: asyncio.Task[None] | None = None
        self.pool = WorkerPool(
            settings.pool,
            log_level=settings.server.log_level,
            log_format=settings.server.log_format,
            replica=self.replica,
        )
        self.registry = ModelRegistry(settings.registry)
        self.service = InferenceService(self.pool, settings.service)
        self.telemetry: Telemetry | None = telemetry
        if telemetry is None and settings.telemetry.enabled:
            self.telemetry = build_telemetry(settings.telemetry, self.replica)
        if self.telemetry is not None:
            # Telemetry knows nothing of workers/: it reads the stats as plain data.
            self.telemetry.observe_pool(lambda: msgspec.to_builtins(self.pool.stats()))
        self.service.telemetry = self.telemetry
        self.rollout = Rollout(
            self.registry,
            self.pool,
            self.service,
            on_outcome=self.telemetry.reload if self.telemetry else None,
        )
        self.redis: Any | None = None
        if settings.cache.redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.from_url(
                settings.cache.redis_url,
                socket_timeout=settings.cache.timeout_s,
                socket_connect_timeout=settings.cache.timeout_s,
            )
        self.cache = PredictionCache(settings.cache, self.redis)
        self.service.cache = self.cache
        self.feedback_redis: Any | None = None
        if settings.cache.redis_url and settings.feedback.enabled:
            import redis.asyncio as aioredis

            # Its own client: feedback reads (figures, samples) may take longer than the
            # cache's 50 ms budget and must not trip the cache's breaker.
            self.feedback_redis = aioredis.from_url(
                settings.cache.redis_url,
                socket_timeout=settings.feedback.timeout_s,
                socket_connect_timeout=settings.feedback.timeout_s,
            )
        self.feedback = FeedbackService(
            settings.feedback,
            self.feedback_redis,
            Breaker(settings.cache.breaker_failures, settings.cache.breaker_cooldown_s),
            self.telemetry,
        )
        self.service.answers = self.feedback.answers
        self.control = ControlPlane(
            settings.control,
            self.redis,
            settings.registry.model_name(),
            settings.registry.model_uri,
            self.rollout,
            self.replica,
            self.telemetry,
        )
        self.peers: PeerExposition | None = None
        registry = self.telemetry.registry if self.telemetry is not None else None
        if registry is not None and process.peers is not None:
            self.peers = PeerExposition(
                single(registry), process.peers, process.index, process.count
            )

    async def scrape(self) -> bytes:
        """``/metrics``: this process's metrics, or its replica's when it has siblings."""
        if self.peers is not None:
            return await self.peers.scrape()
        assert self.telemetry is not None
        assert self.telemetry.registry is not None
        return single(self.telemetry.registry)()

    async def start(self) -> None:
        """Start the pool, then converge on the desired state in the background."""
        # Before any I/O is in flight: the one full collection holds the event loop for tens
        # of ms, which would time out a Redis read already waiting (the control plane's first
        # read of the desired state then fell back to the default model).
        freeze_startup_objects("HTTP process")
        if self.peers is not None:
            await self.peers.start()
        await self.pool.start()
        if self.process.shared:
            self.process.mark_ready(False)  # a predecessor's marker (a respawned process)
            self._announce = asyncio.create_task(self._announce_ready())
        self.control.start()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.control.reresolve)

    async def stop(self) -> None:
        """Drain and stop everything."""
        if self._announce is not None:
            self._announce.cancel()
        self.process.leave()
        await self.control.stop()
        await self.pool.stop()
        if self.peers is not None:
            await self.peers.stop()
        if self.telemetry is not None:
            self.telemetry.shutdown()
        await self.cache.close()
        await self.feedback.close()
        for client in (self.redis, self.feedback_redis):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()

    async def _announce_ready(self) -> None:
        """Mark this process ready for its siblings once it is, and keep the mark there.

        Re-marked every second: a ``/tmp`` cleaner or an operator removing the file must not
        leave a healthy replica not ready for good.
        """
        while not self.service.ready()[0]:  # noqa: ASYNC110 - readiness is computed, not signalled
            await asyncio.sleep(0.1)
        while True:
            self.process.mark_ready(True)
            await asyncio.sleep(1.0)

    def readiness(self) -> tuple[bool, Readiness]:
        """Ready when every routed version is served; details for operators.

        With several HTTP processes, also only once every one has been ready since it started.
        """
        ok, routed, served = self.service.ready()
        processes = None
        if self.process.shared:
            processes = self.process.ready_processes()
            ok = ok and len(processes) == self.process.count
        return ok, Readiness(
            routed=routed,
            served=served,
            pool=self.pool.stats().states,
            cache=self.cache.state(),
            feedback=self.feedback.state(),
            rollout=RolloutOutcome(
                last_outcome=self.rollout.status.last_outcome,
                last_error=self.rollout.status.last_error,
            ),
            control=self.control.state(),
            status="ready" if ok else "not ready",
            http_processes_ready=processes,
        )

    def live(self) -> dict[str, dict[str, Any]]:
        """Per-version live figures from the telemetry instruments."""
        return self.telemetry.live() if self.telemetry else {}

    def models_state(self) -> ModelsState:
        """/v1/models: resident versions, routing, rollout outcome, per-version counters."""
        live = self.live()
        return ModelsState(
            replica=self.replica,
            model=self.settings.registry.model_name(),
            routing=self.service.routing_state(),
            rollout=self.rollout.describe(),
            control=self.control.state(),
            versions={v: c.describe(live.get(v)) for v, c in self.service.contexts.items()},
            pool=self.pool.stats(),
        )


def create_app(
    settings: Settings, telemetry: Telemetry | None = None, process: HttpProcess = LONE
) -> Litestar:
    """Build the Litestar application and its collaborators for ``settings``.

    ``telemetry`` injects providers (tests pass in-memory exporters); by default they are
    built from the ``OTEL_*`` environment. ``process`` is this HTTP process's place in its
    replica (``HEIMDALL_HTTP_PROCESSES``).
    """
    components = Components(settings, telemetry, process)

    @contextlib.asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await components.start()
        try:
            yield
        finally:
            await components.stop()

    routes = build_routes(
        components.service,
        components.feedback,
        models_state=components.models_state,
        live=components.live,
        readiness=components.readiness,
        max_body=settings.server.max_body_bytes,
        max_batch_body=settings.server.max_batch_body_bytes,
        known=KnownVersions(components.registry),
    )
    routes += build_oip_routes(
        components.service,
        model_name=settings.registry.model_name(),
        readiness=components.readiness,
        max_body=settings.server.max_batch_body_bytes,
    )
    middleware = []
    if components.telemetry is not None:
        if components.telemetry.registry is not None:
            routes.append(metrics_route(components.scrape))
        # Litestar turns an OpenTelemetry middleware in this list into its OpenTelemetry
        # plugin (outermost, around the router); the class is our lean server span.
        middleware.append(
            OpenTelemetryConfig(
                tracer_provider=components.telemetry.tracer_provider,
                meter_provider=components.telemetry.meter_provider,
                exclude=["/health", "/metrics", "/v2/health"],
                middleware_class=server_span_middleware(components.telemetry),
            ).middleware
        )
    app = Litestar(
        route_handlers=routes,
        middleware=middleware,
        lifespan=[lifespan],
        exception_handlers={
            ServiceError: v2_aware(service_error_handler),
            HTTPException: v2_aware(http_error_handler),
            Exception: v2_aware(internal_error_handler),
        },
        openapi_config=OpenAPIConfig(
            title="heimdall-inference",
            version="1",
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
        request_max_body_size=settings.server.max_body_bytes,
        debug=False,
        # Logging is ours (telemetry/logs.py, one schema with the workers): Litestar must not
        # replace the root handlers with its own queue handler and format.
        logging_config=None,
    )
    app.state.components = components
    complete_openapi(app)
    return app


def _settings_from_env() -> tuple[Settings, HttpProcess]:
    """Settings and this HTTP process's place; with siblings, its share of the pool."""
    settings = load_settings()
    process = HttpProcess.from_env(settings.server.http_processes)
    if process.shared:
        settings = dataclasses.replace(
            settings,
            pool=msgspec.structs.replace(
                settings.pool, workers=process.pool_share(settings.pool.worker_count())
            ),
        )
    configure_logging(
        settings.server.log_level, settings.server.log_format, replica_name(settings, process)
    )
    return settings, process


def with_request_context(app: Litestar, settings: Settings) -> RequestContext:
    """``app`` behind the X-Request-ID / access-log wrapper (app/web/request_context.py)."""
    return RequestContext(app, access=settings.server.access_log)


def create_app_from_env() -> RequestContext:
    """Granian ASGI factory target: settings from the environment, validated at start."""
    settings, process = _settings_from_env()
    return with_request_context(create_app(settings, process=process), settings)


def route_limits(app: Litestar) -> RouteLimits:
    """The body limit of every route of ``app`` that takes a body (its POST handlers)."""
    table = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            methods = set(handler.http_methods) & {"POST", "PUT", "PATCH"}
            size = handler.resolve_request_max_body_size()
            if methods and size is not None:
                table += [(path, methods, size) for path in handler.paths]
    return RouteLimits(table)


def create_rsgi_app_from_env() -> RSGIFront:
    """Granian RSGI factory target: the same app behind the RSGI front (app/web/rsgi.py)."""
    settings, process = _settings_from_env()
    server = settings.server
    app = create_app(settings, process=process)
    components: Components = app.state.components
    telemetry = components.telemetry
    spans = None
    if telemetry is not None:
        tracer = telemetry.tracer_provider.get_tracer("heimdall.http")
        spans = ServerSpans(tracer, telemetry)
    hot = DirectPredict(components.service, spans, access=server.access_log)
    return RSGIFront(
        with_request_context(app, settings),
        # Single bodies in one piece; batches stream, counted against the budget as they come.
        one_piece_limit=server.max_body_bytes,
        body_limit=route_limits(app),
        intake=IntakeLimits(
            timeout_s=server.body_timeout_s,
            grace_s=server.body_grace_s,
            min_rate_bytes_s=server.body_min_rate_bytes_s,
            max_uploads=server.max_concurrent_uploads,
            max_body_bytes_in_flight=server.max_body_bytes_in_flight,
        ),
        on_client_fault=telemetry.client_fault if telemetry is not None else None,
        # The hottest route skips ASGI and Litestar (app/web/direct.py, issue 23).
        direct={("POST", ROUTE): hot},
    )
