"""Operator verbs: promote, route, shadow, status (publish to and read the control plane).

Only :mod:`app.control.protocol` (msgspec, redis) is needed by ``route``, ``shadow`` and
``status``; the registry (MLflow) is imported by ``promote`` alone.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import msgspec

from app.control.canary import CanaryState, read_canary
from app.control.protocol import (
    Current,
    DesiredState,
    ReplicaStatus,
    fleet,
    history,
    proposed,
    publish_change,
    read_current,
)
from app.registry.rest import RestAliases, is_remote
from app.settings import OperatorSettings, load_operator_settings


class UsageError(ValueError):
    """The command line is wrong (exit code 2, like argparse's own usage errors)."""


def _client(settings: OperatorSettings) -> Any:
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


async def _publish(
    settings: OperatorSettings,
    weights: dict[str, float] | None,
    shadow: str | bool | None,
    fraction: float | None,
    *,
    reason: str,
    force: bool = False,
    start_epoch: bool = False,
) -> None:
    client = _client(settings)
    model = settings.registry.model_name()
    control = settings.control
    try:
        if not control.hmac_secret and not force:
            refusal = unsigned_refusal(
                await read_current(client, control, model), await fleet(client, control, model)
            )
            if refusal:
                raise SystemExit(refusal)

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
    """Point ``alias`` at ``version`` after checking it exists.

    A tracking server is spoken to over REST (no MLflow import: seconds saved); a local
    sqlite registry goes through MLflow.

    Raises:
        ServiceError: the version does not exist (NotFound) or the registry failed.
    """
    name = settings.registry.model_name()
    if is_remote(settings.registry.tracking_uri):
        rest = RestAliases(settings.registry.tracking_uri)
        rest.check_version(name, version)
        rest.set_alias(name, alias, version)
        return
    from app.registry.client import ModelRegistry

    registry = ModelRegistry(settings.registry)
    registry.resolve(version)  # fails clearly when the version does not exist
    registry.set_alias(name, alias, version)


def check_refs(settings: OperatorSettings, refs: list[str]) -> None:
    """Check that every version or alias in ``refs`` exists in the registry before publishing.

    A desired state naming a version the registry lacks can never be applied: every replica
    would keep failing to load it. A tracking server is asked over REST (no MLflow import).

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
    if is_remote(settings.registry.tracking_uri):
        rest = RestAliases(settings.registry.tracking_uri)
        for _, version, alias in parsed:
            if version is not None:
                rest.check_version(name, version)
            else:
                rest.check_alias(name, str(alias))
        return
    from app.registry.client import ModelRegistry

    registry = ModelRegistry(settings.registry)
    for ref, _, _ in parsed:
        registry.resolve(ref)


def cmd_promote(args: argparse.Namespace) -> int:
    """Point the alias at VERSION in MLflow and route all traffic to the alias."""
    settings = load_operator_settings()
    name = settings.registry.model_name()
    if not str(args.version).isdigit():
        raise UsageError(f"VERSION must be a version number, got {args.version!r}")
    set_alias(settings, args.alias, str(args.version))
    print(f"{name}@{args.alias} -> version {args.version}")
    asyncio.run(
        _publish(
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


def cmd_route(args: argparse.Namespace) -> int:
    """Publish routing weights, e.g. ``route 3=0.9 4=0.1``."""
    weights: dict[str, float] = {}
    for part in args.weights:
        ref, _, weight = part.partition("=")
        try:
            weights[ref] = float(weight)
        except ValueError:
            ref = ""
        if not ref or weights[ref] < 0:
            raise UsageError(f"expected VERSION=WEIGHT (a number >= 0), got {part!r}")
    if not any(weights.values()):
        raise UsageError("at least one weight must be > 0")
    settings = load_operator_settings()
    if not args.no_check:
        check_refs(settings, list(weights))
    asyncio.run(
        _publish(
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
        _publish(
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
    client = _client(settings)
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


def duration_s(text: str) -> float:
    """``60s``, ``2m``, ``500ms`` or a number of seconds."""
    for suffix, factor in (("ms", 1e-3), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
            return float(text[: -len(suffix)]) * factor
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (e.g. 60s, 2m)") from None


def steps_pct(text: str) -> list[float]:
    """``5,25,50,100``: increasing percentages ending at 100."""
    try:
        steps = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of percentages: {text!r}") from None
    if not steps or steps != sorted(set(steps)) or steps[0] <= 0 or steps[-1] != 100:
        raise argparse.ArgumentTypeError("steps must increase and end at 100, e.g. 5,25,50,100")
    return steps


def cmd_canary(args: argparse.Namespace) -> int:
    """Raise VERSION's weight step by step; roll back by itself on a breach (exit 1)."""
    from app.control.canary import Canary, Gates, LockHeld

    settings = load_operator_settings()
    if not args.no_check:
        check_refs(settings, [str(args.version)])
    gates = Gates(
        args.max_error_rate_delta, args.max_p99_ratio, args.max_shadow_m, args.min_requests
    )

    async def run() -> bool:
        client = _client(settings)
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
                str(args.version),
                args.steps,
                args.interval,
                gates,
            )
            return await canary.run()
        finally:
            await client.aclose()

    try:
        return 0 if asyncio.run(run()) else 1
    except LockHeld as exc:
        raise SystemExit(str(exc)) from exc


