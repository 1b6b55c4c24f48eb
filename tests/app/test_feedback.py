"""Feedback below HTTP: two service instances sharing a real (private) Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from pyproj import Geod

from app.serving.breaker import Breaker
from app.serving.errors import (
    Conflict,
    ExpiredRequest,
    Forbidden,
    StoreUnavailable,
    TooManyRequests,
    UnknownRequest,
)
from app.serving.feedback import FeedbackService
from app.serving.feedback_settings import FeedbackSettings
from app.serving.field import window_coverage
from app.serving.schemas import FeedbackRequest, TruePosition
from tests.support.procs import free_port
from workers.messages import Prediction

COV = [[4.0e6, 1.5e6], [1.5e6, 9.0e6]]  # sigma_e 2 km, sigma_n 3 km, rho 0.25


def prediction(lat: float = 45.0, lon: float = 7.5, cov: list[list[float]] = COV) -> Prediction:
    return Prediction(lat, lon, cov, 2000.0, 3000.0, 0.25, [])


def independent_d2(
    mean: tuple[float, float], truth: tuple[float, float], cov: list[list[float]]
) -> tuple[float, float]:
    """Error (m) and d² computed here with pyproj and numpy, not with app.serving.field."""
    az, _, dist = Geod(ellps="WGS84").inv(mean[1], mean[0], truth[1], truth[0])
    v = np.array([dist * np.sin(np.radians(az)), dist * np.cos(np.radians(az))])
    return float(dist), float(v @ np.linalg.inv(np.array(cov)) @ v)


async def settle(service: FeedbackService) -> None:
    """Let the background answer write finish."""
    for _ in range(50):
        if service.answers._flush is None:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.02)


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[Any]:
    clients: list[Any] = []

    def make(**overrides: Any) -> FeedbackService:
        settings = FeedbackSettings(**{"prefix": prefix, **overrides})
        client = aioredis.from_url(redis_url, socket_timeout=1)
        clients.append(client)
        return FeedbackService(settings, client, Breaker())

    prefix = f"t{uuid.uuid4().hex[:8]}:field:"
    yield make
    for client in clients:
        await client.aclose()


def truth(request_id: str, lat: float, lon: float, source: str = "beacon") -> FeedbackRequest:
    return FeedbackRequest(request_id, TruePosition(lat, lon), source)


async def test_feedback_on_another_instance_joins_the_answer(pair: Any) -> None:
    a, b = pair(), pair()
    a.answers.record("r1", "rf-localizer", "1", prediction(), ["TRN", "IVR", "BIE"])
    await settle(a)
    got = await b.submit(truth("r1", 45.08, 7.55), "10.0.0.1")
    error, d2 = independent_d2((45.0, 7.5), (45.08, 7.55), COV)
    assert 6.0 < d2 < 21.0  # outside every ellipse, though d would be inside 90 and 95 %
    assert got.model.version == "1"
    assert got.error_m == pytest.approx(error, abs=0.01)
    assert got.mahalanobis**2 == pytest.approx(d2, rel=1e-4)
    assert [e.inside for e in got.ellipses] == [d2 <= -2 * np.log(1 - p) for p in (0.5, 0.9, 0.95)]
    figures = await a.figures("rf-localizer", "1")
    assert figures is not None
    assert figures["count"] == 1 and figures["sources"]["beacon"]["count"] == 1
    assert figures["coverage"] == {"0.5": 0.0, "0.9": 0.0, "0.95": 0.0}


async def test_sources_holding_colons_get_their_own_figures(pair: Any) -> None:
    # Third outside review: `survey:north` and `survey:south` showed as one phantom `survey`
    # with count 0, and `beacon:evil` vanished; per-source counts summed to less than count.
    a = pair()
    sources = ["survey:north", "survey:south", "survey:south", "beacon", "beacon:evil"]
    for i, source in enumerate(sources):
        a.answers.record(f"c{i}", "rf-localizer", "1", prediction(), ["TRN", "IVR", "BIE"])
        await settle(a)
        await a.submit(truth(f"c{i}", 45.01, 7.51, source), "10.0.0.1")
    figures = await a.figures("rf-localizer", "1")
    assert figures is not None
    counts = {name: part["count"] for name, part in figures["sources"].items()}
    assert counts == {"beacon": 1, "beacon:evil": 1, "survey:north": 1, "survey:south": 2}
    assert sum(counts.values()) == figures["count"] == 5


async def test_duplicates_are_idempotent_and_a_different_truth_conflicts(pair: Any) -> None:
    a, b = pair(), pair()
    a.answers.record("dup", "rf-localizer", "1", prediction(), ["TRN"])
    await settle(a)
    first = await b.submit(truth("dup", 45.02, 7.5), "c")
    again = await a.submit(truth("dup", 45.02, 7.5), "c")
    assert again.duplicate and not first.duplicate
    assert again.error_m == first.error_m and again.mahalanobis == first.mahalanobis
    with pytest.raises(Conflict):
        await b.submit(truth("dup", 45.3, 7.5), "c")
    figures = await b.figures("rf-localizer", "1")
    assert figures is not None and figures["count"] == 1 and figures["samples"] == 1


async def test_unknown_and_expired_ids_are_refused_with_the_reason(pair: Any) -> None:
    a = pair(answer_ttl_s=1, expired_grace_s=30)
    with pytest.raises(UnknownRequest, match="never answered"):
        await a.submit(truth("nobody-asked", 45.0, 7.5), "c")
    a.answers.record("old", "rf-localizer", "1", prediction(), ["TRN"])
    await settle(a)
    await asyncio.sleep(1.2)
    with pytest.raises(ExpiredRequest, match="accepted for 1 s"):
        await a.submit(truth("old", 45.0, 7.5), "c")
    figures = await a.figures("rf-localizer", "1")
    assert figures is not None and figures["count"] == 0


async def test_versions_keep_separate_figures(pair: Any) -> None:
    a = pair()
    far = prediction(cov=[[1e4, 0.0], [0.0, 1e4]])  # sigma 100 m: a 2 km miss is outside
    a.answers.record("v1-a", "rf-localizer", "1", far, ["TRN"])
    a.answers.record("v2-a", "rf-localizer", "2", prediction(), ["TRN"])
    a.answers.record("v2-b", "rf-localizer", "2", prediction(), ["TRN"])
    await settle(a)
    await a.submit(truth("v1-a", 45.02, 7.5), "c")
    await a.submit(truth("v2-a", 45.0, 7.5), "c")
    before = await a.figures("rf-localizer", "2")
    assert before is not None
    await a.submit(truth("v2-b", 45.001, 7.5), "c")
    one, two = await a.figures("rf-localizer", "1"), await a.figures("rf-localizer", "2")
    assert one is not None and two is not None
    assert one["count"] == 1 and one["coverage"]["0.95"] == 0.0
    assert two["count"] == 2 and two["coverage"]["0.5"] == 1.0
    assert (await a.figures("rf-localizer", "3") or {})["count"] == 0
    # What a canary gate reads: the figures of the window between two readings.
    assert two is not None and two["inside"] == {"0.5": 2, "0.9": 2, "0.95": 2}
    assert window_coverage(before, two) == {
        "count": 1,
        "coverage": {"0.5": 1.0, "0.9": 1.0, "0.95": 1.0},
    }
    assert window_coverage(two, two)["coverage"]["0.9"] is None


async def test_rate_limit_per_client_answers_with_retry_after(pair: Any) -> None:
    a = pair(burst=3, rate_per_s=0.5)
    for _ in range(3):
        with pytest.raises(UnknownRequest):
            await a.submit(truth("x", 45.0, 7.5), "10.0.0.9")
    with pytest.raises(TooManyRequests) as caught:
        await a.submit(truth("x", 45.0, 7.5), "10.0.0.9")
    assert caught.value.retry_after == 2
    with pytest.raises(UnknownRequest):  # another client has its own bucket
        await a.submit(truth("x", 45.0, 7.5), "10.0.0.10")


async def test_answer_cap_deletes_the_oldest(pair: Any) -> None:
    a = pair(max_answers=5)
    for i in range(8):
        a.answers.record(f"cap-{i}", "rf-localizer", "1", prediction(), ["TRN"])
        await settle(a)
    for i in range(3):
        with pytest.raises(UnknownRequest):
            await a.submit(truth(f"cap-{i}", 45.0, 7.5), "c")
    assert (await a.submit(truth("cap-7", 45.0, 7.5), "c")).model.version == "1"


async def test_turned_off_stores_nothing_and_answers_403(pair: Any, redis_url: str) -> None:
    off = pair(enabled=False)
    off.answers.record("off-1", "rf-localizer", "1", prediction(), ["TRN"])
    await settle(off)
    with pytest.raises(Forbidden):
        await off.submit(truth("off-1", 45.0, 7.5), "c")
    with pytest.raises(UnknownRequest):
        await pair().submit(truth("off-1", 45.0, 7.5), "c")


async def test_redis_down_never_fails_an_answer_and_feedback_says_503() -> None:
    client = aioredis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.2)
    service = FeedbackService(FeedbackSettings(), client, Breaker(failures=1, cooldown_s=5))
    service.answers.record("r", "rf-localizer", "1", prediction(), ["TRN"])  # must not raise
    await settle(service)
    assert not service.breaker.closed
    service.answers.record("r2", "rf-localizer", "1", prediction(), ["TRN"])
    assert service.answers.dropped == 2
    with pytest.raises(StoreUnavailable):
        await service.submit(truth("r", 45.0, 7.5), "c")
    await client.aclose()
