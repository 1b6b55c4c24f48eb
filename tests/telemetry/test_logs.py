"""Structured logs: one JSON schema in the HTTP process and the workers, joined by trace id."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from telemetry.logs import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    job_trace,
    request_scope,
    resolve_format,
)
from tests.support.procs import Server, free_port
from training.simulate import heard_batch, request_payload

SCHEMA = {"ts", "level", "logger", "msg", "replica", "pid"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a server's log, parsed: Granian's and MLflow's own lines are JSON too."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_one_request_shares_its_trace_id_across_http_process_and_worker(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(
        HEIMDALL_LOG_LEVEL="DEBUG",
        HEIMDALL_ACCESS_LOG="true",
        HEIMDALL_POOL_WORKERS="1",
        HEIMDALL_CACHE_ENABLED="false",
        # Spans are made only when something exports them: an OTLP endpoint nobody serves.
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
    )
    body = request_payload(heard_batch(1, 2027), 0)
    body.pop("request_id", None)
    response = httpx.post(
        server.url + "/v1/predict",
        json=body,
        headers={
            "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01",
            "x-request-id": "ops-4711.a",
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "ops-4711.a"
    assert response.json()["request_id"] == "ops-4711.a"  # the body named none

    def mine() -> list[dict[str, Any]]:
        lines = json_lines(server.log_path.read_text())
        return [line for line in lines if line.get("trace_id") == TRACE_ID]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and {"heimdall.access", "heimdall.worker"} - {
        line["logger"] for line in mine()
    }:
        time.sleep(0.1)
    lines = json_lines(server.log_path.read_text())
    assert lines, server.log_path.read_text()[-2000:]
    for line in lines:
        assert set(line) >= SCHEMA, line
    granian = [line["msg"] for line in lines if line["logger"].startswith("_granian")]
    for start in ("Starting granian", "Listening at", "Started worker"):
        assert any(msg.startswith(start) for msg in granian), (start, granian)
    traced = mine()
    by_logger = {line["logger"]: line for line in traced}
    access, worker = by_logger["heimdall.access"], by_logger["heimdall.worker"]
    assert access["pid"] != worker["pid"]  # two processes, one trace
    assert access["replica"] == worker["replica"]
    assert len(access["span_id"]) == 16 and len(worker["span_id"]) == 16
    assert access["request_id"] == "ops-4711.a" == worker["request_id"]
    assert (access["method"], access["path"], access["status"]) == ("POST", "/v1/predict", 200)
    assert access["duration_ms"] > 0
    assert "predicted 1 of 1 items" in worker["msg"]
    # A body only the worker can refuse (IQ that is not base64): its one log line, written
    # by the worker that decoded it, names the request too.
    bad = {**body, "receivers": [{**body["receivers"][0], "iq": "%%%"}, *body["receivers"][1:]]}
    refused = httpx.post(
        server.url + "/v1/predict", json=bad, headers={"x-request-id": "ops-4711.b"}, timeout=30
    )
    assert refused.status_code == 400, refused.text

    def rejected() -> list[dict[str, Any]]:
        return [
            line
            for line in json_lines(server.log_path.read_text())
            if line["logger"] == "heimdall.decoding" and line.get("request_id") == "ops-4711.b"
        ]

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not rejected():
        time.sleep(0.1)
    (line,) = rejected()
    assert line["pid"] == worker["pid"] and "base64" in line["msg"], line
    # Every response carries an id, also unknown paths (a fresh one when none or junk is sent).
    for junk in ("x" * 300, "a b", "<script>"):
        nowhere = httpx.get(server.url + "/v2/nowhere", headers={"x-request-id": junk})
        assert nowhere.status_code == 404
        assert len(nowhere.headers["x-request-id"]) == 32, junk  # a fresh uuid4 hex


def test_auto_format_is_text_on_a_terminal_and_json_otherwise() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert resolve_format("auto", Tty()) == "text"
    assert resolve_format("auto", io.StringIO()) == "json"
    assert resolve_format("text", io.StringIO()) == "text"


@pytest.fixture
def restore_root_logger() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_request_and_job_context(restore_root_logger: None) -> None:
    stream = io.StringIO()
    assert configure_logging("INFO", "json", "replica-a", stream) == "json"
    log = logging.getLogger("heimdall.test")
    log.info("outside")
    with request_scope("req-1"):
        log.info("inside %s", "a request", extra={"status": 201})
    with job_trace(f"{TRACE_ID}-00f067aa0ba902b7-req-2-with-dashes"):
        log.warning("in a job")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    outside, inside, job, failed = (json.loads(line) for line in stream.getvalue().splitlines())
    assert set(outside) == SCHEMA and outside["replica"] == "replica-a"
    assert outside["ts"].endswith("Z") and outside["level"] == "INFO"
    assert inside["request_id"] == "req-1" and inside["status"] == 201
    assert inside["msg"] == "inside a request"
    assert (job["trace_id"], job["span_id"]) == (TRACE_ID, "00f067aa0ba902b7")
    assert job["request_id"] == "req-2-with-dashes"
    assert "ValueError: boom" in failed["exc"]


def test_text_lines_name_request_and_trace(restore_root_logger: None) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "text", "replica-b", stream)
    assert isinstance(logging.getLogger().handlers[0].formatter, TextFormatter)
    with request_scope("req-2"), job_trace(f"{TRACE_ID}-00f067aa0ba902b7"):
        logging.getLogger("heimdall.test").info("hello")
    line = stream.getvalue().strip()
    assert "INFO replica-b heimdall.test: hello" in line
    assert line.endswith(f"request_id=req-2 trace_id={TRACE_ID}")
    assert not isinstance(logging.getLogger().handlers[0].formatter, JsonFormatter)
