"""Hostile clients against a real server, from the outside (raw sockets and plain HTTP).

What a user notices is asserted: status codes (4xx, never 5xx), answers that do not come,
connections that close, /health/live latency while connections stall, predictions still
answered afterwards, no traceback in the log and no 5xx in /metrics. Covers issue 17's
classes; docs/reliability.md maps each class to its test here.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import re
import socket
import statistics
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from tests.support.procs import Server
from tests.support.rawhttp import (
    closed_by_peer,
    connect,
    exchange,
    parse,
    read_all,
    read_answer,
    request_head,
)
from tests.support.reference import reference_spec
from training.simulate import iter_batches, request_payload

# serial: it measures latency, timing or load (runs alone in `make test`)
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.serial]

MODEL = "rf-localizer"
V2 = f"/v2/models/{MODEL}/infer"
BATCH_LIMIT = 32 << 20  # HEIMDALL_MAX_BATCH_BODY_BYTES of this server: the inflate limit too
UPLOADS = 200  # HEIMDALL_MAX_CONCURRENT_UPLOADS of this server
DEPTH = 50_000
GOOD = request_payload(next(iter_batches(4, 1717, chunk=4)), 0, cache=False)
GOOD_JSON = json.dumps(GOOD).encode()


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, registry_env: dict[str, str]
) -> Iterator[Server]:
    """A private server with short intake limits (no Redis: hostile payloads stay out)."""
    env = {
        **registry_env,
        "REDIS_URL": "",
        "HEIMDALL_POOL_WORKERS": "1",
        "HEIMDALL_BODY_TIMEOUT_S": "4",
        "HEIMDALL_BODY_GRACE_S": "1",
        "HEIMDALL_BODY_MIN_RATE_BYTES_S": "65536",
        "HEIMDALL_MAX_CONCURRENT_UPLOADS": str(UPLOADS),
        "HEIMDALL_GRANIAN_BACKPRESSURE": "1024",
        "HEIMDALL_MAX_BATCH_BODY_BYTES": str(BATCH_LIMIT),
        "OTEL_SDK_DISABLED": "false",
    }
    srv = Server(env, tmp_path_factory.mktemp("hostile") / "server.log").start()
    yield srv
    srv.stop()


def metric(server: Server, name: str, **labels: str) -> float:
    """Sum of a Prometheus series whose labels include ``labels``."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def server_errors(server: Server) -> float:
    """Requests answered 5xx so far, as /metrics counts them."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("http_server_request_duration_seconds_count")
        and re.search(r'http_response_status_code="5\d\d"', line)
    )


def assert_still_serving(server: Server) -> None:
    answer = httpx.post(server.url + "/v1/predict", content=GOOD_JSON, timeout=30)
    assert answer.status_code == 200, answer.text
    assert "Traceback" not in server.log_path.read_text()


# --------------------------------------------------------------------------- bodies


def json_nest(inner: bytes = b"") -> bytes:
    return b"[" * DEPTH + inner + b"]" * DEPTH


def msgpack_nest() -> bytes:
    return b"\x91" * DEPTH + b"\xc0"


def v2_json(data: bytes, parameters: bytes = b"{}") -> bytes:
    spec = reference_spec()
    inputs = []
    for i, tensor in enumerate(spec.inputs.values()):
        shape = [1, *tensor.shape[1:]]
        values = data if i == 0 else json.dumps(np.zeros(shape).ravel().tolist()).encode()
        inputs.append(
            b'{"name": "%s", "datatype": "FP32", "shape": %s, "data": %s}'
            % (tensor.name.encode(), json.dumps(shape).encode(), values)
        )
    return b'{"parameters": %s, "inputs": [%s]}' % (parameters, b", ".join(inputs))


BIG = b"1" + b"0" * 400
BOMBS: list[tuple[str, str, bytes]] = [
    ("/v1/predict", "json", b'{"unknown": ' + json_nest() + GOOD_JSON[1:]),
    ("/v1/predict", "msgpack", b"\x81\xa7unknown" + msgpack_nest()),
    ("/v1/predict", "json", GOOD_JSON.replace(b'"sample_rate_hz": ', b'"sample_rate_hz": ' + BIG)),
    ("/v1/predict", "json", b'{"receivers": [], "sample_rate_hz": 1' + b"0" * 100_000 + b"}"),
    ("/v1/predict/batch", "json", b'{"items": [{"x": ' + json_nest() + b"}]}"),
    ("/v1/predict/batch", "msgpack", b"\x81\xa5items\x91\x81\xa1x" + msgpack_nest()),
    (V2, "json", v2_json(b"[[" + BIG + b"]]")),
    (V2, "json", v2_json(b"[" + BIG + b"]")),
    (V2, "json", v2_json(json_nest(b"1"))),
    (V2, "json", v2_json(b"[0]", parameters=b'{"x": ' + json_nest() + b"}")),
]


@pytest.mark.parametrize(
    ("path", "fmt", "body"),
    BOMBS,
    ids=[
        "v1-json-nesting",
        "v1-msgpack-nesting",
        "v1-json-400-digits",
        "v1-json-100k-digits",
        "batch-json-nesting",
        "batch-msgpack-nesting",
        "v2-nested-400-digits",
        "v2-flat-400-digits",
        "v2-data-nesting",
        "v2-parameters-nesting",
    ],
)
def test_nesting_and_number_bombs_get_a_4xx(
    server: Server, path: str, fmt: str, body: bytes
) -> None:
    media = "application/msgpack" if fmt == "msgpack" else "application/json"
    answer = httpx.post(
        server.url + path, content=body, headers={"content-type": media}, timeout=30
    )
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert "Traceback" not in server.log_path.read_text()


# --------------------------------------------------------------------------- uploads


def test_aborted_uploads_are_client_faults_not_5xx(server: Server) -> None:
    before_5xx = server_errors(server)
    before = metric(server, "heimdall_http_client_faults_total", reason="incomplete_body")
    for _ in range(20):
        with connect(server.port) as sock:
            head = {"content-type": "application/json", "content-length": str(len(GOOD_JSON))}
            sock.sendall(request_head("POST", "/v1/predict", head) + GOOD_JSON[:5000])
    time.sleep(1.0)
    after = metric(server, "heimdall_http_client_faults_total", reason="incomplete_body")
    assert after - before == 20
    assert server_errors(server) == before_5xx
    assert_still_serving(server)


def chunked(body: bytes, *, last: bool = True) -> bytes:
    parts = [
        b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096])
        for i in range(0, len(body), 4096)
    ]
    return b"".join(parts) + (b"0\r\n\r\n" if last else b"")


def test_chunked_body_without_its_last_chunk_is_not_computed(server: Server) -> None:
    head = request_head(
        "POST", "/v1/predict", {"content-type": "application/json", "transfer-encoding": "chunked"}
    )
    with connect(server.port) as sock:
        sock.sendall(head + chunked(GOOD_JSON))
        complete = read_answer(sock, 30)
    assert complete is not None and complete.status == 200
    computed = metric(server, "heimdall_inference_requests_total", outcome="ok")
    faults = metric(server, "heimdall_http_client_faults_total", reason="incomplete_body")
    # The same body without its terminating chunk, then end of stream.
    cut, _ = parse(exchange(server.port, head + chunked(GOOD_JSON, last=False), shut_write=True))
    assert [a.status for a in cut] in ([], [400]), cut  # refused or closed, never computed
    time.sleep(0.5)
    assert metric(server, "heimdall_inference_requests_total", outcome="ok") == computed
    assert metric(server, "heimdall_http_client_faults_total", reason="incomplete_body") == (
        faults + 1
    )


def test_stalled_and_trickled_bodies_get_408_and_the_connection_closes(server: Server) -> None:
    head = request_head(
        "POST", "/v1/predict", {"content-type": "application/json", "content-length": "200000"}
    )
    with connect(server.port) as stalled, connect(server.port) as trickled:
        started = time.monotonic()
        stalled.sendall(head + b'{"receivers": [')
        trickled.sendall(head)
        answers = {}
        while len(answers) < 2 and time.monotonic() - started < 10:
            with contextlib.suppress(OSError):
                trickled.send(b" ")  # one byte every 0.1 s: 10 B/s, far below 64 KiB/s
            time.sleep(0.1)
            for name, sock in (("stalled", stalled), ("trickled", trickled)):
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answers.setdefault(name, sock.recv(65536))
                sock.setblocking(True)
        elapsed = time.monotonic() - started
        for name in ("stalled", "trickled"):
            got, _ = parse(answers[name])
            assert got and got[0].status == 408, (name, answers[name][:300])
            assert got[0].headers.get("connection") == "close"
        # deadline = grace 1 s + 200 kB at 64 KiB/s = 4.05 s, capped by the 4 s body timeout
        assert 3.5 < elapsed < 6.0, elapsed
        assert closed_by_peer(stalled) and closed_by_peer(trickled)


def probe_live(server: Server, seconds: float, every: float = 0.05) -> list[float]:
    """/health/live latencies (s) sampled for ``seconds`` over one kept-alive connection."""
    samples = []
    with httpx.Client(base_url=server.url, timeout=5) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            assert client.get("/health/live").status_code == 200
            samples.append(time.perf_counter() - t)
            time.sleep(every)
    return samples


def test_stalled_uploads_do_not_starve_health_checks_or_predictions(server: Server) -> None:
    head = request_head(
        "POST", "/v1/predict", {"content-type": "application/json", "content-length": "300000"}
    )
    idle = [connect(server.port) for _ in range(200)]  # connected, nothing sent
    stalled = []
    for _ in range(UPLOADS - 10):  # uploads that stall after their first bytes
        sock = connect(server.port)
        sock.sendall(head + b'{"receivers": [')
        stalled.append(sock)
    try:
        time.sleep(0.3)
        live = probe_live(server, 1.0)
        latencies = []
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for _ in range(10):
                t = time.perf_counter()
                answer = client.post("/v1/predict", content=GOOD_JSON)
                latencies.append(time.perf_counter() - t)
                assert answer.status_code == 200, answer.text
        # Uploads beyond the cap are refused at once (503 + Retry-After), not left hanging.
        extra = [connect(server.port) for _ in range(30)]
        for sock in extra:
            sock.sendall(head)
        refused = [read_answer(sock, 3.0) for sock in extra]
        for sock in extra:
            sock.close()
        assert max(live) < 0.1, live
        print(
            f"\n/health/live max {max(live) * 1000:.1f} ms with 190 stalled uploads + 200 "
            f"idle connections; predictions median {statistics.median(latencies) * 1000:.1f} ms"
        )
        statuses = [a.status if a else None for a in refused]
        assert statuses.count(503) >= 10, statuses  # the 10 free slots may take some
        assert all(a.headers.get("retry-after") for a in refused if a and a.status == 503)
    finally:
        for sock in idle + stalled:
            sock.close()
    assert_still_serving(server)


# --------------------------------------------------------------------------- HTTP/1.1 abuse


def test_request_smuggling_attempts_are_refused_or_answered_once(server: Server) -> None:
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    # CL + TE: the chunked body ends at once; the bytes after it must not be a second request.
    cl_te = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n%s"
        % (5 + len(smuggled), smuggled)
    )
    answers, _ = parse(exchange(server.port, cl_te, timeout=5))
    assert len(answers) == 1 and 400 <= answers[0].status < 500, answers
    # Two different Content-Lengths: refused by the HTTP layer.
    dup = (
        b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\n{}"
    )
    answers, _ = parse(exchange(server.port, dup, timeout=5))
    assert [a.status for a in answers] == [400], answers
    for bad_length in (b"-1", b"+2", b"0x10", b"1 1"):
        raw = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n{}" % bad_length
        answers, _ = parse(exchange(server.port, raw, timeout=5))
        assert all(400 <= a.status < 500 for a in answers), (bad_length, answers)
    assert server_errors(server) == 0


def test_pipelined_requests_are_answered_in_order(server: Server) -> None:
    raw = (
        request_head("GET", "/health/live")
        + request_head(
            "POST",
            "/v1/predict",
            {"content-type": "application/json", "content-length": str(len(GOOD_JSON))},
        )
        + GOOD_JSON
        + request_head("GET", "/v2/health/live", {"connection": "close"})
    )
    answers, _ = parse(exchange(server.port, raw, timeout=30))
    assert [a.status for a in answers] == [200, 200, 200]
    assert json.loads(answers[1].body)["kind"] == "prediction"
    assert json.loads(answers[2].body) == {"live": True}


def test_huge_headers_are_refused_without_5xx(server: Server) -> None:
    huge_value = request_head("GET", "/health/live", {"x-junk": "a" * 200_000})
    many = request_head("GET", "/health/live", [(f"x-h{i}", "v") for i in range(5_000)])
    for raw in (huge_value, many):
        answers, _ = parse(exchange(server.port, raw, timeout=10))
        assert all(a.status < 500 for a in answers), [a.status for a in answers]
    assert httpx.get(server.url + "/health/live", timeout=5).status_code == 200


# --------------------------------------------------------------------------- /v2


def gzip_zeros(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    return b"".join(compressor.compress(chunk) for _ in range(size >> 20)) + compressor.flush()


def test_compression_bombs_are_refused_without_blocking_the_loop(server: Server) -> None:
    bomb = gzip_zeros(1 << 30)  # 1 GiB of zeros in ≈ 1 MB
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    statuses: list[int] = []

    def send() -> None:
        answer = httpx.post(server.url + V2, content=bomb, headers=headers, timeout=60)
        statuses.append(answer.status_code)

    threads = [threading.Thread(target=send) for _ in range(3)]
    for thread in threads:
        thread.start()
    live = probe_live(server, 2.0, every=0.01)
    for thread in threads:
        thread.join()
    assert statuses == [413] * 3, statuses
    print(f"\n/health/live during 3 gzip bombs: max {max(live) * 1000:.1f} ms")
    assert max(live) < 0.1, sorted(live)[-5:]
    good = gzip.compress(v2_json(json.dumps([0.0] * (7 * 32 * 32)).encode()))
    answer = httpx.post(server.url + V2, content=good, headers=headers, timeout=30)
    assert answer.status_code == 200, answer.text


def test_non_finite_outputs_are_a_422_not_null(server: Server) -> None:
    spec = reference_spec()
    shapes = {t.name: [1, *t.shape[1:]] for t in spec.inputs.values()}
    fills = {spec.inputs["features"].name: 3e38, spec.inputs["mask"].name: 1.0}
    body: dict[str, Any] = {"inputs": []}
    for name, shape in shapes.items():
        fill = fills.get(name, 0.0)  # huge but finite features, every receiver present
        body["inputs"].append(
            {"name": name, "datatype": "FP32", "shape": shape, "data": [fill] * int(np.prod(shape))}
        )
    before = metric(server, "heimdall_inference_requests_total", outcome="nonfinite_output")
    answer = httpx.post(server.url + V2, json=body, timeout=30)
    assert answer.status_code == 422, answer.text
    assert "not finite" in answer.json()["error"]
    after = metric(server, "heimdall_inference_requests_total", outcome="nonfinite_output")
    assert after == before + 1
    assert_still_serving(server)


def test_messagepack_and_base64_junk_is_a_4xx(server: Server) -> None:
    bad_iq = {**GOOD, "receivers": [{**GOOD["receivers"][0], "iq": "%%%"}]}
    bodies = [
        (msgspec.msgpack.encode({"receivers": [{"iq": b"\x00" * 7}]}), "application/msgpack"),
        (b"\xc1" * 100, "application/msgpack"),  # never-used msgpack byte
        (json.dumps(bad_iq).encode(), "application/json"),
        (base64.b64encode(b"x" * 1000), "application/json"),
    ]
    for body, media in bodies:
        answer = httpx.post(
            server.url + "/v1/predict", content=body, headers={"content-type": media}, timeout=30
        )
        assert 400 <= answer.status_code < 500, answer.text[:300]


def test_made_up_methods_do_not_grow_metrics(server: Server) -> None:
    """300 made-up method tokens are one ``_OTHER`` series, not 300 (each was a new series
    per status and route: a client could grow /metrics to megabytes and stall every scrape)."""
    before = httpx.get(server.url + "/metrics", timeout=10).text.count("\n")
    with httpx.Client(base_url=server.url, timeout=10) as client:
        for i in range(300):
            assert client.request(f"M{i}", "/v1/models").status_code < 500
    after = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'http_request_method="M1' not in after
    assert (
        metric(server, "http_server_request_duration_seconds_count", http_request_method="_OTHER")
        >= 300
    )
    assert after.count("\n") - before < 40  # one histogram: its buckets, sum and count


def test_http2_is_not_spoken(server: Server) -> None:
    # The intake rules and their refusals (Connection: close, which HTTP/2 forbids) are built
    # for HTTP/1.1; served over h2c (prior knowledge) a refusal was a stream error and a
    # trickled body was never cut (third outside review). Only HTTP/1.1 is served.
    sock = connect(server.port)
    try:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        data = read_all(sock, timeout=3)
    finally:
        sock.close()
    # Closed, or an HTTP/1.1 refusal; never an HTTP/2 SETTINGS frame (type 4 at byte 3).
    assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:64]
    assert httpx.get(server.url + "/health/live", timeout=5).status_code == 200


def test_no_request_in_this_module_was_answered_5xx(server: Server) -> None:
    assert server_errors(server) == 0
    assert "Traceback" not in server.log_path.read_text()
    with socket.create_connection(("127.0.0.1", server.port)):
        pass
    assert_still_serving(server)
