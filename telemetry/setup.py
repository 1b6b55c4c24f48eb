"""OpenTelemetry providers and the service's instruments (no web framework here).

Providers are built from the standard ``OTEL_*`` variables (service name, resource
attributes, OTLP endpoint and protocol, sampler — read by the SDK itself) and injected into
whoever records; nothing patches the global providers. Metrics go to a Prometheus reader
(for ``/metrics``), to an OTLP exporter when an endpoint is configured, and to an in-memory
reader from which ``/v1/models`` computes its live figures, so there is one bookkeeping.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from msgspec import Meta, Struct
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import Tracer

from telemetry.aggregates import Aggregates, Instrument

# Sub-millisecond to seconds, for phases that range from 50 µs (features) to a 5 s deadline.
DURATION_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
DISTANCE_BUCKETS_M = (0.1, 1, 10, 100, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# Normalised error d (Mahalanobis distance): a calibrated model has d <= 1.18, 2.15, 2.45 at
# 50/90/95 %; the upper buckets show how far an uncalibrated one is off.
MAHALANOBIS_BUCKETS = (0.5, 1.0, 1.1774, 1.5, 2.0, 2.146, 2.4477, 3.0, 4.0, 6.0, 10.0, 20.0)
FIELD_ERROR_BUCKETS_M = (100, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)


class TelemetrySettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Telemetry settings (prefix ``HEIMDALL_TELEMETRY_``; the SDK reads ``OTEL_*`` itself)."""

    enabled: bool = True
    """Record traces and metrics at all (``/metrics`` answers 404 when off)."""
    traces: bool = True
    """Trace requests when spans have somewhere to go (an ``OTEL_EXPORTER_OTLP_*`` endpoint);
    without one no span is created at all."""
    trace_sample_ratio: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.05
    """Share of requests traced when ``OTEL_TRACES_SAMPLER`` is unset (parent-based: a sampled
    incoming ``traceparent`` is always traced)."""
    metrics_export_interval_s: float = 15.0
    """Period of the OTLP metric export (when an endpoint is set)."""


