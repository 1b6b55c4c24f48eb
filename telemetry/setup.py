"""OpenTelemetry providers and the service's instruments (no web framework here)."""

from __future__ import annotations

from msgspec import Struct


class TelemetrySettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Telemetry settings (prefix ``HEIMDALL_TELEMETRY_``; the SDK reads ``OTEL_*`` itself)."""

    enabled: bool = True
    """Record traces and metrics at all (``/metrics`` answers 404 when off)."""
    traces: bool = True
    """Create spans (exported only when ``OTEL_EXPORTER_OTLP_*`` endpoints are set)."""
