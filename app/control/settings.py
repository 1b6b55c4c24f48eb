"""Control plane settings (the subscriber itself lives in :mod:`app.control.plane`)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct


class ControlSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Rollout control channel settings (prefix ``HEIMDALL_CONTROL_``; Redis from ``REDIS_URL``)."""

    enabled: bool = True
    """Follow the desired state in Redis (otherwise serve ``HEIMDALL_MODEL_URI`` only)."""
    namespace: str = "heimdall"
    """Key prefix: state in ``{namespace}:{model}:desired``, messages on ``…:control``."""
    poll_interval_s: Annotated[float, Meta(gt=0)] = 30.0
    """Slow periodic re-read of the desired state (level-triggered safety net)."""
    heartbeat_ttl_s: Annotated[int, Meta(ge=2)] = 15
    """TTL of this replica's status key; refreshed every third of it."""
    hmac_secret: str = ""
    """Shared secret; when set, messages and states must carry a valid HMAC (over namespace,
    model, epoch, revision and body) and the CLI signs what it publishes."""
    retry_max_s: Annotated[float, Meta(gt=0)] = 30.0
    """Longest back-off between retries of a failed apply or a lost connection."""
    divergence_grace_s: Annotated[float, Meta(ge=0)] = 30.0
    """``status`` reports a replica whose applied (epoch, revision) differs from the desired
    one for longer than this as an error (exit code 1)."""
