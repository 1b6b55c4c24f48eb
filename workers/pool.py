"""The worker pool: spawn, dispatch, supervise, roll versions, drain.

The parent side lives on the application's event loop. Requests become :class:`Job` objects
in one bounded FIFO; whenever a worker has a free slot the dispatcher takes the oldest jobs of
one version (up to ``max_batch`` items, so concurrent single requests share an ONNX batch),
sends them as one :class:`~workers.messages.Predict` and resolves each job's future from the
reply. Replies are read with ``loop.add_reader`` on the pipe; a worker's exit is seen at once
through its process sentinel, a hang through the age of its oldest message and missed pongs.
A dead or hung worker's jobs are retried once on another worker, and the worker is replaced
and given every resident version before it takes traffic. Too many restarts in a window stop
the respawning of that slot (crash-loop guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Literal

import msgspec

from telemetry.logs import trace_token
from workers.cpus import cgroup_cpu_limit, usable_cpus
from workers.errors import (
    DeadlineExceeded,
    ModelLoadError,
    NotReady,
    Overloaded,
    ServiceError,
    WorkerFailure,
)
from workers.messages import (
    Ack,
    Hang,
    Hello,
    Infer,
    InferReply,
    ItemError,
    Load,
    Ping,
    Pong,
    Predict,
    Prediction,
    PredictItem,
    PredictReply,
    Stop,
    Timings,
    Unload,
    reply_decoder,
    request_encoder,
)
from workers.settings import PoolSettings
from workers.shm import Arena
from workers.worker import WorkerConfig, worker_main

__all__ = ["PoolSettings", "WorkerPool", "cgroup_cpu_limit", "usable_cpus"]

log = logging.getLogger("heimdall.pool")


@dataclass(eq=False)
class Job:
    """Items of one request (or one slice of a batch) waiting for or under computation."""

    version: str
    items: list[PredictItem]
    future: asyncio.Future[JobResult]
    deadline: float
    enqueued_at: float
    infer: Infer | None = None
    attempts: int = 0
    dispatched_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    trace: str = ""
    """The submitting request's trace (``TRACEID-SPANID``), for the worker's log lines."""

    @property
    def size(self) -> int:
        """Items this job occupies in the queue."""
        return self.infer.batch if self.infer else len(self.items)


@dataclass(frozen=True)
class JobResult:
    """What a job's future resolves to."""

    results: list[Prediction | ItemError]
    timings: Timings
    queue_s: float
    worker_id: int
    batch_size: int
    reply: InferReply | None = None


@dataclass(eq=False)
class _Outgoing:
    message: Any
    jobs: list[Job]
    sent_at: float
    future: asyncio.Future[Any] | None = None
    slot: int = -1


@dataclass(eq=False)
class _Worker:
    slot: int
    process: BaseProcess
    conn: Connection
    state: str = "starting"  # starting | ready | dead | failed | stopped
    pid: int = 0
    outgoing: dict[int, _Outgoing] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    last_pong: float = 0.0
    served: int = 0
    hello: asyncio.Future[int] | None = None
    arena: Arena | None = None
    loading: int = 0  # Load messages outstanding: the worker computes nothing else meanwhile

    @property
    def load(self) -> int:
        return len(self.outgoing)


@dataclass
class _Resident:
    model_path: str
    spec: bytes
    sha256: str = ""


