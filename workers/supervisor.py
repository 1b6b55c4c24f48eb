"""The pool's supervisor: worker processes, their pipes, hangs, deaths and respawns.

Each worker is a ``spawn`` process with one duplex pipe. Replies are read with
``loop.add_reader`` on the pipe (no threads); a worker's exit is seen at once through its
process sentinel, a hang through the age of its oldest message and missed pongs (then it is
SIGKILLed). On a death the worker's control futures fail, its jobs go back to the dispatcher
(retried once elsewhere) and the slot is respawned — with every resident version replayed
before it takes traffic — unless it restarted too often within a window (crash-loop guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator

import msgspec

from workers.dispatcher import Dispatcher
from workers.errors import NotReady, ServiceError, WorkerFailure
from workers.handle import Outgoing, WorkerHandle, WorkerState, ready_workers
from workers.messages import Hang, Hello, Load, Ping, Pong, Stop, Unload, reply_decoder
from workers.settings import PoolSettings
from workers.shm import Arena
from workers.worker import WorkerConfig, worker_main

log = logging.getLogger("heimdall.pool")

_GONE = (WorkerState.DEAD, WorkerState.STOPPED, WorkerState.FAILED, WorkerState.STOPPING)
"""States in which a worker's exit is expected or already handled."""


class Supervisor:
    """Starts, watches and replaces the pool's worker processes; see the module docstring."""

    def __init__(
        self,
        settings: PoolSettings,
        workers: list[WorkerHandle | None],
        ids: Iterator[int],
        dispatcher: Dispatcher,
        config: WorkerConfig,
        replay: Callable[[WorkerHandle], Awaitable[None]],
        on_restart: Callable[[int], None] | None = None,
    ) -> None:
        """Supervise the slots of ``workers``.

        ``config`` is the workers' configuration (its ``worker_id`` and ``arena_path`` are set
        per slot); ``replay`` brings a new worker's loaded versions in line with the pool's
        before it takes work; ``on_restart`` is told of each respawn.
        """
        self.settings = settings
        self.workers = workers
        self._ids = ids
        self._dispatcher = dispatcher
        self._config = config
        self._replay = replay
        self._on_restart = on_restart
        self._ctx = mp.get_context("spawn")
        self._restarts: dict[int, deque[float]] = {i: deque() for i in range(len(workers))}
        self.restarts_total = 0
        self.closing = False
        """Set by the pool's shutdown: dead workers are no longer respawned."""
        self._watch: asyncio.Task[None] | None = None
        self._respawns: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start every worker and the watch loop; returns when all said hello (or failed)."""
        self._loop = asyncio.get_running_loop()
        await asyncio.gather(*(self._spawn(slot) for slot in range(len(self.workers))))
        self._watch = asyncio.create_task(self._supervise(), name="pool-supervisor")

    async def halt(self) -> None:
        """Stop watching and respawning (the first step of shutdown)."""
        if self._watch:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for task in list(self._respawns):
            task.cancel()

    async def stop_workers(self) -> None:
        """Tell every live worker to stop, join it (bounded), then kill what is left."""
        for worker in self.workers:
            if worker and worker.state in (WorkerState.READY, WorkerState.STARTING):
                worker.state = WorkerState.STOPPING
                with contextlib.suppress(OSError):
                    worker.send(Stop(next(self._ids)))
        for worker in self.workers:
            if worker is None:
                continue
            await asyncio.to_thread(worker.process.join, 5.0)
            if worker.process.is_alive():
                worker.kill()
                await asyncio.to_thread(worker.process.join, 2.0)
            self._detach(worker)
            worker.state = WorkerState.STOPPED
            if worker.arena:
                worker.arena.close()

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
        config = msgspec.structs.replace(
            self._config, worker_id=slot, arena_path=arena.path if arena else ""
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
        hello = self._loop.create_future()
        worker = WorkerHandle(slot, process, parent_conn, hello=hello, arena=arena)
        self.workers[slot] = worker
        self._loop.add_reader(parent_conn.fileno(), self._on_readable, worker)
        self._loop.add_reader(process.sentinel, self._on_exit, worker)
        try:
            worker.pid = await asyncio.wait_for(hello, self.settings.start_timeout_s)
            if worker.arena:
                worker.arena.unlink()  # the worker has mapped it
            await self._replay(worker)
        except (ServiceError, TimeoutError, OSError) as exc:
            log.error("worker %d failed to start: %s", slot, exc)
            if worker.state is not WorkerState.DEAD:
                worker.kill()
            return
        if worker.state is WorkerState.STARTING:
            worker.state = WorkerState.READY
            worker.last_pong = time.monotonic()
            log.info("worker %d ready (pid %d)", slot, worker.pid)
            self._dispatcher.pump()

    def _detach(self, worker: WorkerHandle) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.conn.fileno())
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(worker.process.sentinel)

    def _on_exit(self, worker: WorkerHandle) -> None:
        """The death path: fail control futures, retry jobs, respawn (guarded)."""
        self._detach(worker)
        if worker.state in _GONE:
            return
        was = worker.state
        worker.state = WorkerState.DEAD
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
        for out in worker.outgoing.values():
            if out.future and not out.future.done():
                out.future.set_exception(WorkerFailure(f"worker {worker.slot} exited"))
        self._dispatcher.retry([job for out in worker.outgoing.values() for job in out.jobs])
        worker.outgoing.clear()
        if not self.closing:
            self._schedule_respawn(worker.slot)
        self._dispatcher.pump()

    def _schedule_respawn(self, slot: int) -> None:
        now = time.monotonic()
        history = self._restarts[slot]
        while history and now - history[0] > self.settings.restart_window_s:
            history.popleft()
        if len(history) >= self.settings.max_restarts:
            worker = self.workers[slot]
            if worker:
                worker.state = WorkerState.FAILED
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
        """Every ping period: kill hung workers, ping the others."""
        interval = self.settings.ping_interval_s
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for worker in ready_workers(self.workers):
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
                    worker.kill()
                    continue
                worker.send(Ping(next(self._ids)))

    # ------------------------------------------------------------------ wire

    def _on_readable(self, worker: WorkerHandle) -> None:
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
        else:
            self._dispatcher.settle(worker, out, reply)
        self._dispatcher.pump()

    async def control(self, worker: WorkerHandle, message: Load | Unload) -> msgspec.Struct:
        """Send a control message (Load, Unload) and wait for its reply (bounded)."""
        assert self._loop is not None
        future: asyncio.Future[msgspec.Struct] = self._loop.create_future()
        worker.outgoing[message.id] = Outgoing(message, [], time.monotonic(), future)
        if not worker.send(message):
            worker.outgoing.pop(message.id, None)
            raise WorkerFailure(f"worker {worker.slot} is gone")
        return await asyncio.wait_for(future, self.settings.start_timeout_s)

    def hang(self, slot: int, seconds: float) -> None:
        """Test hook: send a Hang to one ready worker (its compute thread blocks)."""
        worker = self.workers[slot]
        if worker is None or worker.state is not WorkerState.READY:
            raise NotReady(f"worker {slot} is not ready")
        message = Hang(next(self._ids), seconds)
        worker.outgoing[message.id] = Outgoing(message, [], time.monotonic(), None)
        worker.send(message)
