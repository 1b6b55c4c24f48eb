"""``register``: an ONNX-flavor version with its spec, always new unless --reuse, served after
``promote``."""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

from tests.support.procs import ROOT, Server, run_cli
from training.simulate import heard_batch, request_payload

REFERENCE = ROOT / "training" / "reference"


def cli(env: dict[str, str], *args: str) -> str:
    return run_cli(env, *args, check=True).stdout


def server_env(tmp_path: Path, redis_url: str, namespace: str) -> dict[str, str]:
    """A private sqlite registry, artifact cache and control namespace for one test."""
    return {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "HEIMDALL_ARTIFACT_CACHE": str(tmp_path / "artifacts"),
        "REDIS_URL": redis_url,
        "HEIMDALL_CONTROL_NAMESPACE": f"{namespace}{uuid.uuid4().hex[:8]}",
        "HEIMDALL_CONTROL_POLL_INTERVAL_S": "2",
        "HEIMDALL_POOL_WORKERS": "1",
    }


def test_registered_onnx_flavor_versions_are_new_and_served_after_promote(
    tmp_path: Path, redis_url: str, start_server: Callable[..., Server]
) -> None:
    env = server_env(tmp_path, redis_url, "r")
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


def log_with_mlflow_onnx(tracking_uri: str, folder: Path) -> str:
    """A model author's usual way: ``mlflow.onnx.log_model(..., registered_model_name=...)``
    and ``mlflow.log_artifact(spec)`` in a run; no heimdall tags. Its version number."""
    import mlflow
    import mlflow.onnx
    import onnx

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    experiment = mlflow.create_experiment(
        "author", artifact_location=(folder / "author-artifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment):
        info = mlflow.onnx.log_model(
            onnx.load(str(REFERENCE / "model.onnx")),
            name="model",
            registered_model_name="rf-localizer",
        )
        mlflow.log_artifact(str(REFERENCE / "model_spec.json"))
    version = info.registered_model_version
    assert version is not None
    mv = mlflow.MlflowClient().get_model_version("rf-localizer", str(version))
    assert not mv.tags
    return str(version)


def test_a_version_logged_the_usual_mlflow_way_is_served_after_promote(
    tmp_path: Path, redis_url: str, start_server: Callable[..., Server]
) -> None:
    env = server_env(tmp_path, redis_url, "u")
    cli(env, "register", str(REFERENCE), "--alias", "production")
    version = log_with_mlflow_onnx(env["MLFLOW_TRACKING_URI"], tmp_path)
    assert version == "2"
    server = start_server(**env)
    body = request_payload(heard_batch(1, 32), 0)
    cli(env, "promote", version)
    deadline = time.monotonic() + 30
    served = "1"
    while time.monotonic() < deadline and served != version:
        time.sleep(0.2)
        served = httpx.post(server.url + "/v1/predict", json=body, timeout=30).json()["model"][
            "version"
        ]
    assert served == version, server.log_path.read_text()[-3000:]
    detail = httpx.get(server.url + f"/v1/models/{version}", timeout=10).json()
    assert len(detail["sha256"]) == 64  # pinned from the download
    assert "has no heimdall.model_sha256 tag" in server.log_path.read_text()
    # Its digest comes from the download, not a tag: a later convergence (SIGHUP re-resolves)
    # and a rollout that keeps it must not take it for another model (a fourth review found
    # every later apply refused).
    server.signal(signal.SIGHUP)
    cli(env, "route", f"{version}=0.5", "1=0.5")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        models = httpx.get(server.url + "/v1/models", timeout=10).json()
        if models["routing"]["weights"] == {version: 0.5, "1": 0.5}:
            break
        time.sleep(0.2)
    assert models["routing"]["weights"] == {version: 0.5, "1": 0.5}, models["rollout"]
    assert models["rollout"]["last_outcome"] == "applied", models["rollout"]


def test_an_untagged_version_that_is_not_an_onnx_flavor_model_is_refused(tmp_path: Path) -> None:
    import pytest
    from mlflow.tracking import MlflowClient

    from app.registry.client import ModelRegistry, RegistrySettings
    from workers.errors import ModelLoadError

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    registry = ModelRegistry(
        RegistrySettings(tracking_uri=uri, artifact_cache=str(tmp_path / "cache"))
    )
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("bare", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(REFERENCE), artifact_path="package")
    client.create_registered_model("rf-localizer")
    client.create_model_version(
        "rf-localizer", source=f"{run.info.artifact_uri}/package", run_id=run.info.run_id
    )
    with pytest.raises(ModelLoadError, match="not an MLflow model in the onnx flavor"):
        registry.fetch(registry.resolve("1"))
