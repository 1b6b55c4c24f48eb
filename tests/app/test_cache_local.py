"""The in-memory cache tier: bounded, least recently used first out, entries expire."""

from __future__ import annotations

import time

from app.serving.cache import CacheSettings, LocalTier, PredictionCache
from workers.messages import Prediction


def prediction(x: float) -> Prediction:
    return Prediction(
        latitude=45.0 + x,
        longitude=7.0,
        covariance_enu_m2=[[1.0, 0.0], [0.0, 1.0]],
        sigma_east_m=1.0,
        sigma_north_m=1.0,
        correlation=0.0,
        ellipses=[],
    )


def test_least_recently_used_goes_first_when_full() -> None:
    tier = LocalTier(entries=2, ttl_s=60)
    tier.put("a", prediction(1))
    tier.put("b", prediction(2))
    assert tier.get("a") is not None  # a is now the most recent
    tier.put("c", prediction(3))
    assert tier.get("b") is None and tier.get("a") is not None and tier.get("c") is not None
    assert len(tier) == 2


def test_entries_expire() -> None:
    tier = LocalTier(entries=8, ttl_s=0.05)
    tier.put("a", prediction(1))
    assert tier.get("a") is not None
    time.sleep(0.08)
    assert tier.get("a") is None and len(tier) == 0


def test_tier_lives_no_longer_than_redis_entries_and_can_be_off() -> None:
    cache = PredictionCache(CacheSettings(ttl_s=5, local_ttl_s=60), client=object())
    assert cache.local is not None and cache.local.ttl_s == 5
    assert PredictionCache(CacheSettings(local_entries=0), client=object()).local is None
    assert PredictionCache(CacheSettings(), client=None).local is None


class DownRedis:
    """A Redis client whose every call fails as a refused connection does."""

    def __init__(self) -> None:
        self.calls = 0

    async def get(self, key: str) -> bytes | None:
        self.calls += 1
        raise ConnectionError("Connection refused")


async def test_a_failing_redis_opens_the_breaker_and_stops_being_asked() -> None:
    client = DownRedis()
    cache = PredictionCache(
        CacheSettings(breaker_failures=3, breaker_cooldown_s=60, local_entries=0), client
    )
    for _ in range(5):
        assert await cache.get("k") == (None, "error")
    assert client.calls == 3  # the breaker opened after three failures in a row
    state = cache.state()
    assert not cache.usable and state["breaker"] == "open"
    assert state["consecutive_failures"] == 3
    assert "Connection refused" in state["last_error"]
