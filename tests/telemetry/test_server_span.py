"""The server span middleware on a small Litestar app: failures, 5xx, head sampling."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, get
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from litestar.plugins.opentelemetry import OpenTelemetryConfig
from litestar.testing import TestClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import generate_latest

from app.web.tracing import server_span_middleware
from telemetry.config import TelemetrySettings
from telemetry.instruments import Telemetry
from telemetry.providers import build_telemetry


@get("/ok/{n:int}", sync_to_thread=False)
def ok(n: FromPath[int]) -> dict[str, int]:
    return {"n": n}


@get("/unavailable", sync_to_thread=False)
def unavailable() -> None:
    raise HTTPException(status_code=503, detail="not now")


@get("/boom", sync_to_thread=False)
def boom() -> None:
    raise RuntimeError("the handler failed")


def app_with(ratio: float) -> tuple[Litestar, Telemetry, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    telemetry = build_telemetry(
        TelemetrySettings(trace_sample_ratio=ratio),
        "span-test",
        extra_span_processors=[SimpleSpanProcessor(exporter)],
    )
    config = OpenTelemetryConfig(
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
        middleware_class=server_span_middleware(telemetry),
    )
    return Litestar([ok, unavailable, boom], middleware=[config.middleware]), telemetry, exporter


def server_spans(exporter: InMemorySpanExporter) -> list[Any]:
    return [s for s in exporter.get_finished_spans() if s.kind == SpanKind.SERVER]


def test_a_5xx_answer_marks_the_span_as_an_error_and_is_measured() -> None:
    app, telemetry, exporter = app_with(1.0)
    with TestClient(app) as client:
        assert client.get("/ok/3").status_code == 200
        assert client.get("/unavailable").status_code == 503
        assert client.get("/boom").status_code == 500
    spans = {s.name: s for s in server_spans(exporter)}
    assert set(spans) == {"GET /ok/{n}", "GET /unavailable", "GET /boom"}
    assert spans["GET /ok/{n}"].status.status_code == StatusCode.UNSET
    for name, code in (("GET /unavailable", 503), ("GET /boom", 500)):
        assert spans[name].status.status_code == StatusCode.ERROR
        assert spans[name].attributes["http.response.status_code"] == code
    assert spans["GET /ok/{n}"].attributes["http.route"] == "/ok/{n}"  # the template
    text = generate_latest(telemetry.registry).decode()
    assert 'http_response_status_code="503"' in text
    assert 'http_response_status_code="500"' in text


def test_requests_left_out_by_head_sampling_are_measured_without_spans() -> None:
    app, telemetry, exporter = app_with(0.0)
    with TestClient(app) as client:
        for n in range(5):
            assert client.get(f"/ok/{n}").status_code == 200
    assert server_spans(exporter) == []
    text = generate_latest(telemetry.registry).decode()
    (line,) = [
        ln
        for ln in text.splitlines()
        if ln.startswith("http_server_request_duration_seconds_count")
        and 'http_route="/ok/{n}"' in ln
    ]
    assert float(line.rsplit(" ", 1)[1]) == 5
