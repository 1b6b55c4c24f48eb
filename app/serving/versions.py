"""Served model versions: what is resident, how requests are routed, per-version state.

A :class:`VersionContext` holds everything derived once from a version's spec (the known
receiver network, the capture contract) so request validation is a few comparisons.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from app.registry.package import LocalPackage
from app.serving.status import CaptureContract, RoutingState, VersionState
from workers.errors import NotFound, NotReady
from workers.request import known_receivers


@dataclass
class VersionContext:
    """A resident version and what validation needs from its spec."""

    package: LocalPackage
    loaded_at: float = field(default_factory=time.time)
    known: dict[str, tuple[float, float]] = field(init=False)

    def __post_init__(self) -> None:
        """Index the trained receiver network by id."""
        self.known = known_receivers(self.package.spec.capture)

    @property
    def version(self) -> str:
        """Registry version number."""
        return self.package.info.version

    @property
    def name(self) -> str:
        """Registered model name."""
        return self.package.info.name

    @property
    def label(self) -> str:
        """The model and version as problems name them (``model heimdall v3``)."""
        return f"model {self.name} v{self.version}"

    def describe(self, live: dict[str, Any] | None = None) -> VersionState:
        """Spec summary, registry metadata, figures, load time and live counters."""
        spec, info = self.package.spec, self.package.info
        cap = spec.capture
        return VersionState(
            name=info.name,
            version=info.version,
            run_id=info.run_id,
            created=info.created_ms,
            aliases=info.aliases,
            sha256=info.sha256,
            feature_pipeline_version=self.package.spec_hash,
            loaded_at=self.loaded_at,
            capture=CaptureContract(
                sample_rate_hz=cap.sample_rate_hz,
                samples_per_receiver=cap.samples_per_receiver,
                min_receivers=cap.min_receivers,
                max_receivers=cap.max_receivers,
                receivers=[r.id for r in cap.receivers],
            ),
            inputs={k: (t.name, t.datatype, t.shape) for k, t in spec.inputs.items()},
            outputs={k: (t.name, t.datatype, t.shape) for k, t in spec.outputs.items()},
            metrics=spec.provenance.metrics,
            training_data=spec.provenance.training_data,
            live=live
            or {
                "requests": 0,
                "errors": 0,
                "cache_hit_rate": None,
                "latency_ms_p50": None,
                "latency_ms_p95": None,
            },
        )


@dataclass(frozen=True)
class Routing:
    """Weighted choice over versions, plus an optional shadow."""

    weights: dict[str, float]
    shadow: str | None = None
    shadow_fraction: float = 0.0
    revision: int = 0

    def choose(self, request_id: str | None, sticky: bool) -> str:
        """Pick a version: random by weight, or by a hash of ``request_id`` when sticky."""
        versions = list(self.weights)
        if len(versions) == 1:
            return versions[0]
        if sticky and request_id:
            digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2**64
        else:
            point = random.random()  # noqa: S311 - traffic split, not security
        total = sum(self.weights.values())
        acc = 0.0
        for version in versions:
            acc += self.weights[version] / total
            if point < acc:
                return version
        return versions[-1]

    def take_shadow(self) -> bool:
        """Whether this request also runs on the shadow version."""
        return self.shadow is not None and random.random() < self.shadow_fraction  # noqa: S311


class VersionTable:
    """The resident versions and the routing between them (switched atomically)."""

    def __init__(self) -> None:
        """Nothing resident, nothing routed."""
        self.contexts: dict[str, VersionContext] = {}
        self.routing: Routing | None = None

    def install(self, contexts: dict[str, VersionContext], routing: Routing) -> None:
        """Switch routing atomically to versions that are already resident in the pool."""
        for version, ctx in contexts.items():
            self.contexts.setdefault(version, ctx)
        self.routing = routing

    def retire(self, version: str) -> None:
        """Forget a version no longer routed (after the pool unloaded it)."""
        self.contexts.pop(version, None)

    def routed_versions(self) -> set[str]:
        """Versions the routing table (and shadow) can send traffic to."""
        if self.routing is None:
            return set()
        versions = set(self.routing.weights)
        if self.routing.shadow:
            versions.add(self.routing.shadow)
        return versions

    def route(self, request_id: str | None, sticky: bool) -> tuple[str, VersionContext]:
        """The request id (a new one when ``None``) and the version that will answer.

        Raises:
            NotReady: nothing is routed yet.
        """
        if self.routing is None:
            raise NotReady("no model version is loaded yet", retry_after=2)
        request_id = request_id or uuid.uuid4().hex
        return request_id, self.contexts[self.routing.choose(request_id, sticky)]

    def resolve(self, model: str, version: str | None, request_id: str | None) -> VersionContext:
        """The version answering tensor-in work: ``version``, else the routing's choice.

        Raises:
            NotReady: no version is given and none is routed yet.
            NotFound: the version is not resident here.
        """
        if version is None:
            if self.routing is None:
                raise NotReady("no model version is loaded yet", retry_after=2)
            version = self.routing.choose(request_id, False)
        ctx = self.contexts.get(version)
        if ctx is None:
            resident = ", ".join(self.resident_versions()) or "none"
            raise NotFound(
                f"version {version!r} of model {model!r} is not served here (resident: {resident})"
            )
        return ctx

    def resident_versions(self) -> list[str]:
        """Resident versions, oldest first."""
        return sorted(self.contexts, key=lambda v: (len(v), v))

    def main_version(self) -> str | None:
        """The routed version with the largest weight (None before anything is routed)."""
        routing = self.routing
        if routing is None or not routing.weights:
            return None
        return max(routing.weights, key=lambda v: (routing.weights[v], len(v), v))

    def routing_state(self) -> RoutingState:
        """The routing table as reported by ``/v1/models``."""
        routing = self.routing
        return RoutingState(
            weights=dict(routing.weights) if routing else {},
            shadow=routing.shadow if routing else None,
            shadow_fraction=routing.shadow_fraction if routing else 0.0,
            revision=routing.revision if routing else None,
        )
