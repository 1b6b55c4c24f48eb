"""What a replica reports about itself: ``/v1/models``, ``/v1/models/{version}``, readiness.

Typed answers (msgspec) so the OpenAPI document describes them. Parts owned and shaped by
other components — the pool's figures, the cache's, feedback's and the control plane's
state, the rollout's description, live counters — are carried as they come.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct


class RoutingState(Struct, frozen=True):
    """The routing table in force."""

    weights: dict[str, float]
    """Traffic share per version."""
    shadow: str | None
    """Version that also runs a sample of the requests, answers discarded."""
    shadow_fraction: float
    """Share of requests also run on the shadow version."""
    revision: int | None
    """Revision of the desired state that set this routing (None before any)."""


class CaptureContract(Struct, frozen=True):
    """The captures a version accepts."""

    sample_rate_hz: float
    samples_per_receiver: int
    min_receivers: int
    max_receivers: int
    receivers: list[str]
    """Ids of the receiver network the model was trained on (empty: any)."""


TensorSummary = tuple[str, str, list[int]]
"""A model tensor as ``[name, datatype, shape]``."""


class VersionState(Struct, frozen=True):
    """One resident version: registry metadata, spec summary, figures, live counters."""

    name: str
    version: str
    run_id: str
    created: int
    """Registry creation time, milliseconds since the epoch."""
    aliases: list[str]
    sha256: str
    feature_pipeline_version: str
    loaded_at: float
    """When this replica loaded it (seconds since the epoch)."""
    capture: CaptureContract
    inputs: dict[str, TensorSummary]
    outputs: dict[str, TensorSummary]
    metrics: dict[str, float]
    """Figures on held-out data, from the package."""
    training_data: str
    live: dict[str, Any]
    """Requests, errors, cache hit rate and latency quantiles seen by this replica."""
    field: dict[str, Any] | msgspec.UnsetType | None = msgspec.UNSET
    """``/v1/models/{version}`` only: field figures from ground-truth feedback (None
    without Redis or feedback; ``{"error": ...}`` when the store fails)."""


class ModelsState(Struct, frozen=True):
    """``GET /v1/models``: what this replica serves and how."""

    replica: str
    model: str
    routing: RoutingState
    rollout: dict[str, Any]
    control: dict[str, Any]
    versions: dict[str, VersionState]
    pool: Any
    """The worker pool's figures, as the pool reports them."""


class RolloutOutcome(Struct, frozen=True):
    """The last rollout's outcome."""

    last_outcome: str
    last_error: str | None


class Readiness(Struct, frozen=True):
    """``GET /health/ready`` (503 when not ready): what readiness was decided on."""

    routed: list[str]
    """Versions the routing sends traffic to."""
    served: list[str]
    """Versions at least one ready worker serves."""
    pool: Any
    """Worker states, as the pool reports them."""
    cache: dict[str, Any]
    feedback: dict[str, Any]
    rollout: RolloutOutcome
    control: dict[str, Any]
    status: str
    """``ready`` or ``not ready``."""
    http_processes_ready: list[int] | None = None
    """With several HTTP processes: those that have been ready since they started (every one
    must have been for any to answer ready)."""
