"""Field arithmetic: coverage, the scale fit and its interval, the spec a recalibration writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.ops.recalibrate import Recalibration, scaled_spec
from app.serving.field import (
    bootstrap_scale,
    coverage,
    fit_scale,
    mahalanobis2,
    split_halves,
    summarise,
)
from tests.support.procs import REFERENCE
from workers.spec import decode_spec
from workers.uncertainty import calibrated_sigmas


def gaussian_d2(n: int, seed: int, scale: float) -> np.ndarray:
    """d² of truths drawn from N(0, scale² I) judged under the identity covariance."""
    rng = np.random.default_rng(seed)
    return np.sum((rng.standard_normal((n, 2)) * scale) ** 2, axis=1)


def test_mahalanobis_matches_the_inverse_covariance() -> None:
    cov = [[4.0e6, 1.5e6], [1.5e6, 9.0e6]]
    v = np.array([1200.0, -3400.0])
    assert mahalanobis2(cov, *v) == pytest.approx(float(v @ np.linalg.inv(cov) @ v))
    assert mahalanobis2([[1.0, 1.0], [1.0, 1.0]], 1.0, 0.0) == float("inf")


def test_a_calibrated_gaussian_covers_its_levels() -> None:
    got = coverage(gaussian_d2(20_000, 1, 1.0))
    for level, share in got.items():
        assert share == pytest.approx(float(level), abs=0.01)
    assert summarise(gaussian_d2(20_000, 2, 1.0), np.ones(20_000))["mahalanobis"][
        "p50"
    ] == pytest.approx(1.1774, abs=0.03)


@pytest.mark.parametrize("true_scale", [0.5, 1.0, 2.5])
def test_fit_recovers_a_known_scale_inside_its_interval(true_scale: float) -> None:
    d2 = gaussian_d2(2000, 3, true_scale)
    scale = fit_scale(d2)
    low, high = bootstrap_scale(d2, rounds=100)
    assert low <= true_scale <= high
    assert scale == pytest.approx(true_scale, rel=0.06)
    for level, share in coverage(d2, scale).items():
        assert share == pytest.approx(float(level), abs=0.02)


def test_fit_counts_a_missing_covariance_as_outside() -> None:
    d2 = np.concatenate([gaussian_d2(900, 4, 1.0), np.full(100, np.inf)])
    assert coverage(d2)["0.5"] == pytest.approx(0.45, abs=0.03)
    assert fit_scale(d2) > 1.2  # must widen to bring 90 % of all samples in


def test_split_is_stable_and_disjoint() -> None:
    ids = [f"id-{i}" for i in range(101)]
    fit, held = split_halves(ids)
    assert not set(fit) & set(held) and len(fit) + len(held) == 101
    fit2, _ = split_halves(list(reversed(ids)))
    assert {ids[i] for i in fit} == {list(reversed(ids))[i] for i in fit2}


def test_scaled_spec_scales_every_sigma_exactly() -> None:
    doc = json.loads((REFERENCE / "model_spec.json").read_bytes())
    # A spread table whose factor changes across the sigmas below (the knots must move).
    doc["output"]["calibration"] = {"log_sigma_m": [7.0, 9.0, 10.0], "factor": [1.4, 0.9, 1.2]}
    raw = json.dumps(doc).encode()
    result = Recalibration(1.7, (1.6, 1.8), (0.9,), 100, 100, {"0.9": 0.7}, {"0.9": 0.9})
    new = decode_spec(scaled_spec(raw, result, "1", "all", 200))
    old = decode_spec(raw)
    for raw_sigma in (0.01, 0.05, 0.1, 0.2, 0.6):
        before = calibrated_sigmas(raw_sigma, raw_sigma * 1.3, old.output)
        after = calibrated_sigmas(raw_sigma, raw_sigma * 1.3, new.output)
        assert after == pytest.approx((before[0] * 1.7, before[1] * 1.7), rel=1e-9)
    if old.domain is not None:
        assert new.domain is not None
        assert new.domain.out_of_domain_min_sigma_m == pytest.approx(
            old.domain.out_of_domain_min_sigma_m * 1.7
        )
    (record,) = new.provenance.field_calibrations
    assert record.scale == 1.7 and record.parent_version == "1"
    assert new.output.calibration_factor == pytest.approx(old.output.calibration_factor * 1.7)
