"""Serving a version logged the usual MLflow way, without the sha256 tag ``register`` adds."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from app.registry.package import (
    MODEL_FILE,
    SHA256_TAG,
    SPEC_FILE,
    LocalPackage,
    VersionInfo,
    os_reason,
)
from workers.errors import ModelLoadError
from workers.spec import sha256_file

log = logging.getLogger("heimdall.registry")


class Registry(Protocol):
    """What fetching an untagged version needs of :class:`app.registry.client.ModelRegistry`."""

    cache_dir: Path
    tracking_uri: str

    def verify(self, info: VersionInfo, folder: Path) -> LocalPackage:
        """The package in ``folder`` checked against the registry's tags."""

    def install(self, got: Path, target: Path, info: VersionInfo) -> None:
        """Put a downloaded package in place."""


def fetch_untagged(registry: Registry, info: VersionInfo) -> LocalPackage:
    """A version logged the usual MLflow way: ``mlflow.onnx.log_model`` + a spec artifact.

    Served only when its artifacts are an MLflow model in the ``onnx`` flavor and a
    ``model_spec.json`` sits beside ``model.onnx`` or at the root of the version's run.
    Without a sha256 tag there is nothing to verify the download against: the digest is
    taken from this download (downloaded afresh on every load, logged, and checked by
    every worker against the same file) and the package is kept under ``<version>-untagged``.

    Raises:
        ModelLoadError: not an ONNX-flavor model, no spec, or the download failed.
    """
    import yaml
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    target = registry.cache_dir / info.name / f"{info.version}-untagged"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dl-") as tmp:
            got = Path(
                download_artifacts(
                    artifact_uri=info.source, dst_path=tmp, tracking_uri=registry.tracking_uri
                )
            )
            mlmodel = next(got.rglob("MLmodel"), None)
            flavors = yaml.safe_load(mlmodel.read_text()).get("flavors", {}) if mlmodel else {}
            if "onnx" not in flavors:
                raise ModelLoadError(
                    f"version {info.version} has no {SHA256_TAG} tag and is not an MLflow "
                    "model in the onnx flavor; refusing it"
                )
            assert mlmodel is not None
            folder = mlmodel.parent
            model = folder / str(flavors["onnx"].get("data", MODEL_FILE))
            if not (folder / SPEC_FILE).exists() and info.run_id:
                spec = Path(
                    download_artifacts(
                        run_id=info.run_id,
                        artifact_path=SPEC_FILE,
                        dst_path=str(Path(tmp) / "run"),
                        tracking_uri=registry.tracking_uri,
                    )
                )
                shutil.copyfile(spec, folder / SPEC_FILE)
            if model.name != MODEL_FILE:
                model.rename(folder / MODEL_FILE)
            digest = sha256_file(folder / MODEL_FILE)
            pinned = dataclasses.replace(info, sha256=digest)
            package = registry.verify(pinned, folder)
            registry.install(folder, target, pinned)
    except MlflowException as exc:
        raise ModelLoadError(
            f"version {info.version}: no {SPEC_FILE} beside the model or in its run ({exc.message})"
        ) from exc
    except OSError as exc:
        raise ModelLoadError(
            f"cannot fetch version {info.version} into {registry.cache_dir}: {os_reason(exc)}"
        ) from exc
    log.warning(
        "version %s has no %s tag: serving its onnx-flavor model as downloaded "
        "(sha256 %s); heimdall-inference register adds the tag",
        info.version,
        SHA256_TAG,
        digest,
    )
    return LocalPackage(
        pinned, target / MODEL_FILE, package.spec_raw, package.spec, package.spec_hash
    )
