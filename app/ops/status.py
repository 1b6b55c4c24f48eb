"""The ``status`` verb: the desired state, every replica's applied state, the history.

Reads only: :mod:`app.control.protocol` and the canary's state, no registry.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import msgspec

from app.control.canary import CanaryState, read_canary
from app.control.protocol import Current, DesiredState, ReplicaStatus, fleet, history, read_current
from app.ops.publish import redis_client
from app.settings import OperatorSettings, load_operator_settings


class ReplicaView(msgspec.Struct, frozen=True):
    """One replica's row in ``status``."""

    replica: str
    epoch: str
    revision: int
    versions: dict[str, float]
    age_s: float
    outcome: str
    error: str | None
    rejected: int
    last_rejection: str | None
    epoch_changes: int
    in_sync: bool
    diverged_for_s: float | None


class FleetStatus(msgspec.Struct, frozen=True):
    """What ``status`` reports (``--json`` prints exactly this)."""

    ok: bool
    errors: list[str]
    warnings: list[str]
    epoch: str
    counter: int
    desired: DesiredState | None
    replicas: list[ReplicaView]
    history: list[DesiredState]
    canary: CanaryState | None = None


def assess(
    current: Current,
    replicas: list[ReplicaStatus],
    past: list[DesiredState],
    grace_s: float,
    now: float,
) -> FleetStatus:
    """Compare each replica's applied (epoch, revision) with the desired one."""
    errors: list[str] = []
    warnings: list[str] = []
    doc = current.doc
    if current.problem:
        errors.append(f"the desired-state document is refused: {current.problem}")
    views = []
    for r in replicas:
        in_sync = doc is not None and (r.epoch, r.revision) == (doc.epoch, doc.revision)
        diverged_for = None if doc is None or in_sync else max(0.0, now - doc.updated_at)
        views.append(
            ReplicaView(
                replica=r.replica,
                epoch=r.epoch,
                revision=r.revision,
                versions=dict(r.versions),
                age_s=now - r.updated_at,
                outcome=r.outcome,
                error=r.error,
                rejected=r.rejected,
                last_rejection=r.last_rejection,
                epoch_changes=r.epoch_changes,
                in_sync=in_sync,
                diverged_for_s=diverged_for,
            )
        )
        if diverged_for is not None and doc is not None:
            what = (
                f"replica {r.replica} applied epoch {r.epoch or '-'} revision {r.revision}, "
                f"desired is epoch {doc.epoch or '-'} revision {doc.revision} "
                f"(for {diverged_for:.0f}s)"
                + (f"; last refusal: {r.last_rejection}" if r.last_rejection else "")
                + (f"; last error: {r.error}" if r.error else "")
            )
            (errors if diverged_for > grace_s else warnings).append(what)
        elif r.outcome == "failed" and r.error:
            # In step with the desired state (or none published), yet its last apply failed:
            # it keeps serving what it had, and the reason must not hide in the table.
            errors.append(f"replica {r.replica}: its last apply failed: {r.error}")
    if doc is None and not current.problem:
        stale = [r.replica for r in replicas if r.revision >= 1]
        if stale:
            errors.append(
                f"Redis holds no desired state but replicas {', '.join(stale)} applied one: "
                "Redis lost its data? Publish again (promote/route) to start a new epoch"
            )
    if doc is not None and not replicas:
        warnings.append("no replica reports (none running, or none reaches this Redis)")
    return FleetStatus(
        not errors, errors, warnings, current.epoch, current.revision, doc, views, past
    )


def _print_status(status: FleetStatus, model_uri: str) -> None:
    doc = status.desired
    if doc:
        print(
            f"desired epoch {doc.epoch or '-'} revision {doc.revision}: weights {doc.weights}"
            + (f", shadow {doc.shadow} at {doc.shadow_fraction:g}" if doc.shadow else "")
            + f" ({'signed' if doc.hmac else 'unsigned'}, by {doc.by or '?'}"
            + (f": {doc.reason}" if doc.reason else "")
            + ")"
        )
    else:
        print(f"no desired state published; replicas serve {model_uri}")
    print(
        f"{'replica':36} {'epoch':16} {'rev':>4}  {'versions':20} {'age':>4} {'refused':>7}  state"
    )
    for r in status.replicas:
        versions = ",".join(f"{v}={w:g}" for v, w in r.versions.items())
        state = "in sync" if r.in_sync else "DIVERGED" if r.diverged_for_s else "-"
        print(
            f"{r.replica:36} {r.epoch or '-':16} {r.revision:>4}  {versions:20} "
            f"{r.age_s:>3.0f}s {r.rejected:>7}  {state}"
            + (f" (epoch changes: {r.epoch_changes})" if r.epoch_changes else "")
            + (f"; error: {r.error}" if r.error else "")
        )
    if status.history:
        print("history (newest first):")
        for h in status.history[:10]:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(h.updated_at))
            print(
                f"  {stamp}Z  epoch {h.epoch or '-'} revision {h.revision}: "
                f"{h.weights}  {h.reason or '-'} ({h.by or '?'})"
            )
    if status.canary:
        c = status.canary
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(c.updated_at))
        print(f"canary {c.candidate}: {c.state} at {c.step:g}% ({c.reason}; {stamp}Z)")
    for warning in status.warnings:
        print(f"warning: {warning}")
    for error in status.errors:
        print(f"ERROR: {error}")


async def fleet_status(settings: OperatorSettings, grace_s: float) -> FleetStatus:
    """Read the desired state, the history and every replica's report and assess them."""
    client = redis_client(settings)
    model = settings.registry.model_name()
    try:
        current = await read_current(client, settings.control, model)
        replicas = await fleet(client, settings.control, model)
        past = await history(client, settings.control, model)
        canary = await read_canary(client, settings.control, model)
    finally:
        await client.aclose()
    status = assess(current, replicas, past, grace_s, time.time())
    return msgspec.structs.replace(status, canary=canary)


def cmd_status(args: argparse.Namespace) -> int:
    """Print the desired state, every live replica's applied state and the history.

    Exit code 1 when a replica diverges from the desired state for longer than the grace
    period, or the desired document is refused.
    """
    settings = load_operator_settings()
    grace = args.grace if args.grace is not None else settings.control.divergence_grace_s
    status = asyncio.run(fleet_status(settings, grace))
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(status)).decode())
    else:
        _print_status(status, settings.registry.model_uri)
    return 0 if status.ok else 1
