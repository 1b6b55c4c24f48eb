"""Traces and metrics: in-memory exporters in process, OTLP/HTTP and /metrics end to end."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import msgspec
import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app.factory import create_app
from app.settings import load_settings
from app.web.direct import DirectPredict
from app.web.tracing import ServerSpans
from telemetry.config import TelemetrySettings
from telemetry.providers import build_telemetry
from tests.support.procs import Server, free_port
from training.simulate import heard_batch, request_payload

pytestmark = pytest.mark.slow
BATCH = heard_batch(8, 4242)


@contextlib.asynccontextmanager
async def in_memory_app(
    registry_env: dict[str, str], redis_url: str, ratio: float, **env: str
) -> AsyncIterator[tuple[AsyncTestClient[Any], InMemorySpanExporter]]:
    """The app in process with in-memory span export, one pool worker, ready."""
    exporter = InMemorySpanExporter()
    telemetry = build_telemetry(
        TelemetrySettings(trace_sample_ratio=ratio),
        "test-replica",
        prometheus=False,
        extra_span_processors=[SimpleSpanProcessor(exporter)],
    )
    base = {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_POOL_WORKERS": "1",
        "HEIMDALL_CONTROL_ENABLED": "false",
    }
    app = create_app(load_settings({**base, **env}), telemetry)
    async with AsyncTestClient(app, timeout=60) as client:
        for _ in range(600):
            if (await client.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        yield client, exporter
    telemetry.shutdown()


async def test_one_prediction_is_one_trace_covering_every_phase(
    registry_env: dict[str, str], redis_url: str
) -> None:
    async with in_memory_app(
        registry_env, redis_url, 1.0, HEIMDALL_CACHE_PREFIX="heimdall:traces:"
    ) as (client, exporter):
        exporter.clear()
        body = request_payload(BATCH, 0, request_id="trace-me")
        response = await client.post("/v1/predict", json=body)
        assert response.status_code == 200
        spans = exporter.get_finished_spans()
        names = {s.name for s in spans}
        assert {"cache.lookup", "queue", "features", "inference"} <= names, names
        assert len({s.context.trace_id for s in spans}) == 1
        server = [s for s in spans if s.parent is None]
        assert len(server) == 1 and server[0].name == "POST /v1/predict"
        assert server[0].kind is SpanKind.SERVER
        assert server[0].attributes["http.route"] == "/v1/predict"
        assert server[0].attributes["http.response.status_code"] == 200
        for span in spans:
            if span.name in ("queue", "features", "inference", "cache.lookup"):
                assert span.parent is not None
                assert span.parent.span_id == server[0].context.span_id
                assert span.attributes["model.version"] == "1"
        inference = next(s for s in spans if s.name == "inference")
        assert inference.attributes["batch.size"] >= 1
        assert inference.end_time > inference.start_time
        # An incoming W3C traceparent continues that trace.
        exporter.clear()
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
        body = request_payload(BATCH, 1)
        await client.post("/v1/predict", json=body, headers={"traceparent": traceparent})
        spans = exporter.get_finished_spans()
        assert spans and {format(s.context.trace_id, "032x") for s in spans} == {trace_id}
        # Health checks are not traced.
        exporter.clear()
        await client.get("/health/ready")
        assert exporter.get_finished_spans() == ()


async def test_sampling_keeps_metrics_and_honours_a_sampled_traceparent(
    registry_env: dict[str, str], redis_url: str
) -> None:
    """Ratio 0: no spans of its own, every request still measured, a sampled parent traced."""
    async with in_memory_app(registry_env, redis_url, 0.0, HEIMDALL_CACHE_ENABLED="false") as (
        client,
        exporter,
    ):
        for i in range(5):
            response = await client.post("/v1/predict", json=request_payload(BATCH, i))
            assert response.status_code == 200
        assert exporter.get_finished_spans() == ()
        assert (await client.get("/v1/models/1")).json()["live"]["requests"] == 5
        # A caller that samples its trace gets the whole trace, whatever the local ratio.
        trace_id = "0af7651916cd43dd8448eb211c80319c"
        headers = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
        await client.post("/v1/predict", json=request_payload(BATCH, 6), headers=headers)
        spans = exporter.get_finished_spans()
        assert {"POST /v1/predict", "queue", "features", "inference"} <= {s.name for s in spans}
        assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id}
        # Unmatched paths are measured without a route (no series per scanned path).
        exporter.clear()
        await client.get("/no/such/path", headers=headers)
        (span,) = exporter.get_finished_spans()
        assert span.name == "GET" and "http.route" not in span.attributes
        assert span.attributes["http.response.status_code"] == 404


def scrape(server: Server) -> str:
    return httpx.get(server.url + "/metrics", timeout=10).text


def metric_sum(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_every_request_across_workers(shared_server: Server) -> None:
    before = scrape(shared_server)
    n = 24
    with httpx.Client(timeout=30) as client:
        for i in range(n):
            body = request_payload(BATCH, i % 8, cache=False)
            assert client.post(shared_server.url + "/v1/predict", json=body).status_code == 200
    after = scrape(shared_server)
    name = "heimdall_inference_requests_total"
    assert metric_sum(after, name, outcome="ok") - metric_sum(before, name, outcome="ok") == n
    for phase in ("queue", "features", "inference", "total"):
        count = "heimdall_inference_duration_seconds_count"
        grew = metric_sum(after, count, phase=phase) - metric_sum(before, count, phase=phase)
        assert grew == n, phase
    assert 'le="0.0005"' in after  # sub-millisecond buckets
    assert "http_server_request_duration_seconds_count" in after
    assert metric_sum(after, "heimdall_pool_workers", state="ready") == 2
    assert "heimdall_pool_queue_depth" in after
    assert "heimdall_pool_worker_restarts_total" in after
    assert "heimdall_model_reloads_total" in after
    served = [
        w["served"] for w in httpx.get(shared_server.url + "/v1/models").json()["pool"]["workers"]
    ]
    assert all(s > 0 for s in served), "both workers should have answered"
    live = httpx.get(shared_server.url + "/v1/models/1").json()["live"]
    assert live["requests"] >= n and live["latency_ms_p50"] > 0


class _Collector(BaseHTTPRequestHandler):
    received: dict[str, list[bytes]] = {"traces": [], "metrics": []}

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        kind = "traces" if self.path.endswith("/v1/traces") else "metrics"
        self.received[kind].append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, dict[str, list[bytes]]]]:
    port = free_port()
    _Collector.received = {"traces": [], "metrics": []}
    httpd = ThreadingHTTPServer(("127.0.0.1", port), _Collector)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", _Collector.received
    httpd.shutdown()
    httpd.server_close()


def test_otlp_http_export_reaches_a_collector(
    start_server: Callable[..., Server], collector: tuple[str, dict[str, list[bytes]]]
) -> None:
    endpoint, received = collector
    server = start_server(
        OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
        OTEL_SERVICE_NAME="heimdall-e2e",
        OTEL_BSP_SCHEDULE_DELAY="200",
        HEIMDALL_TELEMETRY_TRACE_SAMPLE_RATIO="1",
        HEIMDALL_TELEMETRY_METRICS_EXPORT_INTERVAL_S="1",
    )
    for i in range(3):
        body = request_payload(BATCH, i, cache=False)
        assert httpx.post(server.url + "/v1/predict", json=body, timeout=30).status_code == 200
    deadline = time.monotonic() + 20
    spans: list[Any] = []
    requests_counted = 0
    metric_names: set[str] = set()
    service_names: set[str] = set()
    while time.monotonic() < deadline and not (spans and requests_counted == 3):
        time.sleep(0.5)
        for raw in received["traces"]:
            req = ExportTraceServiceRequest.FromString(raw)
            for rs in req.resource_spans:
                service_names |= {
                    a.value.string_value for a in rs.resource.attributes if a.key == "service.name"
                }
                spans += [s for ss in rs.scope_spans for s in ss.spans]
        for raw in received["metrics"]:
            req_m = ExportMetricsServiceRequest.FromString(raw)
            for rm in req_m.resource_metrics:
                metric_names |= {m.name for sm in rm.scope_metrics for m in sm.metrics}
                for m in (m for sm in rm.scope_metrics for m in sm.metrics):
                    if m.name == "heimdall.inference.requests":  # cumulative: the latest counts
                        requests_counted = max(
                            requests_counted,
                            sum(int(p.as_double or p.as_int) for p in m.sum.data_points),
                        )
    assert service_names == {"heimdall-e2e"}
    inference = [s for s in spans if s.name == "inference"]
    assert len(inference) >= 3
    versions = {
        a.value.string_value for s in inference for a in s.attributes if a.key == "model.version"
    }
    assert versions == {"1"}
    assert {"heimdall.inference.requests", "heimdall.inference.duration"} <= metric_names
    assert requests_counted == 3
    assert re.search(r"heimdall\.pool\.workers", " ".join(metric_names))


async def test_v2_infer_records_phases_and_worker_spans_like_v1(
    registry_env: dict[str, str], redis_url: str
) -> None:
    import numpy as np

    from tests.support.reference import payload_arrays, reference_spec
    from workers.inputs import pack_capture

    spec = reference_spec()
    packed = pack_capture(*payload_arrays(request_payload(BATCH, 0)), spec)
    inputs = [
        {"name": spec.inputs[role].name, "datatype": "FP32", "shape": [1, *array.shape]}
        | {"data": np.asarray(array, dtype="<f4").reshape(-1).tolist()}
        for role, array in (
            ("features", packed.features),
            ("receivers", packed.receivers),
            ("mask", packed.mask),
        )
    ]
    trace_id = "5af7651916cd43dd8448eb211c80319d"
    headers = {"traceparent": f"00-{trace_id}-b7ad6b7169203331-01"}
    async with in_memory_app(registry_env, redis_url, 0.0) as (client, exporter):
        response = await client.post(
            "/v2/models/rf-localizer/infer", json={"inputs": inputs}, headers=headers
        )
        assert response.status_code == 200, response.text
        spans = exporter.get_finished_spans()
        by_name = {s.name: s for s in spans}
        assert {"queue", "inference"} <= set(by_name), [s.name for s in spans]
        assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id}
        assert by_name["inference"].attributes["worker.id"] == 0
        live = (await client.get("/v1/models/1")).json()["live"]
    assert live["requests"] == 1


class _RsgiHeaders:
    """Granian's header mapping: ``items()`` keeps repeated headers, ``get`` the first."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def items(self) -> list[tuple[str, str]]:
        return list(self._items)

    def get(self, name: str, default: Any = None) -> Any:
        return next((v for k, v in self._items if k == name), default)


