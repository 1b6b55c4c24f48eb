"""The in-process aggregation gives the points the OpenTelemetry SDK would have given."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    HistogramDataPoint,
    InMemoryMetricReader,
    MetricsData,
    NumberDataPoint,
)
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from prometheus_client import generate_latest

from telemetry import aggregates as aggregates_module
from telemetry.aggregates import Aggregates, Instrument
from telemetry.config import TelemetrySettings
from telemetry.instruments import DURATION_BUCKETS_S
from telemetry.providers import build_telemetry


def points(data: MetricsData | None, name: str) -> dict[frozenset[Any], Any]:
    out: dict[frozenset[Any], Any] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        out[frozenset((p.attributes or {}).items())] = p
    return out


def test_histogram_and_counter_points_match_the_sdk() -> None:
    rng = random.Random(7)
    # Values on bucket bounds, zero, far outside the buckets, and ones the SDK drops.
    values = [*DURATION_BUCKETS_S, 0.0, 42.0, -1.0, math.nan, math.inf]
    values += [rng.lognormvariate(-6, 1.5) for _ in range(2000)]
    phases = ("queue", "features", "inference", "total")

    reader = InMemoryMetricReader()
    sdk = MeterProvider(
        metric_readers=[reader],
        views=[
            View(
                instrument_name="h",
                aggregation=ExplicitBucketHistogramAggregation(DURATION_BUCKETS_S),
            )
        ],
    )
    meter = sdk.get_meter("heimdall.inference")
    sdk_hist, sdk_count = meter.create_histogram("h", unit="s"), meter.create_counter("c")
    ours_hist = Instrument(
        "h", "s", "", ("model_version", "phase"), scope="s", bounds=DURATION_BUCKETS_S
    )
    ours_count = Instrument("c", "1", "", ("result", "model_version"), scope="s")
    for i, value in enumerate(values):
        phase = phases[i % 4]
        sdk_hist.record(value, {"model_version": "3", "phase": phase})
        ours_hist.record(value, "3", phase)
        # An empty value is left out of the attributes, as callers without a version do.
        version = "" if i % 5 == 0 else "3"
        sdk_count.add(1, {"result": "hit", **({"model_version": version} if version else {})})
        ours_count.add(1, "hit", version)

    ours = Aggregates(Resource.get_empty(), [ours_hist, ours_count]).merge(None)
    theirs = reader.get_metrics_data()
    expected, got = points(theirs, "h"), points(ours, "h")
    assert set(got) == set(expected) and len(got) == 4
    for attrs, want in expected.items():
        have = got[attrs]
        assert isinstance(have, HistogramDataPoint)
        assert have.count == want.count
        assert have.bucket_counts == tuple(want.bucket_counts)
        assert have.explicit_bounds == tuple(want.explicit_bounds)
        assert (have.min, have.max) == (want.min, want.max)
        assert have.sum == pytest.approx(want.sum, rel=1e-12)
    expected_c, got_c = points(theirs, "c"), points(ours, "c")
    assert set(got_c) == set(expected_c) and len(got_c) == 2
    for attrs, want in expected_c.items():
        assert isinstance(got_c[attrs], NumberDataPoint)
        assert got_c[attrs].value == want.value


def test_attribute_sets_beyond_the_limit_go_to_one_overflow_series(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aggregates_module, "CARDINALITY_LIMIT", 4)
    hist = Instrument("h", "s", "", ("route",), scope="s", bounds=(1.0, 2.0))
    for i in range(10):
        hist.record(0.5, f"/path/{i}")
    got = points(Aggregates(Resource.get_empty(), [hist]).merge(None), "h")
    assert len(got) == 4  # three routes and the overflow series
    overflow = got[frozenset({("otel.metric.overflow", True)})]
    assert overflow.count == 7
    assert sum(p.count for p in got.values()) == 10


def test_prometheus_exposition_shows_the_aggregated_instruments() -> None:
    telemetry = build_telemetry(TelemetrySettings(), "replica-a")
    for seconds in (0.0004, 0.0004, 0.003):
        telemetry.request("2", "ok")
        telemetry.duration("2", "inference", seconds)
    telemetry.http_duration(0.004, "POST", 200, "http", "/v1/predict")
    telemetry.http_duration(0.001, "GET", 404, "http", None)
    text = generate_latest(telemetry.registry).decode()
    lines = [line for line in text.splitlines() if not line.startswith("#")]

    def value(prefix: str, *needles: str) -> float:
        (line,) = [ln for ln in lines if ln.startswith(prefix) and all(n in ln for n in needles)]
        return float(line.rsplit(" ", 1)[1])

    assert value("heimdall_inference_requests_total", 'model_version="2"', 'outcome="ok"') == 3
    duration = "heimdall_inference_duration_seconds"
    assert value(f"{duration}_count", 'phase="inference"') == 3
    assert value(f"{duration}_bucket", 'phase="inference"', 'le="0.0005"') == 2
    assert value(f"{duration}_bucket", 'phase="inference"', 'le="0.003"') == 3
    assert value(f"{duration}_sum", 'phase="inference"') == pytest.approx(0.0038)
    http = "http_server_request_duration_seconds_count"
    assert value(http, 'http_route="/v1/predict"', 'http_response_status_code="200"') == 1
    # An unmatched path has no route (Prometheus shows the family's label empty).
    assert value(http, 'http_response_status_code="404"', 'http_route=""') == 1
    # Live figures read the same points.
    live = telemetry.live()["2"]
    assert live["requests"] == 3 and live["errors"] == 0
    telemetry.shutdown()
