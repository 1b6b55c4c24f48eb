"""The service's instruments and the recording API every caller uses (no providers here).

Two kinds of instrument: the ones recorded on every request (requests, phase durations,
domain flags, cache lookups, ``http.server.request.duration``) are aggregated in process
(``telemetry.aggregates``); the rare ones (reloads, shadow distances, field feedback, control
rejections, pool gauges) are ordinary SDK instruments. :class:`Telemetry` binds both and is
what ``telemetry.providers.build_telemetry`` hands to the app; names, units and attributes
are the ones in design section 7.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricsData
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Tracer

from telemetry.aggregates import Aggregates, Instrument
from telemetry.live import gate_figures, live_figures

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
    computed_latency: dict[str, list[int]] = field(default_factory=dict)
    """Per version, bucket counts (``DURATION_BUCKETS_S``) of the total duration of answers
    that were computed, not served from the cache: what the canary's p99 gate compares (a
    warm baseline's cache hits would make a cold candidate look slow)."""
    head_sample_ratio: float | None = None
    """Share of requests without an incoming trace context that are traced, decided by the
    server middleware before any span exists; None when ``OTEL_TRACES_SAMPLER`` decides."""

    def __post_init__(self) -> None:
        """Bind the per-request instruments."""
        if self.aggregates is None:
            self.aggregates = Aggregates(Resource.get_empty(), per_request_instruments())
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

    def computed(self, version: str, seconds: float) -> None:
        """Count the total duration of one answer that was not served from the cache."""
        counts = self.computed_latency.get(version)
        if counts is None:
            counts = self.computed_latency[version] = [0] * (len(DURATION_BUCKETS_S) + 1)
        counts[bisect.bisect_left(DURATION_BUCKETS_S, seconds)] += 1

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
        return live_figures(self.snapshot())

    def gate_figures(self) -> dict[str, dict[str, Any]]:
        """Per-version cumulative counts for rollout gates (see ``telemetry.live``).

        ``latency_counts`` (with ``latency_bounds``) count computed answers only.
        """
        figures = gate_figures(self.snapshot())
        for version, counts in self.computed_latency.items():
            entry = figures.setdefault(version, {})
            entry["latency_bounds"] = list(DURATION_BUCKETS_S)
            entry["latency_counts"] = list(counts)
        return figures


def per_request_instruments() -> list[Instrument]:
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


def views() -> list[View]:
    """Bucket boundaries of the SDK histograms (the per-request ones carry their own)."""
    return [
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


def sdk_instruments(meter: Meter) -> dict[str, Any]:
    """The rarely recorded instruments, created on the SDK ``meter`` (keys as Telemetry uses)."""
    return {
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
