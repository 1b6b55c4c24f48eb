"""Telemetry settings: what is recorded and how often it is exported (no SDK import here).

``app/settings.py`` reads this struct from ``HEIMDALL_TELEMETRY_*`` on demand, so the CLI's
fast verbs that load settings do not import the OpenTelemetry SDK.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct


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
