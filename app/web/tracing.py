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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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
    from contextvars import Token

    from litestar.types import ASGIApp, Message, Receive, Scope, Send
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
        self.spans = ServerSpans(self.tracer, self.telemetry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the request inside its server span (or untraced, when head sampling says so)."""
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        spans = self.spans
        opened = spans.begin(
            scope["method"],
            _carrier(scope["headers"]),
            lambda method: request_attributes(scope, method),
            head=bool(scope.get(HEAD_KEY)),
        )
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException as exc:
            if opened.span is not None:
                opened.span.record_exception(exc)
            raise
        finally:
            # Unmatched paths get no route: a 404 scan must not create a series per path.
            spans.end(opened, status, scope.get("path_template"), scope.get("scheme", "http"))


@dataclass(slots=True)
class OpenSpan:
    """A request's server span (None when head sampling leaves it out) and its start."""

    span: Span | None
    token: Token[Context] | None
    method: str
    started: float


class ServerSpans:
    """The server span and the duration measurement of one request, for either front.

    The ASGI middleware above and the RSGI front's direct route (app/web/direct.py) both
    open and close requests through this, so their spans and metrics are the same.
    """

    __slots__ = ("telemetry", "tracer")

    def __init__(self, tracer: trace.Tracer, telemetry: Telemetry | None) -> None:
        """Spans from ``tracer``; durations to ``telemetry`` (None: spans only)."""
        self.tracer = tracer
        self.telemetry = telemetry

    def begin(
        self,
        raw_method: str,
        carrier: dict[str, str] | None,
        attributes: Callable[[str], dict[str, Any]],
        head: bool = False,
    ) -> OpenSpan:
        """Open a request's span.

        ``carrier`` holds its propagation headers (None: it has none); ``attributes(method)``
        gives its request attributes, asked only for a span that is recorded.
        """
        started = time.perf_counter()
        telemetry = self.telemetry
        parent = None
        if carrier is not None and (telemetry is None or telemetry.traces):
            parent = propagate.extract(carrier)
        # A client chooses the method token: unknown ones are one `_OTHER` series (as the HTTP
        # semantic conventions say), or every new token would be a new series in /metrics.
        method = raw_method if raw_method in _METHODS else "_OTHER"
        if head:  # a HEAD answered by its GET route
            method = "HEAD"
        span: Span | None = None
        token = None
        # A request without a trace context that head sampling leaves out gets no span at all
        # (no ids, no sampler, no context switch): that is most requests at the default ratio.
        if parent is not None or telemetry is None or not telemetry.untraced_root():
            # The route template is known only once routed: the name is completed at the end.
            name = method if method != "_OTHER" else "HTTP"
            span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)
            if span.is_recording():
                span.set_attributes(attributes(method))
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            note_trace()  # for the access log line written after the span ends
        return OpenSpan(span, token, method, started)

    def end(self, opened: OpenSpan, status: int, route: str | None, scheme: str) -> None:
        """Name the span after the matched route, end it, record the duration."""
        if opened.token is not None:
            otel_context.detach(opened.token)
        span, method = opened.span, opened.method
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
            seconds = time.perf_counter() - opened.started
            self.telemetry.http_duration(seconds, method, status, scheme, route or None)


_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
"""The methods of RFC 9110 and RFC 5789 (the semantic conventions' known set)."""


def _carrier(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str] | None:
    """The propagation headers of an ASGI request (None when it carries none)."""
    carrier: dict[str, str] | None = None
    for name, value in headers:
        if name in _PROPAGATION_HEADERS:
            if carrier is None:
                carrier = {}
            carrier[name.decode("latin-1")] = value.decode("latin-1")
    return carrier


PROPAGATION_HEADERS = tuple(sorted(h.decode() for h in _PROPAGATION_HEADERS))
"""The names a propagator may read, as text (for fronts whose headers are a mapping)."""


def request_attributes(scope: Mapping[str, Any], method: str) -> dict[str, Any]:
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
