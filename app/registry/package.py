"""What a model version is to the service: its registry metadata and its verified package."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from workers.spec import ModelSpec

SHA256_TAG = "heimdall.model_sha256"
SPEC_HASH_TAG = "heimdall.spec_hash"
MODEL_FILE = "model.onnx"
SPEC_FILE = "model_spec.json"


@dataclass(frozen=True)
class VersionInfo:
    """Registry metadata of one model version."""

    name: str
    version: str
    source: str
    run_id: str
    created_ms: int
    sha256: str
    spec_hash: str
    aliases: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LocalPackage:
    """A verified model package on local disk."""

    info: VersionInfo
    model_path: Path
    spec_raw: bytes
    spec: ModelSpec
    spec_hash: str
