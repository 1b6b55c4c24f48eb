"""Settings of field feedback, apart from :mod:`app.serving.feedback` so they load light."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, Struct


class FeedbackSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Field feedback settings (prefix ``HEIMDALL_FEEDBACK_``; Redis from ``REDIS_URL``)."""

    enabled: bool = True
    """Keep answers and accept ``POST /v1/feedback`` (off: nothing is stored, 403)."""
    answer_ttl_s: Annotated[int, Meta(ge=1)] = 7 * 86400
    """How long an answer is kept for feedback (model, version, mean, covariance, domain flag,
    receiver ids; never the IQ)."""
    expired_grace_s: Annotated[int, Meta(ge=0)] = 3600
    """An answer stays this much longer only so late feedback is told "expired", not
    "unknown"."""
    max_answers: Annotated[int, Meta(ge=1)] = 1_000_000
    """Most answers kept; beyond it the oldest are deleted."""
    max_samples: Annotated[int, Meta(ge=10)] = 20_000
    """Latest feedback samples kept per version for quantiles and recalibration."""
    max_sources: Annotated[int, Meta(ge=1)] = 32
    """Distinct ``source`` values tracked per version; later ones are counted as ``other``."""
    rate_per_s: Annotated[float, Meta(gt=0)] = 20.0
    """Feedback requests per second per client address (token bucket refill)."""
    burst: Annotated[int, Meta(ge=1)] = 200
    """Feedback requests a client may send at once (token bucket size)."""
    prefix: str = "heimdall:field:"
    """Key prefix of every feedback key."""
    timeout_s: Annotated[float, Meta(gt=0, le=10)] = 0.5
    """Timeout of feedback calls to Redis."""
