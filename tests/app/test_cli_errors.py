"""Every CLI verb's error paths: one line on stderr, no traceback, a documented exit code."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.ops import cli

ROOT = Path(__file__).resolve().parents[2]
DOWN_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1

# (verb and arguments, extra environment, exit code, text stderr must hold)
CASES: list[tuple[str, dict[str, str], int, str]] = [
    ("promote 99", {}, cli.EXIT_NOT_FOUND, "'99' is not in the registry"),
    ("promote x", {}, cli.EXIT_USAGE, "VERSION must be a version number"),
    ("route 3=x", {}, cli.EXIT_USAGE, "expected VERSION=WEIGHT"),
    ("route 1=0", {}, cli.EXIT_USAGE, "at least one weight must be > 0"),
    # nan and inf were published as null (every replica refused the document); 1e308 twice
    # summed to inf (all traffic to the last version)
    ("route 1=nan", {}, cli.EXIT_USAGE, "a number from 0 to 1e+09"),
    ("route 1=inf", {}, cli.EXIT_USAGE, "a number from 0 to 1e+09"),
    ("route 1=1e308 @production=1e308", {}, cli.EXIT_USAGE, "a number from 0 to 1e+09"),
    ("route 1=1_0", {}, cli.EXIT_USAGE, "a number from 0 to 1e+09"),
    ("route 1=-0.0", {}, cli.EXIT_USAGE, "a number from 0 to 1e+09"),
    ("route 99=1", {}, cli.EXIT_NOT_FOUND, "'99' is not in the registry"),
    ("route @nope=1", {}, cli.EXIT_NOT_FOUND, "'@nope' is not in the registry"),
    ("route models:/other@production=1", {}, cli.EXIT_USAGE, "names model 'other'"),
    ("route 1=1", {}, cli.EXIT_UNAVAILABLE, "Redis: Error"),
    # Redis away: refused before the alias moves (it moved, printed "@forced -> version 1",
    # and replicas followed it although the command failed)
    ("promote 1 --alias forced --force", {}, cli.EXIT_UNAVAILABLE, "Redis: Error"),
    ("shadow", {}, cli.EXIT_USAGE, "give a VERSION or --off"),
    ("shadow 99", {}, cli.EXIT_NOT_FOUND, "'99' is not in the registry"),
    ("shadow 1 --fraction 2", {}, cli.EXIT_USAGE, "--fraction must be within [0, 1]"),
    ("canary 99", {}, cli.EXIT_NOT_FOUND, "'99' is not in the registry"),
    ("status", {}, cli.EXIT_UNAVAILABLE, "Redis: Error"),
    ("status", {"REDIS_URL": ""}, cli.EXIT_USAGE, "REDIS_URL is empty"),
    (
        "promote 1",
        {"MLFLOW_TRACKING_URI": "http://127.0.0.1:1"},
        cli.EXIT_UNAVAILABLE,
        "tracking server unreachable",
    ),
    (
        "route 1=1",
        {"MLFLOW_TRACKING_URI": "bogus://registry"},
        cli.EXIT_USAGE,
        "unsupported registry URI scheme 'bogus'",
    ),
    ("bootstrap --package /nonexistent", {}, cli.EXIT_FAILED, "No such file or directory"),
    ("register /nonexistent", {}, cli.EXIT_USAGE, "no model file at /nonexistent "),
    (
        f"register {ROOT / 'training/reference'} --spec {ROOT / 'pyproject.toml'}",
        {},
        cli.EXIT_USAGE,
        "spec",
    ),
    ("simulate --count 0", {}, cli.EXIT_USAGE, "--count must be >= 1"),
    ("serve", {"HEIMDALL_PORT": "eighty"}, cli.EXIT_USAGE, "HEIMDALL_PORT"),
    ("route", {}, cli.EXIT_USAGE, "the following arguments are required"),
    ("nonsense", {}, cli.EXIT_USAGE, "invalid choice"),
]


@pytest.mark.parametrize(("command", "env", "code", "needle"), CASES, ids=[c[0] for c in CASES])
def test_error_paths_exit_non_zero_with_one_line(
    registry_env: dict[str, str],
    tmp_path: Path,
    command: str,
    env: dict[str, str],
    code: int,
    needle: str,
) -> None:
    full_env = {
        **os.environ,
        **registry_env,
        "REDIS_URL": DOWN_REDIS,
        "HEIMDALL_ARTIFACT_CACHE": str(tmp_path / "artifacts"),
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-m", "app.ops.cli", *command.split()],
        env=full_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    if "invalid choice" in needle or "required" in needle:
        lines = lines[-1:]  # argparse prints its usage first, then one error line
    assert len(lines) == 1, done.stderr
    assert needle in lines[0], done.stderr
    assert lines[0].startswith("heimdall-inference")
    assert done.stdout == ""


def test_version_flag_prints_the_package_version() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "app.ops.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == f"heimdall-inference {cli.package_version()}"
    assert cli.package_version()[0].isdigit()


def test_every_option_of_every_verb_has_help() -> None:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    assert len(subparsers.choices) >= 9
    for verb, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{verb} {action.option_strings or action.dest}")
    assert not missing, f"options without help text: {missing}"
    help_text = cli.build_parser().format_help()
    assert "Exit codes" in help_text
