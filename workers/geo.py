"""Geodesy between WGS84 and the model's local east/north frame, with pyproj's geodesics.

The local frame is azimuthal equidistant around an origin: a point at geodesic distance ``d``
and azimuth ``az`` from the origin has ``east = d·sin(az)``, ``north = d·cos(az)``. Using
:class:`pyproj.Geod` directly (Karney's algorithms on the WGS84 ellipsoid) makes the forward
and inverse exact and vectorised without building a projection per request.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt
from pyproj import Geod

FloatArray = npt.NDArray[np.float64]


@lru_cache(maxsize=1)
def wgs84() -> Geod:
    """The WGS84 ellipsoid geodesic solver (built once per process)."""
    return Geod(ellps="WGS84")


def centroid(latitudes: npt.ArrayLike, longitudes: npt.ArrayLike) -> tuple[float, float]:
    """Origin of the local frame: the arithmetic mean latitude and longitude of the receivers."""
    lat = np.asarray(latitudes, dtype=np.float64)
    lon = np.asarray(longitudes, dtype=np.float64)
    return float(lat.mean()), float(lon.mean())


def to_local(
    lat0: float, lon0: float, latitudes: npt.ArrayLike, longitudes: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """WGS84 degrees → local (east, north) metres around ``(lat0, lon0)``."""
    lat = np.atleast_1d(np.asarray(latitudes, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(longitudes, dtype=np.float64))
    az, _, dist = wgs84().inv(np.full_like(lon, lon0), np.full_like(lat, lat0), lon, lat)
    az_rad = np.radians(np.asarray(az, dtype=np.float64))
    dist = np.asarray(dist, dtype=np.float64)
    return dist * np.sin(az_rad), dist * np.cos(az_rad)


def from_local(
    lat0: float, lon0: float, east: npt.ArrayLike, north: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Local (east, north) metres around ``(lat0, lon0)`` → WGS84 (latitude, longitude)."""
    e = np.atleast_1d(np.asarray(east, dtype=np.float64))
    n = np.atleast_1d(np.asarray(north, dtype=np.float64))
    az = np.degrees(np.arctan2(e, n))
    dist = np.hypot(e, n)
    lon, lat, _ = wgs84().fwd(np.full_like(e, lon0), np.full_like(n, lat0), az, dist)
    return np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)


def distance_m(lat1: float, lon1: float, lat2: npt.ArrayLike, lon2: npt.ArrayLike) -> FloatArray:
    """Geodesic distance in metres from one point to one or more points."""
    lat = np.atleast_1d(np.asarray(lat2, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon2, dtype=np.float64))
    _, _, dist = wgs84().inv(np.full_like(lon, lon1), np.full_like(lat, lat1), lon, lat)
    return np.asarray(dist, dtype=np.float64)


def pairwise_distance_m(
    lat1: npt.ArrayLike, lon1: npt.ArrayLike, lat2: npt.ArrayLike, lon2: npt.ArrayLike
) -> FloatArray:
    """Geodesic distances between matching points of two lists, in one vectorised call."""
    _, _, dist = wgs84().inv(
        np.asarray(lon1, dtype=np.float64),
        np.asarray(lat1, dtype=np.float64),
        np.asarray(lon2, dtype=np.float64),
        np.asarray(lat2, dtype=np.float64),
    )
    return np.asarray(dist, dtype=np.float64)
