"""Register a model the way MLflow users expect: an ONNX-flavor model version with its spec.

``heimdall-inference register`` calls :func:`register_onnx`; ``bootstrap``, the embedded
registry's reference model and ``recalibrate`` call :func:`register_package`, which logs a
package directory as it is. The version's artifacts are an
MLflow model directory in the ``onnx`` flavor's layout (``MLmodel`` with the ``onnx`` and
``python_function`` flavors and a tensor signature, ``model.onnx``) plus ``model_spec.json``
next to them, and the version carries the sha256 and spec-hash tags the server verifies.
``mlflow.onnx.log_model`` itself needs pandas (and ``onnx``), which the runtime lock does not
carry (mlflow-skinny), so the ``MLmodel`` file is written here in the flavor's format; MLflow's
tools (``mlflow.onnx.load_model``, ``mlflow.pyfunc``, the UI) read it as they read their own.
"""

from __future__ import annotations

import platform
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from app.registry.client import ModelRegistry
from app.registry.package import MODEL_FILE, SHA256_TAG, SPEC_FILE, SPEC_HASH_TAG
from workers.spec import decode_spec, sha256_file, spec_hash

EXPERIMENT = "heimdall-models"
"""Experiment that holds the runs ``register`` creates."""

_NUMPY_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class Registered:
    """What :func:`register_onnx` did."""

    version: str
    reused: bool
    run_id: str
    sha256: str


def _signature(model_path: Path) -> dict[str, str]:
    """The MLflow tensor signature of the ONNX graph (``MLmodel``'s ``signature``)."""
    import json

    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])

    def specs(args: list[Any]) -> str:
        return json.dumps(
            [
                {
                    "type": "tensor",
                    "tensor-spec": {
                        "dtype": _NUMPY_TYPES.get(a.type, "float32"),
                        "shape": [d if isinstance(d, int) else -1 for d in a.shape],
                    },
                    "name": a.name,
                }
                for a in args
            ]
        )

    return {"inputs": specs(session.get_inputs()), "outputs": specs(session.get_outputs())}


def _mlmodel(run_id: str, model_path: Path) -> str:
    """``MLmodel`` in the layout ``mlflow.onnx.log_model`` writes."""
    import yaml

    try:
        onnx_version: str | None = version("onnx")
    except PackageNotFoundError:
        onnx_version = None
    doc = {
        "artifact_path": "model",
        "flavors": {
            "onnx": {
                "code": None,
                "data": MODEL_FILE,
                "onnx_version": onnx_version,
                "providers": ["CPUExecutionProvider"],
            },
            "python_function": {
                "data": MODEL_FILE,
                "env": {"conda": "conda.yaml", "virtualenv": "python_env.yaml"},
                "loader_module": "mlflow.onnx",
                "python_version": platform.python_version(),
            },
        },
        "mlflow_version": version("mlflow-skinny"),
        "model_uuid": uuid.uuid4().hex,
        "run_id": run_id,
        "signature": _signature(model_path),
        "utc_time_created": time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime()),
    }
    return str(yaml.safe_dump(doc, sort_keys=False))


def artifact_root(registry: ModelRegistry) -> str | None:
    """Where a new experiment keeps its artifacts: beside an embedded sqlite registry.

    None lets a tracking server decide (proxied artifacts).
    """
    if registry.tracking_uri.startswith("sqlite:///"):
        root = Path(registry.tracking_uri[len("sqlite:///") :]).parent / "mlartifacts"
        root.mkdir(parents=True, exist_ok=True)
        return root.as_uri()
    return None


