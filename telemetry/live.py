"""Live figures read back from the metric points: per-version counts, p50/p95, gate counts.

``/v1/models`` shows :func:`live_figures` and the canary leader diffs :func:`gate_figures`;
both read the same collection as ``/metrics`` (the Prometheus reader's last snapshot, see
:func:`prometheus_reader`), so there is one bookkeeping and no second set of counters.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import HistogramDataPoint, MetricsData, NumberDataPoint

from telemetry.aggregates import Aggregates


def live_figures(data: MetricsData | None) -> dict[str, dict[str, Any]]:
    """Per-version figures from the instruments: requests, errors, p50/p95, hit rate."""
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


def gate_figures(data: MetricsData | None) -> dict[str, dict[str, Any]]:
    """Per-version cumulative counts for rollout gates (a leader diffs two of them).

    ``requests``, ``errors`` (outcome not ok), and the bucket counts of the shadow distance
    (metres) histogram with its bounds. The latency the gates compare is not here: it counts
    computed answers only (:meth:`telemetry.instruments.Telemetry.gate_figures`).
    """
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
    elif isinstance(point, HistogramDataPoint) and name == "heimdall.shadow.distance":
        figures["shadow_bounds"] = list(point.explicit_bounds)
        figures["shadow_counts"] = [int(c) for c in point.bucket_counts]


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


def prometheus_reader(aggregates: Aggregates) -> tuple[Any, Any]:
    """A Prometheus reader on a private registry that can also hand out its last snapshot.

    Returns the reader (its ``snapshot()`` feeds the live figures without queueing data for
    the next scrape) and the registry ``/metrics`` renders.
    """
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
