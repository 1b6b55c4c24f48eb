"""Operator verbs that publish a desired state: promote, route, shadow and canary.

Only :mod:`app.control.protocol` (msgspec, redis) is needed by ``route`` and ``shadow``; the
registry (MLflow) is imported by ``promote`` alone (and by the reference checks on a local
sqlite registry).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
from typing import Any

from app.control.protocol import (
    MAX_WEIGHT,
    Current,
    DesiredState,
    ReplicaStatus,
    fleet,
    proposed,
    publish_change,
    read_current,
)
from app.control.settings import ControlSettings
from app.registry.rest import RestAliases, is_remote
from app.registry.sqlite_refs import SqliteRefs, UnknownSchema, sqlite_path, workspaces_enabled
from app.settings import OperatorSettings, load_operator_settings


class UsageError(ValueError):
    """The command line is wrong (exit code 2, like argparse's own usage errors)."""


def redis_client(settings: OperatorSettings) -> Any:
    """A Redis client for the control plane (``REDIS_URL``)."""
    import redis.asyncio as aioredis

    if not settings.cache.redis_url:
        raise UsageError("REDIS_URL is empty: the control plane needs Redis")
    return aioredis.from_url(settings.cache.redis_url, socket_timeout=5)


def unsigned_refusal(current: Current, replicas: list[ReplicaStatus]) -> str | None:
    """Why publishing without a secret would break a signed fleet (None when it would not)."""
    signed = [r.replica for r in replicas if r.signed]
    doc_signed = current.doc is not None and bool(current.doc.hmac)
    if not signed and not doc_signed:
        return None
    reasons = []
    if signed:
        reasons.append(f"replicas {', '.join(signed)} accept only signed documents")
    if doc_signed and current.doc is not None:
        reasons.append(f"the desired revision {current.doc.revision} is signed")
    return (
        "refusing to publish an unsigned desired state: the fleet's state is signed ("
        + "; ".join(reasons)
        + "). Signed replicas would refuse it, and it would replace a signed state. "
        "Set HEIMDALL_CONTROL_HMAC_SECRET, or pass --force to publish unsigned anyway."
    )


async def publish_state(
    settings: OperatorSettings,
    weights: dict[str, float] | None,
    shadow: str | bool | None,
    fraction: float | None,
    *,
    reason: str,
    force: bool = False,
    start_epoch: bool = False,
) -> None:
    """Publish the next desired state: given weights/shadow, or the current one's.

    ``shadow`` False removes the shadow, None keeps the current one. Without a secret the
    publish is refused when the fleet is signed, unless ``force``.
    """
    client = redis_client(settings)
    model = settings.registry.model_name()
    control = settings.control
    try:
        if not control.hmac_secret and not force:
            refusal = unsigned_refusal(
                await read_current(client, control, model), await fleet(client, control, model)
            )
            if refusal:
                raise SystemExit(refusal)
        if not force:
            await refuse_during_canary(client, control, model)

        def change(current: DesiredState | None) -> DesiredState:
            new_weights = weights or (
                dict(current.weights) if current else {settings.registry.model_uri: 1.0}
            )
            if shadow is False:
                new_shadow, new_fraction = None, 0.0
            elif shadow is None:
                new_shadow = current.shadow if current else None
                new_fraction = current.shadow_fraction if current else 0.0
            else:
                new_shadow = str(shadow)
                new_fraction = fraction if fraction is not None else 0.1
            return proposed(new_weights, new_shadow, new_fraction, reason)

        doc = await publish_change(client, control, model, change, start_epoch=start_epoch)
        print(
            f"published epoch {doc.epoch} revision {doc.revision}: weights {doc.weights}"
            + (f", shadow {doc.shadow} at {doc.shadow_fraction:g}" if doc.shadow else "")
            + (" (signed)" if doc.hmac else " (unsigned)")
        )
    finally:
        await client.aclose()


def set_alias(settings: OperatorSettings, alias: str, version: str) -> None:
    """Point ``alias`` at ``version`` (the caller checked it exists: :func:`check_refs`).

    A tracking server is spoken to over REST (no MLflow import: seconds saved); a local
    sqlite registry goes through MLflow.

    Raises:
        ServiceError: the version does not exist (NotFound) or the registry failed.
    """
    name = settings.registry.model_name()
    if is_remote(settings.registry.tracking_uri):
        RestAliases(settings.registry.tracking_uri).set_alias(name, alias, version)
        return
    from app.registry.client import ModelRegistry

    registry = ModelRegistry(settings.registry)
    registry.resolve(version)  # fails clearly when the version does not exist
    registry.set_alias(name, alias, version)


def check_refs(settings: OperatorSettings, refs: list[str]) -> dict[str, str]:
    """Check that every ref exists in the registry before publishing; the version each names.

    An alias names the version it points at now ("" when the registry does not say).

    A desired state naming a version the registry lacks can never be applied: every replica
    would keep failing to load it. A tracking server is asked over REST, a local sqlite
    registry read with the standard library (no MLflow import either way).

    Raises:
        UsageError: a reference is malformed or names another model.
        NotFound: the version or alias is not registered.
        ModelLoadError: the registry is unreachable or failed.
    """
    from app.registry.client import parse_ref

    name = settings.registry.model_name()
    parsed = []
    for ref in refs:
        try:
            ref_name, version, alias = parse_ref(ref, name)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if ref_name != name:
            raise UsageError(f"{ref!r} names model {ref_name!r}; this fleet serves {name!r}")
        parsed.append((ref, version, alias))
    uri = settings.registry.tracking_uri
    path = None if workspaces_enabled() else sqlite_path(uri)
    checker = RestAliases(uri) if is_remote(uri) else SqliteRefs(path) if path else None
    if checker is not None:
        try:
            found: dict[str, str] = {}
            for ref, version, alias in parsed:
                if version is not None:
                    checker.check_version(name, version)
                    found[ref] = version
                else:
                    found[ref] = checker.check_alias(name, str(alias))
            return found
        except UnknownSchema:
            pass  # not the tables this reads: MLflow reads its own database below
    from app.registry.client import ModelRegistry

    registry = ModelRegistry(settings.registry)
    return {ref: registry.resolve(ref).version for ref, _, _ in parsed}


async def refuse_during_canary(client: Any, control: ControlSettings, model: str) -> None:
    """Refuse to publish while a canary runs: its next step would undo the change.

    Raises:
        SystemExit: a canary leader holds the lock.
    """
    from app.control.canary import canary_keys

    holder = await client.get(canary_keys(control, model)[1])
    if holder is not None:
        leader = holder.decode(errors="replace") if isinstance(holder, bytes) else str(holder)
        raise SystemExit(
            f"a canary is running (leader {leader!r}): its next step would undo this change. "
            "Wait for it to finish, or publish with --force (the canary then stops and leaves "
            "your state in place)"
        )


def cmd_promote(args: argparse.Namespace) -> int:
    """Point the alias at VERSION in MLflow and route all traffic to the alias."""
    settings = load_operator_settings()
    name = settings.registry.model_name()
    if not str(args.version).isdigit():
        raise UsageError(f"VERSION must be a version number, got {args.version!r}")
    check_refs(settings, [str(args.version)])  # a missing version is named before Redis

    async def check() -> None:
        # Everything that can refuse the publish, before the alias moves: replicas follow an
        # alias by themselves, so a promote that fails after moving it still takes effect.
        client = redis_client(settings)
        control = settings.control
        try:
            await client.ping()  # Redis away: fail now, not after the alias moved
            if not args.force and not control.hmac_secret:
                current, replicas = (
                    await read_current(client, control, name),
                    await fleet(client, control, name),
                )
                if refusal := unsigned_refusal(current, replicas):
                    raise SystemExit(refusal)
            if not args.force:
                await refuse_during_canary(client, control, name)
        finally:
            await client.aclose()

    asyncio.run(check())
    set_alias(settings, args.alias, str(args.version))
    print(f"{name}@{args.alias} -> version {args.version}")
    asyncio.run(
        publish_state(
            settings,
            {f"@{args.alias}": 1.0},
            None,
            None,
            reason=f"promote {args.version} as @{args.alias}",
            force=args.force,
            start_epoch=args.new_epoch,
        )
    )
    return 0


_DECIMAL = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def cmd_route(args: argparse.Namespace) -> int:
    """Publish routing weights, e.g. ``route 3=0.9 4=0.1``."""
    weights: dict[str, float] = {}
    for part in args.weights:
        ref, _, weight = part.partition("=")
        # A plain decimal number: Python's float() also reads `1_0`, `-0.0`, `nan`, `inf`.
        if _DECIMAL.fullmatch(weight.strip()):
            weights[ref] = float(weight)
        else:
            ref = ""
        # `not 0 <= w <= max` also refuses NaN (`nan` and `inf` parse as floats, and JSON
        # writes them as null: every replica refused the document while route said published).
        if not ref or not 0.0 <= weights[ref] <= MAX_WEIGHT:
            raise UsageError(
                f"expected VERSION=WEIGHT (a number from 0 to {MAX_WEIGHT:g}), got {part!r}"
            )
    if not any(weights.values()):
        raise UsageError("at least one weight must be > 0")
    settings = load_operator_settings()
    if not args.no_check:
        check_refs(settings, list(weights))
    asyncio.run(
        publish_state(
            settings,
            weights,
            None,
            None,
            reason="route " + " ".join(args.weights),
            force=args.force,
            start_epoch=args.new_epoch,
        )
    )
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    """Publish a shadow version (``--off`` removes it)."""
    shadow: str | bool = False if args.off else str(args.version)
    if not args.off and not args.version:
        raise UsageError("give a VERSION or --off")
    if args.fraction is not None and not 0 <= args.fraction <= 1:
        raise UsageError(f"--fraction must be within [0, 1], got {args.fraction:g}")
    settings = load_operator_settings()
    if not args.off and not args.no_check:
        check_refs(settings, [str(args.version)])
    asyncio.run(
        publish_state(
            settings,
            None,
            shadow,
            args.fraction,
            reason="shadow off" if args.off else f"shadow {args.version}",
            force=args.force,
            start_epoch=args.new_epoch,
        )
    )
    return 0


def cmd_canary(args: argparse.Namespace) -> int:
    """Raise VERSION's weight step by step; roll back by itself on a breach (exit 1)."""
    from app.control.canary import Canary, Interrupted, LockHeld
    from app.control.gates import Gates

    settings = load_operator_settings()
    candidate = str(args.version)
    if not args.no_check:
        # Replicas report their figures by version number: an alias is compared as the version
        # it points at when the canary starts (as "@staging" it never matched, and its traffic
        # counted as the baseline's).
        candidate = check_refs(settings, [candidate])[candidate] or candidate
    elif not candidate.isdigit():
        raise UsageError(f"with --no-check, give a version number, not {candidate!r}")
    gates = Gates(
        args.max_error_rate_delta, args.max_p99_ratio, args.max_shadow_m, args.min_requests
    )

    async def run() -> bool:
        client = redis_client(settings)
        try:
            if not settings.control.hmac_secret and not args.force:
                model = settings.registry.model_name()
                refusal = unsigned_refusal(
                    await read_current(client, settings.control, model),
                    await fleet(client, settings.control, model),
                )
                if refusal:
                    raise SystemExit(refusal)
            canary = Canary(
                client,
                settings.control,
                settings.registry.model_name(),
                candidate,
                args.steps,
                args.interval,
                gates,
            )
            # SIGTERM (a timeout, systemd, CI) or ^C: it rolls back before it exits (a killed
            # leader left the traffic split and the canary "running").
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, canary.interrupt)
            return await canary.run()
        finally:
            await client.aclose()

    try:
        return 0 if asyncio.run(run()) else 1
    except LockHeld as exc:
        raise SystemExit(str(exc)) from exc
    except Interrupted:
        raise SystemExit("canary interrupted: rolled back (see status)") from None
