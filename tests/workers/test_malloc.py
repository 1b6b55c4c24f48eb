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


def fresh(script: str, mmap: int, trim: int, **env: str) -> str:
    """Stdout of ``script`` in a new interpreter whose only MALLOC_* variables are ``env``."""
    clean = {k: v for k, v in os.environ.items() if "MALLOC_" not in k}
    return subprocess.run(
        [sys.executable, "-c", script, str(mmap), str(trim)],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def probe(mmap: int, trim: int, **env: str) -> dict[str, dict[str, str]]:
    result: dict[str, dict[str, str]] = json.loads(fresh(PROBE, mmap, trim, **env))
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
    result = probe(0, 64 << 20, MALLOC_MMAP_THRESHOLD_="4194304")
    assert result["applied"] == {"MALLOC_TRIM_THRESHOLD_": 64 << 20}


FAULTS = """
import json, resource, sys
from workers import malloc
malloc.tune(int(sys.argv[1]), int(sys.argv[2]))
def churn(n):
    for _ in range(n):
        buffer = b"x" * 300_000  # a request-sized buffer, every page written
        del buffer
churn(20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn(200)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 200)
"""


@pytest.mark.parametrize(
    ("mmap", "trim"), [(0, 0), (8 << 20, 64 << 20), (0, 64 << 20)], ids=["glibc", "both", "trim"]
)
def test_request_sized_buffers_are_reused_without_page_faults(mmap: int, trim: int) -> None:
    # glibc freezes its dynamic mmap threshold at 128 KiB once the trim threshold is set:
    # setting the trim threshold alone (mmap 0) would fault in all 74 pages of every buffer.
    faults = fresh(FAULTS, mmap, trim)
    assert float(faults) < 5, f"{faults.strip()} minor page faults per 300 kB buffer"


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
        # Set by `serve` before Granian loaded: the HTTP process's jemalloc read it too.
        assert any(v.startswith(b"_RJEM_MALLOC_CONF=background_thread:true") for v in environ)


JEMALLOC = """
import json, os, sys
from workers import malloc
set_ = malloc.granian_decay(int(sys.argv[1]))
print(json.dumps([set_, os.environ.get("_RJEM_MALLOC_CONF")]))
"""


def test_granian_jemalloc_returns_memory_unless_the_operator_configured_it() -> None:
    set_, conf = json.loads(fresh(JEMALLOC, 1000, 0))
    assert set_ is True
    assert conf == ("background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,narenas:1")
    assert json.loads(fresh(JEMALLOC, 0, 0)) == [False, None]
    assert json.loads(fresh(JEMALLOC, 1000, 0, _RJEM_MALLOC_CONF="narenas:2")) == [
        False,
        "narenas:2",
    ]
