"""Progressive delivery: raise a candidate's weight step by step, roll back on a breach.

One leader at a time holds ``{ns}:{model}:canary:lock`` (SET NX with a TTL it renews; a
crashed leader's lock expires). For each step the leader publishes the weights (the current
state scaled down, the candidate at the step's share), waits until every live replica has
applied that revision, takes the replicas' cumulative per-version figures (their reports),
waits the interval and takes them again. The difference over the window is judged: the
candidate against the other versions ("baseline") on error rate, p99 latency and — when the
candidate is shadowed — shadow disagreement in metres. A breach publishes the state from
before the canary again (a rollback, with the reason); passing the last step leaves the
candidate at 100 %. Every step is a published document whose ``reason`` says what happened,
so the desired-state history shown by ``status`` is the timeline; the current canary state is
also kept in ``{ns}:{model}:canary``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from app.control.protocol import (
    DesiredState,
    ReplicaStatus,
    VersionFigures,
    fleet,
    proposed,
    publish_change,
    publisher_id,
    read_current,
)
from app.control.settings import ControlSettings

# Renew the lock only if we still hold it; release likewise.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


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


class CanaryState(msgspec.Struct, frozen=True):
    """``{ns}:{model}:canary``: what the running (or last) canary is doing."""

    candidate: str
    steps: list[float]
    step: float
    state: str
    """``running``, ``rolled back``, ``complete`` or ``stopped`` (someone else published)."""
    reason: str
    leader: str
    updated_at: float


_canary_decoder = msgspec.json.Decoder(CanaryState)


def canary_keys(settings: ControlSettings, model: str) -> tuple[str, str]:
    """(state key, lock key) of ``model``'s canary."""
    base = f"{settings.namespace}:{model}:canary"
    return base, base + ":lock"


async def read_canary(client: Any, settings: ControlSettings, model: str) -> CanaryState | None:
    """The running or last canary's state, if any (undecodable: None)."""
    raw = await client.get(canary_keys(settings, model)[0])
    if raw is None:
        return None
    try:
        return _canary_decoder.decode(raw)
    except msgspec.DecodeError:
        return None


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
    if p99_c is not None and p99_b and p99_c > gates.max_p99_ratio * p99_b:
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


class LockHeld(RuntimeError):
    """Another leader runs a canary for this model."""


class ChangedMeanwhile(RuntimeError):
    """Someone else published a desired state during the canary (``--force``)."""


