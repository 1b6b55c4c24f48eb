"""Field figures: how right the answers of one model version were, from ground truth.

Pure arithmetic (numpy, pyproj through :mod:`workers.geo`), no I/O. A prediction is a
bivariate Gaussian N(μ, Σ) in a local east/north frame; the truth ``t`` lies inside its
``p``-ellipse iff its squared Mahalanobis distance ``d² = (t-μ)ᵀ Σ⁻¹ (t-μ)`` is at most
``-2 ln(1-p)`` (chi-square, 2 degrees of freedom). A calibrated model's ``d²`` follows that
distribution, so the share of truths inside each ellipse — the coverage — should equal its
level. Scaling the covariance by ``s²`` divides every ``d²`` by ``s²``; :func:`fit_scale`
picks the ``s`` whose coverage is closest to the levels (see docs/field-calibration.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from workers.geo import to_local

LEVELS = (0.5, 0.9, 0.95)
"""Ellipse levels whose coverage is tracked."""
D_BOUNDS = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
"""Upper bounds of the normalised-error (Mahalanobis distance ``d``) histogram bins."""

FloatArray = npt.NDArray[np.float64]


def chi2_radius2(level: float) -> float:
    """Squared Mahalanobis radius of the ``level`` ellipse (chi-square, 2 dof)."""
    return -2.0 * math.log1p(-level)


def level_key(level: float) -> str:
    """Name of a level in documents: ``0.9`` → ``"0.9"``."""
    return f"{level:g}"


def offset_enu(
    mean_lat: float, mean_lon: float, true_lat: float, true_lon: float
) -> tuple[float, float]:
    """East/north metres from the predicted mean to the truth (geodesic, WGS84)."""
    east, north = to_local(mean_lat, mean_lon, [true_lat], [true_lon])
    return float(east[0]), float(north[0])


def mahalanobis2(cov: Sequence[Sequence[float]], east: float, north: float) -> float:
    """``d²`` of an east/north offset under a 2×2 covariance (inf when it is singular)."""
    see, sen, snn = float(cov[0][0]), float(cov[0][1]), float(cov[1][1])
    det = see * snn - sen * sen
    if not det > 0.0 or not math.isfinite(det):
        return math.inf
    return (snn * east * east - 2.0 * sen * east * north + see * north * north) / det


def coverage(d2: npt.ArrayLike, scale: float = 1.0) -> dict[str, float]:
    """Share of ``d²/scale²`` inside each level's ellipse."""
    values = np.asarray(d2, dtype=np.float64) / (scale * scale)
    if not len(values):
        return {}
    return {level_key(p): float(np.mean(values <= chi2_radius2(p))) for p in LEVELS}


def summarise(d2: npt.ArrayLike, error_m: npt.ArrayLike) -> dict[str, Any]:
    """Quantiles of the error, the normalised-error distribution and coverage of samples."""
    d2 = np.asarray(d2, dtype=np.float64)
    err = np.asarray(error_m, dtype=np.float64)
    if not len(d2):
        return {"samples": 0}
    d = np.sqrt(d2)
    edges = np.array([0.0, *D_BOUNDS, np.inf])
    counts, _ = np.histogram(np.where(np.isfinite(d), d, np.finfo(np.float64).max), edges)
    expected = np.diff(1.0 - np.exp(-(edges**2) / 2.0))
    return {
        "samples": len(d2),
        "coverage": coverage(d2),
        "error_m": {
            "p50": round(float(np.quantile(err, 0.5)), 1),
            "p90": round(float(np.quantile(err, 0.9)), 1),
        },
        "mahalanobis": {
            "p50": round(float(np.quantile(d, 0.5)), 4),
            "p90": round(float(np.quantile(d, 0.9)), 4),
            "p95": round(float(np.quantile(d, 0.95)), 4),
            "calibrated": {
                level_key(q): round(math.sqrt(chi2_radius2(q)), 4) for q in (0.5, 0.9, 0.95)
            },
            "histogram": [
                {
                    "le": "+Inf" if not math.isfinite(hi) else float(hi),
                    "share": round(int(c) / len(d), 4),
                    "calibrated_share": round(float(e), 4),
                }
                for hi, c, e in zip(edges[1:], counts, expected, strict=True)
            ],
        },
    }


