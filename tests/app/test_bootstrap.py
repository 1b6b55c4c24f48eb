"""`heimdall-inference bootstrap` against a fresh sqlite MLflow registry."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from app.registry.package import SHA256_TAG, SPEC_HASH_TAG
from tests.support.procs import REFERENCE, ROOT
from tests.support.variants import registry
from workers.spec import spec_hash


def run_bootstrap(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "app.ops.cli", "bootstrap"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_bootstrap_registers_a_verified_production_version_once(tmp_path: Path) -> None:
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "HEIMDALL_ARTIFACT_CACHE": str(tmp_path / "cache"),
    }
    assert "version 1" in run_bootstrap(env)
    assert "version 1" in run_bootstrap(env)  # idempotent
    reg = registry(env)
    assert [v.version for v in reg.list_versions("rf-localizer")] == ["1"]
    info = reg.resolve("models:/rf-localizer@production")
    model_bytes = (REFERENCE / "model.onnx").read_bytes()
    assert info.sha256 == hashlib.sha256(model_bytes).hexdigest()
    assert info.spec_hash == spec_hash((REFERENCE / "model_spec.json").read_bytes())
    package = reg.fetch(info)
    assert package.model_path.read_bytes() == model_bytes
    assert package.spec.capture.samples_per_receiver == 4096
    tags = reg.client.get_model_version("rf-localizer", "1").tags
    assert tags[SHA256_TAG] == info.sha256 and tags[SPEC_HASH_TAG] == info.spec_hash


def test_serve_bootstraps_an_empty_embedded_registry_only_when_asked(tmp_path: Path) -> None:
    """What the image does at start (HEIMDALL_BOOTSTRAP_REFERENCE=true in the Dockerfile)."""
    from app.ops.cli import bootstrap_if_missing
    from app.registry.client import RegistrySettings

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cache = str(tmp_path / "cache")
    off = RegistrySettings(tracking_uri=db, artifact_cache=cache)
    assert bootstrap_if_missing(off) is None  # default: never registers anything
    remote = RegistrySettings(
        tracking_uri="http://127.0.0.1:9/", artifact_cache=cache, bootstrap_reference=True
    )
    assert bootstrap_if_missing(remote) is None  # a remote registry is the operator's
    on = RegistrySettings(tracking_uri=db, artifact_cache=cache, bootstrap_reference=True)
    assert bootstrap_if_missing(on) == "1"
    assert bootstrap_if_missing(on) is None  # already there: left alone
    reg = registry({"MLFLOW_TRACKING_URI": db, "HEIMDALL_ARTIFACT_CACHE": cache})
    assert reg.resolve("models:/rf-localizer@production").version == "1"
    assert [v.version for v in reg.list_versions("rf-localizer")] == ["1"]
