"""Head sampling: the server middleware decides before any span exists."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from telemetry.config import TelemetrySettings
from telemetry.instruments import Telemetry
from telemetry.providers import build_telemetry


def exporting(**settings: Any) -> Telemetry:
    """Telemetry whose spans go somewhere (an in-memory exporter)."""
    processor = SimpleSpanProcessor(InMemorySpanExporter())
    return build_telemetry(
        TelemetrySettings(**settings), "r", prometheus=False, extra_span_processors=[processor]
    )


@pytest.mark.parametrize(("ratio", "traced"), [(0.0, 0), (1.0, 2000)])
def test_ratio_bounds_are_exact(ratio: float, traced: int) -> None:
    telemetry = exporting(trace_sample_ratio=ratio)
    assert sum(not telemetry.untraced_root() for _ in range(2000)) == traced


def test_ratio_is_the_share_of_traced_roots() -> None:
    telemetry = exporting(trace_sample_ratio=0.1)
    traced = sum(not telemetry.untraced_root() for _ in range(20000))
    assert 1600 < traced < 2400  # 2000 expected, sd 42: outside only 9 sd away


def test_traces_off_leaves_every_request_untraced() -> None:
    telemetry = exporting(traces=False, trace_sample_ratio=1.0)
    assert all(telemetry.untraced_root() for _ in range(100))


def test_without_an_exporter_no_request_is_traced() -> None:
    telemetry = build_telemetry(TelemetrySettings(trace_sample_ratio=1.0), "r")
    assert all(telemetry.untraced_root() for _ in range(100))


def test_an_explicit_otel_sampler_decides_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    telemetry = exporting(trace_sample_ratio=1.0)
    assert not telemetry.untraced_root()  # the span is started; the SDK's sampler drops it
    span = telemetry.tracer.start_span("x")
    assert not span.is_recording()
