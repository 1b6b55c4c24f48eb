"""HTTP request and response bodies (msgspec), shared by JSON and MessagePack.

Constraints live in the types; msgspec reports the failing field's path. ``iq`` is ``bytes``:
base64 in JSON, raw binary in MessagePack. The `/v1/predict` body itself is in workers/request.py
(the pool workers decode it).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from msgspec import Meta, Struct

from workers.messages import Ellipse
from workers.request import Latitude, Longitude, PredictRequest

MAX_BATCH = 256


class BatchRequest(Struct, frozen=True):
    """``POST /v1/predict/batch`` body."""

    items: Annotated[list[PredictRequest], Meta(min_length=1, max_length=MAX_BATCH)]


class Position(Struct, frozen=True):
    """Estimated transmitter position."""

    latitude: float
    longitude: float


class Uncertainty(Struct, frozen=True):
    """Bivariate Gaussian in the local east/north frame and its confidence ellipses."""

    covariance_enu_m2: list[list[float]]
    sigma_east_m: float
    sigma_north_m: float
    correlation: float
    ellipses: list[Ellipse]


class ModelRef(Struct, frozen=True):
    """The model version that answered."""

    name: str
    version: str


class Timing(Struct, frozen=True):
    """Milliseconds spent per phase."""

    queue: float
    features: float
    inference: float
    total: float


class DomainFlags(Struct, frozen=True):
    """Whether the capture lies inside the model's trained domain, and why not."""

    inside: bool
    """False when the received power, noise floor or estimated position lies beyond what the
    model was trained on; its sigmas are then widened to at least the in-domain median."""
    reasons: list[str]
    """One sentence per reason (empty when inside)."""


class PredictResponse(Struct, frozen=True, omit_defaults=True, tag_field="kind", tag="prediction"):
    """One localization."""

    request_id: str
    position: Position
    uncertainty: Uncertainty
    model: ModelRef
    cached: bool
    timing_ms: Timing
    domain: DomainFlags
    geojson: dict[str, Any] | None = None


class FieldError(Struct, frozen=True):
    """One validation failure."""

    field: str
    message: str


class Problem(Struct, frozen=True, omit_defaults=True, tag_field="kind", tag="problem"):
    """RFC 9457 problem details (also a batch item's failure)."""

    title: str
    status: int
    detail: str
    type: str = "about:blank"
    errors: list[FieldError] = []
    request_id: str | None = None


Source = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:/-]*$",
        description="Where the truth comes from (beacon, survey, ...); letters, digits, _.:/-",
    ),
]


class TruePosition(Struct, frozen=True, forbid_unknown_fields=True):
    """Surveyed position of the transmitter."""

    latitude: Latitude
    longitude: Longitude


class FeedbackRequest(Struct, frozen=True, forbid_unknown_fields=True):
    """``POST /v1/feedback`` body: the truth for an earlier answer."""

    request_id: Annotated[str, Meta(min_length=1, max_length=128)]
    """``request_id`` of the prediction (batch items: the item's own id)."""
    position: TruePosition
    """Where the transmitter really was."""
    source: Source = "unspecified"
    """Which kind of ground truth this is; field figures are also kept per source."""
    observed_at: datetime | None = None
    """When the truth was observed (RFC 3339), kept with the sample."""


class EllipseHit(Struct, frozen=True):
    """Whether the truth fell inside one confidence ellipse of the answer."""

    confidence: float
    inside: bool


class FeedbackResponse(Struct, frozen=True, tag_field="kind", tag="feedback"):
    """The truth joined with the answer it is about."""

    request_id: str
    model: ModelRef
    source: str
    error_m: float
    """Geodesic distance from the answered position to the truth."""
    error_east_m: float
    error_north_m: float
    mahalanobis: float
    """Normalised error ``d``: the truth's Mahalanobis distance under the answered covariance."""
    ellipses: list[EllipseHit]
    domain_inside: bool
    """The answer's domain flag."""
    duplicate: bool = False
    """True when this truth had already been received (it was counted once)."""


class BatchResponse(Struct, frozen=True):
    """Results in request order: a prediction or a problem per item."""

    results: list[PredictResponse | Problem]
