"""Property-based tests (hypothesis) of the pure functions workers rely on."""

from __future__ import annotations

import contextlib
import itertools
import math

import msgspec
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.serving.cache import input_digest
from tests.support.procs import REFERENCE
from workers.features import band_power_db, extract_features
from workers.messages import (
    Ack,
    Ellipse,
    Hello,
    InferReply,
    ItemError,
    Load,
    Ping,
    Predict,
    Prediction,
    PredictItem,
    PredictReply,
    Timings,
    reply_decoder,
    request_decoder,
    request_encoder,
)
from workers.spec import decode_spec
from workers.uncertainty import covariance, cut_at_antimeridian, ellipse_axes, ellipse_polygon

SPEC = decode_spec((REFERENCE / "model_spec.json").read_bytes()).features
SAMPLES = SPEC.n_fft * SPEC.n_frames
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FINITE32 = st.floats(allow_nan=False, allow_infinity=False, width=32)

# ------------------------------------------------------------------------------ features


def iq_arrays(elements: st.SearchStrategy[float]) -> st.SearchStrategy[np.ndarray]:
    """(receivers, samples) complex64 arrays built from float32 I and Q."""
    return (
        st.integers(1, 3)
        .flatmap(lambda k: hnp.arrays(np.float32, (k, SAMPLES * 2), elements=elements))
        .map(lambda a: a.view(np.complex64))
    )


@PROPS
@given(iq=iq_arrays(FINITE32))
def test_features_are_finite_with_the_declared_shape_for_any_finite_iq(iq: np.ndarray) -> None:
    features = extract_features(iq, SPEC)
    assert features.shape == (iq.shape[0], SPEC.n_frames, SPEC.n_bands)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()


def test_features_of_silence_and_of_full_scale_are_finite() -> None:
    for fill in (0.0, 3.4e38, -3.4e38, 1e-45):
        iq = np.full((2, SAMPLES), fill + 1j * fill, dtype=np.complex64)
        assert np.isfinite(extract_features(iq, SPEC)).all(), fill


@PROPS
@given(
    seed=st.integers(0, 2**32 - 1),
    level_db=st.floats(-100, -20),
    gain_db=st.floats(-40, 40),
)
def test_scaling_iq_by_a_gain_shifts_features_by_gain_over_norm_std(
    seed: int, level_db: float, gain_db: float
) -> None:
    rng = np.random.default_rng(seed)
    amplitude = 10 ** (level_db / 20)
    iq = (rng.normal(size=(2, SAMPLES)) + 1j * rng.normal(size=(2, SAMPLES))) * amplitude
    iq = iq.astype(np.complex64)
    scaled = (iq * np.float32(10 ** (gain_db / 20))).astype(np.complex64)
    # Only where both stay above the dB floor is the shift exact.
    assume(band_power_db(iq, SPEC).min() > SPEC.db_floor + 1)
    assume(band_power_db(scaled, SPEC).min() > SPEC.db_floor + 1)
    shift = extract_features(scaled, SPEC) - extract_features(iq, SPEC)
    np.testing.assert_allclose(shift, gain_db / SPEC.norm_std_db, atol=2e-3)


# ------------------------------------------------------------------------------ uncertainty

SIGMA = st.floats(1e-3, 1e6)
RHO = st.floats(-0.999, 0.999)
LEVEL = st.floats(0.01, 0.999)


@PROPS
@given(se=SIGMA, sn=SIGMA, rho=RHO, level=LEVEL)
def test_ellipse_axes_are_ordered_and_azimuth_is_folded(
    se: float, sn: float, rho: float, level: float
) -> None:
    major, minor, azimuth = ellipse_axes(covariance(se, sn, rho), level)
    assert major >= minor >= 0.0
    assert 0.0 <= azimuth < 180.0
    assert all(math.isfinite(x) for x in (major, minor, azimuth))


def angle_gap(a: float, b: float) -> float:
    """Distance between two axis directions (mod 180°)."""
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


