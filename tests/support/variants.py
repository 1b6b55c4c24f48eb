"""Register extra model versions (good and deliberately broken) in a test registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.support.procs import REFERENCE
from workers.registry import SHA256_TAG, ModelRegistry, RegistrySettings


def registry(env: dict[str, str]) -> ModelRegistry:
    """A registry client for a test registry's env."""
    return ModelRegistry(
        RegistrySettings(
            tracking_uri=env["MLFLOW_TRACKING_URI"], artifact_cache=env["HEIMDALL_ARTIFACT_CACHE"]
        )
    )


def register_variant(
    env: dict[str, str], folder: Path, kind: str = "good", calibration: float = 1.5
) -> str:
    """Register a copy of the reference package, altered by ``kind``; returns the version.

    Kinds: ``good`` (a different calibration factor: a distinguishable, valid model),
    ``corrupt`` (model.onnx bytes are garbage), ``bad_sha`` (the sha256 tag lies),
    ``bad_shape`` (the spec declares a tensor shape the graph does not have).
    """
    target = folder / f"{kind}-{calibration}"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(REFERENCE, target)
    spec = json.loads((target / "model_spec.json").read_text())
    spec["output"]["calibration_factor"] = calibration
    if kind == "corrupt":
        (target / "model.onnx").write_bytes(b"\x08\x07this is not an onnx graph" * 100)
    if kind == "bad_shape":
        spec["inputs"]["receivers"]["shape"] = [-1, 7, 3]
    (target / "model_spec.json").write_text(json.dumps(spec, indent=2))
    reg = registry(env)
    version = reg.register(target, "rf-localizer", alias=None)
    if kind == "bad_sha":
        reg.client.set_model_version_tag("rf-localizer", version, SHA256_TAG, "0" * 64)
    return version
