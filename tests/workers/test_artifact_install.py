"""Installing a verified download into the shared artifact cache (app.registry.client)."""

from __future__ import annotations

from pathlib import Path

from app.registry.client import MODEL_FILE, ModelRegistry
from workers.spec import sha256_file


def package(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_bytes(content)
    return folder


def test_a_verified_copy_in_place_is_kept_for_the_process_loading_it(tmp_path: Path) -> None:
    target = package(tmp_path / "cache" / "1", b"onnx")
    inode = (target / MODEL_FILE).stat().st_ino
    ours = package(tmp_path / "dl" / "1", b"onnx")
    ModelRegistry._install(ours, target, sha256_file(target / MODEL_FILE))
    # Another replica's download of the same version must not pull the file away.
    assert (target / MODEL_FILE).stat().st_ino == inode


def test_a_stale_copy_is_replaced(tmp_path: Path) -> None:
    target = package(tmp_path / "cache" / "1", b"old")
    ours = package(tmp_path / "dl" / "1", b"new")
    ModelRegistry._install(ours, target, sha256_file(ours / MODEL_FILE))
    assert (target / MODEL_FILE).read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["1"]  # the stale copy is gone
