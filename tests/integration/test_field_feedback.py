"""Ground truth from the field, end to end: two replicas, one Redis, a real MLflow registry.

2,000 captures come from a network whose propagation differs from training (12 dB
shadowing); replica A answers them, their truths go to replica B. The field figures every
replica shows must match a computation made here from the answers alone (pyproj + numpy);
``recalibrate`` must register a version whose held-out coverage is right; after ``promote``
the figures follow the new version and nothing of it leaks into the old one's.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest
from pyproj import Geod

from app.serving.field import split_halves
from tests.support.procs import Server, run_cli
from tests.support.variants import registry
from training.simulate import WIDE, heard_batch, request_payload, truth_of

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

FIELD = dataclasses.replace(WIDE, name="field", shadowing_db=(12.0, 12.0))
LEVELS = (0.5, 0.9, 0.95)
GEOD = Geod(ellps="WGS84")


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_cli(env, *args, check=check)


def d2_of(answer: dict[str, Any], truth: dict[str, float]) -> float:
    """Squared Mahalanobis distance of the truth, computed here from the answer alone."""
    pos = answer["position"]
    az, _, dist = GEOD.inv(pos["longitude"], pos["latitude"], truth["longitude"], truth["latitude"])
    v = np.array([dist * np.sin(np.radians(az)), dist * np.cos(np.radians(az))])
    cov = np.array(answer["uncertainty"]["covariance_enu_m2"])
    return float(v @ np.linalg.solve(cov, v))


def covered(d2: np.ndarray, level: float) -> float:
    return float(np.mean(d2 <= -2.0 * np.log(1.0 - level)))


@dataclasses.dataclass
class Fleet:
    a: Server
    b: Server
    env: dict[str, str]
    answers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    truths: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


@pytest.fixture(scope="module")
def fleet(
    tmp_path_factory: pytest.TempPathFactory, registry_env: dict[str, str], redis_url: str
) -> Iterator[Fleet]:
    tag = uuid.uuid4().hex[:8]
    env = {
        **registry_env,
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"f{tag}",
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "2",
        "HEIMDALL_FEEDBACK_PREFIX": f"f{tag}:field:",
        "HEIMDALL_CACHE_PREFIX": f"f{tag}:cache:",
        "HEIMDALL_POOL_WORKERS": "1",
    }
    folder = tmp_path_factory.mktemp("field")
    # A limits feedback tightly (the 429 check); B takes the whole stream.
    a = Server(
        {**env, "HEIMDALL_FEEDBACK_BURST": "5", "HEIMDALL_FEEDBACK_RATE_PER_S": "0.2"},
        folder / "a.log",
    )
    b = Server(
        {**env, "HEIMDALL_FEEDBACK_BURST": "100000", "HEIMDALL_FEEDBACK_RATE_PER_S": "10000"},
        folder / "b.log",
    )
    try:
        a.start()
        b.start()
        yield Fleet(a, b, env)
    finally:
        a.stop()
        b.stop()


def predict_and_feed(fleet: Fleet, seeds: range, prefix: str) -> dict[str, dict[str, Any]]:
    """Batches of 100 through A's /v1/predict/batch; each item's truth to B, concurrently."""
    answered: dict[str, dict[str, Any]] = {}
    sent: list[tuple[str, Future[httpx.Response]]] = []
    with httpx.Client(timeout=120) as client, ThreadPoolExecutor(4) as pool:

        def feed(request_id: str, truth: dict[str, float]) -> httpx.Response:
            body = {"request_id": request_id, "position": truth, "source": "beacon"}
            return client.post(fleet.b.url + "/v1/feedback", json=body)

        for seed in seeds:
            batch = heard_batch(100, seed, domain=FIELD)
            ids = [f"{prefix}-{seed}-{i}" for i in range(len(batch))]
            items = [
                request_payload(batch, i, request_id=ids[i], cache=False) for i in range(len(batch))
            ]
            got = client.post(fleet.a.url + "/v1/predict/batch", json={"items": items})
            assert got.status_code == 200, got.text[:500]
            for i, result in enumerate(got.json()["results"]):
                if result["kind"] != "prediction":
                    continue  # e.g. no-signal: a capture the model refuses gets no truth
                answered[ids[i]] = result
                fleet.truths[ids[i]] = truth_of(batch, i)
                sent.append((ids[i], pool.submit(feed, ids[i], fleet.truths[ids[i]])))
        for request_id, future in sent:
            response = future.result()
            assert response.status_code == 200, (request_id, response.text[:300])
            assert response.json()["model"] == answered[request_id]["model"]
    fleet.answers.update(answered)
    return answered


def field_of(server: Server, version: str, resident: bool = True) -> dict[str, Any]:
    path = f"/v1/models/{version}" if resident else f"/v1/models/{version}/field"
    got = httpx.get(server.url + path, timeout=30)
    assert got.status_code == 200, got.text[:300]
    body = got.json()
    return dict(body["field"] if resident else body)


def wait_for(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_field_figures_recalibration_and_promotion(fleet: Fleet) -> None:
    started = time.monotonic()
    answered = predict_and_feed(fleet, range(19_000, 19_020), "v1")
    took = time.monotonic() - started
    assert len(answered) >= 1900
    versions = {a["model"]["version"] for a in answered.values()}
    assert len(versions) == 1
    (v1,) = versions

    ids = sorted(answered)
    d2 = np.array([d2_of(answered[i], fleet.truths[i]) for i in ids])
    expected = {f"{p:g}": covered(d2, p) for p in LEVELS}
    for server in (fleet.a, fleet.b):  # both replicas show the same figures
        field = field_of(server, v1)
        assert field["count"] == len(ids)
        for level, share in expected.items():
            assert field["coverage"][level] == pytest.approx(share, abs=0.01), level
    print(
        f"\n{len(ids)} answers on A, truths through B in {took:.1f}s; coverage shown "
        f"{field['coverage']} vs computed here "
        f"{ {k: round(v, 4) for k, v in expected.items()} }"
    )

    # Figures are in /metrics of the replica that took the truths.
    metrics = httpx.get(fleet.b.url + "/metrics", timeout=10).text
    counted = sum(
        float(m.group(1))
        for m in re.finditer(
            rf'heimdall_field_feedback_total{{[^}}]*model_version="{v1}"[^}}]*}} (\S+)', metrics
        )
    )
    assert counted == len(ids)

    # Recalibrate on the feedback: the fitted version covers 90 % on the held-out half.
    reg = registry(fleet.env)
    assert cli(fleet.env, "recalibrate", v1, "--min-samples", "5000", check=False).returncode == 3
    # The default fits 50/90/95 % at once; one scale cannot match every level of an error
    # distribution whose shape is not Gaussian, so the test fits the level it judges. 2,000
    # truths: with 1,000 the held-out 90 % coverage has a standard error of 1.9 points (fit
    # and held-out halves of 500), too close to the ±3 of the acceptance.
    default = cli(fleet.env, "recalibrate", v1, "--dry-run").stdout
    print(default)
    assert "nothing registered" in default
    out = cli(fleet.env, "recalibrate", v1, "--min-samples", "200", "--levels", "0.9").stdout
    print(out)
    v2 = re.search(r"registered rf-localizer version (\d+)", out)
    assert v2 is not None, out
    new = reg.fetch(reg.resolve(v2.group(1)))
    old = reg.fetch(reg.resolve(v1))
    scale = new.spec.output.calibration_factor / old.spec.output.calibration_factor
    assert new.info.sha256 == old.info.sha256  # the same ONNX graph
    (record,) = new.spec.provenance.field_calibrations
    assert record.parent_version == v1 and record.scale == pytest.approx(scale)
    _, held = split_halves(ids)
    before, after = covered(d2[held], 0.9), covered(d2[held] / scale**2, 0.9)
    assert abs(after - 0.9) <= 0.03, after
    assert abs(before - 0.9) > 0.03, before
    assert record.held_out_coverage_after["0.9"] == pytest.approx(after, abs=1e-9)

    # Promote it: both replicas switch, new answers are s² times as wide, figures follow.
    alias = f"field{uuid.uuid4().hex[:6]}"
    cli(fleet.env, "promote", v2.group(1), "--alias", alias)
    for server in (fleet.a, fleet.b):
        wait_for(
            lambda s=server: (
                httpx.get(s.url + "/v1/models", timeout=5).json()["routing"]["weights"]
                == {v2.group(1): 1.0}
            ),
            30,
        )
    # The same capture answered by v1 before: the covariance is exactly s² times as large.
    first = heard_batch(100, 19_000, domain=FIELD)
    i0 = next(i for i in range(len(first)) if f"v1-19000-{i}" in answered)
    again = httpx.post(
        fleet.a.url + "/v1/predict", json=request_payload(first, i0, cache=False), timeout=30
    ).json()
    assert again["model"]["version"] == v2.group(1)
    np.testing.assert_allclose(
        np.array(again["uncertainty"]["covariance_enu_m2"]),
        np.array(answered[f"v1-19000-{i0}"]["uncertainty"]["covariance_enu_m2"]) * scale**2,
        rtol=1e-4,
    )
    fresh = predict_and_feed(fleet, range(19_100, 19_103), "v2")
    assert {a["model"]["version"] for a in fresh.values()} == {v2.group(1)}
    fresh_ids = sorted(fresh)
    d2_new = np.array([d2_of(fresh[i], fleet.truths[i]) for i in fresh_ids])
    field2 = field_of(fleet.b, v2.group(1))
    assert field2["count"] == len(fresh_ids)
    assert field2["coverage"]["0.9"] == pytest.approx(covered(d2_new, 0.9), abs=0.01)
    assert abs(field2["coverage"]["0.9"] - 0.9) <= 0.06, field2["coverage"]
    still = field_of(fleet.b, v1, resident=False)
    assert still["count"] == len(ids)  # nothing of v2 leaked into v1
    assert still["coverage"] == field["coverage"]
    print(
        f"v{v2.group(1)} (s = {scale:.3f}) on {len(fresh_ids)} fresh captures: coverage "
        f"{field2['coverage']}; v{v1} still {still['count']} samples"
    )


def test_feedback_errors_answer_the_right_4xx(fleet: Fleet) -> None:
    if not fleet.answers:
        predict_and_feed(fleet, range(19_200, 19_201), "err")
    request_id, answer = next(iter(fleet.answers.items()))
    truth = fleet.truths[request_id]
    url = fleet.b.url + "/v1/feedback"

    unknown = httpx.post(url, json={"request_id": "never-asked", "position": truth})
    assert unknown.status_code == 404
    assert unknown.headers["content-type"] == "application/problem+json"
    assert unknown.json()["type"] == "urn:heimdall:problem:unknown-request"

    # A duplicate (sent as MessagePack) gets the same answer and is not counted again.
    version = answer["model"]["version"]
    count = field_of(fleet.b, version, resident=False)["count"]
    body = msgspec.msgpack.encode({"request_id": request_id, "position": truth, "source": "beacon"})
    again = httpx.post(
        url,
        content=body,
        headers={"content-type": "application/msgpack", "accept": "application/msgpack"},
    )
    assert again.status_code == 200
    decoded = msgspec.msgpack.decode(again.content)
    assert decoded["duplicate"] is True and decoded["model"] == answer["model"]
    assert field_of(fleet.b, version, resident=False)["count"] == count
    moved = {"latitude": truth["latitude"] + 0.1, "longitude": truth["longitude"]}
    conflict = httpx.post(
        url, json={"request_id": request_id, "position": moved, "source": "beacon"}
    )
    assert conflict.status_code == 409

    assert httpx.post(url, content=b"{not json", headers={"content-type": JSON}).status_code == 400
    bad = httpx.post(
        url, json={"request_id": request_id, "position": {"latitude": 91, "longitude": 7}}
    )
    assert bad.status_code == 400 and bad.json()["errors"][0]["field"] == "$.position.latitude"
    assert httpx.post(url, json={"position": truth}).status_code == 400
    # Field figures of something that is not a version number: 404, not 200 with zeros.
    for odd in ("abc", "%E2%98%83", "1.0", "01", "9" * 30):
        typo = httpx.get(fleet.b.url + f"/v1/models/{odd}/field")
        assert typo.status_code == 404 and "is not a version number" in typo.text, typo.text
    # A version number the registry never had: 404 too, asked twice (the second from memory).
    for _ in range(2):
        never = httpx.get(fleet.b.url + "/v1/models/4242/field")
        assert never.status_code == 404 and "not in the registry" in never.text, never.text

    # A allows 5 at once, then 429 with Retry-After.
    codes = [
        httpx.post(
            fleet.a.url + "/v1/feedback", json={"request_id": "never", "position": truth}
        ).status_code
        for _ in range(6)
    ]
    assert codes[:5] == [404] * 5 and codes[5] == 429
    limited = httpx.post(fleet.a.url + "/v1/feedback", json={"request_id": "x", "position": truth})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1


JSON = "application/json"
