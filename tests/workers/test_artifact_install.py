"""Installing a verified download into the shared artifact cache (app.registry.client)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from app.registry.client import ModelRegistry, RegistrySettings
from app.registry.package import MODEL_FILE, SPEC_FILE, VersionInfo, os_reason
from tests.support.procs import bootstrap_registry
from workers.errors import ModelLoadError
from workers.spec import sha256_file


def tagged(digest: str) -> VersionInfo:
    return VersionInfo("m", "1", "file:///nowhere", "", 0, digest, "")


def package(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(content)
    return folder


def test_a_verified_copy_in_place_is_kept_for_the_process_loading_it(tmp_path: Path) -> None:
    target = package(tmp_path / "cache" / "1", b"onnx")
    inode = (target / MODEL_FILE).stat().st_ino
    ours = package(tmp_path / "dl" / "1", b"onnx")
    ModelRegistry.install(ours, target, tagged(sha256_file(target / MODEL_FILE)))
    # Another replica's download of the same version must not pull the file away.
    assert (target / MODEL_FILE).stat().st_ino == inode


def test_a_stale_copy_is_replaced(tmp_path: Path) -> None:
    target = package(tmp_path / "cache" / "1", b"old")
    ours = package(tmp_path / "dl" / "1", b"new")
    ModelRegistry.install(ours, target, tagged(sha256_file(ours / MODEL_FILE)))
    assert (target / MODEL_FILE).read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["1"]  # the stale copy is gone


def registry_in(env: dict[str, str], cache: Path) -> ModelRegistry:
    return ModelRegistry(
        RegistrySettings(tracking_uri=env["MLFLOW_TRACKING_URI"], artifact_cache=str(cache))
    )


def test_an_edited_spec_in_the_cache_is_fetched_again_and_a_tampered_source_refused(
    tmp_path: Path,
) -> None:
    # Third outside review: the cached model_spec.json was never checked. Its calibration
    # factor edited ×20 moved answers by kilometres and widened σ 55-fold, silently, while
    # the registry's spec-hash tag said otherwise.
    env = bootstrap_registry(tmp_path / "registry")
    registry = registry_in(env, tmp_path / "cache")
    info = registry.resolve("1")
    assert info.spec_hash
    first = registry.fetch(info)
    cached = first.model_path.parent / SPEC_FILE
    spec = json.loads(cached.read_text())
    spec["output"]["calibration_factor"] *= 20
    cached.write_text(json.dumps(spec))
    again = registry.fetch(info)
    assert again.spec_hash == info.spec_hash
    restored = json.loads(cached.read_text())["output"]["calibration_factor"]
    assert restored == first.spec.output.calibration_factor
    # The registry's own copy edited: no copy matches the tag, so the version is refused.
    source = Path(info.source.removeprefix("file://")) / SPEC_FILE
    source.write_text(json.dumps(spec))
    cached.write_text(json.dumps(spec))
    with pytest.raises(ModelLoadError, match="does not match the registry tag"):
        registry.fetch(info)


def test_an_artifact_cache_that_fills_up_is_reported_in_a_few_words(tmp_path: Path) -> None:
    # copytree raises one shutil.Error listing (source, destination, error) per file: its
    # text, hundreds of characters of paths, was the rollout's last_error.
    failures = [
        (f"/src/{name}", f"/cache/{name}", str(OSError(28, "No space left on device", name)))
        for name in ("model.onnx", "model_spec.json")
    ]
    reason = os_reason(shutil.Error(failures))
    assert reason == "No space left on device (and 1 more files)"
    assert os_reason(OSError(13, "Permission denied")) == "Permission denied"
