"""Work waiting for or under computation in the pool, one type per kind, and its results.

A :class:`PredictJob` holds capture sets (``/v1``): the dispatcher merges consecutive ones of
one version into a :class:`~workers.messages.Predict` and each resolves to a
:class:`PredictResult`. A :class:`TensorJob` holds ready-made input tensors (``/v2``): it
travels alone as an :class:`~workers.messages.Infer` and resolves to a :class:`TensorResult`.
Each job settles itself from its worker's reply (:meth:`Job.settle`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Generic, TypeVar

import msgspec

from workers.errors import DeadlineExceeded, ServiceError, WorkerFailure
from workers.messages import (
    Infer,
    InferReply,
    ItemError,
    Prediction,
    PredictItem,
    PredictReply,
    Timings,
)

R = TypeVar("R")


@dataclass(frozen=True, kw_only=True)
class JobResult:
    """What every job's future resolves to: worker-side timings and where it was computed."""

    timings: Timings
    queue_s: float
    """Time the job waited in the parent's queue."""
    worker_id: int
    batch_size: int
    """Items of the ONNX batch the job was computed in."""


@dataclass(frozen=True, kw_only=True)
class PredictResult(JobResult):
    """A :class:`PredictJob`'s outcome: one prediction or per-item error per item."""

    results: list[Prediction | ItemError]


@dataclass(frozen=True, kw_only=True)
class TensorResult(JobResult):
    """A :class:`TensorJob`'s outcome: the worker's output tensors (or its error)."""

    reply: InferReply


@dataclass(eq=False, kw_only=True)
class Job(Generic[R]):
    """State shared by every kind of job: version, future, deadline and dispatch record."""

    version: str
    future: asyncio.Future[R]
    deadline: float
    """``time.monotonic()`` after which the job is not computed."""
    enqueued_at: float
    trace: str = ""
    """The submitting request's trace (``TRACEID-SPANID``), for the worker's log lines."""
    attempts: int = 0
    dispatched_at: float = 0.0
    timer: asyncio.TimerHandle | None = None

    @property
    def queue_s(self) -> float:
        """Time between submission and (the last) dispatch."""
        return self.dispatched_at - self.enqueued_at

    def resolve(self, result: R) -> None:
        """Stop the expiry timer and hand ``result`` to the waiting caller."""
        if self.timer:
            self.timer.cancel()
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, error: ServiceError) -> None:
        """Stop the expiry timer and raise ``error`` in the waiting caller."""
        if self.timer:
            self.timer.cancel()
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(eq=False, kw_only=True)
class PredictJob(Job[PredictResult]):
    """Capture sets of one request (or one slice of a batch request)."""

    items: list[PredictItem]

    @property
    def size(self) -> int:
        """Items this job occupies in the queue."""
        return len(self.items)

    @property
    def nbytes(self) -> int:
        """Bytes its items put in a worker's arena (IQ, or undecoded bodies)."""
        return sum(len(i.iq) for i in self.items)

    def settle(self, reply: msgspec.Struct, offset: int, worker_id: int) -> None:
        """Resolve from this job's ``offset``-based slice of a :class:`PredictReply`.

        When every item of the slice expired in the worker's pipe, the job fails with
        :class:`DeadlineExceeded` ("504, not computed").
        """
        if not isinstance(reply, PredictReply):
            self.fail(WorkerFailure(f"worker {worker_id} answered a predict job with {reply}"))
            return
        part = reply.results[offset : offset + len(self.items)]
        if part and all(isinstance(r, ItemError) and r.code == "deadline" for r in part):
            first = part[0]
            assert isinstance(first, ItemError)
            self.fail(DeadlineExceeded(first.detail))
            return
        self.resolve(
            PredictResult(
                results=part,
                timings=reply.timings,
                queue_s=self.queue_s,
                worker_id=worker_id,
                batch_size=len(reply.results),
            )
        )


@dataclass(eq=False, kw_only=True)
class TensorJob(Job[TensorResult]):
    """Ready-made input tensors of one ``/v2`` request; never merged with other jobs."""

    infer: Infer

    @property
    def size(self) -> int:
        """Items this job occupies in the queue (the tensors' batch)."""
        return self.infer.batch

    def message(self, message_id: int) -> Infer:
        """The job's Infer with the message's id and the request's trace."""
        return msgspec.structs.replace(self.infer, id=message_id, trace=self.trace)

    def settle(self, reply: msgspec.Struct, offset: int, worker_id: int) -> None:
        """Resolve from an :class:`InferReply` (``offset`` is 0: the job travels alone)."""
        if not isinstance(reply, InferReply):
            self.fail(WorkerFailure(f"worker {worker_id} answered a tensor job with {reply}"))
            return
        self.resolve(
            TensorResult(
                reply=reply,
                timings=reply.timings,
                queue_s=self.queue_s,
                worker_id=worker_id,
                batch_size=self.infer.batch,
            )
        )


AnyJob = PredictJob | TensorJob
"""A job of either kind, as the queue and the per-worker outgoing map hold them."""
