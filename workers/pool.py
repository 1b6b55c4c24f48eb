"""The worker pool: a facade over the supervisor and the dispatcher, and model versions.

:class:`WorkerPool` is what the application uses. It composes a
:class:`~workers.supervisor.Supervisor` (processes, hangs, deaths, respawns, crash-loop guard)
and a :class:`~workers.dispatcher.Dispatcher` (the FIFO, batching, deadlines, retries) that
share the worker slots (:class:`~workers.handle.WorkerHandle`), and it keeps the resident
model versions: a version loads on one worker at a time and every respawned worker gets them
all before it takes traffic. Shutdown stops intake, drains (bounded), then ends the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from telemetry.logs import trace_token
from workers.cpus import cgroup_cpu_limit, usable_cpus
from workers.dispatcher import Dispatcher
from workers.errors import ModelLoadError, NotReady, ServiceError
from workers.handle import (
    PoolStats,
    WorkerHandle,
    WorkerState,
    WorkerStats,
    ready_workers,
    worker_stats,
)
from workers.jobs import JobResult, PredictResult, TensorResult
from workers.messages import Ack, Infer, Load, PredictItem, Unload
from workers.settings import PoolSettings
from workers.supervisor import Supervisor
from workers.worker import WorkerConfig

__all__ = [
    "JobResult",
    "PoolSettings",
    "PoolStats",
    "PredictResult",
    "TensorResult",
    "WorkerPool",
    "WorkerState",
    "WorkerStats",
    "cgroup_cpu_limit",
    "usable_cpus",
]


@dataclass
class _Resident:
    model_path: str
    spec: bytes
    sha256: str = ""
    label: str = ""


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
        self._workers: list[WorkerHandle | None] = [None] * self.size
        self._ids = itertools.count(1)
        self._resident: dict[str, _Resident] = {}
        self._dispatcher = Dispatcher(settings, self._workers, self._ids)
        config = WorkerConfig(
            worker_id=0,
            intra_op_threads=settings.intra_op_threads,
            test_hooks=settings.test_hooks,
            log_level=log_level,
            log_format=log_format,
            replica=replica,
        )
        self._supervisor = Supervisor(
            settings, self._workers, self._ids, self._dispatcher, config, self._replay, on_restart
        )

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every worker process and the supervisor; returns when all said hello."""
        self._dispatcher.bind(asyncio.get_running_loop())
        await self._supervisor.start()

    async def stop(self) -> None:
        """Stop intake, let queued and in-flight work finish (bounded), then end workers."""
        self._supervisor.closing = True
        deadline = time.monotonic() + self.settings.drain_timeout_s
        busy = self._dispatcher.busy()
        while busy and time.monotonic() < deadline:  # polls two conditions with a deadline
            await asyncio.sleep(0.02)
            busy = self._dispatcher.busy()
        await self._supervisor.halt()
        self._dispatcher.fail_queued(
            NotReady("the service is shutting down; retry on another replica")
        )
        await self._supervisor.stop_workers()

    @property
    def closing(self) -> bool:
        """True once :meth:`stop` began."""
        return self._supervisor.closing

    @property
    def restarts_total(self) -> int:
        """Worker respawns since the pool started."""
        return self._supervisor.restarts_total

    # ------------------------------------------------------------------ work

    def submit(
        self, version: str, items: list[list[PredictItem]], timeout_s: float
    ) -> list[asyncio.Future[PredictResult]]:
        """Queue one predict job per item group and return their futures.

        Raises:
            NotReady: shutting down, ``version`` is not resident, or no worker is ready.
            Overloaded: the queue cannot take these items.
        """
        self._check_intake(version)
        return self._dispatcher.submit(version, items, timeout_s, trace_token())

    def submit_tensors(
        self, version: str, infers: list[Infer], timeout_s: float
    ) -> list[asyncio.Future[TensorResult]]:
        """Queue one tensor job per Infer (``/v2``) and return their futures.

        Raises:
            NotReady: shutting down, ``version`` is not resident, or no worker is ready.
            Overloaded: the queue cannot take these items.
        """
        self._check_intake(version)
        return self._dispatcher.submit_tensors(version, infers, timeout_s, trace_token())

    def _check_intake(self, version: str) -> None:
        if self.closing:
            raise NotReady("the service is shutting down; retry on another replica", retry_after=1)
        if version not in self._resident:
            raise NotReady(f"model version {version} is not loaded on this replica", retry_after=1)
        if not ready_workers(self._workers):
            raise NotReady("no worker is ready", retry_after=1)

    # ------------------------------------------------------------------ versions

    async def _replay(self, worker: WorkerHandle) -> None:
        """Bring a new worker's versions in line with the resident ones (before it serves)."""
        while missing := [v for v in self._resident if v not in worker.loaded]:
            for version in missing:
                await self._load_on(worker, version, self._resident[version])
        for version in [v for v in worker.loaded if v not in self._resident]:
            await self._supervisor.control(worker, Unload(next(self._ids), version))
            worker.loaded.discard(version)

    async def _load_on(self, worker: WorkerHandle, version: str, res: _Resident) -> None:
        worker.loading += 1
        try:
            ack = await self._supervisor.control(
                worker,
                Load(next(self._ids), version, res.model_path, res.spec, res.sha256, res.label),
            )
        finally:
            worker.loading -= 1
            self._dispatcher.pump()
        if not isinstance(ack, Ack) or not ack.ok:
            detail = ack.detail if isinstance(ack, Ack) else "unexpected reply"
            raise ModelLoadError(f"worker {worker.slot} could not load {version}: {detail}")
        worker.loaded.add(version)

    async def load(
        self, version: str, model_path: str, spec: bytes, sha256: str = "", label: str = ""
    ) -> None:
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
        res = _Resident(model_path, spec, sha256, label or f"model v{version}")
        self._resident[version] = res
        errors: list[BaseException] = []
        for worker in ready_workers(self._workers):
            try:
                await self._load_on(worker, version, res)
            except Exception as exc:  # any failure: unload everywhere, report it below
                errors.append(exc)
                break
        if errors or not ready_workers(self._workers):
            del self._resident[version]
            for w in ready_workers(self._workers):
                if version in w.loaded:
                    with contextlib.suppress(ServiceError, TimeoutError):
                        await self._supervisor.control(w, Unload(next(self._ids), version))
                    w.loaded.discard(version)
            if errors:
                first = errors[0]
                raise first if isinstance(first, ServiceError) else ModelLoadError(str(first))
            raise NotReady("no worker is ready to load the model")

    @contextlib.contextmanager
    def holding(self, version: str) -> Iterator[None]:
        """Keep ``version`` loaded while the caller prepares work for it.

        A cache lookup, a decode in a thread: an :meth:`unload` that starts meanwhile waits
        for the hold to end and for the work submitted under it, as for queued and in-flight
        jobs.
        """
        self._dispatcher.hold(version)
        try:
            yield
        finally:
            self._dispatcher.release(version)

    async def unload(self, version: str, wait_s: float = 30.0) -> None:
        """Drop ``version`` once its holds and its queued and in-flight jobs have finished.

        It stays resident (it takes work) until then: a request routed to it before the
        routing changed may still be on its way to :meth:`submit` (rollouts must not fail it).
        """
        if version not in self._resident:
            return
        deadline = time.monotonic() + wait_s
        # Again after each wake-up: a hold taken between the last job's end and this task
        # running again must be waited for too.
        while self._dispatcher.pending(version) and (left := deadline - time.monotonic()) > 0:
            await self._dispatcher.wait_idle(version, left)
        self._resident.pop(version, None)
        for w in ready_workers(self._workers):
            if version in w.loaded:
                with contextlib.suppress(ServiceError, TimeoutError):
                    await self._supervisor.control(w, Unload(next(self._ids), version))
                w.loaded.discard(version)

    def resident(self) -> list[str]:
        """Versions loaded (or loading) on the pool."""
        return list(self._resident)

    # ------------------------------------------------------------------ observation

    def stats(self) -> PoolStats:
        """Snapshot for health, gauges and /v1/models: workers by state, queue depth, restarts."""
        workers = [worker_stats(slot, w) for slot, w in enumerate(self._workers)]
        states: dict[str, int] = {"starting": 0, "ready": 0, "dead": 0, "failed": 0}
        for w in workers:
            states[w.state.value] = states.get(w.state.value, 0) + 1
        queued = self._dispatcher.queued_items
        return PoolStats(
            workers=workers,
            states=states,
            queue_depth=queued,
            pending_items=queued + self._dispatcher.in_flight_items(),
            restarts=self.restarts_total,
        )

    def ready_versions(self) -> set[str]:
        """Resident versions that at least one ready worker serves."""
        served: set[str] = set()
        for w in ready_workers(self._workers):
            served |= w.loaded
        return served & set(self._resident)

    def pids(self) -> list[int]:
        """PIDs of live workers (for tests and resource accounting)."""
        return [w.pid for w in ready_workers(self._workers)]

    async def hang_worker(self, slot: int, seconds: float) -> None:
        """Test hook: make one worker's compute thread block (needs ``test_hooks``).

        Raises:
            RuntimeError: the pool runs without test hooks (its workers would not decode it).
            NotReady: the worker is not ready.
        """
        if not self.settings.test_hooks:
            raise RuntimeError("test hooks are disabled (HEIMDALL_POOL_TEST_HOOKS)")
        self._supervisor.hang(slot, seconds)
