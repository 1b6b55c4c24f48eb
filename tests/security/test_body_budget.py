"""The byte budget over request bodies (``HEIMDALL_MAX_BODY_BYTES_IN_FLIGHT``), from outside.

An outside review sent four 64 MB batches at once and the HTTP process grew to 894 MiB:
nothing bounded the bytes of bodies held but the upload count. The budget counts a body's
bytes as they arrive and holds them until its answer is sent. What a client notices is
asserted: a body that does not fit (in one piece, chunked, or inflated from gzip) gets 503
with ``Retry-After`` and the ``body-budget-full`` problem, health checks keep answering, the
same body is answered 200 once the bytes held are given back; and (a second review) uploads
that stall hold nothing of the budget, and a body over its route's limit is refused unread.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.support.procs import Server
from tests.support.rawhttp import connect, read_answer, request_head
from tests.support.reference import reference_spec
from training.simulate import heard_batch, request_payload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BUDGET = 1 << 20  # HEIMDALL_MAX_BODY_BYTES_IN_FLIGHT of this server, and both body limits
CAPTURES = heard_batch(8, 5150)
ITEMS = [request_payload(CAPTURES, i, cache=False) for i in range(8)]
ONE = json.dumps(ITEMS[0]).encode()
PROBLEM = "urn:heimdall:problem:body-budget-full"


def gzipped_v2_body() -> bytes:
    """A valid /v2 infer body of 300 kB (zeros, padded with spaces), gzipped to a few hundred
    bytes: the budget counts the encoded bytes at admission, the inflated ones once inflated."""
    inputs = [
        {
            "name": tensor.name,
            "datatype": "FP32",
            "shape": [1, *tensor.shape[1:]],
            "data": np.zeros([1, *tensor.shape[1:]]).ravel().tolist(),
        }
        for tensor in reference_spec().inputs.values()
    ]
    plain = json.dumps({"inputs": inputs}).encode()
    padded = b"{" + b" " * max(0, 300_000 - len(plain)) + plain[1:]
    return gzip.compress(padded)


GZIPPED = gzipped_v2_body()
V2 = "/v2/models/rf-localizer/infer"
GZIP_HEADERS = {"content-type": "application/json", "content-encoding": "gzip"}


def batch_that_fills_the_budget() -> bytes:
    """The largest batch of captures within the budget: with one more capture it does not fit."""
    items = 1
    while len(json.dumps({"items": ITEMS[: items + 1]})) <= BUDGET:
        items += 1
    body = json.dumps({"items": ITEMS[:items]}).encode()
    assert len(body) + len(ONE) > BUDGET, "the test needs a batch that leaves no room for ONE"
    return body


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, registry_env: dict[str, str]
) -> Iterator[Server]:
    env = {
        **registry_env,
        "REDIS_URL": "",
        "HEIMDALL_POOL_WORKERS": "1",
        "HEIMDALL_MAX_BODY_BYTES": str(BUDGET),
        "HEIMDALL_MAX_BATCH_BODY_BYTES": str(BUDGET),
        "HEIMDALL_MAX_BODY_BYTES_IN_FLIGHT": str(BUDGET),
        "HEIMDALL_BODY_TIMEOUT_S": "60",
        "HEIMDALL_BODY_GRACE_S": "60",
    }
    srv = Server(env, tmp_path_factory.mktemp("budget") / "server.log").start()
    yield srv
    srv.stop()


def refused_for_budget(answer: httpx.Response) -> None:
    assert answer.status_code == 503, answer.text
    assert answer.headers["retry-after"] == "1"
    problem = answer.json()
    assert problem["type"] == PROBLEM, problem
    assert "budget" in problem["detail"], problem


def chunks(body: bytes) -> Iterator[bytes]:
    """``body`` sent chunked (no Content-Length): the budget counts it as it arrives."""
    for start in range(0, len(body), 16384):
        yield body[start : start + 16384]


def test_stalled_uploads_hold_nothing_and_an_oversized_body_is_413_unread(
    server: Server,
) -> None:
    # An outside review: two connections announcing 128 MiB and sending nothing shut off
    # predictions for a minute while the budget counted announced lengths. A stalled upload
    # holds only the bytes it sent, and a body over its route's limit is refused unread.
    stalls = []
    for method, path in (("POST", "/v1/predict/batch"), ("GET", "/health/live")):
        sock = connect(server.port)
        sock.sendall(
            request_head(
                method, path, {"Content-Type": "application/json", "Content-Length": str(BUDGET)}
            )
            + b'{"items": '
        )
        stalls.append(sock)
    try:
        time.sleep(0.3)
        for _ in range(3):
            answer = httpx.post(server.url + "/v1/predict", content=ONE, timeout=30)
            assert answer.status_code == 200, answer.text
        oversized = connect(server.port)
        try:
            started = time.monotonic()
            # Over /v1/feedback's 64 KiB, within what the front reads before the application.
            oversized.sendall(request_head("POST", "/v1/feedback", {"Content-Length": "500000"}))
            refused = read_answer(oversized, timeout=5)
            assert refused is not None and refused.status == 413, refused
            assert time.monotonic() - started < 2, "refused on its Content-Length, unread"
            assert json.loads(refused.body)["type"] == "urn:heimdall:problem:too-large"
        finally:
            oversized.close()
    finally:
        for sock in stalls:
            sock.close()
    assert "Traceback" not in server.log_path.read_text()


def test_queued_requests_hold_their_bytes_until_they_are_answered(server: Server) -> None:
    body = batch_that_fills_the_budget()
    items = len(json.loads(body)["items"])
    models = httpx.get(server.url + "/v1/models", timeout=10).json()
    worker_pid = models["pool"]["workers"][0]["pid"]

    def pending() -> int:
        pool = httpx.get(server.url + "/v1/models", timeout=5).json()["pool"]
        return int(pool["pending_items"])

    os.kill(worker_pid, signal.SIGSTOP)  # the batch's body is in; its answer cannot come
    try:
        with ThreadPoolExecutor(1) as threads:
            queued = threads.submit(
                httpx.post, server.url + "/v1/predict/batch", content=body, timeout=60
            )
            deadline = time.monotonic() + 20
            while pending() < items and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pending() == items, "the batch should be queued behind the stopped worker"
            # Whether it comes in one piece, chunked, or inflated from a few hundred bytes.
            refused_for_budget(httpx.post(server.url + "/v1/predict", content=ONE, timeout=10))
            chunked = httpx.post(
                server.url + "/v1/predict",
                content=chunks(ONE),
                headers={"content-type": "application/json"},
                timeout=10,
            )
            refused_for_budget(chunked)
            inflated = httpx.post(
                server.url + V2, content=GZIPPED, headers=GZIP_HEADERS, timeout=10
            )
            assert inflated.status_code == 503, inflated.text
            assert inflated.headers["retry-after"] == "1"
            assert "inflates to" in inflated.json()["error"]
            assert httpx.get(server.url + "/health/live", timeout=5).status_code == 200
            os.kill(worker_pid, signal.SIGCONT)
            answered = queued.result(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGCONT)
    assert answered.status_code == 200, answered.text
    assert {item["kind"] for item in answered.json()["results"]} == {"prediction"}
    # Every byte was given back: the same full batch, then the capture, are admitted again.
    again = httpx.post(server.url + "/v1/predict/batch", content=body, timeout=60)
    assert again.status_code == 200, again.text
    assert httpx.post(server.url + "/v1/predict", content=ONE, timeout=30).status_code == 200
    assert (
        httpx.post(server.url + V2, content=GZIPPED, headers=GZIP_HEADERS, timeout=30).status_code
        == 200
    )


def test_a_body_alone_over_the_limits_is_413_not_a_budget_refusal(server: Server) -> None:
    # Alone on the replica, a chunked body past the limit is the client's to fix (413): the
    # budget refuses only for bytes other requests hold.
    big = json.dumps({"items": ITEMS * 2}).encode()
    assert len(big) > BUDGET
    answer = httpx.post(
        server.url + "/v1/predict/batch",
        content=chunks(big),
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 413, answer.text
