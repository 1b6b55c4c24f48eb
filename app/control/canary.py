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
import contextlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import msgspec

from app.control.gates import Gates, Window, judge, summary, windows
from app.control.protocol import (
    DesiredState,
    ReplicaStatus,
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


class CanaryState(msgspec.Struct, frozen=True):
    """``{ns}:{model}:canary``: what the running (or last) canary is doing."""

    candidate: str
    steps: list[float]
    step: float
    state: str
    """``running``, ``rolled back``, ``complete``, ``stopped`` (someone else published) or, as
    read back, ``abandoned`` (running without a leader)."""
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
    state_key, lock_key = canary_keys(settings, model)
    raw = await client.get(state_key)
    if raw is None:
        return None
    try:
        state = _canary_decoder.decode(raw)
    except msgspec.DecodeError:
        return None
    if state.state == "running" and await client.get(lock_key) is None:
        # Its leader is gone without an end (killed, or Redis was lost under it).
        reason = "its leader is gone: the desired state is as its last step left it"
        return msgspec.structs.replace(state, state="abandoned", reason=reason)
    return state


class LockHeld(RuntimeError):
    """Another leader runs a canary for this model."""


class ChangedMeanwhile(RuntimeError):
    """Someone else published a desired state during the canary (``--force``)."""


class Interrupted(RuntimeError):
    """The operator stopped the canary (SIGTERM, ^C): it rolled back."""


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
        # Renewed every quarter interval (and every 0.5 s while waiting for the fleet): a
        # leader that died frees the lock within 30 s of its last renewal.
        self.lock_ms = int((30.0 + interval_s / 4) * 1000)
        self._started = time.monotonic()
        self._last: tuple[str, int] = ("", 0)
        self._step = 0.0
        self._before: DesiredState | None = None
        self._stop = asyncio.Event()
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
        self, weights: dict[str, float], reason: str, base: DesiredState, rollback: bool = False
    ) -> DesiredState:
        proposal = proposed(weights, base.shadow, base.shadow_fraction, reason)
        expected = self._last

        def change(current: DesiredState | None) -> DesiredState:
            # Only on top of our own last document: another publisher's (an operator's
            # --force) is left in place, not undone by the next step or the rollback. With
            # no document at all (Redis lost its data) nobody else's state is there and the
            # replicas still run our last step: a rollback puts the pre-canary state back.
            if current is None and rollback:
                return proposal
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
            await self._pause(0.5)

    async def _observe(self, doc: DesiredState) -> tuple[Window, Window]:
        """Figures over ``interval_s`` after the fleet applied ``doc`` (longer if too few)."""
        start = await self._converged(doc, max(30.0, self.interval_s))
        waited = 0.0
        while True:
            await self._pause(self.interval_s / 4)
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
        except Interrupted:
            await self._abort("interrupted")
            raise
        except Exception as exc:  # Redis lost, a replica report unreadable...
            await self._abort(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            await self.client.eval(_RELEASE, 1, self.lock_key, self.token)

    async def _abort(self, why: str, patience_s: float = 15.0) -> None:
        """Put the pre-canary state back over our own last document and say why; never raises.

        Retried while Redis is away, for up to ``patience_s``.
        """
        before = self._before
        reason = f"canary {self.candidate} rolled back at {self._step:g}%: {why}"
        deadline = time.monotonic() + patience_s
        while True:
            try:
                if before is not None and self._last != (before.epoch, before.revision):
                    await self._publish(dict(before.weights), reason, before, rollback=True)
                await self._state(self._step, "rolled back", reason)
                self._log(reason)
                return
            except ChangedMeanwhile as exc:
                self._log(f"not rolled back ({why}): {exc}; the traffic is left as that set it")
                with contextlib.suppress(Exception):
                    await self._state(self._step, "stopped", f"{reason}; {exc}; left as it is")
                return
            except Exception as exc:
                if time.monotonic() > deadline:
                    self._log(f"could not roll back ({exc}); the state is as the last step left it")
                    return
                await asyncio.sleep(1.0)

    def interrupt(self) -> None:
        """Stop at the next wait and roll back (the CLI's SIGTERM and SIGINT handler).

        Cooperative: a task cancelled in the middle of a Redis command can leave its
        connection waiting for a reply that never comes, and the rollback would hang on it.
        """
        self._stop.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``; raise :class:`Interrupted` as soon as :meth:`interrupt` is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        if self._stop.is_set():
            raise Interrupted("interrupted")

    async def _still_ours(self) -> None:
        """Raise :class:`ChangedMeanwhile` when the desired state is no longer our document."""
        doc = (await read_current(self.client, self.settings, self.model)).doc
        if doc is None or (doc.epoch, doc.revision) != self._last:
            seen = f"revision {doc.revision} ({doc.reason})" if doc else "none"
            raise ChangedMeanwhile(f"the desired state changed under the canary: {seen}")

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
        self._before = before
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
                await self._still_ours()  # a window another publisher changed says nothing
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
        await self._still_ours()
        reason = f"canary {self.candidate} complete"
        await self._state(self.steps[-1], "complete", reason)
        self._log(reason)
        return True
