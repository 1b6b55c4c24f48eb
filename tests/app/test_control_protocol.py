"""The control plane's protocol against a real (private) Redis: atomic publish, epochs, HMAC."""

from __future__ import annotations

import asyncio
import uuid

import msgspec
import pytest
import redis.asyncio as aioredis

from app.control.protocol import (
    ControlMessage,
    DesiredState,
    history,
    keys,
    proposed,
    publish,
    publish_change,
    read_current,
    sign,
    verified,
)
from app.control.settings import ControlSettings

MODEL = "rf-localizer"
SECRET = "s3cret"  # noqa: S105 - a test key


def control(namespace: str | None = None, secret: str = "") -> ControlSettings:
    return ControlSettings(namespace=namespace or f"p{uuid.uuid4().hex[:8]}", hmac_secret=secret)


async def test_concurrent_publishers_strictly_increase_revisions_and_lose_no_update(
    redis_url: str,
) -> None:
    settings = control()
    clients = [aioredis.from_url(redis_url) for _ in range(2)]
    per_publisher = 20

    async def publisher(client: aioredis.Redis, name: str) -> list[int]:
        revisions = []
        for i in range(per_publisher):
            # Read-modify-write: each publish adds one entry to the current weights.
            def add(current: DesiredState | None, key: str = f"{name}-{i}") -> DesiredState:
                weights = dict(current.weights) if current else {}
                return proposed({**weights, key: 1.0}, reason=key)

            doc = await publish_change(client, settings, MODEL, add)
            revisions.append(doc.revision)
        return revisions

    try:
        got = await asyncio.gather(publisher(clients[0], "a"), publisher(clients[1], "b"))
        current = await read_current(clients[0], settings, MODEL)
        past = await history(clients[0], settings, MODEL)
    finally:
        for client in clients:
            await client.aclose()
    total = 2 * per_publisher
    for revisions in got:
        assert revisions == sorted(revisions) and len(set(revisions)) == per_publisher
    assert sorted(got[0] + got[1]) == list(range(1, total + 1))
    assert current.doc is not None and current.revision == total
    assert current.doc.revision == total
    # No lost update: every publisher's entry survived the interleaving.
    assert len(current.doc.weights) == total, sorted(current.doc.weights)
    assert [h.revision for h in past] == list(range(total, 0, -1))
    assert len({h.epoch for h in past}) == 1


async def test_reset_starts_a_new_epoch_and_an_old_document_is_refused(redis_url: str) -> None:
    settings = control()
    k = keys(settings.namespace, MODEL)
    client = aioredis.from_url(redis_url)
    try:
        for version in ("1", "2", "3"):
            doc = await publish(client, settings, MODEL, {version: 1.0})
        old_raw = await client.get(k.desired)
        assert doc.revision == 3
        # Redis loses this model's data (a private server is shared by the session's tests,
        # so only our keys go; the replica-level test SIGKILLs a server of its own).
        await client.delete(*k[:3], k.epoch, k.history)
        fresh = await publish(client, settings, MODEL, {"4": 1.0})
        assert fresh.revision == 1 and fresh.epoch != doc.epoch
        assert (await read_current(client, settings, MODEL)).doc == fresh
        await client.set(k.desired, old_raw)  # replay of the old epoch's document
        replayed = await read_current(client, settings, MODEL)
        assert replayed.doc is None and replayed.reason == "epoch"
        assert f"epoch {doc.epoch}" in (replayed.problem or "")
    finally:
        await client.aclose()


async def test_a_document_signed_for_another_namespace_does_not_verify(redis_url: str) -> None:
    a, b = control(secret=SECRET), control(secret=SECRET)
    ka, kb = keys(a.namespace, MODEL), keys(b.namespace, MODEL)
    client = aioredis.from_url(redis_url)
    try:
        await publish(client, a, MODEL, {"2": 1.0})
        await publish(client, b, MODEL, {"1": 1.0})
        # Copy the whole of A's state (document, epoch, counter) into B.
        for src, dst in zip(ka, kb, strict=True):
            if src in (ka.desired, ka.epoch, ka.revision):
                await client.set(dst, await client.get(src))
        copied = await read_current(client, b, MODEL)
        assert copied.doc is None and copied.reason == "hmac"
        assert (await read_current(client, a, MODEL)).doc is not None
        # Another model in the same namespace is refused the same way.
        other = keys(a.namespace, "other-model")
        for src, dst in ((ka.desired, other.desired), (ka.epoch, other.epoch)):
            await client.set(dst, await client.get(src))
        assert (await read_current(client, a, "other-model")).reason == "hmac"
    finally:
        await client.aclose()


