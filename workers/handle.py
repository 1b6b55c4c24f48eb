"""One worker process as the parent sees it, and the pool's typed statistics.

A :class:`WorkerHandle` is shared by the supervisor (which starts, pings, kills and replaces
the process) and the dispatcher (which sends it work): its ``outgoing`` map holds every
message the worker has not answered yet, keyed by message id.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import msgspec

from workers.jobs import AnyJob
from workers.messages import request_encoder
from workers.shm import Arena


class WorkerState(enum.StrEnum):
    """Life cycle of a worker slot; the values are what stats and gauges report."""

    STARTING = "starting"
    """Spawned; saying hello and loading the resident versions."""
    READY = "ready"
    """Takes work."""
    STOPPING = "stopping"
    """Told to stop by the pool's shutdown; its exit is expected."""
    DEAD = "dead"
    """Exited unexpectedly (or never started); a respawn may be under way."""
    FAILED = "failed"
    """Crash-looping: the slot stays down (readiness reflects it)."""
    STOPPED = "stopped"
    """Ended by the pool's shutdown."""


@dataclass(eq=False)
class Outgoing:
    """A message sent to a worker and not answered yet."""

    message: msgspec.Struct
    jobs: list[AnyJob]
    """The jobs it computes (none for control messages)."""
    sent_at: float
    future: asyncio.Future[msgspec.Struct] | None = None
    """Resolved with the reply of a control message (Load, Unload)."""
    slot: int = -1
    """Arena slot holding its IQ, released with the reply (-1: none)."""


@dataclass(eq=False)
class WorkerHandle:
    """The parent's record of one worker process."""

    slot: int
    process: BaseProcess
    conn: Connection
    state: WorkerState = WorkerState.STARTING
    pid: int = 0
    outgoing: dict[int, Outgoing] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    last_pong: float = 0.0
    served: int = 0
    hello: asyncio.Future[int] | None = None
    arena: Arena | None = None
    loading: int = 0
    """Load messages outstanding: the worker computes nothing else meanwhile."""
    killed: bool = False
    """Killed by the pool and not yet seen dead: it takes no work (a job retried from a
    sibling that died first must not land on it)."""

    def kill(self) -> None:
        """SIGKILL the process; the supervisor's death path (its sentinel) takes it from here."""
        self.killed = True
        self.process.kill()

    @property
    def load(self) -> int:
        """Messages in flight on this worker."""
        return len(self.outgoing)

    def send(self, message: msgspec.Struct) -> bool:
        """Write one message to the pipe; False when the pipe is gone."""
        try:
            self.conn.send_bytes(request_encoder.encode(message))
        except OSError:
            return False
        return True


def ready_workers(workers: list[WorkerHandle | None]) -> list[WorkerHandle]:
    """The workers that take work, in slot order."""
    return [w for w in workers if w and w.state is WorkerState.READY and not w.killed]


class WorkerStats(msgspec.Struct, frozen=True):
    """One worker slot in :class:`PoolStats`."""

    slot: int
    state: WorkerState
    pid: int
    in_flight: int
    """Messages sent and not answered yet."""
    served: int
    """Items computed since the worker started."""
    loading: bool
    """Whether it is building a session (it takes no work meanwhile when others can)."""
    versions: list[str]
    """Versions loaded on it, sorted."""


class PoolStats(msgspec.Struct, frozen=True):
    """Snapshot for health, gauges and ``/v1/models`` (encodes as the same JSON object)."""

    workers: list[WorkerStats]
    states: dict[str, int]
    """Worker slots by state; ``starting``, ``ready``, ``dead`` and ``failed`` always listed."""
    queue_depth: int
    """Items waiting for a worker."""
    pending_items: int
    """Items waiting or in flight."""
    restarts: int
    """Worker respawns since the pool started."""


def worker_stats(slot: int, worker: WorkerHandle | None) -> WorkerStats:
    """Stats of one slot (an empty slot counts as a dead worker)."""
    if worker is None:
        return WorkerStats(slot, WorkerState.DEAD, 0, 0, 0, False, [])
    return WorkerStats(
        slot,
        worker.state,
        worker.pid,
        worker.load,
        worker.served,
        bool(worker.loading),
        sorted(worker.loaded),
    )
