"""Bivariate-Gaussian uncertainty: confidence ellipses and geodesic GeoJSON polygons.

A 2-D Gaussian's confidence region at level ``p`` is the ellipse ``xᵀ Σ⁻¹ x ≤ k²`` with
``k² = -2 ln(1 - p)`` (chi-square, 2 degrees of freedom): 1σ covers 39.3 %, not 68 %.
Axes come from the eigen-decomposition of the east/north covariance; the azimuth is the
semi-major axis direction, clockwise from true north, folded into [0, 180).
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from workers.geo import from_local
from workers.spec import OutputSpec


def chi2_2dof_scale(level: float) -> float:
    """Mahalanobis radius ``k`` whose ellipse holds ``level`` of a 2-D Gaussian."""
    return math.sqrt(-2.0 * math.log1p(-level))


def covariance(sigma_east: float, sigma_north: float, rho: float) -> npt.NDArray[np.float64]:
    """2×2 east/north covariance from standard deviations and correlation."""
    c = rho * sigma_east * sigma_north
    return np.array([[sigma_east**2, c], [c, sigma_north**2]], dtype=np.float64)


def ellipse_axes(cov: npt.NDArray[np.float64], level: float) -> tuple[float, float, float]:
    """Semi-major (m), semi-minor (m) and azimuth (degrees in [0, 180)) at ``level``."""
    see, sen, snn = float(cov[0, 0]), float(cov[0, 1]), float(cov[1, 1])
    half_trace = 0.5 * (see + snn)
    root = math.sqrt(max(0.25 * (see - snn) ** 2 + sen**2, 0.0))
    lam_major, lam_minor = half_trace + root, max(half_trace - root, 0.0)
    # Major-axis direction in (east, north): angle from east, counter-clockwise.
    theta = 0.5 * math.atan2(2.0 * sen, see - snn)
    azimuth = math.degrees(math.pi / 2.0 - theta) % 180.0
    k = chi2_2dof_scale(level)
    return k * math.sqrt(lam_major), k * math.sqrt(lam_minor), azimuth


def ellipse_radius(
    cov: npt.NDArray[np.float64], level: float, azimuth_deg: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Distance from the centre to the ellipse boundary along each azimuth (clockwise from N)."""
    az = np.radians(np.asarray(azimuth_deg, dtype=np.float64))
    u = np.stack([np.sin(az), np.cos(az)])  # (2, n) unit vectors east/north
    inv = np.linalg.inv(cov)
    quad = np.einsum("in,ij,jn->n", u, inv, u)
    return np.asarray(chi2_2dof_scale(level) / np.sqrt(quad), dtype=np.float64)


def ellipse_polygon(
    lat0: float,
    lon0: float,
    cov: npt.NDArray[np.float64],
    level: float,
    vertices: int = 72,
) -> list[list[float]]:
    """Closed, counter-clockwise ring ``[[lon, lat], ...]`` of the ellipse on the ellipsoid.

    Each vertex lies at the ellipse radius along its azimuth, measured as a geodesic from the
    centre (RFC 7946: exterior rings are counter-clockwise, i.e. decreasing azimuth).
    Longitudes are continuous around the centre: a ring across the antimeridian has vertices
    beyond ±180 (:func:`cut_at_antimeridian` makes GeoJSON of it).
    """
    azimuths = (-360.0 * np.arange(vertices) / vertices) % 360.0
    radius = ellipse_radius(cov, level, azimuths)
    east = radius * np.sin(np.radians(azimuths))
    north = radius * np.cos(np.radians(azimuths))
    lat, lon = from_local(lat0, lon0, east, north)
    lon = lon0 + (lon - lon0 + 180.0) % 360.0 - 180.0  # no jump of 360 degrees at ±180
    ring = [[round(float(x), 7), round(float(y), 7)] for x, y in zip(lon, lat, strict=True)]
    ring.append(ring[0])
    return ring


def _clip(ring: list[list[float]], edge: float, west: bool) -> list[list[float]]:
    """The part of a closed convex ring west (or east) of the meridian ``edge``, closed.

    Sutherland-Hodgman against one line: the vertices on the kept side, plus the points where
    the ring's edges cross the meridian; the orientation is kept.
    """

    def kept(point: list[float]) -> bool:
        return point[0] <= edge if west else point[0] >= edge

    def crossing(a: list[float], b: list[float]) -> list[float]:
        t = (edge - a[0]) / (b[0] - a[0])
        return [edge, round(a[1] + t * (b[1] - a[1]), 7)]

    points = ring[:-1]
    out: list[list[float]] = []
    for i, current in enumerate(points):
        previous = points[i - 1]
        if kept(current):
            if not kept(previous):
                out.append(crossing(previous, current))
            out.append(current)
        elif kept(previous):
            out.append(crossing(previous, current))
    if out:
        out.append(out[0])
    return out


def cut_at_antimeridian(ring: list[list[float]]) -> list[list[list[float]]]:
    """A ring from :func:`ellipse_polygon` as one ring, or two when it crosses ±180.

    RFC 7946 §3.1.9: a geometry that crosses the antimeridian is cut in two so that neither
    part crosses it; the part beyond ±180 is shifted by 360 degrees. Both parts stay closed
    and counter-clockwise.
    """
    beyond_east = any(x > 180.0 for x, _ in ring)
    if not beyond_east and not any(x < -180.0 for x, _ in ring):
        return [ring]
    edge, shift = (180.0, -360.0) if beyond_east else (-180.0, 360.0)
    near = _clip(ring, edge, west=beyond_east)
    far = [[round(x + shift, 7), y] for x, y in _clip(ring, edge, west=not beyond_east)]
    # A part thinner than the 1e-7 degree rounding has no area left: dropped.
    return [part for part in (near, far) if len(part) >= 4 and _area(part) > 0]


def _area(ring: list[list[float]]) -> float:
    """Signed area of a closed ring in square degrees (positive: counter-clockwise)."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


def feature_collection(
    lat: float,
    lon: float,
    cov: npt.NDArray[np.float64],
    levels: list[float],
    vertices: int = 72,
) -> dict[str, Any]:
    """GeoJSON FeatureCollection: the estimated point and one polygon per confidence level."""
    features: list[dict[str, Any]] = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": {"kind": "estimate"},
        }
    ]
    for level in levels:
        rings = cut_at_antimeridian(ellipse_polygon(lat, lon, cov, level, vertices))
        geometry = (
            {"type": "Polygon", "coordinates": rings}
            if len(rings) == 1
            else {"type": "MultiPolygon", "coordinates": [[ring] for ring in rings]}
        )
        features.append(
            {
                "type": "Feature",
                "geometry": geometry,
                "properties": {"kind": "confidence_ellipse", "confidence": level},
            }
        )
    return {"type": "FeatureCollection", "features": features}


def calibrated_sigmas(
    sigma_east: float, sigma_north: float, output: OutputSpec
) -> tuple[float, float]:
    """Metres from the model's sigma outputs: scale, global factor, then the spread table.

    Args:
        sigma_east: ``sigma`` output, east, in model units.
        sigma_north: ``sigma`` output, north, in model units.
        output: the spec's output decoding.

    Returns:
        Calibrated east and north standard deviations in metres.
    """
    factor = output.position_scale_m * output.calibration_factor
    s_e, s_n = sigma_east * factor, sigma_north * factor
    table = output.calibration
    if table is not None and s_e > 0 and s_n > 0:
        spread = float(np.interp(0.5 * math.log(s_e * s_n), table.log_sigma_m, table.factor))
        s_e, s_n = s_e * spread, s_n * spread
    return s_e, s_n
