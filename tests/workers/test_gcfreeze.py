"""Start-up objects leave the cyclic collector's walk (workers/gcfreeze.py), once per process."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.procs import ROOT

PROBE = """
import gc, json
import app.factory, mlflow.tracking, onnxruntime  # what a serving process holds at start
from workers.gcfreeze import freeze_startup_objects
walked_before = len(gc.get_objects())
frozen = freeze_startup_objects("probe")
walked_after = len(gc.get_objects())
again = freeze_startup_objects("probe")
print(json.dumps([walked_before, frozen, walked_after, again, gc.isenabled()]))
"""


def test_a_full_collection_no_longer_walks_the_start_up_objects() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    walked_before, frozen, walked_after, again, enabled = json.loads(out)
    assert walked_before > 100_000  # the imports alone: what each full collection walked
    assert frozen >= walked_before * 0.9
    assert walked_after < 1_000
    assert again == 0  # once per process: a later call freezes nothing (no frozen garbage)
    assert enabled  # the collector still runs for objects made while serving
