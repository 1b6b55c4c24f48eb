"""Redis control plane: a level-triggered desired state, pushed by pub/sub.

Publishers write the desired-state document to ``{ns}:{model}:desired`` (with a revision from
``INCR {ns}:{model}:revision``), then publish the revision on ``{ns}:{model}:control``. Every
replica reads the key and converges on it: on a message, on (re)connect, at start, on a slow
poll and on SIGHUP (which also re-resolves aliases). A missed message only delays
convergence. Documents and messages are decoded into declared types; junk is logged and
ignored; with a shared secret both must carry a valid HMAC-SHA256, and a revision older than
the applied one is refused (no replay). Each replica writes what it applied to
``{ns}:{model}:replicas:{replica}`` with a TTL (its heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import time
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from app.control import ControlSettings
from app.rollout import DesiredState, Rollout
from workers.errors import ServiceError

log = logging.getLogger("heimdall.control")

Weight = Annotated[float, Meta(ge=0.0)]


class DesiredDoc(Struct, frozen=True, forbid_unknown_fields=True):
    """The desired-state document stored in Redis."""

    revision: Annotated[int, Meta(ge=1)]
    weights: Annotated[dict[str, Weight], Meta(min_length=1)]
    shadow: str | None = None
    shadow_fraction: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    updated_at: float = 0.0
    hmac: str = ""


class ControlMessage(Struct, frozen=True, forbid_unknown_fields=True):
    """What is published on the channel: just the revision to converge on."""

    revision: Annotated[int, Meta(ge=1)]
    hmac: str = ""


class ReplicaStatus(Struct, frozen=True):
    """What a replica reports (heartbeat with TTL)."""

    replica: str
    revision: int
    versions: dict[str, float]
    shadow: str | None
    outcome: str
    error: str | None
    updated_at: float


_doc_decoder = msgspec.json.Decoder(DesiredDoc)
_msg_decoder = msgspec.json.Decoder(ControlMessage)
_status_decoder = msgspec.json.Decoder(ReplicaStatus)


def keys(namespace: str, model: str) -> tuple[str, str, str, str]:
    """(desired key, channel, revision counter, replica-status prefix)."""
    base = f"{namespace}:{model}"
    return f"{base}:desired", f"{base}:control", f"{base}:revision", f"{base}:replicas:"


def sign(value: Struct, secret: str) -> str:
    """HMAC-SHA256 (hex) of the value's canonical JSON without its ``hmac`` field."""
    fields = msgspec.structs.asdict(value)
    fields.pop("hmac", None)
    payload = msgspec.json.encode(fields, order="sorted")
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def verified(value: DesiredDoc | ControlMessage, secret: str) -> bool:
    """True when no secret is configured or the HMAC matches."""
    return not secret or hmac.compare_digest(value.hmac, sign(value, secret))


async def publish(
    client: Any,
    settings: ControlSettings,
    model: str,
    weights: dict[str, float],
    shadow: str | None = None,
    shadow_fraction: float = 0.0,
) -> DesiredDoc:
    """Write a new desired state (next revision) and announce it. Returns the document."""
    desired_key, channel, counter, _ = keys(settings.namespace, model)
    revision = int(await client.incr(counter))
    doc = DesiredDoc(revision, weights, shadow, shadow_fraction if shadow else 0.0, time.time())
    if settings.hmac_secret:
        doc = msgspec.structs.replace(doc, hmac=sign(doc, settings.hmac_secret))
    await client.set(desired_key, msgspec.json.encode(doc))
    message = ControlMessage(revision)
    if settings.hmac_secret:
        message = ControlMessage(revision, sign(message, settings.hmac_secret))
    await client.publish(channel, msgspec.json.encode(message))
    return doc


async def read_desired(client: Any, settings: ControlSettings, model: str) -> DesiredDoc | None:
    """The current document, or None when absent or invalid (logged)."""
    raw = await client.get(keys(settings.namespace, model)[0])
    if raw is None:
        return None
    try:
        doc = _doc_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        log.error("ignoring an invalid desired-state document: %s", exc)
        return None
    if not verified(doc, settings.hmac_secret):
        log.error("ignoring desired state revision %d: bad or missing HMAC", doc.revision)
        return None
    return doc


