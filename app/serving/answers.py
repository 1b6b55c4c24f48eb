"""Answers assembled from what a worker computed: predictions, timings, problems.

Pure functions of worker results: no routing, no pool, no telemetry.
"""

from __future__ import annotations

import numpy as np

from app.serving.schemas import (
    DomainFlags,
    FieldError,
    ModelRef,
    Position,
    PredictResponse,
    Problem,
    Timing,
    Uncertainty,
)
from workers.errors import ServiceError
from workers.geo import distance_m
from workers.messages import Prediction
from workers.pool import JobResult


def problem_from(error: ServiceError, request_id: str | None = None) -> Problem:
    """Problem-details value for an error (batch items and HTTP errors alike)."""
    errors = [FieldError(error.field, error.detail)] if error.field else []
    return Problem(
        title=error.title,
        status=int(error.status),
        detail=error.detail,
        type=error.problem_type,
        errors=errors,
        request_id=request_id,
    )


def job_timing(result: JobResult, total_ms: float) -> Timing:
    """Milliseconds per phase of a computed job (worker-side times) and in total."""
    t = result.timings
    return Timing(
        queue=round(result.queue_s * 1e3, 3),
        features=round((t.features_end_ns - t.features_start_ns) / 1e6, 3),
        inference=round((t.inference_end_ns - t.inference_start_ns) / 1e6, 3),
        total=round(total_ms, 3),
    )


def build_response(
    request_id: str, p: Prediction, model: ModelRef, timing: Timing, cached: bool = False
) -> PredictResponse:
    """Assemble the public response from a worker's prediction."""
    return PredictResponse(
        request_id=request_id,
        position=Position(p.latitude, p.longitude),
        uncertainty=Uncertainty(
            covariance_enu_m2=p.covariance_enu_m2,
            sigma_east_m=p.sigma_east_m,
            sigma_north_m=p.sigma_north_m,
            correlation=p.correlation,
            ellipses=p.ellipses,
        ),
        model=model,
        cached=cached,
        timing_ms=timing,
        domain=DomainFlags(p.domain_inside, p.domain_reasons),
        geojson=p.geojson,
    )


def positions_distance_m(a: Prediction, b: Prediction) -> float:
    """Geodesic distance between two predictions' positions."""
    return float(
        distance_m(a.latitude, a.longitude, np.array([b.latitude]), np.array([b.longitude]))[0]
    )
