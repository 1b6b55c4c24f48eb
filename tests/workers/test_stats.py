"""Pool statistics are typed and encode to the JSON objects /v1/models and readiness serve."""

from __future__ import annotations

import msgspec

from workers.pool import PoolSettings, PoolStats, WorkerPool, WorkerState, WorkerStats


def test_stats_of_a_pool_not_started_list_every_slot_as_dead() -> None:
    stats = WorkerPool(PoolSettings(workers=2)).stats()
    assert isinstance(stats, PoolStats)
    assert stats.workers == [
        WorkerStats(0, WorkerState.DEAD, 0, 0, 0, False, []),
        WorkerStats(1, WorkerState.DEAD, 0, 0, 0, False, []),
    ]
    # Same bytes as the dict the pool returned before (field order included).
    assert msgspec.json.encode(stats) == msgspec.json.encode(
        {
            "workers": [
                {
                    "slot": slot,
                    "state": "dead",
                    "pid": 0,
                    "in_flight": 0,
                    "served": 0,
                    "loading": False,
                    "versions": [],
                }
                for slot in (0, 1)
            ],
            "states": {"starting": 0, "ready": 0, "dead": 2, "failed": 0},
            "queue_depth": 0,
            "pending_items": 0,
            "restarts": 0,
        }
    )
