"""``register``: an ONNX-flavor version with its spec, always new unless --reuse, served after
``promote``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from tests.support.procs import ROOT, Server
from training.simulate import heard_batch, request_payload

REFERENCE = ROOT / "training" / "reference"


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_registered_onnx_flavor_versions_are_new_and_served_after_promote(
    tmp_path: Path, redis_url: str, start_server: Callable[..., Server]
) -> None:
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "HEIMDALL_ARTIFACT_CACHE": str(tmp_path / "artifacts"),
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"r{uuid.uuid4().hex[:8]}",
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "2",
        "HEIMDALL_POOL_WORKERS": "1",
    }
    first = cli(
        env,
        "register",
        str(REFERENCE / "model.onnx"),
        "--spec",
        str(REFERENCE / "model_spec.json"),
        "--alias",
        "production",
    )
    assert "registered rf-localizer version 1 " in first
    assert "registered rf-localizer version 2 " in cli(env, "register", str(REFERENCE))
    assert "reused rf-localizer version 1 " in cli(env, "register", str(REFERENCE), "--reuse")

    # The artifacts are an MLflow model in the onnx flavor's layout, with the spec beside it.
    mlmodels = sorted((tmp_path / "mlartifacts").glob("*/artifacts/model/MLmodel"))
    assert len(mlmodels) == 2  # one run per new version; --reuse logged nothing
    mlmodel = mlmodels[0]
    doc = yaml.safe_load(mlmodel.read_text())
    assert doc["flavors"]["onnx"]["data"] == "model.onnx"
    assert doc["flavors"]["python_function"]["loader_module"] == "mlflow.onnx"
    inputs = json.loads(doc["signature"]["inputs"])
    assert [i["name"] for i in inputs] == ["features", "receivers", "mask"]
    assert inputs[0]["tensor-spec"]["shape"][0] == -1
    assert (mlmodel.parent / "model_spec.json").read_bytes() == (
        REFERENCE / "model_spec.json"
    ).read_bytes()

    server = start_server(**env)
    body = request_payload(heard_batch(1, 31), 0)
    answer = httpx.post(server.url + "/v1/predict", json=body, timeout=30)
    assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
    assert "rf-localizer@production -> version 2" in cli(env, "promote", "2")
    deadline = time.monotonic() + 30
    version = "1"
    while time.monotonic() < deadline and version != "2":
        time.sleep(0.2)
        answer = httpx.post(server.url + "/v1/predict", json=body, timeout=30)
        version = answer.json()["model"]["version"]
    assert version == "2", answer.text[:300]