async def fleet(client: Any, settings: ControlSettings, model: str) -> list[ReplicaStatus]:
    """Every live replica's last report."""
    prefix = keys(settings.namespace, model)[3]
    out = []
    async for key in client.scan_iter(match=prefix + "*"):
        raw = await client.get(key)
        if raw is None:
            continue
        with contextlib.suppress(msgspec.DecodeError):
            out.append(_status_decoder.decode(raw))
    return sorted(out, key=lambda s: s.replica)


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
    ) -> None:
        """Keep collaborators; :meth:`run` does the work."""
        self.settings = settings
        self.client = client
        self.model = model
        self.default = DesiredState({default_ref: 1.0}, revision=0)
        self.rollout = rollout
        self.replica = replica
        self.connected = False
        self.last_error: str | None = None
        self.rejected = 0
        self._wake = asyncio.Event()
        self._reresolve = False
        self._applied: tuple[int, tuple[tuple[str, str], ...]] | None = None
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

    def reresolve(self) -> None:
        """SIGHUP: re-resolve aliases and reapply."""
        self._reresolve = True
        self._wake.set()

    def state(self) -> dict[str, Any]:
        """For /health/ready and /v1/models."""
        return {
            "enabled": self.settings.enabled and self.client is not None,
            "connected": self.connected,
            "last_error": self.last_error,
            "rejected_messages": self.rejected,
        }

    def _status_key(self) -> str:
        return keys(self.settings.namespace, self.model)[3] + self.replica

    # ------------------------------------------------------------------ loops

    async def _subscribe_loop(self) -> None:
        assert self.client is not None
        channel = keys(self.settings.namespace, self.model)[1]
        delay = 0.5
        while True:
            pubsub = self.client.pubsub()
            try:
                await pubsub.subscribe(channel)
                self.connected = True
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
                self.last_error = f"control channel: {type(exc).__name__}: {exc}"
                log.warning("%s; reconnecting in %.1fs", self.last_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.retry_max_s)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def _on_message(self, data: Any) -> None:
        try:
            message = _msg_decoder.decode(data if isinstance(data, bytes) else str(data).encode())
        except msgspec.DecodeError as exc:
            self.rejected += 1
            log.warning("ignoring a junk control message: %s", exc)
            return
        if not verified(message, self.settings.hmac_secret):
            self.rejected += 1
            log.warning(
                "rejecting control message revision %d: bad or missing HMAC", message.revision
            )
            return
        if message.revision < self.rollout.status.applied_revision:
            self.rejected += 1
            log.warning("ignoring control message for old revision %d", message.revision)
            return
        self._wake.set()

    async def _converge_loop(self) -> None:
        delay = 1.0
        while True:
            failed = False
            try:
                await self._converge()
                delay = 1.0
            except ServiceError as exc:
                failed = True
                self.last_error = exc.detail
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failed = True
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("converge failed: %s", self.last_error)
            timeout = delay if failed else self.settings.poll_interval_s
            if failed:
                delay = min(delay * 2, self.settings.retry_max_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()

    async def _desired(self) -> DesiredState:
        if self.client is None or not self.settings.enabled:
            return self.default
        try:
            doc = await asyncio.wait_for(read_desired(self.client, self.settings, self.model), 2.0)
        except (TimeoutError, OSError, ConnectionError) as exc:
            self.connected = False
            self.last_error = f"redis unreachable: {exc or type(exc).__name__}"
            if self._applied is None:
                log.warning(
                    "%s; serving the default %s", self.last_error, list(self.default.weights)
                )
                return self.default
            raise
        except Exception as exc:  # redis-py errors
            self.connected = False
            self.last_error = f"redis: {type(exc).__name__}: {exc}"
            if self._applied is None:
                return self.default
            raise
        if doc is None:
            return self.default
        return DesiredState(dict(doc.weights), doc.shadow, doc.shadow_fraction, doc.revision)

    async def _converge(self) -> None:
        desired = await self._desired()
        if desired.revision < self.rollout.status.applied_revision and not self._reresolve:
            return
        try:
            resolved = await self._resolve_refs(desired)
        except ServiceError as exc:
            self.rollout.record_failure(desired, exc.detail)
            raise
        fingerprint = (desired.revision, resolved)
        if fingerprint == self._applied and not self._reresolve:
            return
        self._reresolve = False
        try:
            await self.rollout.apply(desired)
        finally:
            with contextlib.suppress(Exception):
                await self._report()
        self._applied = fingerprint

    async def _resolve_refs(self, desired: DesiredState) -> tuple[tuple[str, str], ...]:
        refs = sorted(set(desired.weights) | ({desired.shadow} if desired.shadow else set()))
        out = []
        for ref in refs:
            if ref.startswith("@") or ref.startswith("models:/"):
                info = await asyncio.to_thread(self.rollout.registry.resolve, ref)
                out.append((ref, info.version))
            else:
                out.append((ref, ref))
        return tuple(out)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_ttl_s / 3)
            with contextlib.suppress(Exception):
                await self._report()

    async def _report(self) -> None:
        if self.client is None or not self.settings.enabled:
            return
        routing = self.rollout.service.routing
        status = self.rollout.status
        report = ReplicaStatus(
            replica=self.replica,
            revision=status.applied_revision,
            versions=dict(routing.weights) if routing else {},
            shadow=routing.shadow if routing else None,
            outcome=status.last_outcome,
            error=status.last_error,
            updated_at=time.time(),
        )
        await self.client.set(
            self._status_key(), msgspec.json.encode(report), ex=self.settings.heartbeat_ttl_s
        )
