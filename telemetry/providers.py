"""Tracer and meter providers, their readers and exporters: :func:`build_telemetry`.

Providers are built from the standard ``OTEL_*`` variables (service name, resource
attributes, OTLP endpoint and protocol, sampler — read by the SDK itself) and injected into
whoever records; nothing patches the global providers. Metrics go to a Prometheus reader
(for ``/metrics``), to an OTLP exporter when an endpoint is configured, and to an in-memory
reader from which ``/v1/models`` computes its live figures, so there is one bookkeeping.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    InMemoryMetricReader,
    MetricExporter,
    MetricExportResult,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from telemetry.aggregates import Aggregates
from telemetry.config import TelemetrySettings
from telemetry.instruments import Telemetry, per_request_instruments, sdk_instruments, views
from telemetry.live import prometheus_reader


def _otlp_endpoint(kind: str) -> bool:
    return bool(
        os.environ.get(f"OTEL_EXPORTER_OTLP_{kind}_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


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
    aggregates = Aggregates(resource, per_request_instruments())
    registry = None
    snapshot: Callable[[], MetricsData | None]
    if prometheus:
        reader, registry = prometheus_reader(aggregates)
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
    # Exemplars are sampled on every measurement; nothing here consumes them, so skip the cost
    # unless OTEL_METRICS_EXEMPLAR_FILTER asks for them.
    exemplars = None
    if not os.environ.get("OTEL_METRICS_EXEMPLAR_FILTER"):
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter

        exemplars = AlwaysOffExemplarFilter()
    meter_provider = MeterProvider(
        resource=resource, metric_readers=readers, views=views(), exemplar_filter=exemplars
    )
    instruments = sdk_instruments(meter_provider.get_meter("heimdall.inference"))

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
