"""The pool's dispatcher: one bounded FIFO of jobs, batching, deadlines, retries.

Requests become jobs (:mod:`workers.jobs`) in one FIFO bounded in items. Whenever a ready
worker has a free slot, :meth:`Dispatcher.pump` takes the oldest job; a predict job takes the
predict jobs of the same version right behind it along (up to ``max_batch`` items, so
concurrent single requests share an ONNX batch) and they travel as one
:class:`~workers.messages.Predict`; a tensor job travels alone as an
:class:`~workers.messages.Infer`. Each reply settles its jobs. A job still queued at its
deadline fails with :class:`~workers.errors.DeadlineExceeded`; the jobs of a worker that died
are retried once (:meth:`Dispatcher.retry`), with their own time budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgspec

from workers.errors import DeadlineExceeded, Overloaded, ServiceError, WorkerFailure
from workers.handle import Outgoing, WorkerHandle, ready_workers
from workers.jobs import AnyJob, PredictJob, PredictResult, TensorJob, TensorResult
from workers.messages import Infer, Predict, PredictItem, PredictReply
from workers.settings import PoolSettings


class Dispatcher:
    """Queue and in-flight work of a pool; see the module docstring."""

    def __init__(
        self,
        settings: PoolSettings,
        workers: list[WorkerHandle | None],
        ids: Iterator[int],
    ) -> None:
        """Dispatch to ``workers`` (the supervisor's slots), numbering messages from ``ids``."""
        self.settings = settings
        self._workers = workers
        self._ids = ids
        self._queue: deque[AnyJob] = deque()
        self.queued_items = 0
        self._pending: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._turn = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Use ``loop`` for the jobs' futures and expiry timers."""
        self._loop = loop

    # ------------------------------------------------------------------ intake

    def submit(
        self, version: str, groups: list[list[PredictItem]], timeout_s: float, trace: str
    ) -> list[asyncio.Future[PredictResult]]:
        """Queue one predict job per item group; raises Overloaded when they do not fit."""
        jobs = [
            PredictJob(items=group, **self._job_fields(version, timeout_s, trace))
            for group in groups
        ]
        self._enqueue(jobs, timeout_s)
        return [j.future for j in jobs]

    def submit_tensors(
        self, version: str, infers: list[Infer], timeout_s: float, trace: str
    ) -> list[asyncio.Future[TensorResult]]:
        """Queue one tensor job per Infer; raises Overloaded when they do not fit."""
        jobs = [
            TensorJob(infer=infer, **self._job_fields(version, timeout_s, trace))
            for infer in infers
        ]
        self._enqueue(jobs, timeout_s)
        return [j.future for j in jobs]

    def _job_fields(self, version: str, timeout_s: float, trace: str) -> dict[str, Any]:
        """What every new job starts with: version, a fresh future, deadline and trace."""
        now = time.monotonic()
        return {
            "version": version,
            "future": self._require_loop().create_future(),
            "deadline": now + timeout_s,
            "enqueued_at": now,
            "trace": trace,
        }

    def _enqueue(self, jobs: list[PredictJob] | list[TensorJob], timeout: float) -> None:
        size = sum(j.size for j in jobs)
        if self.queued_items + size > self.settings.queue_size:
            raise Overloaded(
                f"{self.queued_items} items are queued (limit {self.settings.queue_size}); "
                "retry after the indicated delay",
                retry_after=1,
            )
        loop = self._require_loop()
        for job in jobs:
            job.timer = loop.call_at(loop.time() + timeout, self._expire, job)
            self._queue.append(job)
            self.queued_items += job.size
            self._pending[job.version] = self._pending.get(job.version, 0) + 1
        self.pump()

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the pool is not started"
        return self._loop

    def _expire(self, job: AnyJob) -> None:
        job.timer = None
        if job.dispatched_at == 0.0 and job in self._queue:
            self._queue.remove(job)
            self.queued_items -= job.size
            self._fail(
                job,
                DeadlineExceeded(
                    f"the request waited {time.monotonic() - job.enqueued_at:.2f}s in the queue "
                    "past its deadline and was not computed"
                ),
            )

    # ------------------------------------------------------------------ dispatch

    def pump(self) -> None:
        """Send queued jobs to the least-loaded ready workers while they have free slots."""
        limit = self.settings.max_inflight
        size = len(self._workers)
        while self._queue:
            # A worker building a session answers nothing until it is done: while any other
            # worker is ready, jobs wait in the queue for it rather than behind the load.
            ready = ready_workers(self._workers)
            serving = [w for w in ready if not w.loading] or ready
            candidates = [w for w in serving if w.load < limit]
            if not candidates:
                return
            # Least loaded; ties go round-robin so idle workers share the traffic.
            self._turn = (self._turn + 1) % size
            worker = min(candidates, key=lambda w: (w.load, (w.slot - self._turn) % size))
            now = time.monotonic()
            jobs, message, shm_slot = self._take(worker, now)
            for job in jobs:
                job.dispatched_at = now
                job.attempts += 1
            if not worker.send(message):
                if shm_slot >= 0 and worker.arena:
                    worker.arena.release(shm_slot)
                for job in reversed(jobs):
                    job.attempts -= 1
                    self._queue.appendleft(job)
                    self.queued_items += job.size
                worker.kill()
                return
            worker.outgoing[message.id] = Outgoing(message, jobs, now, slot=shm_slot)

    def _pop(self) -> AnyJob:
        job = self._queue.popleft()
        self.queued_items -= job.size
        return job

    def _take(self, worker: WorkerHandle, now: float) -> tuple[list[AnyJob], Predict | Infer, int]:
        """The next message for ``worker``: its jobs, the message and its arena slot (or -1)."""
        first = self._pop()
        if isinstance(first, TensorJob):
            return [first], first.message(next(self._ids)), -1
        batch = [first]
        items, nbytes = first.size, first.nbytes
        # Join jobs while the message still fits one arena slot: padded bodies (up to the
        # body limit each) must not push a whole batch through the pipe instead.
        room = worker.arena.slot_bytes if worker.arena else 1 << 62
        while (
            self._queue
            and isinstance(following := self._queue[0], PredictJob)
            and following.version == first.version
            and items + following.size <= self.settings.max_batch
            and nbytes + following.nbytes <= room
        ):
            self._pop()
            batch.append(following)
            items += following.size
            nbytes += following.nbytes
        wall = time.time_ns() - int(now * 1e9)
        staged, shm_slot = self._stage([i for j in batch for i in j.items], worker)
        message = Predict(
            next(self._ids),
            first.version,
            staged,
            [wall + int(j.deadline * 1e9) for j in batch for _ in j.items],
            [j.trace for j in batch for _ in j.items] if any(j.trace for j in batch) else [],
        )
        jobs: list[AnyJob] = [*batch]
        return jobs, message, shm_slot

    @staticmethod
    def _stage(items: list[PredictItem], worker: WorkerHandle) -> tuple[list[PredictItem], int]:
        """Move the items' IQ (or bodies) into the worker's arena when there is room."""
        staged = worker.arena.write([i.iq for i in items]) if worker.arena else None
        if staged is None:
            return items, -1
        slot, offsets = staged
        return [
            PredictItem(
                b"", i.latitudes, i.longitudes, i.levels, i.geojson, offset, len(i.iq), i.encoding
            )
            for i, offset in zip(items, offsets, strict=True)
        ], slot

    # ------------------------------------------------------------------ outcomes

    def settle(self, worker: WorkerHandle, out: Outgoing, reply: msgspec.Struct) -> None:
        """Resolve the jobs of ``out`` from ``reply`` (each job reads its own part)."""
        if isinstance(reply, PredictReply):
            worker.served += len(reply.results)
        offset = 0
        for job in out.jobs:
            job.settle(reply, offset, worker.slot)
            offset += job.size
            self._done_pending(job.version)

    def retry(self, jobs: list[AnyJob]) -> None:
        """Put a dead worker's jobs back at the head of the queue (each is retried once)."""
        again: list[AnyJob] = []
        for job in jobs:
            if job.future.done():
                continue
            if job.attempts >= 2:
                self._fail(job, WorkerFailure("the worker computing this request died twice"))
            else:
                # Retries carry their own budget: a hang is found after the hang timeout,
                # which may be past the original deadline (docs/design-notes.md).
                job.deadline = max(job.deadline, time.monotonic() + self.settings.retry_budget_s)
                again.append(job)
        for job in reversed(again):
            self._queue.appendleft(job)
            self.queued_items += job.size

    def _fail(self, job: AnyJob, error: ServiceError) -> None:
        job.fail(error)
        self._done_pending(job.version)

    def _done_pending(self, version: str) -> None:
        left = self._pending.get(version, 0) - 1
        self._pending[version] = max(left, 0)
        if left <= 0 and version in self._idle:
            self._idle[version].set()

    # ------------------------------------------------------------------ draining

    def busy(self) -> bool:
        """Whether jobs are queued or any worker has messages in flight."""
        return bool(self._queue) or any(w and w.outgoing for w in self._workers)

    def in_flight_items(self) -> int:
        """Items of the jobs sent to workers and not answered yet."""
        return sum(j.size for w in self._workers if w for o in w.outgoing.values() for j in o.jobs)

    def fail_queued(self, error: ServiceError) -> None:
        """Fail every queued job with ``error`` (shutdown)."""
        for job in list(self._queue):
            self._fail(job, error)
        self._queue.clear()
        self.queued_items = 0

    def hold(self, version: str) -> None:
        """Count work the caller is preparing for ``version`` as pending (see ``release``)."""
        self._pending[version] = self._pending.get(version, 0) + 1

    def pending(self, version: str) -> int:
        """Jobs of ``version`` queued or in flight, and holds on it."""
        return self._pending.get(version, 0)

    def release(self, version: str) -> None:
        """End one :meth:`hold`."""
        self._done_pending(version)

    async def wait_idle(self, version: str, wait_s: float) -> None:
        """Wait (at most ``wait_s``) until no job of ``version`` is queued or in flight."""
        if self._pending.get(version, 0) <= 0:
            return
        event = self._idle.setdefault(version, asyncio.Event())
        event.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), wait_s)
        self._idle.pop(version, None)
