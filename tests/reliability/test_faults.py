"""Fault cases not covered elsewhere: registry unavailable or artifact cache unwritable during
a rollout, slow clients, a full queue and passed deadlines — all through real servers.

Covered elsewhere (see docs/reliability.md): worker SIGKILL/hang/crash loop
(tests/workers/test_pool.py), Redis killed (tests/integration/test_cache.py), bad model
variants (tests/integration/test_rollout.py), SIGTERM under load (tests/e2e/test_lifecycle.py).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_rollout import cli, served_version, wait_for
from tests.support.procs import Server, run_cli
from tests.support.variants import register_variant
from training.simulate import heard_batch, request_payload

# serial: it measures latency, timing or load (runs alone in `make test`)
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.serial]

BATCH = heard_batch(64, 991)
BODIES = [request_payload(BATCH, i, cache=False) for i in range(64)]


@pytest.fixture
def private_env(registry_env: dict[str, str], redis_url: str, tmp_path: Path) -> dict[str, str]:
    """A private copy of the session registry (so breaking it harms no other test)."""
    source = Path(registry_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    db = tmp_path / "mlflow.db"
    shutil.copy(source, db)
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
        "HEIMDALL_ARTIFACT_CACHE": str(tmp_path / "artifacts"),
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"f{uuid.uuid4().hex[:8]}",
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "2",
        "HEIMDALL_CONTROL_RETRY_MAX_S": "1",
        "HEIMDALL_POOL_WORKERS": "1",
    }


def rollout_state(server: Server) -> dict[str, Any]:
    return httpx.get(server.url + "/v1/models", timeout=5).json()["rollout"]


def assert_keeps_serving_version_1(server: Server) -> None:
    for body in BODIES[:5]:
        answer = httpx.post(server.url + "/v1/predict", json=body, timeout=10)
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
    assert httpx.get(server.url + "/health/ready", timeout=5).status_code == 200


def test_registry_unavailable_during_a_rollout_keeps_serving_then_converges(
    start_server: Callable[..., Server], private_env: dict[str, str], tmp_path: Path
) -> None:
    """The MLflow backend store breaks after the publish: the replica keeps serving v1,
    says why in /v1/models, and converges once the registry is back."""
    v2 = register_variant(private_env, tmp_path, "good", calibration=1.21)
    server = start_server(**private_env)
    db = Path(private_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    header = db.read_bytes()[:100]
    # Overwrite the header in place (same inode: open pooled connections see it too, and
    # root cannot bypass it the way it bypasses file permissions).
    with db.open("r+b") as handle:
        handle.write(b"\0" * 100)
    try:
        cli(
            {**private_env, "MLFLOW_TRACKING_URI": "sqlite:////nonexistent/x.db"},
            "route",
            f"{v2}=1",
            "--no-check",  # the registry is broken for the publisher too
        )
        wait_for(lambda: rollout_state(server)["last_outcome"] == "failed", 20.0)
        error = rollout_state(server)["last_error"]
        assert error and ("database" in error.lower() or "registry" in error.lower()), error
        assert served_version(server) == {"1": 1.0}
        assert_keeps_serving_version_1(server)
    finally:
        with db.open("r+b") as handle:
            handle.write(header)
    took = wait_for(lambda: served_version(server) == {v2: 1.0}, 20.0)
    assert rollout_state(server)["last_outcome"] == "applied"
    print(f"\nregistry back: converged on v{v2} {took:.1f}s later (last error was: {error[:80]})")


def test_a_registry_outage_in_steady_state_is_reported_and_then_cleared(
    start_server: Callable[..., Server], private_env: dict[str, str]
) -> None:
    """Every convergence resolves the references; while the registry is broken `status` says
    so (exit 1), and once it answers again the failure clears by itself (a fourth review
    found `status` failing for good after a 12 s lock: the same fingerprint never recorded
    success)."""
    server = start_server(**private_env)
    cli(private_env, "route", "1=1")
    wait_for(lambda: rollout_state(server)["applied_revision"] == 1, 20.0)
    db = Path(private_env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///"))
    header = db.read_bytes()[:100]
    with db.open("r+b") as handle:
        handle.write(b"\0" * 100)
    try:
        wait_for(lambda: rollout_state(server)["last_outcome"] == "failed", 20.0)
        assert run_cli(private_env, "status").returncode != 0
        assert_keeps_serving_version_1(server)
    finally:
        with db.open("r+b") as handle:
            handle.write(header)
    wait_for(lambda: rollout_state(server)["last_outcome"] == "applied", 20.0)
    assert rollout_state(server)["last_error"] is None
    wait_for(lambda: run_cli(private_env, "status").returncode == 0, 20.0)


@contextlib.contextmanager
def unwritable(folder: Path) -> Iterator[str]:
    """Make ``folder`` unwritable even for root: the immutable attribute when the filesystem
    has it, else replace the folder by a regular file. Yields the method used."""
    folder.mkdir(parents=True, exist_ok=True)
    immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if immutable:
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    moved = folder.with_name(folder.name + ".moved")
    folder.rename(moved)
    folder.write_bytes(b"")
    try:
        yield "a file where the folder was"
    finally:
        folder.unlink()
        moved.rename(folder)


def test_unwritable_artifact_cache_keeps_serving_resident_version_with_a_clear_error(
    start_server: Callable[..., Server], private_env: dict[str, str], tmp_path: Path
) -> None:
    v2 = register_variant(private_env, tmp_path, "good", calibration=1.22)
    server = start_server(**private_env)
    model_dir = Path(private_env["HEIMDALL_ARTIFACT_CACHE"]) / "rf-localizer"
    with unwritable(model_dir) as how:
        cli(private_env, "route", f"{v2}=1")
        wait_for(lambda: rollout_state(server)["last_outcome"] == "failed", 20.0)
        error = rollout_state(server)["last_error"]
        assert "cannot write the artifact cache" in error, (how, error)
        assert_keeps_serving_version_1(server)
    wait_for(lambda: served_version(server) == {v2: 1.0}, 20.0)


def test_slow_client_is_cut_by_the_header_timeout_without_hurting_others(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(REDIS_URL="", HEIMDALL_HTTP_TIMEOUT_S="1", HEIMDALL_POOL_WORKERS="1")
    slow = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)]
    try:
        for sock in slow:  # a request line and one header, then silence
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\n")
            sock.settimeout(5.0)
        started = time.monotonic()
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for body in BODIES[:10]:
                assert client.post("/v1/predict", json=body).status_code == 200
        assert time.monotonic() - started < 5.0
        cut = 0
        for sock in slow:
            with contextlib.suppress(ConnectionResetError):
                data = sock.recv(1024)
                assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:80]
            cut += 1
        assert cut == len(slow)
        assert time.monotonic() - started < 5.0, "slow clients were not cut within ~1 s"
    finally:
        for sock in slow:
            sock.close()


def fire(
    server: Server, bodies: list[Any], path: str = "/v1/predict", workers: int = 16
) -> list[httpx.Response]:
    with (
        httpx.Client(
            base_url=server.url, timeout=60, limits=httpx.Limits(max_connections=workers)
        ) as client,
        ThreadPoolExecutor(workers) as pool,
    ):
        return list(pool.map(lambda b: client.post(path, json=b), bodies))


def test_full_queue_answers_503_with_retry_after_and_the_rest_succeed(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(
        REDIS_URL="",
        HEIMDALL_POOL_WORKERS="1",
        HEIMDALL_POOL_QUEUE_SIZE="2",
        HEIMDALL_POOL_MAX_BATCH="1",
        HEIMDALL_POOL_MAX_INFLIGHT="1",
    )
    responses = fire(server, BODIES * 2, workers=32)
    codes = Counter(r.status_code for r in responses)
    print(f"\nqueue size 2, 128 requests over 32 connections: {dict(codes)}")
    assert set(codes) <= {200, 503} and codes[503] > 0 and codes[200] > 0, codes
    for refused in (r for r in responses if r.status_code == 503):
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["content-type"] == "application/problem+json"
    assert httpx.get(server.url + "/health/ready").status_code == 200


def queue_depth(server: Server) -> int:
    return int(httpx.get(server.url + "/v1/models", timeout=5).json()["pool"]["queue_depth"])


def test_deadline_passed_in_the_queue_answers_504(start_server: Callable[..., Server]) -> None:
    server = start_server(
        REDIS_URL="",
        HEIMDALL_POOL_WORKERS="1",
        HEIMDALL_REQUEST_TIMEOUT_S="0.25",
    )
    batches = [{"items": BODIES * 4}] * 4  # 1,024 items ahead of the single requests
    with ThreadPoolExecutor(2) as pool:
        heavy = pool.submit(fire, server, batches, "/v1/predict/batch", 4)
        wait_for(lambda: queue_depth(server) > 0, 20.0)  # the singles queue behind them
        singles = pool.submit(fire, server, BODIES[:32], "/v1/predict", 16)
        heavy_responses, single_responses = heavy.result(), singles.result()
    codes = Counter(r.status_code for r in single_responses)
    item_codes = Counter(
        item.get("status", 200)
        for r in heavy_responses
        if r.status_code == 200
        for item in r.json()["results"]
    )
    print(
        f"\ndeadline 0.25 s under 1,024 queued items: singles {dict(codes)}, "
        f"batch items {dict(item_codes)}"
    )
    assert set(codes) <= {200, 504}, codes
    assert set(item_codes) <= {200, 504}, item_codes
    # Whichever waited past 0.25 s (the queued singles or the tail of the batches) got 504.
    assert codes[504] + item_codes[504] > 0, (codes, item_codes)
    for late in (r for r in single_responses if r.status_code == 504):
        assert late.headers["content-type"] == "application/problem+json"
    assert httpx.get(server.url + "/health/ready").status_code == 200