class _RsgiScope:
    """The RSGI scope attributes the direct route reads (Granian's scope is not constructible)."""

    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.headers = _RsgiHeaders(headers)
        self.method, self.path, self.scheme, self.http_version = (
            "POST",
            "/v1/predict",
            "http",
            "1.1",
        )
        self.server, self.client, self.query_string = "127.0.0.1:8000", "127.0.0.1:50000", ""


async def test_the_direct_route_answers_and_traces_like_the_litestar_route(
    registry_env: dict[str, str], redis_url: str
) -> None:
    """The RSGI front's direct POST /v1/predict (app/web/direct.py) against the same request
    through Litestar: same answer, same trace (server span, its attributes, its children)."""
    async with in_memory_app(registry_env, redis_url, 1.0, HEIMDALL_CACHE_ENABLED="false") as (
        client,
        exporter,
    ):
        components = client.app.state.components
        telemetry = components.telemetry
        tracer = telemetry.tracer_provider.get_tracer("heimdall.http")
        direct = DirectPredict(components.service, ServerSpans(tracer, telemetry), access=False)
        # The app here lacks the X-Request-ID wrapper of a served one: the body names the id.
        body = msgspec.json.encode(request_payload(BATCH, 2, request_id="direct-7.a"))
        trace_id = "5b8efff798038103d269b633813fc60c"
        headers = [
            ("content-type", "application/json"),
            ("x-request-id", "direct-7.a"),
            ("traceparent", f"00-{trace_id}-eee19b7ec3c1b174-01"),
            ("user-agent", "probe/1"),
        ]
        # The direct route also gets an earlier traceparent: the last one counts, as in the
        # ASGI middleware's carrier (an outside review found the direct route took the first;
        # the test client joins repeated headers, so Litestar gets the one).
        repeated = [("traceparent", "00-11111111111111111111111111111111-1111111111111111-01")]

        async def read() -> bytes:
            return body

        exporter.clear()
        # In the app's own event loop (the test client runs it in a portal thread).
        portal = client.blocking_portal
        status, answer_headers, answer = await asyncio.to_thread(
            portal.call, direct, _RsgiScope(repeated + headers), read
        )
        direct_spans = exporter.get_finished_spans()
        exporter.clear()
        litestar = await client.post("/v1/predict", content=body, headers=headers)
        litestar_spans = exporter.get_finished_spans()

        assert status == litestar.status_code == 200
        assert dict(answer_headers) == {
            "content-type": "application/json",
            "x-request-id": "direct-7.a",
        }
        mine, theirs = msgspec.json.decode(answer), litestar.json()
        assert mine.pop("timing_ms").keys() == theirs.pop("timing_ms").keys()
        assert mine == theirs
        for route, spans in (("direct", direct_spans), ("litestar", litestar_spans)):
            assert {format(s.context.trace_id, "032x") for s in spans} == {trace_id}, route
        assert sorted(s.name for s in direct_spans) == sorted(s.name for s in litestar_spans)
        (server,) = [s for s in direct_spans if s.kind is SpanKind.SERVER]
        (reference,) = [s for s in litestar_spans if s.kind is SpanKind.SERVER]
        assert server.name == reference.name == "POST /v1/predict"
        attrs, want = dict(server.attributes or {}), dict(reference.attributes or {})
        # The test client names its own peer; the rest must be the same.
        for key in ("client.address", "server.address", "server.port"):
            attrs.pop(key, None), want.pop(key, None)
        assert attrs == want
        assert server.parent is not None and format(server.parent.span_id, "016x") == (
            "eee19b7ec3c1b174"
        )
        children = [s for s in direct_spans if s is not server]
        assert children and all(
            s.parent is not None and s.parent.span_id == server.context.span_id for s in children
        )
