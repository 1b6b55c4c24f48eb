"""Redis control plane, replica side: a level-triggered desired state, pushed by pub/sub.

Publishers write the desired-state document atomically (see :mod:`app.control.protocol`),
then announce its (epoch, revision) on ``{ns}:{model}:control``. Every replica reads the key
and converges on it: on a message, on (re)connect, at start, on a slow poll and on SIGHUP
(which also re-resolves aliases). A missed message only delays convergence.

A document is accepted when it decodes, verifies (with a shared secret: HMAC over namespace,
model, epoch, revision and body), carries the current epoch key, and is not older than what
was applied in the same epoch. A document of another epoch than the applied one is a fresh
start after Redis lost its data: the replica converges on it and says so (log, status, metric
``heimdall_control_epoch_changes_total``); an epoch this replica has already left is refused.
Refusals, from the channel or from reading the key, are counted and shown. Each replica
writes what it applied to ``{ns}:{model}:replicas:{replica}`` with a TTL (its heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from app.control.protocol import (
    Current,
    DesiredState,
    ReplicaStatus,
    VersionFigures,
    decode_message,
    keys,
    read_current,
    verified,
)
from app.control.rollout import Rollout
from app.control.settings import ControlSettings
from workers.errors import ServiceError

if TYPE_CHECKING:
    from telemetry.instruments import Telemetry

log = logging.getLogger("heimdall.control")


class ControlPlane:
    """One replica's subscriber: converges the rollout on the desired state."""

    def __init__(
        self,
        settings: ControlSettings,
        client: Any | None,
        model: str,
        default_ref: str,
        rollout: Rollout,
        replica: str,
        telemetry: Telemetry | None = None,
    ) -> None:
        """Keep collaborators; :meth:`run` does the work."""
        self.settings = settings
        self.client = client
        self.model = model
        self.default = DesiredState(revision=0, weights={default_ref: 1.0})
        self.rollout = rollout
        self.replica = replica
        self.telemetry = telemetry
        self.connected = False
        # Standing faults by source ("channel", "read", "converge"); each source clears its
        # own when it next succeeds, so a fault that is over is never shown as current.
        self._faults: dict[str, str] = {}
        self.rejected = 0
        self.rejected_documents = 0
        self.last_rejection: dict[str, Any] | None = None
        self.epoch_changes = 0
        self.last_epoch_change: dict[str, Any] | None = None
        self._left_epochs: set[str] = set()
        self._refused: tuple[bytes | None, str] | None = None
        self._redis_down = False
        self._report_due = False
        self._wake = asyncio.Event()
        self._reresolve = False
        self._applied: tuple[str, int, tuple[tuple[str, str, str, str], ...]] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start the subscriber, the convergence loop and the heartbeat."""
        self._tasks = [asyncio.create_task(self._converge_loop(), name="control-converge")]
        if self.client is not None and self.settings.enabled:
            self._tasks.append(asyncio.create_task(self._subscribe_loop(), name="control-sub"))
            self._tasks.append(asyncio.create_task(self._heartbeat_loop(), name="control-hb"))

    async def stop(self) -> None:
        """Cancel background tasks and remove this replica's status."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.client is not None and self.settings.enabled:
            with contextlib.suppress(Exception):
                await self.client.delete(self._status_key())

    @property
    def last_error(self) -> str | None:
        """The most recent fault that still stands; None when every loop is healthy."""
        return next(reversed(self._faults.values()), None)

    def _fault(self, source: str, error: str | None) -> None:
        """Record (or with None clear) the standing fault of one source."""
        self._faults.pop(source, None)
        if error is not None:
            self._faults[source] = error

    def reresolve(self) -> None:
        """SIGHUP: re-resolve aliases and reapply."""
        self._reresolve = True
        self._wake.set()

    def state(self) -> dict[str, Any]:
        """For /health/ready and /v1/models."""
        status = self.rollout.status
        return {
            "enabled": self.settings.enabled and self.client is not None,
            "connected": self.connected,
            "last_error": self.last_error,
            "signed": bool(self.settings.hmac_secret),
            "epoch": status.applied_epoch,
            "revision": status.applied_revision,
            "rejected_messages": self.rejected,
            "rejected_documents": self.rejected_documents,
            "last_rejection": self.last_rejection,
            "epoch_changes": self.epoch_changes,
            "last_epoch_change": self.last_epoch_change,
        }

    def _status_key(self) -> str:
        return keys(self.settings.namespace, self.model).replicas + self.replica

    def _refuse(self, source: str, reason: str, detail: str) -> None:
        """Count and record one refused message or document."""
        if source == "message":
            self.rejected += 1
        else:
            self.rejected_documents += 1
        self.last_rejection = {
            "source": source,
            "reason": reason,
            "detail": detail,
            "at": time.time(),
        }
        self._report_due = True
        if self.telemetry is not None:
            self.telemetry.control_rejected(source, reason)
        log.warning("refused a control %s (%s): %s", source, reason, detail)

    # ------------------------------------------------------------------ loops

    async def _subscribe_loop(self) -> None:
        assert self.client is not None
        channel = keys(self.settings.namespace, self.model).channel
        delay = 0.5
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(channel)
                self.connected = True
                self._fault("channel", None)
                delay = 0.5
                self._wake.set()  # (re)connected: re-read the desired state
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._on_message(message.get("data"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                error = f"control channel: {type(exc).__name__}: {exc}"
                self._fault("channel", error)
                log.warning("%s; reconnecting in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_message(self, data: Any) -> None:
        try:
            message = decode_message(data if isinstance(data, bytes) else str(data).encode())
        except msgspec.DecodeError as exc:
            self._refuse("message", "invalid", f"junk: {exc}")
            return
        if not verified(message, self.settings.hmac_secret, self.settings.namespace, self.model):
            self._refuse("message", "hmac", f"revision {message.revision}: bad or missing HMAC")
            return
        status = self.rollout.status
        if message.epoch == status.applied_epoch and message.revision < status.applied_revision:
            self._refuse(
                "message",
                "stale",
                f"revision {message.revision} is older than the applied "
                f"{status.applied_revision} of epoch {message.epoch or '-'}",
            )
            return
        self._wake.set()

    async def _converge_loop(self) -> None:
        delay = 1.0
        while True:
            failed = False
            try:
                await self._converge()
                self._fault("converge", None)
                delay = 1.0
                if self._report_due:  # a refusal: show it in the fleet status now
                    self._report_due = False
                    await self._report()
            except ServiceError as exc:
                failed = True
                self._fault("converge", exc.detail)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed = True
                error = f"{type(exc).__name__}: {exc}"
                self._fault("converge", error)
                log.warning("converge failed: %s", error)
            timeout = delay if failed else self.settings.poll_interval_s
            if failed:
                delay = min(delay * 2, self.settings.retry_max_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def _read(self) -> Current | None:
        """The current desired state in Redis; None to serve the default."""
        if self.client is None or not self.settings.enabled:
            return None
        try:
            current = await asyncio.wait_for(
                read_current(self.client, self.settings, self.model), 2.0
            )
        except (TimeoutError, OSError, ConnectionError) as exc:
            self._redis_down = True
            self.connected = False
            error = f"redis unreachable: {exc or type(exc).__name__}"
            self._fault("read", error)
            if self._applied is None:
                log.warning("%s; serving the default %s", error, list(self.default.weights))
                return None
            raise
        except Exception as exc:  # redis-py errors
            self._redis_down = True
            self.connected = False
            self._fault("read", f"redis: {type(exc).__name__}: {exc}")
            if self._applied is None:
                return None
            raise
        if self._redis_down:
            # Redis answers again (the subscriber may have reconnected before a read failed):
            # do not keep showing a connection error that is over.
            self._redis_down, self.connected = False, True
        self._fault("read", None)
        return current

    async def _desired(self) -> DesiredState | None:
        """What to converge on, or None to keep serving what is applied.

        Refuses (and counts once per distinct document) what fails the checks of
        :func:`~app.control.protocol.read_current`, a document of an epoch this replica
        has left, and an older revision of the applied epoch.
        """
        current = await self._read()
        applied = self.rollout.status.applied_revision >= 1
        if current is None or (current.doc is None and current.problem is None):
            # No document (never published, or Redis lost it): keep what is applied.
            return None if applied else self.default
        problem, reason = current.problem, current.reason
        doc = current.doc
        status = self.rollout.status
        if doc is not None and applied:
            if doc.epoch in self._left_epochs:
                problem, reason = f"epoch {doc.epoch} was left earlier (a replay?)", "epoch"
            elif doc.epoch == status.applied_epoch and doc.revision < status.applied_revision:
                problem, reason = (
                    f"revision {doc.revision} is older than the applied "
                    f"{status.applied_revision} of epoch {doc.epoch or '-'}",
                    "stale",
                )
        if problem is not None:
            if (current.raw, problem) != self._refused:  # each document and cause once
                self._refused = (current.raw, problem)
                self._refuse("document", reason or "invalid", problem)
            return None if applied else self.default
        assert doc is not None
        return doc

    async def _converge(self) -> None:
        desired = await self._desired()
        if desired is None:
            return
        try:
            resolved = await self.rollout.resolve(desired)
        except ServiceError as exc:
            self.rollout.record_failure(desired, exc.detail)
            with contextlib.suppress(Exception):
                await self._report()  # the fleet sees the failure now, not a heartbeat later
            raise
        fingerprint = resolved.key
        if fingerprint == self._applied and not self._reresolve:
            if self.rollout.recovered():  # a transient failure (registry outage) is over
                with contextlib.suppress(Exception):
                    await self._report()
            return
        self._reresolve = False
        before = self.rollout.status
        old_epoch, old_revision = before.applied_epoch, before.applied_revision
        try:
            await self.rollout.apply(resolved)
            self._applied = fingerprint
            if old_revision >= 1 and desired.epoch != old_epoch:
                self._epoch_changed(old_epoch, old_revision, desired)
        finally:
            with contextlib.suppress(Exception):
                await self._report()

    def _epoch_changed(self, old_epoch: str, old_revision: int, desired: DesiredState) -> None:
        self.epoch_changes += 1
        self._left_epochs.add(old_epoch)
        self.last_epoch_change = {
            "from": {"epoch": old_epoch, "revision": old_revision},
            "to": {"epoch": desired.epoch, "revision": desired.revision},
            "at": time.time(),
        }
        if self.telemetry is not None:
            self.telemetry.epoch_change()
        log.warning(
            "control epoch changed from %s (revision %d) to %s (revision %d): the revision "
            "counter was reset (Redis lost its data?) or a new epoch was started; applied the "
            "new epoch's state",
            old_epoch or "-",
            old_revision,
            desired.epoch or "-",
            desired.revision,
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_ttl_s / 3)
            with contextlib.suppress(Exception):
                await self._report()

    def _figures(self) -> dict[str, VersionFigures]:
        if self.telemetry is None:
            return {}
        with contextlib.suppress(Exception):
            return {
                version: msgspec.convert(figures, VersionFigures)
                for version, figures in self.telemetry.gate_figures().items()
            }
        return {}

    async def _report(self) -> None:
        if self.client is None or not self.settings.enabled:
            return
        routing = self.rollout.routing
        status = self.rollout.status
        last = self.last_rejection
        report = ReplicaStatus(
            replica=self.replica,
            revision=status.applied_revision,
            versions=dict(routing.weights) if routing else {},
            shadow=routing.shadow if routing else None,
            outcome=status.last_outcome,
            error=status.last_error,
            updated_at=time.time(),
            epoch=status.applied_epoch,
            signed=bool(self.settings.hmac_secret),
            rejected=self.rejected + self.rejected_documents,
            last_rejection=f"{last['source']}: {last['detail']}" if last else None,
            epoch_changes=self.epoch_changes,
            figures=self._figures(),
        )
        await self.client.set(
            self._status_key(), msgspec.json.encode(report), ex=self.settings.heartbeat_ttl_s
        )