def register_package(
    registry: ModelRegistry, package_dir: Path, name: str, alias: str | None = "production"
) -> str:
    """Register a package directory as a new version (idempotent).

    A version whose sha256 and spec-hash tags equal the package's is reused; ``alias`` is
    pointed at it. Returns the version number.
    """
    model = package_dir / MODEL_FILE
    digest = sha256_file(model)
    raw = (package_dir / SPEC_FILE).read_bytes()
    feature_version = spec_hash(raw)
    client = registry.client
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Radio-transmitter localizer")
    existing = [
        mv
        for mv in client.search_model_versions(f"name='{name}'")
        if (mv.tags or {}).get(SHA256_TAG) == digest
        and (mv.tags or {}).get(SPEC_HASH_TAG) == feature_version
    ]
    if existing:
        version = str(min(int(mv.version) for mv in existing))
    else:
        experiment = client.get_experiment_by_name("heimdall-packages")
        experiment_id = (
            experiment.experiment_id
            if experiment
            else client.create_experiment(
                "heimdall-packages", artifact_location=artifact_root(registry)
            )
        )
        run = client.create_run(experiment_id, run_name=f"package-{digest[:12]}")
        client.log_artifacts(run.info.run_id, str(package_dir), artifact_path="package")
        client.set_terminated(run.info.run_id)
        mv = client.create_model_version(
            name,
            source=f"{run.info.artifact_uri}/package",
            run_id=run.info.run_id,
            tags={SHA256_TAG: digest, SPEC_HASH_TAG: feature_version},
        )
        version = str(mv.version)
    if alias:
        client.set_registered_model_alias(name, alias, version)
    return version


def register_onnx(
    registry: ModelRegistry,
    model_path: Path,
    spec_path: Path,
    name: str,
    *,
    alias: str | None = None,
    reuse: bool = False,
) -> Registered:
    """Log ``model_path`` with ``spec_path`` as a new ONNX-flavor version of ``name``.

    Always a new version, unless ``reuse`` and a version with the same model sha256 and spec
    hash exists (then that one). ``alias``, when given, is pointed at the version.

    Raises:
        ValueError: the spec does not decode, or the model is not a loadable ONNX graph.
    """
    from mlflow.exceptions import MlflowException

    raw = spec_path.read_bytes()
    decode_spec(raw)  # SpecError (a ValueError) names what is wrong
    digest = sha256_file(model_path)
    feature_version = spec_hash(raw)
    client = registry.client
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Radio-transmitter localizer")
    if reuse:
        same = [
            mv
            for mv in client.search_model_versions(f"name='{name}'")
            if (mv.tags or {}).get(SHA256_TAG) == digest
            and (mv.tags or {}).get(SPEC_HASH_TAG) == feature_version
        ]
        if same:
            mv = min(same, key=lambda v: int(v.version))
            if alias:
                client.set_registered_model_alias(name, alias, str(mv.version))
            return Registered(str(mv.version), True, str(mv.run_id or ""), digest)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(EXPERIMENT, artifact_location=artifact_root(registry))
    )
    run = client.create_run(
        experiment_id,
        run_name=f"register-{digest[:12]}",
        tags={"mlflow.source.type": "LOCAL", "heimdall.source": str(model_path.resolve())},
    )
    run_id = run.info.run_id
    try:
        with tempfile.TemporaryDirectory(prefix="heimdall-register-") as tmp:
            folder = Path(tmp) / "model"
            folder.mkdir()
            shutil.copyfile(model_path, folder / MODEL_FILE)
            shutil.copyfile(spec_path, folder / SPEC_FILE)
            try:
                text = _mlmodel(run_id, folder / MODEL_FILE)
            except Exception as exc:  # ORT's own exception types: not a loadable graph
                raise ValueError(f"{model_path} is not a loadable ONNX model: {exc}") from exc
            (folder / "MLmodel").write_text(text)
            client.log_artifacts(run_id, str(folder), artifact_path="model")
        client.log_param(run_id, "model_sha256", digest)
        client.log_param(run_id, "spec_hash", feature_version)
        client.set_terminated(run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    mv = client.create_model_version(
        name,
        source=f"{run.info.artifact_uri}/model",
        run_id=run_id,
        tags={SHA256_TAG: digest, SPEC_HASH_TAG: feature_version},
    )
    if alias:
        client.set_registered_model_alias(name, alias, str(mv.version))
    return Registered(str(mv.version), False, run_id, digest)