def fit_scale(d2: npt.ArrayLike, levels: Sequence[float] = LEVELS) -> float:
    """The covariance scale ``s`` (Σ → s²Σ) whose coverage is closest to every level.

    Minimax in standard errors: ``s`` minimises, over ``levels``, the largest coverage
    error divided by the binomial standard error of a coverage at that level
    (``sqrt(p(1-p))``), so each level counts by how precisely it can be measured — a point
    at 95 % weighs 2.3 times a point at 50 %. Coverage is a step function of ``s``; the
    search is exhaustive over the values where a step happens (a sample's ``d²`` meeting a
    level's radius) and returns the geometric middle of the best intervals.
    """
    values = np.sort(np.asarray(d2, dtype=np.float64))
    values = values[~np.isnan(values)]
    finite = values[np.isfinite(values) & (values > 0)]
    if not len(finite):
        return 1.0
    levels_arr = np.array(levels, dtype=np.float64)
    radii = np.array([chi2_radius2(p) for p in levels])
    # s² at which sample i crosses level p's boundary: d²_i / r²_p.
    steps = np.unique(np.concatenate([finite / r for r in radii]))
    # Candidates: midpoints between consecutive steps (coverage is constant on each interval).
    candidates = np.sqrt(np.concatenate([[steps[0] / 2], (steps[:-1] + steps[1:]) / 2]))
    # Coverage at each candidate and level, by binary search on the sorted d².
    inside = np.searchsorted(values, np.outer(candidates**2, radii), side="right")
    weights = np.sqrt(levels_arr * (1.0 - levels_arr))
    gaps = (np.abs(inside / len(values) - levels_arr) / weights).max(axis=1)
    best = np.flatnonzero(gaps <= gaps.min() + 1e-12)
    # Several intervals can tie; take the geometric middle of the tied range.
    return float(math.sqrt(candidates[best[0]] * candidates[best[-1]]))


def bootstrap_scale(
    d2: npt.ArrayLike,
    levels: Sequence[float] = LEVELS,
    rounds: int = 200,
    seed: int = 0,
    ci: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`fit_scale` (``ci`` two-sided)."""
    values = np.asarray(d2, dtype=np.float64)
    rng = np.random.default_rng(seed)
    fits = [
        fit_scale(values[rng.integers(0, len(values), len(values))], levels) for _ in range(rounds)
    ]
    tail = (1.0 - ci) / 2.0
    return float(np.quantile(fits, tail)), float(np.quantile(fits, 1.0 - tail))


def split_halves(ids: Sequence[str]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Indices of the fit and held-out halves, by a hash of each request id (stable)."""
    keys = np.array(
        [int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big") for i in ids],
        dtype=np.uint64,
    )
    order = np.argsort(keys, kind="stable")
    return np.sort(order[0::2]), np.sort(order[1::2])


def window_coverage(earlier: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """Coverage of the feedback received between two readings of the same version's figures.

    ``earlier`` and ``later`` are :meth:`app.serving.field_store.FieldStore.figures` documents (or
    their ``sources`` entries) read at the start and the end of a window, e.g. a canary step:
    the counters only grow, so their difference is the window's feedback.

    Returns:
        ``{"count": n, "coverage": {"0.5": share or None, ...}}`` for the window.
    """
    count = int(later.get("count", 0)) - int(earlier.get("count", 0))
    before, after = earlier.get("inside", {}), later.get("inside", {})
    return {
        "count": count,
        "coverage": {
            level_key(p): (
                round((after.get(level_key(p), 0) - before.get(level_key(p), 0)) / count, 4)
                if count > 0
                else None
            )
            for p in LEVELS
        },
    }
