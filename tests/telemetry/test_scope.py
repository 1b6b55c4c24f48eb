"""The inference scope: measurements from deep in the call stack, labelled by the scope.

Real SDK providers with an in-memory metric reader and span exporter; each test reads back
what a ``/metrics`` scrape or a trace backend would get.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import HistogramDataPoint, NumberDataPoint
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from telemetry.config import TelemetrySettings
from telemetry.instruments import Telemetry
from telemetry.providers import build_telemetry
from telemetry.scope import (
    current_scope,
    inference_scope,
    phase,
    phase_spans,
    record_cache,
    record_outcome,
    traced,
)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(spans: InMemorySpanExporter) -> Telemetry:
    """Providers with an in-memory metric reader, spans exported in memory."""
    return build_telemetry(
        TelemetrySettings(trace_sample_ratio=1.0),
        "scope-test",
        prometheus=False,
        extra_span_processors=[SimpleSpanProcessor(spans)],
    )


def points(telemetry: Telemetry, name: str) -> dict[frozenset[tuple[str, Any]], Any]:
    """The points of one metric keyed by their attributes."""
    out: dict[frozenset[tuple[str, Any]], Any] = {}
    data = telemetry.snapshot()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name == name:
                    for p in metric.data.data_points:
                        out[frozenset((p.attributes or {}).items())] = p
    return out


def counts(telemetry: Telemetry, name: str) -> dict[frozenset[tuple[str, Any]], int]:
    """Counter values (or histogram counts) of one metric keyed by their attributes."""
    out = {}
    for attrs, p in points(telemetry, name).items():
        out[attrs] = int(p.value) if isinstance(p, NumberDataPoint) else p.count
    return out


def labels(**attrs: str) -> frozenset[tuple[str, Any]]:
    return frozenset(attrs.items())


def worker_step() -> None:
    """Code deep in the call stack: no telemetry object, no labels passed in."""
    phase("queue", 0.25)
    phase("features", 0.0005)
    record_cache("miss", "redis")


def test_deep_calls_are_recorded_with_the_scopes_labels(telemetry: Telemetry) -> None:
    started = time.perf_counter() - 0.2
    with inference_scope(telemetry, version="7", model="rf", started=started) as scope:
        assert current_scope() is scope
        worker_step()
        record_outcome("ok", domain_inside=False)
    assert current_scope() is None

    durations = points(telemetry, "heimdall.inference.duration")
    assert set(durations) == {
        labels(model_version="7", phase=p) for p in ("queue", "features", "total")
    }
    queue = durations[labels(model_version="7", phase="queue")]
    assert isinstance(queue, HistogramDataPoint)
    assert (queue.count, queue.sum) == (1, 0.25)
    total = durations[labels(model_version="7", phase="total")]
    assert total.count == 1 and 0.2 <= total.sum < 5  # measured from `started`
    assert counts(telemetry, "heimdall.inference.requests") == {
        labels(model_version="7", outcome="ok"): 1
    }
    assert counts(telemetry, "heimdall.inference.domain") == {
        labels(model_version="7", inside="false"): 1
    }
    assert counts(telemetry, "heimdall.cache.requests") == {
        labels(result="miss", tier="redis", model_version="7"): 1
    }
    # The same figures the live view (/v1/models) and the canary gates read.
    live = telemetry.live()["7"]
    assert (live["requests"], live["errors"], live["cache_hit_rate"]) == (1, 0, 0.0)


def test_an_outcome_without_an_answer_has_no_domain_flag(telemetry: Telemetry) -> None:
    with inference_scope(telemetry, version="3"):
        record_outcome("deadline_exceeded")
    assert counts(telemetry, "heimdall.inference.requests") == {
        labels(model_version="3", outcome="deadline_exceeded"): 1
    }
    assert counts(telemetry, "heimdall.inference.domain") == {}
    assert telemetry.gate_figures()["3"]["errors"] == 1


def test_outside_a_scope_and_with_telemetry_off_nothing_is_recorded(
    telemetry: Telemetry,
) -> None:
    worker_step()
    record_outcome("ok", domain_inside=True)
    with inference_scope(telemetry, version="1"):
        phase("queue", 0.1)
        with inference_scope(None, version="1") as off:
            assert off is None and current_scope() is None
            worker_step()
            record_outcome("ok")
        assert current_scope() is not None  # the outer scope is back
    assert counts(telemetry, "heimdall.inference.duration") == {
        labels(model_version="1", phase="queue"): 1
    }
    assert counts(telemetry, "heimdall.inference.requests") == {}
    assert counts(telemetry, "heimdall.cache.requests") == {}


async def test_concurrent_tasks_keep_their_own_scope(telemetry: Telemetry) -> None:
    both_inside = asyncio.Barrier(2)

    async def request(version: str, seconds: float) -> str | None:
        with inference_scope(telemetry, version=version):
            await both_inside.wait()  # both scopes are open at once
            await asyncio.sleep(0)
            phase("inference", seconds)
            await asyncio.sleep(0)
            record_outcome("ok")
            scope = current_scope()
            return scope.version if scope else None

    async def bystander() -> None:
        await asyncio.sleep(0)
        assert current_scope() is None  # a task started outside any scope sees none
        phase("inference", 99.0)

    seen = await asyncio.gather(request("a", 0.001), request("b", 0.002), bystander())
    assert seen[:2] == ["a", "b"]
    durations = points(telemetry, "heimdall.inference.duration")
    assert durations[labels(model_version="a", phase="inference")].sum == 0.001
    assert durations[labels(model_version="b", phase="inference")].sum == 0.002
    assert durations[labels(model_version="a", phase="inference")].count == 1
    assert durations[labels(model_version="b", phase="inference")].count == 1
    assert counts(telemetry, "heimdall.inference.requests") == {
        labels(model_version="a", outcome="ok"): 1,
        labels(model_version="b", outcome="ok"): 1,
    }


async def test_a_scope_opened_in_a_child_task_does_not_leak_back(telemetry: Telemetry) -> None:
    async def shadow() -> str | None:
        inherited = current_scope()
        with inference_scope(telemetry, version="shadow") as scope:
            assert scope is not None
            scope.shadow("ok", distance_m=12.5)
        return inherited.version if inherited else None

    with inference_scope(telemetry, version="primary") as primary:
        inherited = await asyncio.create_task(shadow())
        assert current_scope() is primary
        record_outcome("ok")
    assert inherited == "primary"  # create_task copies the context: it starts in the scope
    assert counts(telemetry, "heimdall.inference.requests") == {
        labels(model_version="primary", outcome="ok"): 1,
        labels(model_version="shadow", outcome="ok"): 1,
    }
    assert counts(telemetry, "heimdall.shadow.distance") == {labels(model_version="shadow"): 1}
    # A shadow request has no duration: only the primary's total is recorded.
    assert set(points(telemetry, "heimdall.inference.duration")) == {
        labels(model_version="primary", phase="total")
    }


def finished(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in spans.get_finished_spans()}


def test_phase_spans_and_local_cache_spans_only_for_a_sampled_request(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    timed = [("queue", 1_000, 3_000), ("features", 3_000, 0), ("inference", 5_000, 4_000)]
    with inference_scope(telemetry, version="7", model="rf"):
        phase_spans(timed, {"worker.id": "w1", "batch.size": 2})
        record_cache("hit", "local")
    assert spans.get_finished_spans() == ()  # no current recording span: not sampled

    with (
        telemetry.tracer.start_as_current_span("POST /v1/predict") as server,
        inference_scope(telemetry, version="7", model="rf"),
    ):
        phase_spans(timed, {"worker.id": "w1", "batch.size": 2})
        record_cache("hit", "local")
    got = finished(spans)
    assert set(got) == {"queue", "inference", "cache.lookup", "POST /v1/predict"}
    queue, inference = got["queue"], got["inference"]
    assert dict(queue.attributes or {}) == {
        "model.name": "rf",
        "model.version": "7",
        "worker.id": "w1",
        "batch.size": 2,
    }
    assert (queue.start_time, queue.end_time) == (1_000, 3_000)
    assert (inference.start_time, inference.end_time) == (5_000, 5_000)  # never ends early
    assert dict(got["cache.lookup"].attributes or {}) == {
        "cache.result": "hit",
        "cache.tier": "local",
        "model.version": "7",
    }
    for child in (queue, inference, got["cache.lookup"]):
        assert child.parent is not None
        assert child.parent.span_id == server.get_span_context().span_id
    # A redis lookup is counted without a span of its own here (traced() wraps the call).
    assert counts(telemetry, "heimdall.cache.requests") == {
        labels(result="hit", tier="local", model_version="7"): 2
    }


def test_traced_wraps_a_step_only_when_sampled(
    telemetry: Telemetry, spans: InMemorySpanExporter
) -> None:
    with traced("cache.lookup") as outside:
        assert outside is None
    with inference_scope(telemetry, version="7"), traced("cache.lookup") as unsampled:
        assert unsampled is None
    with (
        telemetry.tracer.start_as_current_span("server"),
        inference_scope(telemetry, version="7"),
        traced("cache.lookup") as span,
    ):
        assert span is not None
        span.set_attribute("cache.result", "miss")
    assert [s.name for s in spans.get_finished_spans()] == ["cache.lookup", "server"]


def test_without_a_span_exporter_nothing_is_traced() -> None:
    quiet = build_telemetry(TelemetrySettings(trace_sample_ratio=1.0), "scope-test")
    with (
        quiet.tracer.start_as_current_span("server") as server,
        inference_scope(quiet, version="7") as scope,
    ):
        assert server.is_recording()
        assert scope is not None and not scope.sampled()
        with traced("cache.lookup") as span:
            assert span is None


def test_the_scope_records_what_the_direct_calls_record(telemetry: Telemetry) -> None:
    """Switching the service from Telemetry's methods to the scope changes no series."""
    direct = build_telemetry(TelemetrySettings(), "scope-test", prometheus=False)
    started = time.perf_counter()
    # The calls the service made before it used the scope (Telemetry methods directly) ...
    direct.cache("miss", "4", "redis")
    for name, seconds in (("queue", 0.001), ("features", 0.0002), ("inference", 0.003)):
        direct.duration("4", name, seconds)
    direct.request("4", "ok")
    direct.duration("4", "total", time.perf_counter() - started)
    direct.domain("4", True)
    direct.request("5", "ok")
    direct.shadow_distance("5", 40.0)
    # ... and the same through scopes.
    with inference_scope(telemetry, version="4", started=started):
        record_cache("miss", "redis")
        for name, seconds in (("queue", 0.001), ("features", 0.0002), ("inference", 0.003)):
            phase(name, seconds)
        record_outcome("ok", domain_inside=True)
    with inference_scope(telemetry, version="5") as shadow:
        assert shadow is not None
        shadow.shadow("ok", 40.0)
    for name in (
        "heimdall.inference.requests",
        "heimdall.inference.duration",
        "heimdall.inference.domain",
        "heimdall.cache.requests",
        "heimdall.shadow.distance",
    ):
        assert counts(telemetry, name) == counts(direct, name), name
    ours = points(telemetry, "heimdall.inference.duration")
    theirs = points(direct, "heimdall.inference.duration")
    for attrs, point in ours.items():
        if ("phase", "total") not in attrs:
            assert point.bucket_counts == theirs[attrs].bucket_counts
            assert point.sum == theirs[attrs].sum


def test_cache_hits_are_left_out_of_the_latency_the_canary_compares(telemetry: Telemetry) -> None:
    # A warm baseline (cache hits in ~1 ms) against a cold candidate (computed answers) would
    # breach the p99 gate for latency the candidate does not have: the gates' latency counts
    # computed answers only, while requests and the Prometheus total count every answer.
    for cached in (True, True, False):
        with inference_scope(telemetry, version="4", started=time.perf_counter() - 0.004):
            record_outcome("ok", True, cached=cached)
    gate = telemetry.gate_figures()["4"]
    assert gate["requests"] == 3
    assert sum(gate["latency_counts"]) == 1
    assert gate["latency_counts"][gate["latency_bounds"].index(0.005)] == 1  # 4 ms: <= 5 ms
    total = points(telemetry, "heimdall.inference.duration")[
        labels(model_version="4", phase="total")
    ]
    assert total.count == 3
