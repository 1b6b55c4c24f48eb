"""Canary gates: windows between two fleet snapshots, and the verdicts on them."""

from __future__ import annotations

import argparse

import pytest

from app.control.gates import Gates, judge, quantile_upper, windows
from app.control.protocol import ReplicaStatus, VersionFigures
from app.ops.operate import duration_s, steps_pct

BOUNDS = [0.005, 0.01, 0.025, 0.05]


def report(replica: str, figures: dict[str, VersionFigures]) -> ReplicaStatus:
    return ReplicaStatus(replica, 1, {}, None, "applied", None, 0.0, figures=figures)


def figures(requests: int, errors: int, latency: list[int]) -> VersionFigures:
    return VersionFigures(requests, errors, BOUNDS, latency)


def test_window_is_the_growth_summed_over_replicas_and_survives_a_restart() -> None:
    a1, a2 = figures(100, 0, [90, 10, 0, 0, 0]), figures(10, 1, [10, 0, 0, 0, 0])
    before = [report("a", {"1": a1, "2": a2}), report("b", {"1": figures(500, 0, [500] + [0] * 4)})]
    a1, a2 = figures(150, 0, [130, 20, 0, 0, 0]), figures(30, 5, [10, 0, 0, 20, 0])
    # b restarted: its counters start again from zero.
    b1, b2 = figures(40, 0, [40, 0, 0, 0, 0]), figures(10, 0, [10, 0, 0, 0, 0])
    after = [report("a", {"1": a1, "2": a2}), report("b", {"1": b1, "2": b2})]
    cand, base = windows(before, after, "2")
    assert (cand.requests, cand.errors) == (30, 4)
    assert (base.requests, base.errors) == (90, 0)
    assert cand.latency == [10, 0, 0, 20, 0] and base.latency == [80, 10, 0, 0, 0]
    assert quantile_upper(cand.latency, cand.latency_bounds, 0.99) == 0.05
    assert quantile_upper(base.latency, base.latency_bounds, 0.99) == 0.01


def test_gates() -> None:
    gates = Gates(max_error_rate_delta=0.01, max_p99_ratio=1.5, max_shadow_m=None)
    ok = windows([], [report("a", {"1": figures(100, 1, [100, 0, 0, 0, 0]),
                                   "2": figures(100, 1, [100, 0, 0, 0, 0])})], "2")  # fmt: skip
    assert judge(*ok, gates) is None
    errors = windows([], [report("a", {"1": figures(100, 0, [100, 0, 0, 0, 0]),
                                       "2": figures(100, 5, [100, 0, 0, 0, 0])})], "2")  # fmt: skip
    assert "error rate 0.050 (5/100)" in (judge(*errors, gates) or "")
    slow = windows([], [report("a", {"1": figures(100, 0, [100, 0, 0, 0, 0]),
                                     "2": figures(100, 0, [0, 0, 100, 0, 0])})], "2")  # fmt: skip
    assert "p99 latency 25.0 ms > 1.5 x baseline 5.0 ms" in (judge(*slow, gates) or "")
    # One stray baseline request (in flight when the 100 % step applied) has no p99.
    stray = windows([], [report("a", {"1": figures(1, 0, [1, 0, 0, 0, 0]),
                                      "2": figures(100, 0, [0, 0, 100, 0, 0])})], "2")  # fmt: skip
    assert judge(*stray, gates) is None
    # A warm baseline answered almost all from the cache: its 100 requests carry 3 computed
    # latencies (hits are not counted), too few for a p99 against the cold candidate's.
    warm = windows([], [report("a", {"1": figures(100, 0, [3, 0, 0, 0, 0]),
                                     "2": figures(100, 0, [0, 0, 100, 0, 0])})], "2")  # fmt: skip
    assert judge(*warm, gates) is None


def test_cli_parses_steps_and_durations() -> None:
    assert steps_pct("5,25,50,100") == [5, 25, 50, 100]
    assert duration_s("60s") == 60 and duration_s("2m") == 120 and duration_s("1.5") == 1.5
    for bad in ("50,25,100", "5,50", "0,100", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            steps_pct(bad)
    with pytest.raises(argparse.ArgumentTypeError):
        duration_s("soon")
