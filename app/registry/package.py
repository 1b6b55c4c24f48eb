"""What a model version is to the service: its registry metadata and its verified package."""

from __future__ import annotations

import re
import shutil
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


def os_reason(exc: OSError) -> str:
    """An OS error's reason in a few words (``No space left on device``).

    ``shutil.copytree`` raises one ``shutil.Error`` listing (source, destination, error) per
    file: its text was hundreds of characters of paths in ``last_error``.
    """
    failures = exc.args[0] if isinstance(exc, shutil.Error) and exc.args else None
    if isinstance(failures, list) and failures:
        text = str(failures[0][-1])
        found = re.search(r"\[Errno \d+\] ([^:]+)", text)
        more = f" (and {len(failures) - 1} more files)" if len(failures) > 1 else ""
        return (found.group(1) if found else text) + more
    return exc.strerror or str(exc)
