"""Applying a desired serving state as a rolling swap.

:meth:`Rollout.resolve` looks the state's references up in the registry (each convergence;
the plane compares the versions and their digests with what it applied, so moving an alias
rolls out, and a registry whose version number now names another model is refused), then
:meth:`Rollout.apply`: download + verify → every worker loads, warms up and validates the
new sessions → routing switches atomically → versions no longer routed are unloaded after
their queued and in-flight work. Any failure leaves the replica serving what it served
before and is recorded (``last_error``) for /v1/models, logs and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from app.control.protocol import DesiredState
from app.registry.client import ModelRegistry
from app.registry.package import LocalPackage, VersionInfo
from app.serving.service import InferenceService
from app.serving.versions import Routing, VersionContext
from workers.errors import ModelLoadError, ServiceError
from workers.pool import WorkerPool

log = logging.getLogger("heimdall.rollout")


def _same_model(serving: VersionInfo, registry: VersionInfo) -> None:
    """Refuse a registry whose version number now names another model than the one served.

    Raises:
        ModelLoadError: the registry's digests of the version differ from the resident copy's.
    """
    # A version without the tags (logged the usual MLflow way) has nothing to compare: its
    # digest was taken from the download (app/registry/untagged.py).
    same_model = not registry.sha256 or serving.sha256 == registry.sha256
    same_spec = not registry.spec_hash or serving.spec_hash == registry.spec_hash
    if same_model and same_spec:
        return
    raise ModelLoadError(
        f"the registry's version {registry.version} is now another model (model sha256 "
        f"{registry.sha256[:12]}…, spec {registry.spec_hash or '-'}) than the one this replica "
        f"serves ({serving.sha256[:12]}…, {serving.spec_hash or '-'}): was the registry "
        "replaced or the version re-created? This replica keeps serving its copy; register "
        "the model as a new version and roll it out"
    )


@dataclass(frozen=True)
class Resolved:
    """A desired state with its references (aliases, URIs, numbers) resolved in the registry."""

    state: DesiredState
    versions: dict[str, VersionInfo]
    """Each reference of ``state`` and the version it named when resolved."""

    @property
    def key(self) -> tuple[str, int, tuple[tuple[str, str, str, str], ...]]:
        """(epoch, revision, each reference with its version and digests): equal keys serve alike.

        The digests make a registry replaced under the same version numbers a new key.
        """
        return (
            self.state.epoch,
            self.state.revision,
            tuple(
                (ref, info.version, info.sha256, info.spec_hash)
                for ref, info in sorted(self.versions.items())
            ),
        )


@dataclass
class RolloutStatus:
    """Outcome of the last apply, for /v1/models and the fleet status."""

    applied_revision: int = -1
    applied_epoch: str = ""
    applied_at: float = 0.0
    last_outcome: str = "pending"
    last_error: str | None = None
    attempts: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class Rollout:
    """Converges the pool and the service's routing on a :class:`DesiredState`."""

    def __init__(
        self,
        registry: ModelRegistry,
        pool: WorkerPool,
        service: InferenceService,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        """Keep collaborators; nothing runs until :meth:`apply`."""
        self._registry = registry
        self._pool = pool
        self._service = service
        self.status = RolloutStatus()
        self._lock = asyncio.Lock()
        self._on_outcome = on_outcome
        self._resolved: dict[str, str] = {}

    @property
    def routing(self) -> Routing | None:
        """What the service routes now (None before the first apply)."""
        return self._service.routing

    async def resolve(self, state: DesiredState) -> Resolved:
        """Look up the versions that ``state``'s aliases and model URIs name now.

        Raises:
            ServiceError: the registry does not know a reference or failed.
        """
        versions = {}
        for ref in sorted(set(state.references())):
            versions[ref] = await asyncio.to_thread(self._registry.resolve, ref)
        return Resolved(state, versions)

    async def apply(self, resolved: Resolved) -> None:
        """Apply a resolved state (serialised; a newer call waits for the running one).

        Raises:
            ServiceError: resolution, download, verification or loading failed; the previous
                state keeps serving.
        """
        state = resolved.state
        async with self._lock:
            self.status.attempts += 1
            try:
                await self._apply(resolved)
            except ServiceError as exc:
                self._record("failed", state, exc.detail)
                raise
            except Exception as exc:
                self._record("failed", state, f"{type(exc).__name__}: {exc}")
                raise
            self._record("applied", state, None)

    def recovered(self) -> bool:
        """The applied state resolves again: a standing failure (registry outage) is over.

        True when there was one to clear (not a reload: nothing is counted).
        """
        status = self.status
        if status.last_outcome != "failed" or status.applied_revision < 0:
            return False
        log.info("revision %d resolves again: the last failure is over", status.applied_revision)
        status.last_outcome, status.last_error = "applied", None
        return True

    def record_failure(self, state: DesiredState, error: str) -> None:
        """Record a failure that happened before :meth:`apply` could start (e.g. resolving)."""
        self._record("failed", state, error)

    def _record(self, outcome: str, state: DesiredState, error: str | None) -> None:
        status = self.status
        status.last_outcome = outcome
        status.last_error = error
        if outcome == "applied":
            status.applied_revision = state.revision
            status.applied_epoch = state.epoch
            status.applied_at = time.time()
        status.history = [
            *status.history[-9:],
            {
                "epoch": state.epoch,
                "revision": state.revision,
                "outcome": outcome,
                "error": error,
                "at": time.time(),
            },
        ]
        if error:
            log.error("applying revision %d failed: %s", state.revision, error)
        else:
            log.info("applied revision %d: %s", state.revision, self._service.routing)
        if self._on_outcome:
            self._on_outcome(outcome)

    async def _apply(self, resolved: Resolved) -> None:
        state = resolved.state
        refs = state.references()
        versions: dict[str, str] = {}
        packages: dict[str, LocalPackage] = {}
        for ref in refs:
            info = resolved.versions[ref]
            versions[ref] = info.version
            resident = self._service.contexts.get(info.version)
            if resident is None:
                packages[info.version] = await asyncio.to_thread(self._registry.fetch, info)
            else:
                _same_model(resident.package.info, info)
        loaded: list[str] = []
        try:
            for version, package in packages.items():
                await self._pool.load(
                    version,
                    str(package.model_path),
                    package.spec_raw,
                    package.info.sha256,
                    label=f"model {package.info.name} v{version}",
                )
                loaded.append(version)
        except BaseException:
            for version in loaded:
                await self._pool.unload(version)
            raise
        contexts = {v: VersionContext(p) for v, p in packages.items()}
        weights: dict[str, float] = {}
        for ref, weight in state.weights.items():
            weights[versions[ref]] = weights.get(versions[ref], 0.0) + weight
        routing = Routing(
            weights={v: w for v, w in weights.items() if w > 0} or {versions[refs[0]]: 1.0},
            shadow=versions[state.shadow] if state.shadow else None,
            shadow_fraction=state.shadow_fraction if state.shadow else 0.0,
            revision=state.revision,
        )
        previous = set(self._service.contexts)
        self._service.install(contexts, routing)
        self._resolved = versions
        for version in previous - self._service.routed_versions():
            # Retired first: a request naming it (/v2 .../versions/N) is 404 from now on,
            # and the unload waits for the ones already on their way (pool holds).
            self._service.retire(version)
            await self._pool.unload(version)

    def describe(self) -> dict[str, Any]:
        """Status for /v1/models."""
        s = self.status
        return {
            "applied_epoch": s.applied_epoch,
            "applied_revision": s.applied_revision,
            "applied_at": s.applied_at,
            "last_outcome": s.last_outcome,
            "last_error": s.last_error,
            "resolved": self._resolved,
            "history": s.history,
        }
