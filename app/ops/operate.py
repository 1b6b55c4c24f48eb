"""The operator verbs' parsers: promote, route, shadow, canary and status.

The verbs live in :mod:`app.ops.publish` (those that publish a desired state) and
:mod:`app.ops.status` (the fleet's state). Only :mod:`app.control.protocol` (msgspec, redis)
is needed by ``route``, ``shadow`` and ``status``; the registry (MLflow) is imported by
``promote`` alone.
"""

from __future__ import annotations

import argparse
from typing import Any

from app.ops.publish import cmd_canary, cmd_promote, cmd_route, cmd_shadow
from app.ops.status import cmd_status


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


def _publisher_flags(parser: Any) -> None:
    parser.add_argument(
        "--force",
        action="store_true",
        help="publish even when the fleet is signed and this has no secret, or while a canary "
        "runs (the canary then stops, leaving this state)",
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
