"""Operator verbs (promote, route, shadow, status) — filled in by the rollout work."""

from __future__ import annotations

import argparse
from typing import Any


def add_operator_commands(sub: Any) -> None:
    """Register operator sub-commands on the CLI parser."""
    del sub
    _ = argparse