def _publisher_flags(parser: Any) -> None:
    parser.add_argument(
        "--force", action="store_true", help="publish unsigned even when the fleet is signed"
    )
    parser.add_argument(
        "--new-epoch",
        action="store_true",
        help="start a new epoch (revision 1) instead of the next revision of the current one",
    )


def _check_flag(parser: Any) -> None:
    parser.add_argument(
        "--no-check",
        action="store_true",
        help="publish without checking that the versions exist in the registry",
    )


def add_operator_commands(sub: Any) -> None:
    """Register operator sub-commands on the CLI parser."""
    promote = sub.add_parser("promote", help="set the MLflow alias to VERSION and publish")
    promote.add_argument("version", help="registered version number to promote, e.g. 3")
    promote.add_argument(
        "--alias", default="production", help="alias to point at VERSION (default: production)"
    )
    _publisher_flags(promote)
    promote.set_defaults(func=cmd_promote)
    route = sub.add_parser("route", help="publish routing weights: VERSION=WEIGHT ...")
    route.add_argument(
        "weights",
        nargs="+",
        metavar="VERSION=WEIGHT",
        help="a version number or @alias and its relative weight, e.g. 3=0.9 4=0.1",
    )
    _publisher_flags(route)
    _check_flag(route)
    route.set_defaults(func=cmd_route)
    shadow = sub.add_parser("shadow", help="publish a shadow version")
    shadow.add_argument(
        "version", nargs="?", help="version number or @alias that mirrors a sample of traffic"
    )
    shadow.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="share of requests also sent to the shadow, 0-1 (default 0.1)",
    )
    shadow.add_argument("--off", action="store_true", help="remove the shadow version")
    _publisher_flags(shadow)
    _check_flag(shadow)
    shadow.set_defaults(func=cmd_shadow)
    canary = sub.add_parser(
        "canary", help="raise VERSION step by step under gates; roll back on a breach"
    )
    canary.add_argument("version", help="candidate version number or @alias")
    canary.add_argument(
        "--steps",
        type=steps_pct,
        default=[5.0, 25.0, 50.0, 100.0],
        help="increasing traffic percentages ending at 100 (default 5,25,50,100)",
    )
    canary.add_argument(
        "--interval", type=duration_s, default=60.0, help="time per step, e.g. 60s or 2m (60s)"
    )
    canary.add_argument(
        "--max-error-rate-delta",
        type=float,
        default=0.01,
        help="largest error-rate increase over the current version before rollback (0.01)",
    )
    canary.add_argument(
        "--max-p99-ratio",
        type=float,
        default=1.5,
        help="largest p99 latency ratio candidate/current before rollback (1.5)",
    )
    canary.add_argument(
        "--max-shadow-m",
        type=float,
        default=None,
        help="largest shadow disagreement p95 in metres before rollback (off by default)",
    )
    canary.add_argument(
        "--min-requests",
        type=int,
        default=20,
        help="candidate requests a window needs before it is judged (20)",
    )
    canary.add_argument("--force", action="store_true", help="publish unsigned to a signed fleet")
    _check_flag(canary)
    canary.set_defaults(func=cmd_canary)
    status = sub.add_parser(
        "status", help="fleet: desired vs applied per replica, history; exit 1 on divergence"
    )
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument(
        "--grace",
        type=float,
        default=None,
        help="seconds a replica may differ from the desired state before it is an error "
        "(default HEIMDALL_CONTROL_DIVERGENCE_GRACE_S)",
    )
    status.set_defaults(func=cmd_status)
