"""The control plane's wire protocol: keys, documents, signatures, atomic publish, reads.

Shared by the replicas' subscriber (:mod:`app.control.plane`) and the operator verbs
(:mod:`app.ops.operate`); it imports nothing heavy, so the CLI stays fast.

Keys under ``{namespace}:{model}``: ``desired`` (the document), ``control`` (channel),
``revision`` (counter), ``epoch`` (a random id made when the counter is first created),
``history`` (the last published documents, newest first) and ``replicas:{replica}`` (each
replica's report, with a TTL). A document is identified by ``(epoch, revision)``: when Redis
loses its data the counter starts again at 1 under a *new* epoch, so replicas can tell a
fresh start (document epoch == the epoch key, which differs from what they applied) from a
replay (document epoch != the epoch key, or an older revision of the epoch they applied).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import hmac
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, NamedTuple

import msgspec
from msgspec import Meta, Struct

from app.control.settings import ControlSettings

log = logging.getLogger("heimdall.control")

MAX_WEIGHT = 1e9
"""Weights are relative: any split fits in 0..1e9, and the sum of any weights stays finite."""
Weight = Annotated[float, Meta(ge=0.0, le=MAX_WEIGHT)]
HISTORY_LENGTH = 50


class DesiredState(Struct, frozen=True, forbid_unknown_fields=True):
    """What every replica of one model should serve: the document stored in Redis.

    The one type of the desired state, from the key through the replica's plane to the
    rollout (which resolves its aliases, see :class:`app.control.rollout.Resolved`).
    Routing weights and the shadow name versions (``"3"``), aliases (``"@production"``) or
    model URIs. Revision 0 never travels: it is the state a replica serves without a document
    (``HEIMDALL_MODEL_URI``), or a proposal before :func:`publish_change` numbers it.
    """

    revision: Annotated[int, Meta(ge=1)]
    weights: Annotated[dict[str, Weight], Meta(min_length=1)]
    shadow: str | None = None
    shadow_fraction: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    updated_at: float = 0.0
    epoch: str = ""
    """Random id of the revision counter's life (empty in documents from before epochs)."""
    reason: str = ""
    """Why it was published (operator verb, canary step, rollback cause)."""
    by: str = ""
    """Who published it (user@host)."""
    hmac: str = ""

    def references(self) -> list[str]:
        """Every version reference: the weighted ones in order, then the shadow."""
        return [*self.weights, *([self.shadow] if self.shadow else [])]


class ControlMessage(Struct, frozen=True, forbid_unknown_fields=True):
    """What is published on the channel: the (epoch, revision) to converge on."""

    revision: Annotated[int, Meta(ge=1)]
    epoch: str = ""
    hmac: str = ""


class VersionFigures(Struct, frozen=True):
    """One version's cumulative figures on one replica (for rollout gates)."""

    requests: int = 0
    errors: int = 0
    latency_bounds: list[float] = []
    """Upper bounds (seconds) of the total-duration histogram buckets."""
    latency_counts: list[int] = []
    shadow_bounds: list[float] = []
    """Upper bounds (metres) of the shadow-distance histogram buckets."""
    shadow_counts: list[int] = []


class ReplicaStatus(Struct, frozen=True):
    """What a replica reports (heartbeat with TTL)."""

    replica: str
    revision: int
    versions: dict[str, float]
    shadow: str | None
    outcome: str
    error: str | None
    updated_at: float
    epoch: str = ""
    signed: bool = False
    """The replica requires signed documents (it has a secret)."""
    rejected: int = 0
    """Refused messages and documents since start."""
    last_rejection: str | None = None
    epoch_changes: int = 0
    figures: dict[str, VersionFigures] = {}
    """Per-version cumulative figures since the replica started."""


_doc_decoder = msgspec.json.Decoder(DesiredState)
_msg_decoder = msgspec.json.Decoder(ControlMessage)
_status_decoder = msgspec.json.Decoder(ReplicaStatus)


class Keys(NamedTuple):
    """Redis keys and channel of one model's control plane."""

    desired: str
    channel: str
    revision: str
    replicas: str
    epoch: str
    history: str


def keys(namespace: str, model: str) -> Keys:
    """The keys of ``model`` in ``namespace``."""
    base = f"{namespace}:{model}"
    return Keys(
        f"{base}:desired",
        f"{base}:control",
        f"{base}:revision",
        f"{base}:replicas:",
        f"{base}:epoch",
        f"{base}:history",
    )


