"""The shape of the code (issue 22): small modules, and layers that only import downwards.

The layering itself is checked by import-linter (contracts in pyproject.toml, run by
``make lint``); these tests keep that check honest and bound the size of every module.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("app", "workers", "telemetry", "training")
MAX_LINES = 400


def test_no_module_is_longer_than_one_person_holds_in_mind() -> None:
    too_long = {
        str(path.relative_to(ROOT)): n
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines: {too_long}"


def _lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    tool = Path(sys.executable).with_name("lint-imports")
    if not tool.exists():
        pytest.skip("import-linter is not installed (dev lock)")
    return subprocess.run(
        [str(tool), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_layer_contracts_hold_and_would_catch_an_upward_import(tmp_path: Path) -> None:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    kept = _lint_imports(tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr

    # A worker module that reaches up into the HTTP layer, and telemetry importing Litestar.
    geo = tmp_path / "workers" / "geo.py"
    geo.write_text(geo.read_text() + "\nimport app.web.routes  # noqa\n")
    logs = tmp_path / "telemetry" / "logs.py"
    logs.write_text(logs.read_text() + "\nimport litestar  # noqa\n")
    broken = _lint_imports(tmp_path)
    assert broken.returncode != 0
    assert "workers.geo -> app.web.routes" in broken.stdout
    assert "telemetry.logs -> litestar" in broken.stdout
