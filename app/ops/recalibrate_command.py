"""The ``recalibrate`` verb's parser, kept free of numpy so every CLI call stays light.

The work itself lives in :mod:`app.ops.recalibrate`, imported only when the verb runs.
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_LEVELS = "0.5,0.9,0.95"


def _run(args: argparse.Namespace) -> int:
    from app.ops.recalibrate import cmd_recalibrate

    return cmd_recalibrate(args)


def add_recalibrate_command(sub: Any) -> None:
    """Register ``recalibrate`` on the CLI parser."""
    cmd = sub.add_parser(
        "recalibrate", help="fit a covariance scale on field feedback, register a new version"
    )
    cmd.add_argument("version", help="version number or @alias whose feedback is used")
    cmd.add_argument(
        "--min-samples", type=int, default=200, help="fewest joined feedback samples to fit on"
    )
    cmd.add_argument("--source", default=None, help="use only feedback of this source")
    cmd.add_argument("--levels", default=DEFAULT_LEVELS, help="levels to fit, e.g. 0.9")
    cmd.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    cmd.add_argument("--dry-run", action="store_true", help="fit and print, register nothing")
    cmd.set_defaults(func=_run)
