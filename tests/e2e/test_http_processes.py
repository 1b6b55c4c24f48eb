"""A replica of several HTTP processes (``HEIMDALL_HTTP_PROCESSES=2``), from the outside.

What a client and an operator notice: a replica that says it is ready answers from every
process; one scrape covers every process; each process converges on the control plane and
shows in ``status``; SIGTERM drains the work in flight in every process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.test_rollout import cli, wait_for
from tests.support.procs import Server, post_json, run_cli
from training.simulate import heard_batch, request_payload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def each_process(server: Server, count: int = 2, tries: int = 400) -> dict[str, Any]:
    """``/v1/models`` of every HTTP process (a new connection each time lands on any of them)."""
    seen: dict[str, Any] = {}
    for _ in range(tries):
        state = httpx.get(server.url + "/v1/models", timeout=5).json()
        seen[state["replica"]] = state
        if len(seen) == count:
            return seen
    raise AssertionError(f"only {sorted(seen)} answered in {tries} requests")


def requests_total(text: str) -> dict[str, float]:
    """``heimdall_inference_requests_total`` per ``http_process`` in one scrape."""
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("heimdall_inference_requests_total{"):
            process = line.split('http_process="', 1)[1].split('"', 1)[0]
            totals[process] = totals.get(process, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def test_a_ready_replica_answers_from_every_process_and_one_scrape_counts_them_all(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(
        HEIMDALL_HTTP_PROCESSES="2", HEIMDALL_POOL_WORKERS="3", HEIMDALL_CACHE_ENABLED="false"
    )
    # The first 200 of /health/ready: no process may still be loading its model.
    batch = heard_batch(8, 905)
    bodies = [json.dumps(request_payload(batch, i, cache=False)).encode() for i in range(8)]
    codes = [
        httpx.post(
            server.url + "/v1/predict",
            content=bodies[n % 8],
            headers={"content-type": "application/json"},
            timeout=30,
        ).status_code
        for n in range(60)
    ]
    assert codes == [200] * 60, codes
    processes = each_process(server)
    names = sorted(processes)
    assert [n.rsplit("/", 1)[1] for n in names] == ["p0", "p1"], names
    # HEIMDALL_POOL_WORKERS=3 split between the two: 2 and 1.
    assert sorted(len(p["pool"]["workers"]) for p in processes.values()) == [1, 2]
    ready = httpx.get(server.url + "/health/ready", timeout=5).json()
    assert ready["http_processes_ready"] == [0, 1]
    for _ in range(8):  # whichever process takes the scrape, it reports both
        text = httpx.get(server.url + "/metrics", timeout=5).text
        assert 'heimdall_http_process_up{http_process="0"} 1.0' in text
        assert 'heimdall_http_process_up{http_process="1"} 1.0' in text
        totals = requests_total(text)
        assert sum(totals.values()) == 60, totals
        assert set(totals) == {"0", "1"}, totals  # 60 new connections never all land on one
        for family in ("heimdall_inference_requests_total", "target_info"):
            assert text.count(f"# TYPE {family} ") == 1


def test_each_process_follows_the_control_plane_and_shows_in_status(
    start_server: Callable[..., Server], registry_env: dict[str, str], redis_url: str
) -> None:
    env = {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"p{uuid.uuid4().hex[:8]}",
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "2",
    }
    server = start_server(
        **env, HEIMDALL_HTTP_PROCESSES="2", HEIMDALL_POOL_WORKERS="2", HEIMDALL_REPLICA_ID="r"
    )
    cli(env, "route", "1=1")
    wait_for(
        lambda: all(p["control"]["revision"] == 1 for p in each_process(server).values()), 20.0
    )
    status = run_cli(env, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    fleet = json.loads(status.stdout)["replicas"]
    assert sorted(r["replica"] for r in fleet) == ["r/p0", "r/p1"], fleet
    assert all(r["in_sync"] for r in fleet), fleet


def test_sigterm_drains_the_work_in_flight_in_every_process(
    start_server: Callable[..., Server],
) -> None:
    server = start_server(HEIMDALL_HTTP_PROCESSES="2", HEIMDALL_POOL_WORKERS="2")
    batch = heard_batch(8, 906)
    content = json.dumps(
        {"items": [request_payload(batch, i, cache=False) for i in range(8)]}
    ).encode()
    calls = 12  # on new connections: all on one process has odds of 1 in 2,048
    pids = [w["pid"] for p in each_process(server).values() for w in p["pool"]["workers"]]
    assert len(pids) == 2

    def call(_: int) -> int:
        return post_json(server.url + "/v1/predict/batch", content)

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # hold the work in flight in both processes
    try:
        with ThreadPoolExecutor(calls) as pool:
            futures = [pool.submit(call, i) for i in range(calls)]

            def everything_queued() -> bool:
                pending = [p["pool"]["pending_items"] for p in each_process(server).values()]
                return sum(pending) == calls * 8 and all(pending)

            wait_for(everything_queued, 20.0)
            started = time.monotonic()
            server.signal(signal.SIGTERM)
            time.sleep(0.5)
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
            codes = [f.result() for f in futures]
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    assert server.proc is not None
    server.proc.wait(40)
    assert codes == [200] * calls, codes
    assert time.monotonic() - started < 40
    assert server.proc.returncode == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health/live", timeout=2)


def test_a_removed_marker_a_long_tmpdir_and_a_killed_main_process_leave_nothing_broken(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    # A TMPDIR near the limit of a Unix socket path (108 bytes) once failed the start.
    tmpdir = tmp_path / ("t" * max(1, 100 - len(str(tmp_path))))
    tmpdir.mkdir()
    server = start_server(
        HEIMDALL_HTTP_PROCESSES="2", HEIMDALL_POOL_WORKERS="2", TMPDIR=str(tmpdir)
    )
    (folder,) = tmpdir.glob("heimdall-http-*")
    for marker in folder.glob("ready-*"):
        marker.unlink()  # a /tmp cleaner, an operator: once left the replica 503 for good
    wait_for(lambda: httpx.get(server.url + "/health/ready", timeout=5).status_code == 200, 5.0)

    assert server.proc is not None
    tree = psutil.Process(server.proc.pid).children(recursive=True)
    assert len(tree) >= 4  # 2 HTTP processes, 2 pool workers (and resource trackers)
    os.kill(server.proc.pid, signal.SIGKILL)  # Granian's main process, no chance to clean up
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, [" ".join(p.cmdline()) for p in alive]  # no orphan serving on the port
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health/live", timeout=2)
    assert not folder.exists()  # the last HTTP process out removed the folder
