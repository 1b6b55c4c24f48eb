"""Operator verbs: promote, route, shadow, status (publish to and read the control plane)."""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from app.control_plane import fleet, publish, read_desired
from app.settings import Settings, load_settings


def _client(settings: Settings) -> Any:
    import redis.asyncio as aioredis

    if not settings.cache.redis_url:
        raise SystemExit("REDIS_URL is empty: the control plane needs Redis")
    return aioredis.from_url(settings.cache.redis_url, socket_timeout=5)


async def _publish(
    settings: Settings,
    weights: dict[str, float] | None,
    shadow: str | bool | None,
    fraction: float | None,
) -> None:
    client = _client(settings)
    model = settings.registry.model_name()
    try:
        current = await read_desired(client, settings.control, model)
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
        doc = await publish(client, settings.control, model, new_weights, new_shadow, new_fraction)
        print(
            f"published revision {doc.revision}: weights {doc.weights}"
            + (f", shadow {doc.shadow} at {doc.shadow_fraction:g}" if doc.shadow else "")
        )
    finally:
        await client.aclose()


def cmd_promote(args: argparse.Namespace) -> int:
    """Point the alias at VERSION in MLflow and route all traffic to the alias."""
    from workers.registry import ModelRegistry

    settings = load_settings()
    registry = ModelRegistry(settings.registry)
    name = settings.registry.model_name()
    registry.resolve(str(args.version))  # fails clearly when the version does not exist
    registry.set_alias(name, args.alias, str(args.version))
    print(f"{name}@{args.alias} -> version {args.version}")
    asyncio.run(_publish(settings, {f"@{args.alias}": 1.0}, None, None))
    return 0


def cmd_route(args: argparse.Namespace) -> int:
    """Publish routing weights, e.g. ``route 3=0.9 4=0.1``."""
    weights: dict[str, float] = {}
    for part in args.weights:
        ref, _, weight = part.partition("=")
        if not ref or not weight:
            raise SystemExit(f"expected VERSION=WEIGHT, got {part!r}")
        weights[ref] = float(weight)
    asyncio.run(_publish(load_settings(), weights, None, None))
    return 0


def cmd_shadow(args: argparse.Namespace) -> int:
    """Publish a shadow version (``--off`` removes it)."""
    shadow: str | bool = False if args.off else str(args.version)
    if not args.off and not args.version:
        raise SystemExit("give a VERSION or --off")
    asyncio.run(_publish(load_settings(), None, shadow, args.fraction))
    return 0


async def _status(settings: Settings) -> None:
    client = _client(settings)
    model = settings.registry.model_name()
    try:
        desired = await read_desired(client, settings.control, model)
        replicas = await fleet(client, settings.control, model)
    finally:
        await client.aclose()
    if desired:
        print(
            f"desired revision {desired.revision}: weights {desired.weights}"
            + (
                f", shadow {desired.shadow} at {desired.shadow_fraction:g}"
                if desired.shadow
                else ""
            )
        )
    else:
        print(f"no desired state published; replicas serve {settings.registry.model_uri}")
    print(f"{'replica':40} {'revision':>8}  {'versions':24} {'age':>5}  last error")
    now = time.time()
    for r in replicas:
        versions = ",".join(f"{v}={w:g}" for v, w in r.versions.items())
        print(
            f"{r.replica:40} {r.revision:>8}  {versions:24} {now - r.updated_at:>4.0f}s  "
            f"{r.error or '-'}"
        )


def cmd_status(_: argparse.Namespace) -> int:
    """Print the desired state and every live replica's applied state."""
    asyncio.run(_status(load_settings()))
    return 0


def add_operator_commands(sub: Any) -> None:
    """Register operator sub-commands on the CLI parser."""
    promote = sub.add_parser("promote", help="set the MLflow alias to VERSION and publish")
    promote.add_argument("version")
    promote.add_argument("--alias", default="production")
    promote.set_defaults(func=cmd_promote)
    route = sub.add_parser("route", help="publish routing weights: VERSION=WEIGHT ...")
    route.add_argument("weights", nargs="+")
    route.set_defaults(func=cmd_route)
    shadow = sub.add_parser("shadow", help="publish a shadow version")
    shadow.add_argument("version", nargs="?")
    shadow.add_argument("--fraction", type=float, default=None)
    shadow.add_argument("--off", action="store_true")
    shadow.set_defaults(func=cmd_shadow)
    status = sub.add_parser("status", help="fleet table: replica, revision, versions, error")
    status.set_defaults(func=cmd_status)