def new_epoch() -> str:
    """A fresh random epoch id."""
    return secrets.token_hex(8)


def sign(value: Struct, secret: str, namespace: str, model: str) -> str:
    """HMAC-SHA256 (hex) over namespace, model and the value's fields except ``hmac``.

    For a document that is namespace, model, epoch, revision and body: a document signed for
    one environment or model does not verify in another.
    """
    fields = msgspec.structs.asdict(value)
    fields.pop("hmac", None)
    payload = msgspec.json.encode(
        {"namespace": namespace, "model": model, "value": fields}, order="sorted"
    )
    return hmac.new(secret.encode(), payload, hashlib.sha256).hexdigest()


def verified(value: DesiredState | ControlMessage, secret: str, namespace: str, model: str) -> bool:
    """True when no secret is configured or the HMAC matches."""
    return not secret or hmac.compare_digest(value.hmac, sign(value, secret, namespace, model))


def decode_message(data: bytes) -> ControlMessage:
    """Decode a channel message.

    Raises:
        msgspec.DecodeError: not a control message.
    """
    return _msg_decoder.decode(data)


@dataclass(frozen=True)
class Current:
    """The desired state as a replica or the CLI reads it."""

    doc: DesiredState | None
    """The document, when present, valid and (with a secret) correctly signed."""
    epoch: str
    """The epoch key ('' when absent)."""
    revision: int
    """The revision counter (0 when absent)."""
    raw: bytes | None
    """The document's bytes, as stored."""
    problem: str | None = None
    """Why a present document was refused (invalid, bad HMAC, epoch mismatch)."""
    reason: str | None = None
    """Short cause for metrics: ``invalid``, ``hmac`` or ``epoch``."""


async def read_current(client: Any, settings: ControlSettings, model: str) -> Current:
    """Read document, epoch and counter in one round trip and check the document.

    A document is refused when it does not decode, when its HMAC does not verify for this
    namespace and model (with a secret), or when its epoch is not the current epoch key (a
    document from before a reset, replayed).
    """
    k = keys(settings.namespace, model)
    raw, epoch_raw, revision_raw = await client.mget(k.desired, k.epoch, k.revision)
    epoch = epoch_raw.decode() if epoch_raw else ""
    revision = int(revision_raw) if revision_raw else 0
    if raw is None:
        return Current(None, epoch, revision, None)
    try:
        doc = _doc_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        return Current(None, epoch, revision, raw, f"invalid document: {exc}", "invalid")
    if not verified(doc, settings.hmac_secret, settings.namespace, model):
        problem = (
            f"revision {doc.revision}: bad or missing HMAC (unsigned, another key, or signed "
            f"for another namespace or model than {settings.namespace}:{model})"
        )
        return Current(None, epoch, revision, raw, problem, "hmac")
    if doc.epoch != epoch:
        problem = (
            f"revision {doc.revision} of epoch {doc.epoch or '-'} but the current epoch is "
            f"{epoch or '-'} (a document from before a reset, replayed?)"
        )
        return Current(None, epoch, revision, raw, problem, "epoch")
    return Current(doc, epoch, revision, raw)


async def read_desired(client: Any, settings: ControlSettings, model: str) -> DesiredState | None:
    """The current document, or None when absent or refused (logged)."""
    current = await read_current(client, settings, model)
    if current.problem:
        log.error("ignoring the desired-state document: %s", current.problem)
    return current.doc


async def fleet(client: Any, settings: ControlSettings, model: str) -> list[ReplicaStatus]:
    """Every live replica's last report."""
    prefix = keys(settings.namespace, model).replicas
    out = []
    async for key in client.scan_iter(match=prefix + "*"):
        raw = await client.get(key)
        if raw is None:
            continue
        with contextlib.suppress(msgspec.DecodeError):
            out.append(_status_decoder.decode(raw))
    return sorted(out, key=lambda s: s.replica)


async def history(client: Any, settings: ControlSettings, model: str) -> list[DesiredState]:
    """The last published documents, newest first (undecodable entries skipped)."""
    out = []
    for raw in await client.lrange(keys(settings.namespace, model).history, 0, -1):
        with contextlib.suppress(msgspec.DecodeError):
            out.append(_doc_decoder.decode(raw))
    return out


