"""glibc malloc thresholds (workers/malloc.py) in fresh interpreters, and on a served replica."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.procs import ROOT, Server

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = """
import json, os, sys
from workers import malloc
applied = malloc.tune(int(sys.argv[1]), int(sys.argv[2]))
print(json.dumps({"applied": applied,
                  "env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}))
"""


def probe(mmap: int, trim: int, **env: str) -> dict[str, dict[str, str]]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(mmap), str(trim)],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, dict[str, str]] = json.loads(out.stdout)
    return result


def test_thresholds_are_applied_and_exported_for_child_processes() -> None:
    result = probe(8 << 20, 64 << 20)
    assert result["applied"] == {
        "MALLOC_MMAP_THRESHOLD_": 8 << 20,
        "MALLOC_TRIM_THRESHOLD_": 64 << 20,
    }
    assert result["env"] == {
        "MALLOC_MMAP_THRESHOLD_": str(8 << 20),
        "MALLOC_TRIM_THRESHOLD_": str(64 << 20),
    }


def test_zero_and_operator_settings_are_left_alone() -> None:
    result = probe(0, 64 << 20, MALLOC_TRIM_THRESHOLD_="1048576")
    assert result["applied"] == {}
    assert result["env"] == {"MALLOC_TRIM_THRESHOLD_": "1048576"}


def test_served_replica_runs_its_pool_workers_with_the_thresholds(
    shared_server: Server,
) -> None:
    models = httpx.get(shared_server.url + "/v1/models", timeout=10).json()
    pids = [w["pid"] for w in models["pool"]["workers"]]
    assert pids
    for pid in pids:  # spawned interpreters: glibc read these when the process started
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"MALLOC_MMAP_THRESHOLD_=8388608" in environ
        assert b"MALLOC_TRIM_THRESHOLD_=67108864" in environ
