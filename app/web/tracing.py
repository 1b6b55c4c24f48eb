"""The server span and ``http.server.request.duration``, lean enough for a 1 ms request.

Litestar's OpenTelemetry plugin stays the way the server span is configured (exclusions,
providers, scopes); its ``middleware_class`` is this one instead of the generic ASGI
instrumentation. The generic one wraps every ASGI message, re-reads environment variables,
collects a dozen attributes and records four metric streams per request — about 0.4 ms of a
request whose whole HTTP-side budget is about 1 ms (profile in docs/benchmarks.md). Here:
one span (the W3C ``traceparent``/``tracestate``/``baggage`` headers are extracted with the
configured global propagator), the stable semantic-convention attributes, the route
*template* as ``http.route`` (bounded cardinality), one duration measurement.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from litestar.enums import ScopeType
from litestar.middleware.base import AbstractMiddleware
from litestar.plugins.opentelemetry import OpenTelemetryConfig
from litestar.plugins.opentelemetry.middleware import OpenTelemetryInstrumentationMiddleware
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, StatusCode

from app.web.request_context import HEAD_KEY
from telemetry.logs import note_trace

if TYPE_CHECKING:
    from collections.abc import Iterable

    from litestar.types import ASGIApp, HTTPScope, Message, Receive, Scope, Send
    from opentelemetry.context import Context

    from telemetry.instruments import Telemetry

# Headers a propagator may read; anything else is not copied into the carrier.
_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


class ServerSpanMiddleware(OpenTelemetryInstrumentationMiddleware):
    """One SERVER span and one duration measurement per HTTP request."""

    telemetry: Telemetry | None = None
    """Where ``http.server.request.duration`` goes (see :func:`server_span_middleware`)."""

    def __init__(self, app: ASGIApp, config: OpenTelemetryConfig) -> None:
        """Set up the tracer and the histogram from the plugin's providers."""
        AbstractMiddleware.__init__(
            self,
            app=app,
            scopes=config.scopes,
            exclude=config.exclude,
            exclude_opt_key=config.exclude_opt_key,
        )
        provider = config.tracer_provider or trace.get_tracer_provider()
        self.tracer = provider.get_tracer("heimdall.http")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request inside its server span (or untraced, when head sampling says so)."""
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        telemetry = self.telemetry
        parent = None
        if telemetry is None or telemetry.traces:
            parent = _extract_parent(scope["headers"])
        # A client chooses the method token: unknown ones are one `_OTHER` series (as the HTTP
        # semantic conventions say), or every new token would be a new series in /metrics.
        method = scope["method"] if scope["method"] in _METHODS else "_OTHER"
        if scope.get(HEAD_KEY):  # a HEAD answered by its GET route
            method = "HEAD"
        span: Span | None = None
        token = None
        # A request without a trace context that head sampling leaves out gets no span at all
        # (no ids, no sampler, no context switch): that is most requests at the default ratio.
        if parent is not None or telemetry is None or not telemetry.untraced_root():
            # The plugin wraps the router, so the route template is known only afterwards.
            name = method if method != "_OTHER" else "HTTP"
            span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
            if span.is_recording():
                span.set_attributes(_request_attributes(scope, method))
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            note_trace()  # for the access log line written after the span ends
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            if span is not None:
                span.record_exception(exc)
            raise
        finally:
            if token is not None:
                otel_context.detach(token)
            self._finish(span, scope, method, status, time.perf_counter() - started)

    def _finish(
        self, span: Span | None, scope: HTTPScope, method: str, status: int, seconds: float
    ) -> None:
        """Name the span after the matched route, end it, record the duration."""
        # Unmatched paths get no route: a 404 scan must not create a series per path.
        route = scope.get("path_template")
        if span is not None:
            if span.is_recording():
                if route:
                    span.update_name(f"{method if method != '_OTHER' else 'HTTP'} {route}")
                    span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(StatusCode.ERROR)
            span.end()
        if self.telemetry is not None:
            self.telemetry.http_duration(
                seconds, method, status, scope.get("scheme", "http"), route or None
            )


_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
"""The methods of RFC 9110 and RFC 5789 (the semantic conventions' known set)."""


def _extract_parent(headers: Iterable[tuple[bytes, bytes]]) -> Context | None:
    """The incoming trace context, if the request carries propagation headers."""
    carrier: dict[str, str] | None = None
    for name, value in headers:
        if name in _PROPAGATION_HEADERS:
            if carrier is None:
                carrier = {}
            carrier[name.decode("latin-1")] = value.decode("latin-1")
    return propagate.extract(carrier) if carrier is not None else None


def _request_attributes(scope: HTTPScope, method: str) -> dict[str, Any]:
    """Stable semantic-convention request attributes (only for recorded spans)."""
    attrs: dict[str, Any] = {
        "http.request.method": method,
        **({"http.request.method_original": scope["method"]} if method == "_OTHER" else {}),
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    server = scope.get("server")
    if server:
        attrs["server.address"], attrs["server.port"] = str(server[0]), int(server[1] or 0)
    client = scope.get("client")
    if client:
        attrs["client.address"] = str(client[0])
    for name, value in scope["headers"]:
        if name == b"user-agent":
            attrs["user_agent.original"] = value.decode("latin-1")
            break
    return attrs


def server_span_middleware(telemetry: Telemetry) -> type[ServerSpanMiddleware]:
    """The middleware class bound to ``telemetry`` (Litestar instantiates it per app)."""
    return type("ServerSpanMiddleware", (ServerSpanMiddleware,), {"telemetry": telemetry})
