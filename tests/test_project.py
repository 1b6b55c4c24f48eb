"""Project hygiene a user notices: what `make run` installs, LICENSE, CHANGELOG, py.typed."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dry_run(target: str, tmp_path: Path) -> str:
    """The commands ``make TARGET`` would run for a fresh clone (no venv yet)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(
        ["make", "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


def test_make_run_installs_only_the_runtime_lock(tmp_path: Path) -> None:
    commands = _dry_run("run", tmp_path)
    assert "-r requirements-runtime.lock" in commands
    assert "-r requirements.lock" not in commands
    assert "heimdall-inference serve" in commands


def test_make_test_installs_the_dev_lock(tmp_path: Path) -> None:
    commands = _dry_run("test", tmp_path)
    assert "-r requirements.lock" in commands


def _pins(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)", text, re.M))


def test_runtime_lock_is_the_dev_lock_minus_dev_tools() -> None:
    runtime, dev = _pins("requirements-runtime.lock"), _pins("requirements.lock")
    assert runtime, "no pins in requirements-runtime.lock"
    differing = {name: (v, dev.get(name)) for name, v in runtime.items() if dev.get(name) != v}
    assert not differing, f"runtime pins missing from or different in the dev lock: {differing}"
    for tool in ("mypy", "ruff", "pytest", "scipy", "schemathesis", "k6"):
        assert tool not in runtime


def test_license_is_the_apache_license_pyproject_declares() -> None:
    assert PYPROJECT["project"]["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text


def test_changelog_has_an_unreleased_section_and_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in text
    assert f"## [{PYPROJECT['project']['version']}]" in text


def test_typed_packages_ship_py_typed() -> None:
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    for package in PYPROJECT["tool"]["mypy"]["files"]:
        assert (ROOT / package / "py.typed").is_file(), package
        assert "py.typed" in package_data.get(package, []), package
