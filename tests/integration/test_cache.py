"""The prediction cache against a real Redis and a real server."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.registry.authoring import register_package
from tests.support.procs import REFERENCE, RedisServer, Server
from tests.support.variants import flaky_model, registry
from training.simulate import heard_batch, request_payload

# serial: it measures latency, timing or load (runs alone in `make test`)
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.serial]


def payload(seed: int, **options: object) -> dict:
    batch = heard_batch(1, seed)
    return request_payload(batch, 0, **options)


def predict(server: Server, body: dict, timeout: float = 30.0) -> httpx.Response:
    return httpx.post(server.url + "/v1/predict", json=body, timeout=timeout)


def without_volatile(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("cached", "timing_ms", "request_id")}


def test_second_identical_request_is_a_cache_hit(shared_server: Server) -> None:
    body = payload(501)
    first = predict(shared_server, body).json()
    second = predict(shared_server, body).json()
    assert first["cached"] is False and second["cached"] is True
    assert without_volatile(first) == without_volatile(second)
    assert second["timing_ms"]["inference"] == 0.0
    other_levels = predict(shared_server, {**body, "confidence": [0.99]}).json()
    assert other_levels["cached"] is False
    opted_out = predict(shared_server, {**body, "cache": False}).json()
    assert opted_out["cached"] is False
    live = httpx.get(shared_server.url + "/v1/models/1").json()["live"]
    assert 0 < live["cache_hit_rate"] < 1


def test_undecodable_value_is_a_miss(start_server: Callable[..., Server], redis_url: str) -> None:
    # Redis only: the in-memory tier would (rightly) answer from the value it decoded itself.
    prefix = f"heimdall:junk{uuid.uuid4().hex[:8]}:"
    server = start_server(HEIMDALL_CACHE_LOCAL_ENTRIES="0", HEIMDALL_CACHE_PREFIX=prefix)
    body = payload(502)
    first = predict(server, body).json()
    client = redis.Redis.from_url(redis_url)
    time.sleep(0.2)
    keys = list(client.scan_iter(match=prefix + "*"))
    assert keys, "the prediction was not stored"
    for key in keys:
        client.set(key, b"\xc1 not msgpack")
    again = predict(server, body)
    assert again.status_code == 200 and again.json()["cached"] is False
    assert without_volatile(again.json()) == without_volatile(first)


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def test_redis_killed_mid_stream_loses_no_prediction(
    start_server: Callable[..., Server], own_redis: RedisServer
) -> None:
    server = start_server(
        REDIS_URL=own_redis.url, HEIMDALL_CACHE_TIMEOUT_S="0.05", HEIMDALL_CACHE_LOCAL_ENTRIES="0"
    )
    bodies = [payload(600 + i) for i in range(6)]
    for body in bodies:
        assert predict(server, body).status_code == 200
    assert predict(server, bodies[0]).json()["cached"] is True
    own_redis.stop()
    slowest = 0.0
    for i in range(40):
        t0 = time.perf_counter()
        response = predict(server, bodies[i % len(bodies)], timeout=5.0)
        slowest = max(slowest, time.perf_counter() - t0)
        assert response.status_code == 200, response.text
        assert response.json()["cached"] is False
    assert slowest < 1.0, f"a request waited {slowest:.2f}s with Redis down"
    ready = httpx.get(server.url + "/health/ready").json()
    assert ready["cache"]["last_error"]
    own_redis.start()
    deadline = time.monotonic() + 15
    cached = False
    while time.monotonic() < deadline and not cached:
        predict(server, bodies[1])
        cached = predict(server, bodies[1]).json()["cached"]
        time.sleep(0.3)
    assert cached, "the cache did not resume after Redis came back"


def test_in_memory_tier_answers_repeats_while_redis_is_down(
    start_server: Callable[..., Server], own_redis: RedisServer
) -> None:
    server = start_server(REDIS_URL=own_redis.url, HEIMDALL_CACHE_TIMEOUT_S="0.05")
    seen, fresh = [payload(700 + i) for i in range(3)], [payload(710 + i) for i in range(3)]
    answers = [predict(server, body).json() for body in seen]
    assert not any(a["cached"] for a in answers)
    own_redis.stop()
    for round_ in range(3):
        for body, first in zip(seen, answers, strict=True):
            again = predict(server, body, timeout=5.0).json()
            assert again["cached"] is True
            assert without_volatile(again) == without_volatile(first)
        for body in fresh:  # computed the first time (Redis down), from memory afterwards
            response = predict(server, body, timeout=5.0)
            assert response.status_code == 200
            assert response.json()["cached"] is (round_ > 0)
    state = httpx.get(server.url + "/health/ready").json()["cache"]
    assert state["local_entries"] == len(seen) + len(fresh)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'result="hit",tier="local"' in metrics.replace('model_version="1",', "")


def test_two_registries_sharing_a_redis_never_answer_each_others_model(
    start_server: Callable[..., Server], tmp_path: Path
) -> None:
    """Version numbers are per registry: version 1 of another registry (or of this one,
    re-created) on the same Redis and prefix is another model, and gets its own answers.
    The key carries the model file's sha256 (it was a hit labelled version 1 from the other
    model; outside review)."""
    prefix = f"heimdall:two{uuid.uuid4().hex[:8]}:"
    first = start_server(HEIMDALL_CACHE_PREFIX=prefix)
    body = payload(503)
    assert predict(first, body).json()["cached"] is False
    assert predict(first, body).json()["cached"] is True

    # Registry B: its version 1 is another model file (an extra graph branch) under the same
    # spec.
    package = tmp_path / "other"
    shutil.copytree(REFERENCE, package)
    (package / "model.onnx").write_bytes(flaky_model(package / "model.onnx", above=99.0))
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'b.db'}",
        "HEIMDALL_ARTIFACT_CACHE": str(tmp_path / "b-artifacts"),
    }
    assert register_package(registry(env), package, "rf-localizer", alias="production") == "1"
    second = start_server(HEIMDALL_CACHE_PREFIX=prefix, **env)
    answer = predict(second, body).json()
    assert "model" in answer, answer
    assert answer["model"]["version"] == "1" and answer["cached"] is False
    assert predict(second, body).json()["cached"] is True  # its own answer is cached


def test_the_canary_latency_a_replica_reports_leaves_cache_hits_out(
    start_server: Callable[..., Server], own_redis: RedisServer
) -> None:
    # The heartbeat's per-version figures are what a canary compares. Hits take ~1 ms and a
    # warm baseline full of them made a cold candidate look slow: the latency histogram there
    # counts computed answers only; requests count every answer.
    server = start_server(REDIS_URL=own_redis.url, HEIMDALL_CONTROL_HEARTBEAT_TTL_S="2")
    body = payload(777)
    answers = [predict(server, body).json() for _ in range(6)]
    assert [a["cached"] for a in answers] == [False] + [True] * 5
    client = redis.Redis.from_url(own_redis.url)
    deadline = time.monotonic() + 10
    figures: dict = {}
    while time.monotonic() < deadline:
        keys = client.keys("*:replicas:*")
        reports = [json.loads(client.get(k) or b"{}") for k in keys]
        figures = next((r["figures"]["1"] for r in reports if "1" in r.get("figures", {})), {})
        if figures.get("requests", 0) >= 6:
            break
        time.sleep(0.2)
    assert figures.get("requests") == 6, figures
    assert sum(figures["latency_counts"]) == 1, figures
