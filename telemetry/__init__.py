"""OpenTelemetry providers and instruments (neither Litestar nor workers)."""
