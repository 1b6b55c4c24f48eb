"""Server lifecycle: readiness before the model loads, graceful SIGTERM drain."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.support.procs import ROOT, Server, post_json
from training.simulate import heard_batch, request_payload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_not_ready_until_the_model_exists_then_ready(
    start_server: Callable[..., Server], registry_env: dict[str, str]
) -> None:
    server = start_server(wait_ready=False, HEIMDALL_MODEL_URI="models:/rf-localizer@canary")
    deadline = time.monotonic() + 60
    while True:
        ready = httpx.get(server.url + "/health/ready")
        assert ready.status_code == 503
        if ready.json()["rollout"]["last_error"] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "canary" in ready.json()["rollout"]["last_error"]
    body = request_payload(heard_batch(1, 900), 0)
    refused = httpx.post(server.url + "/v1/predict", json=body, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"]
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from app.settings import load_settings; from app.registry.client import ModelRegistry;"
            "ModelRegistry(load_settings().registry).set_alias('rf-localizer', 'canary', '1')",
        ],
        env={**server.env},
        cwd=ROOT,
        check=True,
    )
    server.wait("/health/ready", 30.0)
    assert httpx.post(server.url + "/v1/predict", json=body, timeout=10).status_code == 200


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
def test_sigterm_drains_in_flight_requests(
    start_server: Callable[..., Server], interface: str
) -> None:
    # Both ways Granian can call the app (HEIMDALL_INTERFACE): the RSGI front runs the
    # lifespan shutdown from its own hook, after Granian has drained the requests.
    server = start_server(HEIMDALL_POOL_WORKERS="1", HEIMDALL_INTERFACE=interface)
    batch = heard_batch(8, 901)
    content = json.dumps(
        {"items": [request_payload(batch, i, cache=False) for i in range(8)]}
    ).encode()
    worker_pid = httpx.get(server.url + "/v1/models").json()["pool"]["workers"][0]["pid"]

    def pending() -> int:
        return int(httpx.get(server.url + "/v1/models", timeout=5).json()["pool"]["pending_items"])

    def call(_: int) -> int:
        return post_json(server.url + "/v1/predict/batch", content)

    os.kill(worker_pid, signal.SIGSTOP)  # hold the work in flight while SIGTERM arrives
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(call, i) for i in range(6)]
            deadline = time.monotonic() + 20
            while pending() < 6 * 8 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pending() == 6 * 8, "every request should be queued or computing"
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            time.sleep(0.5)
            os.kill(worker_pid, signal.SIGCONT)
            codes = [f.result() for f in futures]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker_pid, signal.SIGCONT)
    assert server.proc is not None
    server.proc.wait(40)
    assert codes == [200] * 6, codes
    assert time.monotonic() - started < 40
    assert server.proc.returncode == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health/live", timeout=2)
