"""Model versions from an MLflow registry, cached locally and verified by sha256.

MLflow is imported lazily (it is slow to import), and not at all for an embedded
``sqlite:///`` registry whose tables and ``file://`` artifacts are read directly (design
notes, "A replica reads an embedded registry itself"). Every call here blocks: the service
runs them in a thread. A version's artifacts are cached once per replica in
``<cache>/<name>/<version>/``, put in place only after ``model.onnx`` matched the sha256
and ``model_spec.json`` the spec hash recorded in the version's tags, so a half-written or
tampered package is never loaded (a cached copy that no longer matches is fetched again).
Registering versions lives in :mod:`app.registry.authoring`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msgspec import Struct

from app.registry.package import (
    MODEL_FILE,
    SHA256_TAG,
    SPEC_FILE,
    SPEC_HASH_TAG,
    LocalPackage,
    VersionInfo,
    os_reason,
)
from app.registry.sqlite_refs import SqliteRefs, UnknownSchema, sqlite_path, workspaces_enabled
from workers.errors import ModelLoadError, NotFound
from workers.spec import SpecError, decode_spec, sha256_file, spec_hash

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("heimdall.registry")


_REF = re.compile(r"^(?:models:/(?P<name>[^/@]+))?(?:/(?P<version>[0-9]+)|@(?P<alias>[\w.-]+))$")


REGISTRY_SCHEMES = frozenset(
    {"", "file", "sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "uc"}
    | {"databricks-uc"}
)
"""Tracking URI schemes MLflow's model registry accepts ('' is a plain local path)."""


class RegistrySettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Where models come from (``MLFLOW_TRACKING_URI``, ``HEIMDALL_MODEL_URI``, ...)."""

    tracking_uri: str = "sqlite:///.local/mlflow.db"
    """MLflow tracking/registry URI (``MLFLOW_TRACKING_URI``); relative sqlite paths are
    resolved against the working directory."""
    model_uri: str = "models:/rf-localizer@production"
    """Model served at start: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    artifact_cache: str = ".local/artifacts"
    """Local directory for downloaded, verified model packages."""
    bootstrap_reference: bool = False
    """At start, register the bundled reference model when the registry is an embedded
    ``sqlite:`` one that lacks ``model_uri`` (what ``make run`` does by hand); the image turns
    this on so a bare ``docker run`` serves. Never acts on a remote registry."""

    def __post_init__(self) -> None:
        """Refuse a tracking URI MLflow's registry cannot use (fail at start, not on first use).

        Raises:
            ValueError: the scheme is not one MLflow's model registry supports.
        """
        scheme = (
            self.tracking_uri.partition(":")[0].split("+")[0] if ":" in self.tracking_uri else ""
        )
        if scheme not in REGISTRY_SCHEMES:
            raise ValueError(
                f"unsupported registry URI scheme {scheme!r}; use one of "
                + ", ".join(sorted(s for s in REGISTRY_SCHEMES if s))
            )

    def model_name(self) -> str:
        """The registered model name in ``model_uri``."""
        return parse_ref(self.model_uri, "")[0]