def _otlp_endpoint(kind: str) -> bool:
    return bool(
        os.environ.get(f"OTEL_EXPORTER_OTLP_{kind}_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


@dataclass
class Telemetry:
    """Providers and instruments of one replica."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    snapshot: Callable[[], MetricsData | None]
    tracer: Tracer
    instruments: dict[str, Any] = field(default_factory=dict)
    traces: bool = True
    registry: Any = None
    """The private Prometheus registry ``/metrics`` renders (None without Prometheus)."""

    aggregates: Aggregates | None = None
    """The per-request instruments, aggregated in process (see ``telemetry.aggregates``)."""
    head_sample_ratio: float | None = None
    """Share of requests without an incoming trace context that are traced, decided by the
    server middleware before any span exists; None when ``OTEL_TRACES_SAMPLER`` decides."""

    def __post_init__(self) -> None:
        """Bind the per-request instruments."""
        if self.aggregates is None:
            self.aggregates = Aggregates(Resource.get_empty(), _per_request_instruments())
        each = self.aggregates.instruments
        self._requests = each["heimdall.inference.requests"]
        self._duration = each["heimdall.inference.duration"]
        self._cache = each["heimdall.cache.requests"]
        self._domain = each["heimdall.inference.domain"]
        self._http = each["http.server.request.duration"]

    def shutdown(self) -> None:
        """Flush and stop exporters."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()

    def untraced_root(self) -> bool:
        """Head sampling for a request without an incoming trace context: leave it untraced?"""
        if not self.traces:
            return True
        ratio = self.head_sample_ratio
        return ratio is not None and random.random() >= ratio  # noqa: S311 - sampling

    # ------------------------------------------------------------------ recording

    def request(self, version: str, outcome: str) -> None:
        """Count one answered (or failed) prediction."""
        self._requests.add(1, version, outcome)

    def duration(self, version: str, phase: str, seconds: float) -> None:
        """Record one phase duration."""
        self._duration.record(seconds, version, phase)

    def http_duration(
        self, seconds: float, method: str, status: int, scheme: str, route: str | None
    ) -> None:
        """Record one ``http.server.request.duration`` (no route for unmatched paths)."""
        self._http.record(seconds, method, status, scheme, route)

    def domain(self, version: str, inside: bool) -> None:
        """Count one answer by whether it lies inside the model's trained domain."""
        self._domain.add(1, version, "true" if inside else "false")

    def cache(self, result: str, version: str = "", tier: str = "redis") -> None:
        """Count one cache lookup by result (hit, miss, error) and tier (local, redis)."""
        self._cache.add(1, result, tier, version)

    def client_fault(self, reason: str) -> None:
        """Count one request refused for the client's behaviour (aborted or slow upload...)."""
        self.instruments["client_faults"].add(1, {"reason": reason})

    def reload(self, outcome: str) -> None:
        """Count one rollout apply by outcome."""
        self.instruments["reloads"].add(1, {"outcome": outcome})

    def epoch_change(self) -> None:
        """Count one change of the control plane's epoch (the revision counter was reset)."""
        self.instruments["epoch_changes"].add(1)

    def control_rejected(self, source: str, reason: str) -> None:
        """Count one refused control message or document by source and reason."""
        self.instruments["control_rejected"].add(1, {"source": source, "reason": reason})

    def shadow_distance(self, version: str, metres: float) -> None:
        """Record the distance between primary and shadow positions."""
        self.instruments["shadow"].record(metres, {"model_version": version})

    def field_feedback(
        self,
        version: str,
        source: str,
        inside: dict[float, bool],
        domain_inside: bool,
        error_m: float,
        mahalanobis: float,
    ) -> None:
        """Count one ground-truth feedback and record its error and normalised error."""
        counter = self.instruments.get("field_feedback")
        if counter is None:
            return
        attrs: dict[str, str] = {"model_version": version, "source": source}
        for level, hit in inside.items():
            attrs[f"inside_{round(level * 100):d}"] = "true" if hit else "false"
        attrs["domain_inside"] = "true" if domain_inside else "false"
        counter.add(1, attrs)
        by_version = {"model_version": version, "source": source}
        self.instruments["field_error"].record(error_m, by_version)
        self.instruments["field_mahalanobis"].record(min(mahalanobis, 1e9), by_version)

    def observe_pool(self, stats: Callable[[], dict[str, Any]]) -> None:
        """Register pool gauges (workers by state, queue depth, restarts) read from ``stats``."""
        meter = self.meter_provider.get_meter("heimdall.pool")

        def workers(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(n, {"state": s}) for s, n in stats()["states"].items()]

        def depth(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(stats()["queue_depth"])]

        def restarts(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(stats()["restarts"])]

        meter.create_observable_gauge(
            "heimdall.pool.workers", [workers], unit="1", description="Worker processes by state"
        )
        meter.create_observable_gauge(
            "heimdall.pool.queue_depth", [depth], unit="1", description="Items waiting for a worker"
        )
        meter.create_observable_counter(
            "heimdall.pool.worker_restarts",
            [restarts],
            unit="1",
            description="Worker processes respawned",
        )

    # ------------------------------------------------------------------ live figures

    def live(self) -> dict[str, dict[str, Any]]:
        """Per-version figures from the instruments: requests, errors, p50/p95, hit rate."""
        data = self.snapshot()
        out: dict[str, dict[str, Any]] = {}

        def entry(version: str) -> dict[str, Any]:
            return out.setdefault(
                version,
                {
                    "requests": 0,
                    "errors": 0,
                    "cache_hits": 0,
                    "cache_lookups": 0,
                    "latency_ms_p50": None,
                    "latency_ms_p95": None,
                },
            )

        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        attrs = dict(point.attributes or {})
                        version = str(attrs.get("model_version", ""))
                        if not version:
                            continue
                        _accumulate(metric.name, attrs, point, entry(version))
        for figures in out.values():
            lookups = figures.pop("cache_lookups")
            hits = figures.pop("cache_hits")
            figures["cache_hit_rate"] = round(hits / lookups, 4) if lookups else None
        return out

    def gate_figures(self) -> dict[str, dict[str, Any]]:
        """Per-version cumulative counts for rollout gates (a leader diffs two of them).

        ``requests``, ``errors`` (outcome not ok), and the bucket counts of the total
        duration (seconds) and shadow distance (metres) histograms with their bounds.
        """
        data = self.snapshot()
        out: dict[str, dict[str, Any]] = {}
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        attrs = dict(point.attributes or {})
                        version = str(attrs.get("model_version", ""))
                        if version:
                            _gate_point(metric.name, attrs, point, out.setdefault(version, {}))
        return out


def _gate_point(name: str, attrs: dict[str, Any], point: Any, figures: dict[str, Any]) -> None:
    if name == "heimdall.inference.requests" and isinstance(point, NumberDataPoint):
        figures["requests"] = figures.get("requests", 0) + int(point.value)
        if attrs.get("outcome") != "ok":
            figures["errors"] = figures.get("errors", 0) + int(point.value)
    elif isinstance(point, HistogramDataPoint) and (
        (name == "heimdall.inference.duration" and attrs.get("phase") == "total")
        or name == "heimdall.shadow.distance"
    ):
        kind = "latency" if name == "heimdall.inference.duration" else "shadow"
        figures[f"{kind}_bounds"] = list(point.explicit_bounds)
        figures[f"{kind}_counts"] = [int(c) for c in point.bucket_counts]


def _accumulate(name: str, attrs: dict[str, Any], point: Any, figures: dict[str, Any]) -> None:
    if name == "heimdall.inference.requests" and isinstance(point, NumberDataPoint):
        figures["requests"] += int(point.value)
        if attrs.get("outcome") != "ok":
            figures["errors"] += int(point.value)
    elif name == "heimdall.cache.requests" and isinstance(point, NumberDataPoint):
        figures["cache_lookups"] += int(point.value)
        if attrs.get("result") == "hit":
            figures["cache_hits"] += int(point.value)
    elif (
        name == "heimdall.inference.duration"
        and attrs.get("phase") == "total"
        and isinstance(point, HistogramDataPoint)
        and point.count
    ):
        figures["latency_ms_p50"] = round(quantile(point, 0.5) * 1e3, 3)
        figures["latency_ms_p95"] = round(quantile(point, 0.95) * 1e3, 3)
    elif name == "heimdall.shadow.distance" and isinstance(point, HistogramDataPoint):
        figures["shadow_distance_m"] = {
            "count": point.count,
            "p50": round(quantile(point, 0.5), 1),
            "p95": round(quantile(point, 0.95), 1),
        }


def quantile(point: HistogramDataPoint, q: float) -> float:
    """Quantile estimated from explicit buckets by linear interpolation within a bucket."""
    target = q * point.count
    seen = 0
    lower = point.min if point.min is not None else 0.0
    for bound, count in zip([*point.explicit_bounds, point.max], point.bucket_counts, strict=False):
        if count and seen + count >= target:
            upper = min(bound, point.max)
            low = max(lower, point.min)
            return float(low + (upper - low) * (target - seen) / count)
        seen += count
        lower = bound
    return float(point.max)


def _prometheus_reader(aggregates: Aggregates) -> tuple[Any, Any]:
    """A Prometheus reader on a private registry that can also hand out its last snapshot."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import (
        CollectorRegistry,
        GCCollector,
        PlatformCollector,
        ProcessCollector,
    )

    class LivePrometheusReader(PrometheusMetricReader):
        def __init__(self, registry: CollectorRegistry) -> None:
            super().__init__(registry=registry)
            self._last: MetricsData | None = None
            self._for_live = False

        def _receive_metrics(self, metrics_data: MetricsData, *args: Any, **kwargs: Any) -> None:
            metrics_data = aggregates.merge(metrics_data) or metrics_data
            self._last = metrics_data
            if not self._for_live:  # a live snapshot must not queue data for the next scrape
                super()._receive_metrics(metrics_data, *args, **kwargs)

        def snapshot(self) -> MetricsData | None:
            self._for_live = True
            try:
                self.collect()
            finally:
                self._for_live = False
            return self._last

    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    return LivePrometheusReader(registry), registry


class _MergingExporter(MetricExporter):
    """Hands each export the pre-aggregated points next to the SDK's (OTLP path)."""

    def __init__(self, inner: MetricExporter, aggregates: Aggregates) -> None:
        super().__init__(
            preferred_temporality=inner._preferred_temporality,
            preferred_aggregation=inner._preferred_aggregation,
        )
        self.inner, self.aggregates = inner, aggregates

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        merged = self.aggregates.merge(metrics_data) or metrics_data
        return self.inner.export(merged, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self.inner.force_flush(timeout_millis)

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        self.inner.shutdown(timeout_millis=timeout_millis, **kwargs)


def _per_request_instruments() -> list[Instrument]:
    """The instruments recorded on every request (names, units as design section 7)."""
    return [
        Instrument(
            "heimdall.inference.requests",
            "1",
            "Predictions by version and outcome",
            ("model_version", "outcome"),
            scope="heimdall.inference",
        ),
        Instrument(
            "heimdall.inference.duration",
            "s",
            "Time per phase of a prediction",
            ("model_version", "phase"),
            scope="heimdall.inference",
            bounds=DURATION_BUCKETS_S,
        ),
        Instrument(
            "heimdall.inference.domain",
            "1",
            "Answers by whether the capture lies inside the model's trained domain",
            ("model_version", "inside"),
            scope="heimdall.inference",
        ),
        Instrument(
            "heimdall.cache.requests",
            "1",
            "Prediction cache lookups by result",
            ("result", "tier", "model_version"),
            scope="heimdall.inference",
        ),
        Instrument(
            "http.server.request.duration",
            "s",
            "Duration of HTTP server requests.",
            ("http.request.method", "http.response.status_code", "url.scheme", "http.route"),
            scope="heimdall.http",
            bounds=DURATION_BUCKETS_S,
        ),
    ]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("heimdall-inference")
    except PackageNotFoundError:  # pragma: no cover - running from a plain checkout
        return "0+unknown"


def build_telemetry(
    settings: TelemetrySettings,
    replica: str,
    *,
    prometheus: bool = True,
    extra_span_processors: Iterable[SpanProcessor] = (),
) -> Telemetry:
    """Providers and instruments for one replica (``OTEL_*`` configure exporters)."""
    # The design asks for the stable HTTP metric (http.server.request.duration, seconds);
    # the ASGI instrumentation emits it only with this opt-in (an explicit setting wins).
    os.environ.setdefault("OTEL_SEMCONV_STABILITY_OPT_IN", "http")
    attributes: dict[str, str] = {"service.instance.id": replica, "service.version": _version()}
    if not os.environ.get("OTEL_SERVICE_NAME") and "service.name=" not in os.environ.get(
        "OTEL_RESOURCE_ATTRIBUTES", ""
    ):
        attributes["service.name"] = "heimdall-inference"
    resource = Resource.create(attributes)
    # An explicit OTEL_TRACES_SAMPLER wins (the SDK reads it when no sampler is passed).
    # Otherwise the root decision is taken once, by the server middleware, before any span
    # exists (Telemetry.untraced_root); spans it starts and their children are recorded.
    sampler = None
    head_sample_ratio = None
    if not os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = ParentBased(ALWAYS_ON)
        head_sample_ratio = settings.trace_sample_ratio
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    processors = list(extra_span_processors)
    if settings.traces and _otlp_endpoint("TRACES"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
    for processor in processors:
        tracer_provider.add_span_processor(processor)
    # A span nobody exports is pure cost (≈0.3 ms for a sampled request's six spans here).
    traces = settings.traces and bool(processors)
    # One reader feeds both /metrics and the /v1/models live figures, so every measurement
    # is aggregated once; the per-request instruments are aggregated in process and merged
    # into every reader's collection (telemetry.aggregates).
    aggregates = Aggregates(resource, _per_request_instruments())
    registry = None
    snapshot: Callable[[], MetricsData | None]
    if prometheus:
        reader, registry = _prometheus_reader(aggregates)
        snapshot = reader.snapshot
    else:
        memory = InMemoryMetricReader()
        reader = memory

        def snapshot() -> MetricsData | None:
            return aggregates.merge(memory.get_metrics_data())

    readers: list[MetricReader] = [reader]
    if _otlp_endpoint("METRICS"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(
            PeriodicExportingMetricReader(
                _MergingExporter(OTLPMetricExporter(), aggregates),
                export_interval_millis=settings.metrics_export_interval_s * 1e3,
            )
        )
    views = [
        View(
            instrument_name="heimdall.shadow.distance",
            aggregation=ExplicitBucketHistogramAggregation(DISTANCE_BUCKETS_M),
        ),
        View(
            instrument_name="heimdall.field.error",
            aggregation=ExplicitBucketHistogramAggregation(FIELD_ERROR_BUCKETS_M),
        ),
        View(
            instrument_name="heimdall.field.mahalanobis",
            aggregation=ExplicitBucketHistogramAggregation(MAHALANOBIS_BUCKETS),
        ),
    ]
    # Exemplars are sampled on every measurement; nothing here consumes them, so skip the cost
    # unless OTEL_METRICS_EXEMPLAR_FILTER asks for them.
    exemplars = None
    if not os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER"):
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter

        exemplars = AlwaysOffExemplarFilter()
    meter_provider = MeterProvider(
        resource=resource, metric_readers=readers, views=views, exemplar_filter=exemplars
    )
    meter = meter_provider.get_meter("heimdall.inference")
    instruments = {
        "reloads": meter.create_counter(
            "heimdall.model.reloads", unit="1", description="Rollout applies by outcome"
        ),
        "client_faults": meter.create_counter(
            "heimdall.http.client_faults",
            unit="1",
            description="Requests refused for the client's behaviour (incomplete, slow, excess "
            "uploads), by reason; not server errors",
        ),
        "epoch_changes": meter.create_counter(
            "heimdall.control.epoch_changes",
            unit="1",
            description="Desired states applied from a new control-plane epoch (counter reset)",
        ),
        "control_rejected": meter.create_counter(
            "heimdall.control.rejected",
            unit="1",
            description="Refused control messages and desired-state documents",
        ),
        "shadow": meter.create_histogram(
            "heimdall.shadow.distance", unit="m", description="Primary-to-shadow position distance"
        ),
        "field_feedback": meter.create_counter(
            "heimdall.field.feedback",
            unit="1",
            description="Ground-truth feedback by version, source and whether the truth fell "
            "inside the 50/90/95 % ellipses",
        ),
        "field_error": meter.create_histogram(
            "heimdall.field.error", unit="m", description="Distance from answer to ground truth"
        ),
        "field_mahalanobis": meter.create_histogram(
            "heimdall.field.mahalanobis",
            unit="1",
            description="Normalised error d of the truth under the answered covariance",
        ),
    }

    def series(_: CallbackOptions) -> Iterable[Observation]:
        return [Observation(sum(i.series_count() for i in aggregates.instruments.values()))]

    # Also keeps every collection non-empty, so readers always receive the merged points.
    meter_provider.get_meter("heimdall.telemetry").create_observable_gauge(
        "heimdall.telemetry.series",
        [series],
        unit="1",
        description="Attribute sets of the per-request instruments (cardinality watch)",
    )
    return Telemetry(
        tracer_provider,
        meter_provider,
        snapshot,
        tracer_provider.get_tracer("heimdall.inference"),
        instruments,
        traces=traces,
        registry=registry,
        aggregates=aggregates,
        head_sample_ratio=head_sample_ratio,
    )