class WorkerPool:
    """Process pool serving model versions; see the module docstring."""

    def __init__(
        self,
        settings: PoolSettings,
        *,
        log_level: str = "INFO",
        log_format: Literal["json", "text", "auto"] = "auto",
        replica: str = "",
        on_restart: Callable[[int], None] | None = None,
    ) -> None:
        """Configure the pool; processes start in :meth:`start`.

        ``log_level``, ``log_format`` and ``replica`` go to the workers, which write the same
        log schema as the HTTP process (telemetry/logs.py).
        """
        self.settings = settings
        self.size = settings.worker_count()
        self._log_level = log_level
        self._log_format = log_format
        self._replica = replica
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * self.size
        self._queue: deque[Job] = deque()
        self._queued_items = 0
        self._ids = itertools.count(1)
        self._resident: dict[str, _Resident] = {}
        self._pending: dict[str, int] = {}
        self._idle: dict[str, asyncio.Event] = {}
        self._restarts: dict[int, deque[float]] = {i: deque() for i in range(self.size)}
        self.restarts_total = 0
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._respawns: set[asyncio.Task[None]] = set()
        self._on_restart = on_restart
        self._loop: asyncio.AbstractEventLoop | None = None
        self._turn = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every worker process and the supervisor; returns when all said hello."""
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._spawn(slot) for slot in range(self.size)))
        self._supervisor = asyncio.create_task(self._supervise(), name="pool-supervisor")

    async def stop(self) -> None:
        """Stop intake, let queued and in-flight work finish (bounded), then end workers."""
        self._closing = True
        deadline = time.monotonic() + self.settings.drain_timeout_s
        busy = self._queue or any(w and w.outgoing for w in self._workers)
        while busy and time.monotonic() < deadline:  # polls two conditions with a deadline
            await asyncio.sleep(0.02)
            busy = self._queue or any(w and w.outgoing for w in self._workers)
        if self._supervisor:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for task in list(self._respawns):
            task.cancel()
        for job in list(self._queue):
            self._fail(job, NotReady("the service is shutting down; retry on another replica"))
        self._queue.clear()
        for worker in self._workers:
            if worker and worker.state in ("ready", "starting"):
                worker.state = "stopping"
                with contextlib.suppress(OSError):
                    worker.conn.send_bytes(request_encoder.encode(Stop(next(self._ids))))
        for worker in self._workers:
            if worker is None:
                continue
            await asyncio.to_thread(worker.process.join, 5.0)
            if worker.process.is_alive():
                worker.process.kill()
                await asyncio.to_thread(worker.process.join, 2.0)
            self._detach(worker)
            worker.state = "stopped"
            if worker.arena:
                worker.arena.close()

    @property
    def closing(self) -> bool:
        """True once :meth:`stop` began."""
        return self._closing

    # ------------------------------------------------------------------ processes

    async def _spawn(self, slot: int) -> None:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        arena = None
        if self.settings.shm_slot_bytes:
            try:
                arena = Arena(self.settings.max_inflight, self.settings.shm_slot_bytes)
            except OSError as exc:
                log.warning(
                    "no shared memory for worker %d (%s); IQ goes through the pipe", slot, exc
                )
        config = WorkerConfig(
            worker_id=slot,
            intra_op_threads=self.settings.intra_op_threads,
            test_hooks=self.settings.test_hooks,
            log_level=self._log_level,
            log_format=self._log_format,
            replica=self._replica,
            arena_path=arena.path if arena else "",
        )
        process = self._ctx.Process(
            target=worker_main,
            args=(child_conn, msgspec.msgpack.encode(config)),
            name=f"heimdall-worker-{slot}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        assert self._loop is not None
        worker = _Worker(slot, process, parent_conn, hello=self._loop.create_future(), arena=arena)
        self._workers[slot] = worker
        self._loop.add_reader(parent_conn.fileno(), self._on_readable, worker)
        self._loop.add_reader(process.sentinel, self._on_exit, worker)
        try:
            assert worker.hello is not None
            worker.pid = await asyncio.wait_for(worker.hello, self.settings.start_timeout_s)
            if worker.arena:
                worker.arena.unlink()  # the worker has mapped it
            while missing := [v for v in self._resident if v not in worker.loaded]:
                for version in missing:
                    await self._load_on(worker, version, self._resident[version])
            for version in [v for v in worker.loaded if v not in self._resident]:
                await self._control(worker, Unload(next(self._ids), version))
                worker.loaded.discard(version)
        except (ServiceError, TimeoutError, OSError) as exc:
            log.error("worker %d failed to start: %s", slot, exc)
            if worker.state != "dead":
                worker.process.kill()
            return
        if worker.state == "starting":
            worker.state = "ready"
            worker.last_pong = time.monotonic()
            log.info("worker %d ready (pid %d)", slot, worker.pid)
            self._pump()

    def _detach(self, worker: _Worker) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.conn.fileno())
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.process.sentinel)

    def _on_exit(self, worker: _Worker) -> None:
        if worker.state in ("dead", "stopped", "failed", "stopping"):
            self._detach(worker)
            return
        self._detach(worker)
        was = worker.state
        worker.state = "dead"
        worker.process.join(0)
        log.warning(
            "worker %d (pid %d) exited with %s while %s",
            worker.slot,
            worker.pid,
            worker.process.exitcode,
            was,
        )
        with contextlib.suppress(OSError):
            worker.conn.close()
        if worker.arena:
            worker.arena.close()
        if worker.hello and not worker.hello.done():
            worker.hello.set_exception(WorkerFailure("worker exited during start"))
        retry: list[Job] = []
        for out in worker.outgoing.values():
            if out.future and not out.future.done():
                out.future.set_exception(WorkerFailure(f"worker {worker.slot} exited"))
            for job in out.jobs:
                if job.future.done():
                    continue
                if job.attempts >= 2:
                    self._fail(job, WorkerFailure("the worker computing this request died twice"))
                else:
                    # Retries carry their own budget: a hang is found after the hang timeout,
                    # which may be past the original deadline (docs/design-notes.md).
                    job.deadline = max(
                        job.deadline, time.monotonic() + self.settings.retry_budget_s
                    )
                    retry.append(job)
        worker.outgoing.clear()
        for job in reversed(retry):
            self._queue.appendleft(job)
            self._queued_items += job.size
        if not self._closing:
            self._schedule_respawn(worker.slot)
        self._pump()

    def _schedule_respawn(self, slot: int) -> None:
        now = time.monotonic()
        history = self._restarts[slot]
        while history and now - history[0] > self.settings.restart_window_s:
            history.popleft()
        if len(history) >= self.settings.max_restarts:
            worker = self._workers[slot]
            if worker:
                worker.state = "failed"
            log.error("worker %d is crash-looping; not respawning it", slot)
            return
        history.append(now)
        self.restarts_total += 1
        if self._on_restart:
            self._on_restart(slot)
        task = asyncio.create_task(self._spawn(slot), name=f"respawn-{slot}")
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _supervise(self) -> None:
        interval = self.settings.ping_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for worker in self._workers:
                if worker is None or worker.state != "ready":
                    continue
                oldest = min((o.sent_at for o in worker.outgoing.values()), default=now)
                silent = now - worker.last_pong
                if now - oldest > self.settings.hang_timeout_s or silent > max(
                    self.settings.hang_timeout_s, 5 * interval
                ):
                    log.error(
                        "worker %d hung (busy %.1fs, silent %.1fs); killing it",
                        worker.slot,
                        now - oldest,
                        silent,
                    )
                    worker.process.kill()
                    continue
                self._send(worker, Ping(next(self._ids)))

    # ------------------------------------------------------------------ wire

    def _send(self, worker: _Worker, message: Any) -> bool:
        try:
            worker.conn.send_bytes(request_encoder.encode(message))
        except OSError:
            return False
        return True

    def _on_readable(self, worker: _Worker) -> None:
        try:
            data = worker.conn.recv_bytes()
        except (EOFError, OSError):
            self._detach(worker)  # the sentinel reports the exit
            with contextlib.suppress(ValueError, OSError):
                assert self._loop is not None
                self._loop.add_reader(worker.process.sentinel, self._on_exit, worker)
            return
        try:
            reply = reply_decoder.decode(data)
        except msgspec.DecodeError:
            log.error("undecodable reply from worker %d", worker.slot)
            return
        if isinstance(reply, Pong):
            worker.last_pong = time.monotonic()
            return
        if isinstance(reply, Hello):
            if worker.hello and not worker.hello.done():
                worker.hello.set_result(reply.pid)
            return
        out = worker.outgoing.pop(reply.id, None)
        if out is None:
            return
        if out.slot >= 0 and worker.arena:
            worker.arena.release(out.slot)
        if out.future is not None:
            if not out.future.done():
                out.future.set_result(reply)
        elif isinstance(reply, PredictReply):
            self._resolve(worker, out, reply)
        elif isinstance(reply, InferReply):
            job = out.jobs[0]
            self._finish(
                job,
                JobResult(
                    [],
                    reply.timings,
                    job.dispatched_at - job.enqueued_at,
                    worker.slot,
                    job.infer.batch if job.infer else 0,
                    reply,
                ),
            )
        self._pump()

    def _resolve(self, worker: _Worker, out: _Outgoing, reply: PredictReply) -> None:
        offset = 0
        batch = len(reply.results)
        worker.served += batch
        for job in out.jobs:
            n = len(job.items)
            part = reply.results[offset : offset + n]
            offset += n
            if part and all(isinstance(r, ItemError) and r.code == "deadline" for r in part):
                first = part[0]
                assert isinstance(first, ItemError)
                self._fail(job, DeadlineExceeded(first.detail))
                continue
            self._finish(
                job,
                JobResult(
                    part, reply.timings, job.dispatched_at - job.enqueued_at, worker.slot, batch
                ),
            )

    def _finish(self, job: Job, result: JobResult) -> None:
        if job.timer:
            job.timer.cancel()
        self._done_pending(job.version)
        if not job.future.done():
            job.future.set_result(result)

    def _fail(self, job: Job, error: ServiceError) -> None:
        if job.timer:
            job.timer.cancel()
        self._done_pending(job.version)
        if not job.future.done():
            job.future.set_exception(error)

    def _done_pending(self, version: str) -> None:
        left = self._pending.get(version, 0) - 1
        self._pending[version] = max(left, 0)
        if left <= 0 and version in self._idle:
            self._idle[version].set()

    # ------------------------------------------------------------------ dispatch

    def _ready(self) -> list[_Worker]:
        return [w for w in self._workers if w and w.state == "ready"]

    def _pump(self) -> None:
        """Send queued jobs to the least-loaded ready workers while they have free slots."""
        limit = self.settings.max_inflight
        while self._queue:
            # A worker building a session answers nothing until it is done: while any other
            # worker is ready, jobs wait in the queue for it rather than behind the load.
            ready = self._ready()
            serving = [w for w in ready if not w.loading] or ready
            candidates = [w for w in serving if w.load < limit]
            if not candidates:
                return
            # Least loaded; ties go round-robin so idle workers share the traffic.
            self._turn = (self._turn + 1) % self.size
            worker = min(candidates, key=lambda w: (w.load, (w.slot - self._turn) % self.size))
            first = self._queue.popleft()
            self._queued_items -= first.size
            jobs = [first]
            now = time.monotonic()
            if first.infer is None:
                items = len(first.items)
                while (
                    self._queue
                    and self._queue[0].infer is None
                    and self._queue[0].version == first.version
                    and items + len(self._queue[0].items) <= self.settings.max_batch
                ):
                    job = self._queue.popleft()
                    self._queued_items -= job.size
                    jobs.append(job)
                    items += len(job.items)
                wall = time.time_ns() - int(now * 1e9)
                staged, shm_slot = self._stage([i for j in jobs for i in j.items], worker)
                message: Any = Predict(
                    next(self._ids),
                    first.version,
                    staged,
                    [wall + int(j.deadline * 1e9) for j in jobs for _ in j.items],
                    [j.trace for j in jobs for _ in j.items] if any(j.trace for j in jobs) else [],
                )
            else:
                shm_slot = -1
                infer = first.infer
                message = Infer(
                    next(self._ids),
                    infer.version,
                    infer.batch,
                    infer.features,
                    infer.receivers,
                    infer.mask,
                    first.trace,
                )
            for job in jobs:
                job.dispatched_at = now
                job.attempts += 1
            if not self._send(worker, message):
                if shm_slot >= 0 and worker.arena:
                    worker.arena.release(shm_slot)
                for job in reversed(jobs):
                    job.attempts -= 1
                    self._queue.appendleft(job)
                    self._queued_items += job.size
                worker.process.kill()
                return
            worker.outgoing[message.id] = _Outgoing(message, jobs, now, slot=shm_slot)

    @staticmethod
    def _stage(items: list[PredictItem], worker: _Worker) -> tuple[list[PredictItem], int]:
        """Move the items' IQ into the worker's arena when there is room (else inline)."""
        staged = worker.arena.write([i.iq for i in items]) if worker.arena else None
        if staged is None:
            return items, -1
        slot, offsets = staged
        return [
            PredictItem(b"", i.latitudes, i.longitudes, i.levels, i.geojson, offset, len(i.iq))
            for i, offset in zip(items, offsets, strict=True)
        ], slot

    def _expire(self, job: Job) -> None:
        job.timer = None
        if job.dispatched_at == 0.0 and job in self._queue:
            self._queue.remove(job)
            self._queued_items -= job.size
            self._fail(
                job,
                DeadlineExceeded(
                    f"the request waited {time.monotonic() - job.enqueued_at:.2f}s in the queue "
                    "past its deadline and was not computed"
                ),
            )

    def submit(
        self,
        version: str,
        items: list[list[PredictItem]],
        timeout_s: float,
        infer: list[Infer] | None = None,
    ) -> list[asyncio.Future[JobResult]]:
        """Queue one job per item group (or per Infer) and return their futures.

        Raises:
            NotReady: shutting down, or ``version`` is not resident.
            Overloaded: the queue cannot take these items.
        """
        if self._closing:
            raise NotReady("the service is shutting down; retry on another replica", retry_after=1)
        if version not in self._resident:
            raise NotReady(f"model version {version} is not loaded on this replica", retry_after=1)
        if not self._ready():
            raise NotReady("no worker is ready", retry_after=1)
        groups: list[tuple[list[PredictItem], Infer | None]] = (
            [([], i) for i in infer] if infer else [(g, None) for g in items]
        )
        size = sum(i.batch if i else len(g) for g, i in groups)
        if self._queued_items + size > self.settings.queue_size:
            raise Overloaded(
                f"{self._queued_items} items are queued (limit {self.settings.queue_size}); "
                "retry after the indicated delay",
                retry_after=1,
            )
        assert self._loop is not None
        now = time.monotonic()
        futures = []
        trace = trace_token()
        for group, inf in groups:
            job = Job(version, group, self._loop.create_future(), now + timeout_s, now, inf)
            job.trace = trace
            job.timer = self._loop.call_at(self._loop.time() + timeout_s, self._expire, job)
            self._queue.append(job)
            self._queued_items += job.size
            self._pending[version] = self._pending.get(version, 0) + 1
            futures.append(job.future)
        self._pump()
        return futures

    # ------------------------------------------------------------------ versions

    async def _control(self, worker: _Worker, message: Any) -> Any:
        assert self._loop is not None
        future: asyncio.Future[Any] = self._loop.create_future()
        worker.outgoing[message.id] = _Outgoing(message, [], time.monotonic(), future)
        if not self._send(worker, message):
            worker.outgoing.pop(message.id, None)
            raise WorkerFailure(f"worker {worker.slot} is gone")
        return await asyncio.wait_for(future, self.settings.start_timeout_s)

    async def _load_on(self, worker: _Worker, version: str, res: _Resident) -> None:
        worker.loading += 1
        try:
            ack = await self._control(
                worker, Load(next(self._ids), version, res.model_path, res.spec, res.sha256)
            )
        finally:
            worker.loading -= 1
            self._pump()
        if not isinstance(ack, Ack) or not ack.ok:
            detail = ack.detail if isinstance(ack, Ack) else "unexpected reply"
            raise ModelLoadError(f"worker {worker.slot} could not load {version}: {detail}")
        worker.loaded.add(version)

    async def load(self, version: str, model_path: str, spec: bytes, sha256: str = "") -> None:
        """Load ``version`` on every worker (each builds, warms and validates its session).

        One worker at a time, and the dispatcher sends no work to the worker that is loading
        while another can take it: a swap under load never stops the whole pool (requests keep
        being answered by the other workers). With ``sha256``, every worker (also a respawned
        one, later) refuses the file unless it still has that digest. On any failure the
        version is unloaded everywhere and the error raised; what was resident before keeps
        serving.
        """
        if version in self._resident:
            return
        res = _Resident(model_path, spec, sha256)
        self._resident[version] = res
        errors: list[BaseException] = []
        for worker in self._ready():
            try:
                await self._load_on(worker, version, res)
            except Exception as exc:  # any failure: unload everywhere, report it below
                errors.append(exc)
                break
        if errors or not self._ready():
            del self._resident[version]
            for w in self._ready():
                if version in w.loaded:
                    with contextlib.suppress(ServiceError, TimeoutError):
                        await self._control(w, Unload(next(self._ids), version))
                    w.loaded.discard(version)
            if errors:
                first = errors[0]
                raise first if isinstance(first, ServiceError) else ModelLoadError(str(first))
            raise NotReady("no worker is ready to load the model")

    async def unload(self, version: str, wait_s: float = 30.0) -> None:
        """Drop ``version`` once its queued and in-flight jobs have finished."""
        if version not in self._resident:
            return
        del self._resident[version]
        if self._pending.get(version, 0) > 0:
            event = self._idle.setdefault(version, asyncio.Event())
            event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), wait_s)
            self._idle.pop(version, None)
        for w in self._ready():
            if version in w.loaded:
                with contextlib.suppress(ServiceError, TimeoutError):
                    await self._control(w, Unload(next(self._ids), version))
                w.loaded.discard(version)

    def resident(self) -> list[str]:
        """Versions loaded (or loading) on the pool."""
        return list(self._resident)

    # ------------------------------------------------------------------ observation

    def stats(self) -> dict[str, Any]:
        """Snapshot for health, gauges and /v1/models: workers by state, queue depth, restarts."""
        states: dict[str, int] = {"starting": 0, "ready": 0, "dead": 0, "failed": 0}
        workers = []
        for slot, w in enumerate(self._workers):
            state = w.state if w else "dead"
            states[state] = states.get(state, 0) + 1
            workers.append(
                {
                    "slot": slot,
                    "state": state,
                    "pid": w.pid if w else 0,
                    "in_flight": w.load if w else 0,
                    "served": w.served if w else 0,
                    "loading": bool(w.loading) if w else False,
                    "versions": sorted(w.loaded) if w else [],
                }
            )
        return {
            "workers": workers,
            "states": states,
            "queue_depth": self._queued_items,
            "pending_items": self._queued_items
            + sum(j.size for w in self._workers if w for o in w.outgoing.values() for j in o.jobs),
            "restarts": self.restarts_total,
        }

    def ready_versions(self) -> set[str]:
        """Resident versions that at least one ready worker serves."""
        served: set[str] = set()
        for w in self._ready():
            served |= w.loaded
        return served & set(self._resident)

    def pids(self) -> list[int]:
        """PIDs of live workers (for tests and resource accounting)."""
        return [w.pid for w in self._workers if w and w.state == "ready"]

    async def hang_worker(self, slot: int, seconds: float) -> None:
        """Test hook: make one worker's compute thread block (needs ``test_hooks``).

        Raises:
            RuntimeError: the pool runs without test hooks (its workers would not decode it).
            NotReady: the worker is not ready.
        """
        if not self.settings.test_hooks:
            raise RuntimeError("test hooks are disabled (HEIMDALL_POOL_TEST_HOOKS)")
        worker = self._workers[slot]
        if worker is None or worker.state != "ready":
            raise NotReady(f"worker {slot} is not ready")
        message = Hang(next(self._ids), seconds)
        worker.outgoing[message.id] = _Outgoing(message, [], time.monotonic(), None)
        self._send(worker, message)
