"""A replica's plane and rollout against a real registry and real workers: registry lookups."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from app.control.plane import ControlPlane
from app.control.protocol import publish
from app.control.rollout import Rollout
from app.control.settings import ControlSettings
from app.registry.client import ModelRegistry, RegistrySettings
from app.registry.package import VersionInfo
from app.serving.service import InferenceService, ServiceSettings
from tests.support.procs import RedisServer
from workers.pool import PoolSettings, WorkerPool


class CountingRegistry(ModelRegistry):
    """The real registry client, counting the references it resolves."""

    def __init__(self, settings: RegistrySettings) -> None:
        super().__init__(settings)
        self.resolved: list[str] = []

    def resolve(self, ref: str) -> VersionInfo:
        self.resolved.append(ref)
        return super().resolve(ref)


async def test_an_alias_is_resolved_once_per_apply(registry_env: dict[str, str]) -> None:
    registry = CountingRegistry(
        RegistrySettings(
            tracking_uri=registry_env["MLFLOW_TRACKING_URI"],
            artifact_cache=registry_env["HEIMDALL_ARTIFACT_CACHE"],
        )
    )
    pool = WorkerPool(PoolSettings(workers=1), log_level="WARNING")
    outcomes: list[tuple[str, int]] = []
    applied = asyncio.Event()

    def on_outcome(outcome: str) -> None:
        # How many lookups the apply that just ended took, in total so far.
        outcomes.append((outcome, len(registry.resolved)))
        applied.set()

    await pool.start()
    service = InferenceService(pool, ServiceSettings())
    rollout = Rollout(registry, pool, service, on_outcome=on_outcome)
    # No Redis: the replica serves its default reference, an alias, as revision 0.
    plane = ControlPlane(
        ControlSettings(enabled=False), None, "rf-localizer", "@production", rollout, "t"
    )
    try:
        plane.start()
        await asyncio.wait_for(applied.wait(), 120)
        applied.clear()
        plane.reresolve()  # SIGHUP: look the alias up again and reapply
        await asyncio.wait_for(applied.wait(), 120)
    finally:
        await plane.stop()
        await pool.stop()
    assert outcomes == [("applied", 1), ("applied", 2)]
    assert registry.resolved == ["@production", "@production"]
    assert service.routing is not None
    assert list(service.routing.weights) == ["1"]


async def _until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


async def test_a_redis_restart_seen_only_by_the_channel_leaves_no_standing_error(
    registry_env: dict[str, str],
) -> None:
    """An operator's Redis restarts between two polls: the subscriber notices, reconnects,
    and /v1/models must then say connected with no error (a stale error hides a real one)."""
    registry = ModelRegistry(
        RegistrySettings(
            tracking_uri=registry_env["MLFLOW_TRACKING_URI"],
            artifact_cache=registry_env["HEIMDALL_ARTIFACT_CACHE"],
        )
    )
    own = RedisServer()
    own.start()
    pool = WorkerPool(PoolSettings(workers=1), log_level="WARNING")
    await pool.start()
    service = InferenceService(pool, ServiceSettings())
    client = aioredis.Redis.from_url(own.url, socket_timeout=2)
    # Polls far apart: only the pub/sub channel can see the restart.
    settings = ControlSettings(namespace="restart", poll_interval_s=600, retry_max_s=0.5)
    plane = ControlPlane(
        settings, client, "rf-localizer", "@production", Rollout(registry, pool, service), "t"
    )
    try:
        plane.start()
        assert await _until(lambda: plane.connected and service.routing is not None, 120)
        assert plane.last_error is None
        own.stop()
        assert await _until(lambda: not plane.connected, 10)
        # The channel's fault stands; a converge that was running may have failed after it
        # and be the most recent one (both clear below).
        assert plane.last_error is not None
        assert any(e.startswith("control channel:") for e in plane._faults.values())
        own.start()
        assert await _until(lambda: plane.connected, 10)
        await asyncio.sleep(0.5)  # the re-read the reconnect triggers
        state = plane.state()
        assert state["connected"] and state["last_error"] is None, state
    finally:
        await plane.stop()
        await client.aclose()
        await pool.stop()
        own.stop()


class FirstReadsTimeOut:
    """A real Redis client whose first reads of the desired state time out.

    What a replica saw in CI while its event loop was held for tens of ms at start (the cache
    client's 50 ms socket timeouts): it served its default model until the next read. Three
    failed reads: the one before anything is applied (served the default), then failures
    once something is, which take the retry backoff.
    """

    def __init__(self, client: aioredis.Redis, failures: int) -> None:
        self.client = client
        self.failures = failures

    async def mget(self, *keys: str) -> list[bytes | None]:
        if self.failures > 0:
            self.failures -= 1
            raise TimeoutError("Timeout reading from socket")
        result: list[bytes | None] = await self.client.mget(*keys)
        return result

    def __getattr__(self, name: str) -> object:
        return getattr(self.client, name)


async def test_a_replica_whose_first_reads_time_out_converges_without_waiting_for_a_poll(
    registry_env: dict[str, str], redis_url: str
) -> None:
    """It serves the default meanwhile, then the desired state within the retry backoff."""
    registry = ModelRegistry(
        RegistrySettings(
            tracking_uri=registry_env["MLFLOW_TRACKING_URI"],
            artifact_cache=registry_env["HEIMDALL_ARTIFACT_CACHE"],
        )
    )
    client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
    settings = ControlSettings(namespace="first-read", poll_interval_s=600, retry_max_s=0.5)
    await publish(client, settings, "rf-localizer", {"1": 1.0}, reason="desired")
    pool = WorkerPool(PoolSettings(workers=1), log_level="WARNING")
    await pool.start()
    service = InferenceService(pool, ServiceSettings())
    rollout = Rollout(registry, pool, service)
    wrapped = FirstReadsTimeOut(client, failures=3)
    plane = ControlPlane(settings, wrapped, "rf-localizer", "@production", rollout, "t")
    try:
        plane.start()
        assert await _until(lambda: service.routing is not None, 120)
        # The default (revision 0) first, then the published revision 1 once a read succeeds:
        # within the retry backoff (0.5 s here), not the 600 s poll interval.
        assert await _until(lambda: rollout.status.applied_revision == 1, 10), rollout.status
        assert wrapped.failures == 0
        assert plane.state()["last_error"] is None
    finally:
        await plane.stop()
        await client.aclose()
        await pool.stop()