def proposed(
    weights: dict[str, float],
    shadow: str | None = None,
    shadow_fraction: float = 0.0,
    reason: str = "",
) -> DesiredState:
    """A state to publish; :func:`publish_change` assigns its epoch, revision, time and author."""
    return DesiredState(
        revision=0, weights=weights, shadow=shadow, shadow_fraction=shadow_fraction, reason=reason
    )


# Compare-and-set: the epoch key and the counter must still be what the publisher read
# (and signed against); then counter, epoch, document, history and message change together.
_PUBLISH = """
local epoch = redis.call('GET', KEYS[1]) or ''
local revision = tonumber(redis.call('GET', KEYS[2]) or '0')
if epoch ~= ARGV[1] or revision ~= tonumber(ARGV[2]) then
  return 0
end
if ARGV[3] ~= epoch then redis.call('SET', KEYS[1], ARGV[3]) end
redis.call('SET', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], ARGV[5])
redis.call('LPUSH', KEYS[4], ARGV[5])
redis.call('LTRIM', KEYS[4], 0, tonumber(ARGV[7]) - 1)
redis.call('PUBLISH', ARGV[8], ARGV[6])
return 1
"""


class PublishConflict(RuntimeError):
    """Other publishers kept winning the compare-and-set."""


def publisher_id() -> str:
    """``user@host`` of this process, for the history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "?"
    return f"{user}@{socket.gethostname()}"


async def publish_change(
    client: Any,
    settings: ControlSettings,
    model: str,
    change: Callable[[DesiredState | None], DesiredState],
    *,
    start_epoch: bool = False,
    attempts: int = 50,
) -> DesiredState:
    """Atomically publish ``change(current document)`` as the next revision.

    ``change`` says the weights, shadow and reason (see :func:`proposed`); the rest is set here.
    Reads (epoch, counter, document), builds and signs the next document, and writes it with a
    compare-and-set on (epoch, counter): when another publisher got in between, it reads again
    and re-applies ``change``, so revisions strictly increase and no update is lost. Without an
    epoch key (first publish, or Redis lost its data) a new epoch starts, and so does one with
    ``start_epoch``; its revisions count from the counter (1 after a reset).

    Raises:
        PublishConflict: the compare-and-set failed ``attempts`` times.
    """
    k = keys(settings.namespace, model)
    script = client.register_script(_PUBLISH)
    secret = settings.hmac_secret
    for attempt in range(attempts):
        current = await read_current(client, settings, model)
        proposal = change(current.doc)
        epoch = current.epoch
        revision = current.revision + 1
        if start_epoch or not epoch:
            epoch = new_epoch()
            revision = 1 if start_epoch else revision
        doc = DesiredState(
            revision=revision,
            weights=dict(proposal.weights),
            shadow=proposal.shadow,
            shadow_fraction=proposal.shadow_fraction if proposal.shadow else 0.0,
            updated_at=time.time(),
            epoch=epoch,
            reason=proposal.reason,
            by=publisher_id(),
        )
        message = ControlMessage(revision, epoch)
        if secret:
            doc = msgspec.structs.replace(doc, hmac=sign(doc, secret, settings.namespace, model))
            message = msgspec.structs.replace(
                message, hmac=sign(message, secret, settings.namespace, model)
            )
        won = await script(
            keys=[k.epoch, k.revision, k.desired, k.history],
            args=[
                current.epoch,
                current.revision,
                epoch,
                revision,
                msgspec.json.encode(doc),
                msgspec.json.encode(message),
                HISTORY_LENGTH,
                k.channel,
            ],
        )
        if int(won):
            return doc
        log.info("publish raced with another publisher (attempt %d); retrying", attempt + 1)
    raise PublishConflict(f"another publisher won the compare-and-set {attempts} times")


async def publish(
    client: Any,
    settings: ControlSettings,
    model: str,
    weights: dict[str, float],
    shadow: str | None = None,
    shadow_fraction: float = 0.0,
    reason: str = "",
) -> DesiredState:
    """Publish a fixed desired state as the next revision (see :func:`publish_change`)."""
    proposal = proposed(weights, shadow, shadow_fraction, reason)
    return await publish_change(client, settings, model, lambda _: proposal)