class Canary:
    """The leader of one canary rollout."""

    def __init__(
        self,
        client: Any,
        settings: ControlSettings,
        model: str,
        candidate: str,
        steps: list[float],
        interval_s: float,
        gates: Gates,
        say: Callable[[str], None] = print,
    ) -> None:
        """Keep the plan; :meth:`run` executes it."""
        self.client = client
        self.settings = settings
        self.model = model
        self.candidate = candidate
        self.steps = steps
        self.interval_s = interval_s
        self.gates = gates
        self.say = say
        self.state_key, self.lock_key = canary_keys(settings, model)
        self.token = f"{publisher_id()}:{secrets.token_hex(4)}"
        self.lock_ms = int(max(30.0, 3 * interval_s) * 1000)
        self._started = time.monotonic()
        self._last: tuple[str, int] = ("", 0)
        self._step = 0.0
        """(epoch, revision) of the document this canary started from or last published."""

    def _log(self, text: str) -> None:
        self.say(f"[{time.monotonic() - self._started:7.1f}s] {text}")

    async def _renew(self) -> None:
        renewed = await self.client.eval(_RENEW, 1, self.lock_key, self.token, self.lock_ms)
        if not int(renewed):
            raise LockHeld("lost the canary lock (expired and taken by another leader)")

    async def _state(self, step: float, state: str, reason: str) -> None:
        doc = CanaryState(self.candidate, self.steps, step, state, reason, self.token, time.time())
        await self.client.set(self.state_key, msgspec.json.encode(doc))

    async def _publish(
        self, weights: dict[str, float], reason: str, base: DesiredState
    ) -> DesiredState:
        proposal = proposed(weights, base.shadow, base.shadow_fraction, reason)
        expected = self._last

        def change(current: DesiredState | None) -> DesiredState:
            # Only on top of our own last document: another publisher's (an operator's
            # --force) is left in place, not undone by the next step or the rollback.
            if current is None or (current.epoch, current.revision) != expected:
                seen = f"revision {current.revision} ({current.reason})" if current else "none"
                raise ChangedMeanwhile(f"the desired state changed under the canary: {seen}")
            return proposal

        doc = await publish_change(self.client, self.settings, self.model, change)
        self._last = (doc.epoch, doc.revision)
        self._log(f"published revision {doc.revision}: {doc.weights} ({reason})")
        return doc

    async def _converged(self, doc: DesiredState, timeout_s: float) -> list[ReplicaStatus]:
        deadline = time.monotonic() + timeout_s
        while True:
            replicas = await fleet(self.client, self.settings, self.model)
            if replicas and all(
                (r.epoch, r.revision) == (doc.epoch, doc.revision) for r in replicas
            ):
                return replicas
            failed = [
                r for r in replicas if r.outcome == "failed" and r.updated_at > doc.updated_at
            ]
            if failed:  # the replica's last attempt (ours, or a failure it keeps retrying)
                r = failed[0]
                raise TimeoutError(
                    f"replica {r.replica} failed to apply revision {doc.revision}: {r.error}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fleet did not apply revision {doc.revision} in time")
            await self._renew()
            await asyncio.sleep(0.5)

    async def _observe(self, doc: DesiredState) -> tuple[Window, Window]:
        """Figures over ``interval_s`` after the fleet applied ``doc`` (longer if too few)."""
        start = await self._converged(doc, max(30.0, self.interval_s))
        waited = 0.0
        while True:
            await asyncio.sleep(self.interval_s / 4)
            await self._renew()
            waited += self.interval_s / 4
            now = await fleet(self.client, self.settings, self.model)
            cand, base = windows(start, now, self.candidate)
            # A breach seen early is acted on at once; a pass needs the full interval.
            if cand.requests >= self.gates.min_requests and judge(cand, base, self.gates):
                return cand, base
            if waited >= self.interval_s and cand.requests >= self.gates.min_requests:
                return cand, base
            if waited >= 3 * self.interval_s:
                return cand, base

    async def run(self) -> bool:
        """Run the canary; True when the candidate reached the last step.

        Raises:
            LockHeld: another leader holds the lock.
        """
        took = await self.client.set(self.lock_key, self.token, nx=True, px=self.lock_ms)
        if not took:
            holder = await self.client.get(self.lock_key)
            raise LockHeld(f"another canary is running (leader {holder!r})")
        try:
            return await self._run()
        except ChangedMeanwhile as exc:
            reason = f"canary {self.candidate} stopped: {exc}; left as it is"
            self._log(reason)
            await self._state(self._step, "stopped", reason)
            return False
        finally:
            await self.client.eval(_RELEASE, 1, self.lock_key, self.token)

    async def _run(self) -> bool:
        current = await read_current(self.client, self.settings, self.model)
        before = current.doc
        if before is None:
            raise SystemExit("no valid desired state to start a canary from; publish one first")
        replicas = await fleet(self.client, self.settings, self.model)
        if replicas and all(set(r.versions) == {self.candidate} for r in replicas):
            raise SystemExit(
                f"version {self.candidate} already takes all the traffic: there is no baseline "
                "to compare it with"
            )
        self._last = (before.epoch, before.revision)
        self._log(f"canary {self.candidate} from {dict(before.weights)}, steps {self.steps}")
        for step in self.steps:
            share = step / 100
            scaled = {
                ref: w * (1 - share) / sum(before.weights.values())
                for ref, w in before.weights.items()
                if ref != self.candidate
            }
            weights = {**scaled, self.candidate: share} if share < 1 else {self.candidate: 1.0}
            doc = await self._publish(weights, f"canary {self.candidate} step {step:g}%", before)
            self._step = step
            await self._state(step, "running", f"step {step:g}%")
            breach: str | None
            try:
                cand, base = await self._observe(doc)
            except TimeoutError as exc:  # a replica cannot apply the step: take it back
                cand, base, breach = Window(), Window(), str(exc)
            else:
                breach = judge(cand, base, self.gates)
            figures = summary(cand, base)
            if breach is None and cand.requests < self.gates.min_requests:
                breach = f"too little traffic: {cand.requests} < {self.gates.min_requests}"
            if breach is None and share < 1 and not base.requests:
                # Every request counted as the candidate's: a baseline ref that resolves to
                # the candidate's version; passing would compare nothing.
                breach = "no baseline traffic to compare with"
            if breach:
                reason = f"canary {self.candidate} rolled back at {step:g}%: {breach}"
                self._log(f"BREACH at {step:g}%: {breach} ({figures})")
                await self._publish(dict(before.weights), reason, before)
                await self._state(step, "rolled back", reason)
                return False
            self._log(f"step {step:g}% passed: {figures}")
        reason = f"canary {self.candidate} complete"
        await self._state(self.steps[-1], "complete", reason)
        self._log(reason)
        return True