@PROPS
@given(se=SIGMA, sn=SIGMA, rho=RHO, level=LEVEL)
def test_flipping_the_correlation_mirrors_the_azimuth(
    se: float, sn: float, rho: float, level: float
) -> None:
    major, minor, azimuth = ellipse_axes(covariance(se, sn, rho), level)
    major2, minor2, azimuth2 = ellipse_axes(covariance(se, sn, -rho), level)
    assert major2 == pytest.approx(major, rel=1e-9)
    assert minor2 == pytest.approx(minor, rel=1e-6, abs=1e-9 * major)
    # Mirror across the north axis: azimuth a -> 180 - a (mod 180). A near-circle has no
    # defined axis, so only check when the axes differ measurably.
    assume(major - minor > 1e-6 * major)
    assert angle_gap(azimuth2, (180.0 - azimuth) % 180.0) < 1e-6


def shoelace(ring: list[list[float]]) -> float:
    """Signed area (positive: counter-clockwise) of a lon/lat ring."""
    return 0.5 * sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in itertools.pairwise(ring))


ELLIPSES = {
    "lat": st.floats(-80, 80),
    "lon": st.floats(-179, 179),
    "se": st.floats(10, 50_000),
    "sn": st.floats(10, 50_000),
    "rho": RHO,
    "level": LEVEL,
}
"""An ellipse anywhere a receiver network can be (sigmas 10 m to 50 km)."""


@settings(max_examples=40, deadline=None)
@given(**ELLIPSES)
def test_polygon_is_closed_and_counter_clockwise(
    lat: float, lon: float, se: float, sn: float, rho: float, level: float
) -> None:
    ring = ellipse_polygon(lat, lon, covariance(se, sn, rho), level, vertices=64)
    assert len(ring) == 65 and ring[0] == ring[-1]
    centred = [[x - lon, y - lat] for x, y in ring]
    assert shoelace(centred) > 0


@settings(max_examples=60, deadline=None)
@given(
    **{
        **ELLIPSES,
        "lon": st.one_of(st.floats(-180, 180), st.floats(179, 180), st.floats(-180, -179)),
    }
)
def test_geojson_rings_never_cross_the_antimeridian(
    lat: float, lon: float, se: float, sn: float, rho: float, level: float
) -> None:
    # RFC 7946 3.1.9: cut in two at ±180; each part closed, counter-clockwise, in range.
    ring = ellipse_polygon(lat, lon, covariance(se, sn, rho), level, vertices=64)
    parts = cut_at_antimeridian(ring)
    assert 1 <= len(parts) <= 2
    for part in parts:
        assert part[0] == part[-1] and len(part) >= 4
        assert all(-180.0 <= x <= 180.0 for x, _ in part), part
        assert shoelace(part) > 0
    # Nothing lost or added but what rounding to 1e-7 degree moves: each of the cut points
    # and shifted vertices by up to 5e-8 degree, so at most ≈ perimeter × 1e-7 of area (a
    # 10 m wide sliver's share of that went past a fixed 1e-9 in CI).
    whole = shoelace([[x - lon, y] for x, y in ring])
    perimeter = sum(math.dist(a, b) for a, b in itertools.pairwise(ring))
    slack = 1e-9 + 2e-7 * perimeter
    assert sum(shoelace(p) for p in parts) == pytest.approx(whole, rel=1e-3, abs=slack)


# ------------------------------------------------------------------------------ IPC codec

FLOATS = st.floats(allow_nan=False, allow_infinity=False)
ITEMS = st.builds(
    PredictItem,
    iq=st.binary(max_size=64),
    latitudes=st.lists(FLOATS, max_size=7),
    longitudes=st.lists(FLOATS, max_size=7),
    levels=st.lists(FLOATS, max_size=3),
    geojson=st.booleans(),
)
IDS = st.integers(0, 2**63 - 1)
REQUESTS = st.one_of(
    st.builds(
        Predict,
        id=IDS,
        version=st.text(max_size=8),
        items=st.lists(ITEMS, max_size=3),
        deadlines_ns=st.lists(IDS, max_size=3),
    ),
    st.builds(
        Load,
        id=IDS,
        version=st.text(max_size=8),
        model_path=st.text(max_size=20),
        spec=st.binary(max_size=32),
    ),
    st.builds(Ping, id=IDS),
)
PREDICTIONS = st.builds(
    Prediction,
    latitude=FLOATS,
    longitude=FLOATS,
    covariance_enu_m2=st.lists(st.lists(FLOATS, min_size=2, max_size=2), min_size=2, max_size=2),
    sigma_east_m=FLOATS,
    sigma_north_m=FLOATS,
    correlation=FLOATS,
    ellipses=st.lists(st.builds(Ellipse, FLOATS, FLOATS, FLOATS, FLOATS), max_size=3),
)
REPLIES = st.one_of(
    st.builds(Hello, pid=st.integers(1, 2**22)),
    st.builds(Ack, id=IDS, ok=st.booleans(), code=st.text(max_size=8), detail=st.text(max_size=30)),
    st.builds(
        PredictReply,
        id=IDS,
        results=st.lists(
            st.one_of(PREDICTIONS, st.builds(ItemError, st.text(max_size=8), st.text(max_size=20))),
            max_size=3,
        ),
        timings=st.builds(Timings, IDS, IDS, IDS, IDS),
    ),
    st.builds(InferReply, id=IDS, mean=st.binary(max_size=16), sigma=st.binary(max_size=16)),
)