@pytest.mark.parametrize("field", ["epoch", "revision", "weights"])
async def test_the_signature_covers_epoch_revision_and_body(redis_url: str, field: str) -> None:
    settings = control(secret=SECRET)
    k = keys(settings.namespace, MODEL)
    client = aioredis.from_url(redis_url)
    try:
        doc = await publish(client, settings, MODEL, {"1": 1.0})
        changed = {"epoch": doc.epoch[::-1], "revision": 7, "weights": {"2": 1.0}}[field]
        forged = msgspec.structs.replace(doc, **{field: changed})
        await client.set(k.desired, msgspec.json.encode(forged))
        if field == "epoch":
            await client.set(k.epoch, forged.epoch)
        assert (await read_current(client, settings, MODEL)).reason == "hmac"
    finally:
        await client.aclose()


async def test_new_epoch_on_request_restarts_revisions_and_keeps_history(redis_url: str) -> None:
    settings = control()
    client = aioredis.from_url(redis_url)
    try:
        first = await publish(client, settings, MODEL, {"1": 1.0})
        second = await publish(client, settings, MODEL, {"2": 1.0})
        fresh = await publish_change(
            client, settings, MODEL, lambda _: proposed({"3": 1.0}), start_epoch=True
        )
        current = await read_current(client, settings, MODEL)
        past = await history(client, settings, MODEL)
    finally:
        await client.aclose()
    assert first.epoch == second.epoch != fresh.epoch
    assert (second.revision, fresh.revision) == (2, 1)
    assert current.doc == fresh and current.epoch == fresh.epoch and current.revision == 1
    assert [(h.epoch, h.revision) for h in past] == [
        (fresh.epoch, 1),
        (first.epoch, 2),
        (first.epoch, 1),
    ]


# Written and signed by the code before the desired state became one type (2b7c9c6): other
# replicas and older versions of the CLI read and sign exactly these bytes.
GOLDEN_DOCUMENT = (
    b'{"revision":7,"weights":{"@production":0.9,"4":0.1},"shadow":"5","shadow_fraction":0.2,'
    b'"updated_at":1700000000.5,"epoch":"0123456789abcdef","reason":"route","by":"ops@host",'
    b'"hmac":"19ff19964b732c17ec565cb0f2ba1bb866913cca9858c661b6f1db885bbbb97b"}'
)
GOLDEN_MESSAGE_HMAC = "00d7ba16093381c766c8991a654aa373751efe8da9bad3ddfe3787314e327c90"


def test_the_document_and_its_signature_are_unchanged_on_the_wire() -> None:
    state = DesiredState(
        revision=7,
        weights={"@production": 0.9, "4": 0.1},
        shadow="5",
        shadow_fraction=0.2,
        updated_at=1700000000.5,
        epoch="0123456789abcdef",
        reason="route",
        by="ops@host",
    )
    signed = msgspec.structs.replace(state, hmac=sign(state, SECRET, "heimdall", MODEL))
    assert msgspec.json.encode(signed) == GOLDEN_DOCUMENT
    assert msgspec.json.decode(GOLDEN_DOCUMENT, type=DesiredState) == signed
    assert verified(signed, SECRET, "heimdall", MODEL)
    message = ControlMessage(7, "0123456789abcdef")
    assert sign(message, SECRET, "heimdall", MODEL) == GOLDEN_MESSAGE_HMAC


@pytest.mark.parametrize("weight", [b"1e300", b"-1", b"null"])
def test_a_document_with_a_weight_out_of_range_is_refused(weight: bytes) -> None:
    """Weights are 0..1e9: 1e300 (sums overflow to inf), negatives and null (NaN written as
    JSON) are refused when a replica decodes the document."""
    body = GOLDEN_DOCUMENT.replace(b'"4":0.1', b'"4":' + weight)
    with pytest.raises(msgspec.ValidationError, match=r"weights"):
        msgspec.json.decode(body, type=DesiredState)
