"""The worker pool with real spawned processes and the reference model."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.support.procs import REFERENCE
from tests.support.reference import payload_item, reference_predict
from training.simulate import heard_batch, request_payload
from workers.errors import DeadlineExceeded, ModelLoadError, NotReady, Overloaded
from workers.messages import ItemError, Predict, Prediction, PredictItem
from workers.pool import PoolSettings, WorkerPool
from workers.request import JSON_BODY

# serial: it measures latency, timing or load (runs alone in `make test`)
pytestmark = [pytest.mark.slow, pytest.mark.serial]
SPEC = (REFERENCE / "model_spec.json").read_bytes()
MODEL = str(REFERENCE / "model.onnx")


def payloads(n: int, seed: int = 11) -> list[dict]:
    batch = heard_batch(n, seed)
    return [request_payload(batch, i) for i in range(n)]


PAYLOADS = payloads(24)


async def make_pool(**overrides: object) -> WorkerPool:
    settings = PoolSettings(
        **{
            "workers": 2,
            "ping_interval_s": 0.2,
            "hang_timeout_s": 2.0,
            "test_hooks": True,
            **overrides,
        }
    )  # type: ignore[arg-type]
    pool = WorkerPool(settings, log_level="WARNING")
    await pool.start()
    await pool.load("1", MODEL, SPEC)
    return pool


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    p = await make_pool()
    yield p
    await p.stop()


async def predict_all(pool: WorkerPool, items: list, timeout: float = 10.0) -> list:
    futures = pool.submit("1", [[i] for i in items], timeout)
    return [(await f).results[0] for f in futures]


async def test_predictions_match_in_process_onnx_runtime(pool: WorkerPool) -> None:
    results = await predict_all(pool, [payload_item(p) for p in PAYLOADS])
    expected = reference_predict(PAYLOADS)
    for got, want in zip(results, expected, strict=True):
        assert isinstance(got, Prediction)
        assert got.latitude == pytest.approx(want["latitude"], abs=1e-4)
        assert got.longitude == pytest.approx(want["longitude"], abs=1e-4)
        assert got.sigma_east_m == pytest.approx(want["sigma_east_m"], rel=1e-4)
        assert got.correlation == pytest.approx(want["correlation"], abs=1e-4)


@pytest.mark.parametrize("slot_bytes", [16 * 1024 * 1024, 400_000])
async def test_undecoded_bodies_are_decoded_and_checked_by_the_workers(slot_bytes: int) -> None:
    """Issue 23: a ``/v1/predict`` body crosses to a worker undecoded and comes back answered.

    With the default arena slot several bodies share one message; with a slot that holds one
    306 kB body, jobs are not joined beyond it, and a body larger than a slot (padding in a
    field the schema does not know) still travels, inline. A bad body gets its problem with
    its field path, without failing the bodies batched with it.
    """
    pool = await make_pool(shm_slot_bytes=slot_bytes, max_batch=8)
    try:
        bodies = [msgspec.json.encode(p) for p in PAYLOADS[:8]]
        padded = msgspec.json.encode({**PAYLOADS[8], "note": "x" * 500_000})
        bad = {**PAYLOADS[9], "receivers": [{**PAYLOADS[9]["receivers"][0], "latitude": 91}]}
        items = [PredictItem(b, [], [], [], False, encoding=JSON_BODY) for b in bodies]
        items.append(PredictItem(padded, [], [], [], False, encoding=JSON_BODY))
        items.append(PredictItem(msgspec.json.encode(bad), [], [], [], False, encoding=JSON_BODY))
        sent: list[Predict] = []
        dispatcher = pool._dispatcher
        take = dispatcher._take

        def spy(worker: Any, now: float) -> Any:
            jobs, message, slot = take(worker, now)
            assert isinstance(message, Predict)
            sent.append(message)
            return jobs, message, slot

        dispatcher._take = spy  # type: ignore[method-assign]
        results = await predict_all(pool, items)
        # Only a body larger than a slot travels inline, alone; the rest share arena slots.
        for message in sent:
            inline = [i for i in message.items if i.iq_offset < 0]
            assert not inline or (len(message.items) == 1 and len(inline[0].iq) > slot_bytes)
        if slot_bytes < 2 * len(bodies[0]):
            assert all(len(m.items) == 1 for m in sent), [len(m.items) for m in sent]
        for got, want in zip(results[:9], reference_predict(PAYLOADS[:9]), strict=True):
            assert isinstance(got, Prediction), got
            assert got.latitude == pytest.approx(want["latitude"], abs=1e-4)
            assert got.sigma_east_m == pytest.approx(want["sigma_east_m"], rel=1e-4)
        refused = results[9]
        assert isinstance(refused, ItemError), refused
        assert (refused.code, refused.field) == ("malformed", "$.receivers[0].latitude")
    finally:
        await pool.stop()


async def stream(pool: WorkerPool, seconds: float) -> tuple[int, list[BaseException]]:
    """Keep 8 requests in flight for ``seconds``; count successes and collect failures."""
    items = [payload_item(p) for p in PAYLOADS]
    ok, failures = 0, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        futures = pool.submit("1", [[items[i % len(items)]] for i in range(8)], 10.0)
        for f in futures:
            try:
                result = await f
                assert isinstance(result.results[0], Prediction)
                ok += 1
            except Exception as exc:
                failures.append(exc)
    return ok, failures


async def wait_ready_count(pool: WorkerPool, count: int, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if len(pool.pids()) == count and all("1" in w.versions for w in pool.stats().workers):
            return time.monotonic() - start
        await asyncio.sleep(0.02)
    raise AssertionError(f"pool did not get back to {count} ready workers: {pool.stats()}")


async def test_sigkill_during_stream_loses_nothing_and_worker_returns(pool: WorkerPool) -> None:
    victim = pool.pids()[0]
    task = asyncio.create_task(stream(pool, 4.0))
    await asyncio.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    await asyncio.sleep(0.05)
    replaced_in = await wait_ready_count(pool, 2, 10.0)
    ok, failures = await task
    assert failures == [] and ok > 50
    assert victim not in pool.pids()
    assert replaced_in < 2.0, f"replacement took {replaced_in:.2f}s"
    assert pool.stats().restarts == 1


async def test_hung_worker_is_detected_and_replaced(pool: WorkerPool) -> None:
    victim = pool.pids()[0]
    task = asyncio.create_task(stream(pool, 5.0))
    await asyncio.sleep(0.5)
    await pool.hang_worker(0, 60.0)
    ok, failures = await task
    assert failures == [] and ok > 20
    await wait_ready_count(pool, 2, 10.0)
    assert victim not in pool.pids()


async def test_work_retried_after_a_hang_longer_than_its_deadline_is_computed() -> None:
    """Hang detection (1 s + a ping) is slower than the request deadline (0.5 s): the retried
    job gets its own budget instead of failing 504 on the respawned worker."""
    pool = await make_pool(hang_timeout_s=1.0, retry_budget_s=20.0)
    try:
        await pool.hang_worker(0, 60.0)
        await pool.hang_worker(1, 60.0)
        # Both workers hold one message (the hang); max_inflight 2 sends this one behind it.
        (future,) = pool.submit("1", [[payload_item(PAYLOADS[0])]], 0.5)
        result = await asyncio.wait_for(future, 30.0)
        assert isinstance(result.results[0], Prediction)
        assert pool.restarts_total >= 1
    finally:
        await pool.stop()


async def test_a_worker_the_pool_killed_takes_no_work_before_its_exit_is_seen() -> None:
    """Hang detection kills every hung worker in one pass, then sees their exits one by one: a
    job retried from the first exit must not land on a sibling already killed (it would die
    "twice" without being computed). Here worker 1 is killed and not yet seen dead, worker 0 is
    hung: the job goes behind the hang and is computed after the hang is detected."""
    pool = await make_pool(hang_timeout_s=1.0, retry_budget_s=20.0)
    try:
        await pool.hang_worker(0, 60.0)
        victim = pool._workers[1]
        assert victim is not None
        victim.kill()  # what hang detection does; no await: its exit is not seen yet
        (future,) = pool.submit("1", [[payload_item(PAYLOADS[0])]], 5.0)
        result = await asyncio.wait_for(future, 30.0)
        assert isinstance(result.results[0], Prediction)
    finally:
        await pool.stop()


async def test_an_unload_waits_for_work_held_for_the_version(pool: WorkerPool) -> None:
    """A request routed to version 1 just before a rollout stops routing to it is still on its
    way (a cache lookup, a decode in a thread): the unload waits for it, and it is computed
    (it failed 503 "not loaded on this replica" during rolling swaps)."""
    with pool.holding("1"):
        unload = asyncio.create_task(pool.unload("1"))
        await asyncio.sleep(0.3)
        assert not unload.done()
        (future,) = pool.submit("1", [[payload_item(PAYLOADS[0])]], 10.0)
        result = await asyncio.wait_for(future, 10.0)
        assert isinstance(result.results[0], Prediction)
    # The last hold ends and, before the unload runs again, another request takes one: the
    # unload checks again when it wakes (it unloaded under the new request: 503).
    with pool.holding("1"):
        await asyncio.sleep(0.3)
        assert not unload.done()
        (future,) = pool.submit("1", [[payload_item(PAYLOADS[0])]], 10.0)
        assert isinstance((await asyncio.wait_for(future, 10.0)).results[0], Prediction)
    await asyncio.wait_for(unload, 10.0)
    assert "1" not in pool.resident()
    with pytest.raises(NotReady, match="not loaded"):
        pool.submit("1", [[payload_item(PAYLOADS[0])]], 10.0)


async def test_crash_loop_stops_respawning_and_pool_is_not_ready() -> None:
    pool = await make_pool(workers=1, max_restarts=2, restart_window_s=60.0)
    try:
        for _ in range(3):
            await wait_ready_count(pool, 1, 30.0)
            os.kill(pool.pids()[0], signal.SIGKILL)
            await asyncio.sleep(0.3)
        await asyncio.sleep(0.5)
        assert pool.stats().states["failed"] == 1
        assert pool.ready_versions() == set()
        with pytest.raises(NotReady):
            pool.submit("1", [[payload_item(PAYLOADS[0])]], 1.0)
    finally:
        await pool.stop()


async def test_queued_request_past_deadline_is_not_computed(pool: WorkerPool) -> None:
    await pool.hang_worker(0, 1.5)
    await pool.hang_worker(1, 1.5)
    await asyncio.sleep(0.1)
    futures = pool.submit("1", [[payload_item(PAYLOADS[0])]], 0.3)
    with pytest.raises(DeadlineExceeded):
        await futures[0]
    assert pool.stats().queue_depth == 0


async def test_full_queue_answers_overloaded_with_retry_after() -> None:
    pool = await make_pool(workers=1, queue_size=4, max_batch=1)
    try:
        await pool.hang_worker(0, 1.0)
        item = payload_item(PAYLOADS[0])
        futures = pool.submit("1", [[item]] * 4, 10.0)  # one goes to the free slot
        futures += pool.submit("1", [[item]], 10.0)  # the queue now holds 4: full
        with pytest.raises(Overloaded) as err:
            pool.submit("1", [[item]], 10.0)
        assert err.value.retry_after
        results = await asyncio.gather(*futures)
        assert all(isinstance(r.results[0], Prediction) for r in results)
    finally:
        await pool.stop()


async def test_broken_model_fails_to_load_and_old_version_keeps_serving(
    pool: WorkerPool, tmp_path: Path
) -> None:
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(b"\x08\x01garbage")
    with pytest.raises(ModelLoadError):
        await pool.load("2", str(corrupt), SPEC)
    assert pool.resident() == ["1"]
    results = await predict_all(pool, [payload_item(PAYLOADS[0])])
    assert isinstance(results[0], Prediction)


async def test_new_version_rolls_in_and_old_one_unloads(pool: WorkerPool) -> None:
    await pool.load("2", MODEL, SPEC)
    assert sorted(pool.ready_versions()) == ["1", "2"]
    await pool.unload("1")
    assert pool.resident() == ["2"]
    futures = pool.submit("2", [[payload_item(PAYLOADS[0])]], 5.0)
    assert isinstance((await futures[0]).results[0], Prediction)
    with pytest.raises(NotReady):
        pool.submit("1", [[payload_item(PAYLOADS[0])]], 5.0)


async def test_requests_on_a_killed_worker_are_computed_by_another(pool: WorkerPool) -> None:
    items = [payload_item(p) for p in PAYLOADS]
    futures = pool.submit("1", [[items[i % len(items)]] for i in range(64)], 30.0)
    # No await since submit: the workers cannot have answered yet, the victim dies mid-batch.
    busy = [w for w in pool.stats().workers if w.in_flight]
    assert busy, pool.stats()
    os.kill(busy[0].pid, signal.SIGKILL)
    results = await asyncio.gather(*futures)
    assert all(isinstance(r.results[0], Prediction) for r in results)
    assert pool.stats().restarts == 1


async def test_a_new_version_loads_on_one_worker_at_a_time_while_the_others_serve(
    pool: WorkerPool,
) -> None:
    item = payload_item(PAYLOADS[0])
    loading = asyncio.create_task(pool.load("2", MODEL, SPEC))
    loaded_at: list[float] = []
    loading.add_done_callback(lambda _: loaded_at.append(time.monotonic()))
    seen_loading: list[int] = []

    async def watch() -> None:
        while not loading.done():
            workers = pool.stats().workers
            seen_loading.append(sum(1 for w in workers if w.loading))
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    [future] = pool.submit("1", [[item]], 10.0)
    assert isinstance((await future).results[0], Prediction)
    answered_at = time.monotonic()
    await loading
    await watcher
    # Loading on both workers at once would leave no one to answer until the load is over.
    assert max(seen_loading) == 1, seen_loading
    assert answered_at < loaded_at[0], "a request waited for the whole load"
    assert sorted(pool.ready_versions()) == ["1", "2"]


async def test_stop_drains_in_flight_work() -> None:
    pool = await make_pool()
    futures = pool.submit("1", [[payload_item(p)] for p in PAYLOADS], 10.0)
    await pool.stop()
    assert all(isinstance(f.result().results[0], Prediction) for f in futures)
    with pytest.raises(NotReady):
        pool.submit("1", [[payload_item(PAYLOADS[0])]], 1.0)


async def test_respawned_worker_refuses_a_model_file_changed_on_disk(tmp_path: Path) -> None:
    import hashlib
    import shutil

    model = tmp_path / "model.onnx"
    shutil.copy(MODEL, model)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    pool = WorkerPool(
        PoolSettings(workers=2, ping_interval_s=0.2, max_restarts=2), log_level="ERROR"
    )
    await pool.start()
    try:
        await pool.load("1", str(model), SPEC, digest)
        with model.open("r+b") as handle:  # tamper after verification
            handle.seek(100)
            handle.write(b"\x00\x01\x02")
        os.kill(pool.pids()[0], signal.SIGKILL)
        await asyncio.sleep(3.0)
        assert len(pool.pids()) == 1, "the respawned worker must not serve the tampered file"
        results = await predict_all(pool, [payload_item(PAYLOADS[0])])
        assert isinstance(results[0], Prediction)
    finally:
        await pool.stop()
