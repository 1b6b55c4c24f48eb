"""Canary gates: the candidate's and the baseline's figures over a window, and the verdict.

A leader (app/control/canary.py) takes the replicas' cumulative per-version figures (their
reports) at the start and the end of a window; :func:`windows` sums the growth per group
(candidate, everything else) and :func:`judge` compares them against :class:`Gates`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.control.protocol import ReplicaStatus, VersionFigures


@dataclass(frozen=True)
class Gates:
    """Limits on the candidate compared with the baseline over one window."""

    max_error_rate_delta: float = 0.01
    """Candidate error rate may exceed the baseline's by at most this (absolute)."""
    max_p99_ratio: float = 1.5
    """Candidate p99 latency may be at most this multiple of the baseline's."""
    max_shadow_m: float | None = None
    """Shadow disagreement p95 (metres) limit, when the candidate is shadowed."""
    min_requests: int = 20
    """Fewest candidate requests a window needs before it is judged."""


@dataclass
class Window:
    """Figures of one version group over a window, summed over replicas."""

    requests: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=list)
    latency_bounds: list[float] = field(default_factory=list)
    shadow: list[int] = field(default_factory=list)
    shadow_bounds: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        """Errors per request (0 without requests)."""
        return self.errors / self.requests if self.requests else 0.0

    def add(self, before: VersionFigures | None, after: VersionFigures) -> None:
        """Add the growth from ``before`` to ``after`` (a restarted replica counts from 0)."""
        b = before or VersionFigures()
        if after.requests < b.requests:
            b = VersionFigures()
        self.requests += after.requests - b.requests
        self.errors += max(0, after.errors - b.errors)
        self.latency, self.latency_bounds = _add_counts(
            self.latency, self.latency_bounds, b.latency_counts, after
        )
        self.shadow, self.shadow_bounds = _add_counts(
            self.shadow,
            self.shadow_bounds,
            b.shadow_counts,
            after,
            shadow=True,
        )


def _add_counts(
    acc: list[int],
    bounds: list[float],
    before: list[int],
    after: VersionFigures,
    shadow: bool = False,
) -> tuple[list[int], list[float]]:
    counts = after.shadow_counts if shadow else after.latency_counts
    new_bounds = after.shadow_bounds if shadow else after.latency_bounds
    if not counts:
        return acc, bounds
    if len(before) != len(counts) or any(a < b for a, b in zip(counts, before, strict=True)):
        before = [0] * len(counts)
    delta = [a - b for a, b in zip(counts, before, strict=True)]
    if not acc:
        return delta, list(new_bounds)
    return [x + y for x, y in zip(acc, delta, strict=True)], bounds


def quantile_upper(counts: list[int], bounds: list[float], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (the last bound for the overflow)."""
    total = sum(counts)
    if not total:
        return None
    seen = 0
    for i, count in enumerate(counts):
        seen += count
        if seen >= q * total:
            return bounds[min(i, len(bounds) - 1)] if bounds else None
    return bounds[-1] if bounds else None


def windows(
    before: list[ReplicaStatus], after: list[ReplicaStatus], candidate: str
) -> tuple[Window, Window]:
    """(candidate, baseline) figures over the window between two fleet snapshots."""
    earlier = {r.replica: r.figures for r in before}
    cand, base = Window(), Window()
    for replica in after:
        previous = earlier.get(replica.replica, {})
        for version, figures in replica.figures.items():
            (cand if version == candidate else base).add(previous.get(version), figures)
    return cand, base


def judge(cand: Window, base: Window, gates: Gates) -> str | None:
    """The breach, or None when the candidate passes."""
    if cand.error_rate > base.error_rate + gates.max_error_rate_delta:
        return (
            f"error rate {cand.error_rate:.3f} ({cand.errors}/{cand.requests}) > baseline "
            f"{base.error_rate:.3f} + {gates.max_error_rate_delta:g}"
        )
    p99_c = quantile_upper(cand.latency, cand.latency_bounds, 0.99)
    p99_b = quantile_upper(base.latency, base.latency_bounds, 0.99)
    # Latency counts computed answers only (cache hits are left out on both sides). A side
    # with few of them (stray requests in flight when the last step applied, or nearly all
    # answers from the cache) has no p99.
    enough = min(sum(cand.latency), sum(base.latency)) >= gates.min_requests
    if p99_c is not None and p99_b and enough and p99_c > gates.max_p99_ratio * p99_b:
        return (
            f"p99 latency {p99_c * 1e3:.1f} ms > {gates.max_p99_ratio:g} x baseline "
            f"{p99_b * 1e3:.1f} ms"
        )
    if gates.max_shadow_m is not None:
        p95 = quantile_upper(cand.shadow, cand.shadow_bounds, 0.95)
        if p95 is not None and p95 > gates.max_shadow_m:
            return f"shadow disagreement p95 {p95:.1f} m > {gates.max_shadow_m:g} m"
    return None


def summary(cand: Window, base: Window) -> str:
    """One line of window figures for the timeline."""
    p99_c = quantile_upper(cand.latency, cand.latency_bounds, 0.99)
    p99_b = quantile_upper(base.latency, base.latency_bounds, 0.99)

    def ms(value: float | None) -> str:
        return f"{value * 1e3:.1f}" if value is not None else "-"

    return (
        f"candidate {cand.requests} req, error rate {cand.error_rate:.3f}, p99 <= {ms(p99_c)} "
        f"ms; baseline {base.requests} req, error rate {base.error_rate:.3f}, p99 <= "
        f"{ms(p99_b)} ms"
    )