def parse_ref(ref: str, default_name: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/NAME@ALIAS``, ``models:/NAME/3``, ``@ALIAS`` or ``3``.

    Returns:
        ``(name, version, alias)`` with exactly one of version/alias set.

    Raises:
        ValueError: the reference has none of these forms.
    """
    text = ref.strip()
    if text.isascii() and text.isdigit():
        return default_name, text, None
    if text.startswith("@"):
        text = text[1:]
        if not re.fullmatch(r"[\w.-]+", text):
            raise ValueError(f"invalid alias {ref!r}")
        return default_name, None, text
    match = _REF.match(text)
    if not match or not match.group("name"):
        raise ValueError(
            f"model reference {ref!r} is not models:/NAME@ALIAS, models:/NAME/VERSION, "
            "@ALIAS or a version number"
        )
    return match.group("name"), match.group("version"), match.group("alias")


def absolute_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///`` path absolute so every process sees the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"{prefix}{path}"
    return uri


class ModelRegistry:
    """Resolve, download and verify model versions (blocking calls)."""

    def __init__(self, settings: RegistrySettings) -> None:
        """Remember the settings; the MLflow client is created on first use."""
        self.settings = settings
        self.tracking_uri = absolute_tracking_uri(settings.tracking_uri)
        self.cache_dir = Path(settings.artifact_cache).resolve()
        self._client: MlflowClient | None = None
        path = sqlite_path(self.tracking_uri)
        self._tables = SqliteRefs(path) if path and not workspaces_enabled() else None
        """The registry's tables read without MLflow (embedded sqlite registries only)."""

    @property
    def client(self) -> MlflowClient:
        """The MLflow client (imports MLflow on first use)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(
                tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri
            )
        return self._client

    def resolve(self, ref: str) -> VersionInfo:
        """Resolve a reference to a concrete version with its tags.

        Raises:
            NotFound: the model, alias or version does not exist.
        """
        name, version, alias = parse_ref(ref, self.settings.model_name())
        if self._tables is not None and self._tables.path.is_file():
            try:
                row = self._tables.model_version(name, version, alias)
            except NotFound as exc:
                raise NotFound(f"{ref!r} is not in the registry: {exc}") from exc
            except UnknownSchema:
                pass  # not the tables read there (an older MLflow's): MLflow reads them
            else:
                tags = {tag["key"]: tag["value"] for tag in row["tags"]}
                return self._info(row, tags)
        return self._resolve_with_mlflow(ref, name, version, alias)

    def _resolve_with_mlflow(
        self, ref: str, name: str, version: str | None, alias: str | None
    ) -> VersionInfo:
        from mlflow.exceptions import MlflowException

        try:
            if alias is not None:
                mv = self.client.get_model_version_by_alias(name, alias)
            else:
                mv = self.client.get_model_version(name, str(version))
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise NotFound(f"{ref!r} is not in the registry: {exc.message}") from exc
            raise ModelLoadError(
                f"the registry could not resolve {ref!r} ({exc.error_code}): {exc.message}"
            ) from exc
        return self._from_mlflow(mv)

    def _from_mlflow(self, mv: Any) -> VersionInfo:
        """An MLflow ``ModelVersion`` as :class:`VersionInfo`."""
        names = ("name", "version", "source", "run_id", "creation_timestamp", "aliases")
        return self._info({n: getattr(mv, n, None) for n in names}, dict(mv.tags or {}))

    @staticmethod
    def _info(mv: dict[str, Any], tags: dict[str, str]) -> VersionInfo:
        """A version's fields (MLflow's REST names) and tags as :class:`VersionInfo`."""
        return VersionInfo(
            name=str(mv["name"]),
            version=str(mv["version"]),
            source=str(mv["source"]),
            run_id=str(mv["run_id"] or ""),
            created_ms=int(mv["creation_timestamp"] or 0),
            sha256=tags.get(SHA256_TAG, ""),
            spec_hash=tags.get(SPEC_HASH_TAG, ""),
            aliases=list(mv["aliases"] or []),
        )

    def fetch(self, info: VersionInfo) -> LocalPackage:
        """Download (once) and verify a version's package.

        Raises:
            ModelLoadError: no sha256 tag, a missing file, a digest mismatch, a bad spec, or
                the cache directory cannot be written.
        """
        if not info.sha256:
            from app.registry.untagged import fetch_untagged  # imports this module

            return fetch_untagged(self, info)
        target = self.cache_dir / info.name / info.version
        if not self._cached_copy_matches(info, target):
            self._download(info, target)
        return self.verify(info, target)

    @staticmethod
    def _cached_copy_matches(info: VersionInfo, target: Path) -> bool:
        """Whether the cached package is the registry's: its model's sha256 and spec hash.

        The spec holds the calibration, the receivers and the output decoding: an edited one
        moved answers by kilometres, silently, while only the model was checked.
        """
        model = target / MODEL_FILE
        if not model.exists() or sha256_file(model) != info.sha256:
            return False
        if not info.spec_hash:
            return True
        try:
            matches = spec_hash((target / SPEC_FILE).read_bytes()) == info.spec_hash
        except (OSError, SpecError):
            matches = False
        if not matches:
            log.warning(
                "cached %s of version %s differs from the registry's: fetching it again",
                SPEC_FILE,
                info.version,
            )
        return matches

    def _copy_local(self, info: VersionInfo, tmp: str) -> Path | None:
        """Copy a ``file://`` source folder into ``tmp`` as MLflow would; None for others."""
        source = info.source
        if not source.startswith("file://"):
            return None
        folder = Path(urllib.parse.unquote(urllib.parse.urlparse(source).path))
        if not folder.is_dir():
            return None
        return Path(shutil.copytree(folder, Path(tmp) / folder.name))

    def _download(self, info: VersionInfo, target: Path) -> None:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dl-") as tmp:
                got = self._copy_local(info, tmp) or self._download_with_mlflow(info, tmp)
                if not (got / MODEL_FILE).exists():
                    found = next(got.rglob(MODEL_FILE), None)
                    if found is None:
                        raise ModelLoadError(f"version {info.version} has no {MODEL_FILE}")
                    got = found.parent
                self.verify(info, got)
                self.install(got, target, info)
        except OSError as exc:
            raise ModelLoadError(
                f"cannot write the artifact cache {self.cache_dir}: {os_reason(exc)}"
            ) from exc

    def _download_with_mlflow(self, info: VersionInfo, tmp: str) -> Path:
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        try:
            return Path(
                download_artifacts(
                    artifact_uri=info.source, dst_path=tmp, tracking_uri=self.tracking_uri
                )
            )
        except MlflowException as exc:
            raise ModelLoadError(f"cannot download version {info.version}: {exc.message}") from exc

    @staticmethod
    def install(got: Path, target: Path, info: VersionInfo) -> None:
        """Move a verified download into place without deleting a package in use.

        Replicas sharing one artifact cache may download the same version at once: a copy
        already in place that matches ``info`` is kept (another process may be loading from
        it), and a stale one is renamed away before ours is renamed in (both atomic).
        """
        for _ in range(5):
            if ModelRegistry._cached_copy_matches(info, target):
                return
            if target.exists():
                stale = target.with_name(f".old-{target.name}-{os.getpid()}-{time.time_ns()}")
                with contextlib.suppress(FileNotFoundError):
                    target.rename(stale)
                    shutil.rmtree(stale, ignore_errors=True)
            try:
                got.rename(target)
                return
            except OSError:  # another process put its copy there in between: look again
                continue
        raise ModelLoadError(f"cannot put {target} in place: other processes keep replacing it")

    def verify(self, info: VersionInfo, folder: Path) -> LocalPackage:
        """The package in ``folder`` checked against the registry's tags.

        Raises:
            ModelLoadError: the model's sha256 or the spec's hash differ, or the spec is bad.
        """
        model = folder / MODEL_FILE
        digest = sha256_file(model)
        if digest != info.sha256:
            raise ModelLoadError(
                f"version {info.version}: {MODEL_FILE} sha256 {digest[:12]}… does not match the "
                f"registry tag {info.sha256[:12]}…"
            )
        try:
            raw = (folder / SPEC_FILE).read_bytes()
            spec = decode_spec(raw)
        except (OSError, SpecError) as exc:
            raise ModelLoadError(f"version {info.version}: {exc}") from exc
        hashed = spec_hash(raw)
        if info.spec_hash and hashed != info.spec_hash:
            raise ModelLoadError(
                f"version {info.version}: {SPEC_FILE} hash {hashed} does not match the registry "
                f"tag {info.spec_hash}"
            )
        return LocalPackage(info, model, raw, spec, hashed)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``."""
        self.client.set_registered_model_alias(name, alias, version)

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``."""
        return [self._from_mlflow(mv) for mv in self.client.search_model_versions(f"name='{name}'")]
