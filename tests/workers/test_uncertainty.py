"""Ellipses and geodesic polygons checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from pyproj import Geod
from scipy.stats import chi2

from workers.geo import from_local, to_local
from workers.uncertainty import (
    chi2_2dof_scale,
    covariance,
    ellipse_axes,
    ellipse_polygon,
    feature_collection,
)

LEVELS = [0.5, 0.9, 0.95]
CASES = [
    (3000.0, 1000.0, 0.0),
    (1000.0, 3000.0, 0.6),
    (2500.0, 2400.0, -0.85),
    (8000.0, 500.0, 0.3),
]


def test_one_sigma_ellipse_holds_39_percent_not_68() -> None:
    assert chi2_2dof_scale(1 - math.exp(-0.5)) == pytest.approx(1.0)
    for p in LEVELS:
        assert chi2_2dof_scale(p) == pytest.approx(math.sqrt(chi2.ppf(p, 2)))


@pytest.mark.parametrize(("se", "sn", "rho"), CASES)
def test_samples_fall_inside_each_ellipse_at_its_level(se: float, sn: float, rho: float) -> None:
    cov = covariance(se, sn, rho)
    rng = np.random.default_rng(42)
    samples = rng.multivariate_normal([0.0, 0.0], cov, size=10_000)
    for level in LEVELS:
        major, minor, azimuth = ellipse_axes(cov, level)
        assert 0.0 <= azimuth < 180.0
        assert major >= minor > 0
        # Independent test of membership: project onto the stated axes.
        az = math.radians(azimuth)
        u_major = np.array([math.sin(az), math.cos(az)])  # east, north
        u_minor = np.array([math.cos(az), -math.sin(az)])
        inside = (samples @ u_major / major) ** 2 + (samples @ u_minor / minor) ** 2 <= 1.0
        assert abs(inside.mean() - level) <= 0.015, (level, inside.mean())


def test_azimuth_of_north_south_and_diagonal_ellipses() -> None:
    assert ellipse_axes(covariance(100.0, 400.0, 0.0), 0.5)[2] == pytest.approx(0.0)
    assert ellipse_axes(covariance(400.0, 100.0, 0.0), 0.5)[2] == pytest.approx(90.0)
    assert ellipse_axes(covariance(300.0, 300.0, 0.9), 0.5)[2] == pytest.approx(45.0)
    assert ellipse_axes(covariance(300.0, 300.0, -0.9), 0.5)[2] == pytest.approx(135.0)


@pytest.mark.parametrize(("se", "sn", "rho"), CASES)
def test_polygon_vertices_lie_on_the_ellipse_along_geodesics(
    se: float, sn: float, rho: float
) -> None:
    lat0, lon0 = 45.1, 7.7
    cov = covariance(se, sn, rho)
    geod = Geod(ellps="WGS84")
    for level in LEVELS:
        ring = ellipse_polygon(lat0, lon0, cov, level)
        assert len(ring) >= 65 and ring[0] == ring[-1]
        major, minor, azimuth = ellipse_axes(cov, level)
        lons = np.array([p[0] for p in ring[:-1]])
        lats = np.array([p[1] for p in ring[:-1]])
        az, _, dist = geod.inv(np.full_like(lons, lon0), np.full_like(lats, lat0), lons, lats)
        phi = np.radians(np.asarray(az) - azimuth)
        expected = major * minor / np.sqrt((minor * np.cos(phi)) ** 2 + (major * np.sin(phi)) ** 2)
        assert np.max(np.abs(np.asarray(dist) / expected - 1)) < 0.005
        # RFC 7946: exterior ring counter-clockwise (positive shoelace area in lon/lat).
        x, y = np.array([p[0] for p in ring]), np.array([p[1] for p in ring])
        assert np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]) > 0


def test_an_ellipse_across_the_antimeridian_is_cut_in_two() -> None:
    # A transmitter near Fiji (179.9 E) with a 30 km east-west sigma: the ellipses reach past
    # 180; GeoJSON (RFC 7946 3.1.9) gets a MultiPolygon whose parts stay within ±180.
    fc = feature_collection(-17.0, 179.9, covariance(30_000.0, 5_000.0, 0.0), LEVELS)
    for feature in fc["features"][1:]:
        geometry = feature["geometry"]
        assert geometry["type"] == "MultiPolygon"
        (east,), (west,) = geometry["coordinates"]
        assert max(x for x, _ in east) == 180.0 and min(x for x, _ in east) < 180.0
        assert min(x for x, _ in west) == -180.0 and max(x for x, _ in west) > -180.0
    near = feature_collection(-17.0, 170.0, covariance(30_000.0, 5_000.0, 0.0), LEVELS)
    assert {f["geometry"]["type"] for f in near["features"][1:]} == {"Polygon"}


def test_feature_collection_has_point_and_one_polygon_per_level() -> None:
    fc = feature_collection(45.0, 7.5, covariance(1000.0, 2000.0, 0.2), LEVELS)
    kinds = [f["geometry"]["type"] for f in fc["features"]]
    assert kinds == ["Point", "Polygon", "Polygon", "Polygon"]
    assert [f["properties"].get("confidence") for f in fc["features"][1:]] == LEVELS


def test_local_frame_round_trip_and_distances() -> None:
    lat0, lon0 = 45.0, 7.7
    east = np.array([0.0, 10_000.0, -55_000.0, 30_000.0])
    north = np.array([0.0, 20_000.0, 40_000.0, -60_000.0])
    lat, lon = from_local(lat0, lon0, east, north)
    e2, n2 = to_local(lat0, lon0, lat, lon)
    assert np.allclose(e2, east, atol=1e-3) and np.allclose(n2, north, atol=1e-3)
    _, _, dist = Geod(ellps="WGS84").inv([lon0] * 4, [lat0] * 4, lon, lat)
    assert np.allclose(dist, np.hypot(east, north), rtol=1e-9, atol=1e-3)