@PROPS
@given(message=REQUESTS)
def test_requests_round_trip_through_msgpack(message: object) -> None:
    assert request_decoder.decode(request_encoder.encode(message)) == message


@PROPS
@given(message=REPLIES)
def test_replies_round_trip_through_msgpack(message: object) -> None:
    assert reply_decoder.decode(request_encoder.encode(message)) == message


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=256))
def test_random_bytes_only_ever_raise_decode_error(junk: bytes) -> None:
    for decoder in (request_decoder, reply_decoder):
        with contextlib.suppress(msgspec.DecodeError):  # incl. ValidationError (a subclass)
            decoder.decode(junk)


# ------------------------------------------------------------------------------ cache key

RECEIVER = st.tuples(
    st.text(min_size=1, max_size=8),
    st.floats(-90, 90),
    st.floats(-180, 180),
    st.binary(max_size=32),
)
RECEIVERS = st.lists(RECEIVER, min_size=1, max_size=7, unique_by=lambda r: r[0])


@PROPS
@given(receivers=RECEIVERS, rate=st.floats(1, 1e6), data=st.data())
def test_input_digest_ignores_receiver_order(
    receivers: list[tuple[str, float, float, bytes]], rate: float, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(receivers))
    levels = [0.5, 0.9]
    assert input_digest(receivers, rate, levels, False) == input_digest(
        list(shuffled), rate, levels, False
    )


@PROPS
@given(receivers=RECEIVERS, rate=st.floats(1, 1e6), data=st.data())
def test_input_digest_changes_with_any_input_change(
    receivers: list[tuple[str, float, float, bytes]], rate: float, data: st.DataObject
) -> None:
    levels, geojson = [0.5, 0.9], False
    base = input_digest(receivers, rate, levels, geojson)
    index = data.draw(st.integers(0, len(receivers) - 1))
    rx_id, lat, lon, iq = receivers[index]
    what = data.draw(
        st.sampled_from(["id", "lat", "lon", "iq", "drop", "rate", "levels", "geojson", "encoding"])
    )
    changed = list(receivers)
    new_rate, new_levels, new_geojson, new_encoding = rate, levels, geojson, 0
    if what == "id":
        new_id = data.draw(
            st.text(min_size=1, max_size=8).filter(lambda s: s not in {r[0] for r in receivers})
        )
        changed[index] = (new_id, lat, lon, iq)
    elif what == "lat":
        changed[index] = (rx_id, data.draw(st.floats(-90, 90).filter(lambda v: v != lat)), lon, iq)
    elif what == "lon":
        changed[index] = (
            rx_id,
            lat,
            data.draw(st.floats(-180, 180).filter(lambda v: v != lon)),
            iq,
        )
    elif what == "iq":
        changed[index] = (
            rx_id,
            lat,
            lon,
            data.draw(st.binary(max_size=32).filter(lambda b: b != iq)),
        )
    elif what == "drop":
        assume(len(receivers) > 1)
        del changed[index]
    elif what == "rate":
        new_rate = data.draw(st.floats(1, 1e6).filter(lambda v: v != rate))
    elif what == "levels":
        new_levels = data.draw(st.sampled_from([[0.5, 0.95], [0.5], [0.5, 0.9, 0.95]]))
    elif what == "encoding":  # the same bytes as JSON text, MessagePack bin or samples
        new_encoding = data.draw(st.sampled_from([1, 2]))
    else:
        new_geojson = True
    assert input_digest(changed, new_rate, new_levels, new_geojson, new_encoding) != base, what
