"""Settings of the worker pool (environment prefix ``HEIMDALL_POOL_``)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct

from workers.cpus import usable_cpus


class PoolSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Worker pool settings (environment prefix ``HEIMDALL_POOL_``)."""

    workers: Annotated[int, Meta(ge=0, le=256)] = 0
    """Worker processes; 0 means one per usable CPU (affinity mask capped by the cgroup quota)."""
    intra_op_threads: Annotated[int, Meta(ge=1, le=64)] = 1
    """ONNX Runtime intra-op threads per worker session."""
    queue_size: Annotated[int, Meta(ge=1)] = 1024
    """Items waiting for a worker beyond which requests get 503 + Retry-After."""
    max_batch: Annotated[int, Meta(ge=1, le=256)] = 32
    """Most items sent to a worker as one ONNX batch."""
    max_inflight: Annotated[int, Meta(ge=1, le=16)] = 2
    """Messages outstanding per worker (2 keeps a worker busy while its reply travels)."""
    ping_interval_s: Annotated[float, Meta(gt=0)] = 1.0
    """Period of liveness pings and hang checks."""
    hang_timeout_s: Annotated[float, Meta(gt=0)] = 10.0
    """A message computing longer than this marks its worker hung; it is killed and replaced."""
    retry_budget_s: Annotated[float, Meta(gt=0, le=600)] = 2.0
    """Time a job retried after its worker died or hung has to be computed, whatever is left
    of its original deadline (hang detection may take longer than the request timeout)."""
    start_timeout_s: Annotated[float, Meta(gt=0)] = 120.0
    """Time a new worker has to start and load the resident versions."""
    max_restarts: Annotated[int, Meta(ge=1)] = 5
    """Restarts of one worker slot within ``restart_window_s`` that stop its respawning."""
    restart_window_s: Annotated[float, Meta(gt=0)] = 60.0
    """Window of the crash-loop guard."""
    shm_slot_bytes: Annotated[int, Meta(ge=0)] = 16 * 1024 * 1024
    """Shared memory per in-flight message for IQ (0: send IQ through the pipe instead)."""
    drain_timeout_s: Annotated[float, Meta(gt=0)] = 20.0
    """Time given to queued and in-flight work at shutdown before workers are killed."""
    test_hooks: bool = False
    """Accept test-only messages (worker hang). Never enable in production."""

    def worker_count(self) -> int:
        """Resolved number of worker processes."""
        return self.workers or usable_cpus()
