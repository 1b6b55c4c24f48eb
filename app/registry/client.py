"""Model versions from an MLflow registry, cached locally and verified by sha256.

MLflow is imported lazily (it is slow to import), and not at all for an embedded
``sqlite:///`` registry whose tables and ``file://`` artifacts are read directly (design
notes, "A replica reads an embedded registry itself"). Every call here blocks: the service
runs them in a thread. A version's artifacts are cached once per replica in
``<cache>/<name>/<version>/``, put in place only after ``model.onnx`` matched the sha256
recorded in the version's tags, so a half-written or tampered package is never loaded.
Registering versions lives in :mod:`app.registry.authoring`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from msgspec import Struct

from app.registry.sqlite_refs import SqliteRefs, UnknownSchema, sqlite_path, workspaces_enabled
from workers.errors import ModelLoadError, NotFound
from workers.spec import ModelSpec, SpecError, decode_spec, sha256_file, spec_hash

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = logging.getLogger("heimdall.registry")

SHA256_TAG = "heimdall.model_sha256"
SPEC_HASH_TAG = "heimdall.spec_hash"
MODEL_FILE = "model.onnx"
SPEC_FILE = "model_spec.json"

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
            return self._fetch_untagged(info)
        target = self.cache_dir / info.name / info.version
        if not (target / MODEL_FILE).exists() or sha256_file(target / MODEL_FILE) != info.sha256:
            self._download(info, target)
        return self._verify(info, target)

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
                self._verify(info, got)
                self._install(got, target, info.sha256)
        except OSError as exc:
            raise ModelLoadError(
                f"cannot write the artifact cache {self.cache_dir}: {exc.strerror or exc}"
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
    def _install(got: Path, target: Path, digest: str) -> None:
        """Move a verified download into place without deleting a package in use.

        Replicas sharing one artifact cache may download the same version at once: a copy
        already in place with the same digest is kept (another process may be loading from
        it), and a stale one is renamed away before ours is renamed in (both atomic).
        """
        for _ in range(5):
            if (target / MODEL_FILE).exists() and sha256_file(target / MODEL_FILE) == digest:
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

    def _fetch_untagged(self, info: VersionInfo) -> LocalPackage:
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

        target = self.cache_dir / info.name / f"{info.version}-untagged"
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent, prefix=".dl-") as tmp:
                got = Path(
                    download_artifacts(
                        artifact_uri=info.source, dst_path=tmp, tracking_uri=self.tracking_uri
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
                            tracking_uri=self.tracking_uri,
                        )
                    )
                    shutil.copyfile(spec, folder / SPEC_FILE)
                if model.name != MODEL_FILE:
                    model.rename(folder / MODEL_FILE)
                digest = sha256_file(folder / MODEL_FILE)
                pinned = dataclasses.replace(info, sha256=digest)
                package = self._verify(pinned, folder)
                self._install(folder, target, digest)
        except MlflowException as exc:
            raise ModelLoadError(
                f"version {info.version}: no {SPEC_FILE} beside the model or in its run "
                f"({exc.message})"
            ) from exc
        except OSError as exc:
            raise ModelLoadError(
                f"cannot fetch version {info.version} into {self.cache_dir}: {exc.strerror or exc}"
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

    def _verify(self, info: VersionInfo, folder: Path) -> LocalPackage:
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
        return LocalPackage(info, model, raw, spec, spec_hash(raw))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``alias`` at ``version``."""
        self.client.set_registered_model_alias(name, alias, version)

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``."""
        return [self._from_mlflow(mv) for mv in self.client.search_model_versions(f"name='{name}'")]
