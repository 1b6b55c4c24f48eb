"""HTTP body codecs (app/serving/schemas.py): JSON and MessagePack round trips; junk: DecodeError"""

from __future__ import annotations

import contextlib

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from app.serving.schemas import (
    BatchRequest,
    BatchResponse,
    FieldError,
    ModelRef,
    Position,
    PredictResponse,
    Problem,
    Timing,
    Uncertainty,
)
from workers.messages import Ellipse
from workers.request import PredictRequest, ReceiverCapture

FLOATS = st.floats(allow_nan=False, allow_infinity=False)
LEVEL = st.floats(0.0, 1.0, exclude_min=True, exclude_max=True)
RECEIVER = st.builds(
    ReceiverCapture,
    id=st.text(min_size=1, max_size=64),
    latitude=st.floats(-90, 90),
    longitude=st.floats(-180, 180),
    iq=st.binary(max_size=64),
    altitude_m=st.none() | FLOATS,
)
REQUEST = st.builds(
    PredictRequest,
    receivers=st.lists(RECEIVER, min_size=1, max_size=8),
    sample_rate_hz=st.floats(0, 1e9, exclude_min=True),
    center_frequency_hz=st.none() | st.floats(0, 1e10, exclude_min=True),
    confidence=st.lists(LEVEL, min_size=1, max_size=8),
    geojson=st.booleans(),
    cache=st.booleans(),
    request_id=st.none() | st.text(min_size=1, max_size=128),
    sticky=st.booleans(),
)
RESPONSE = st.builds(
    PredictResponse,
    request_id=st.text(max_size=20),
    position=st.builds(Position, FLOATS, FLOATS),
    uncertainty=st.builds(
        Uncertainty,
        covariance_enu_m2=st.lists(
            st.lists(FLOATS, min_size=2, max_size=2), min_size=2, max_size=2
        ),
        sigma_east_m=FLOATS,
        sigma_north_m=FLOATS,
        correlation=FLOATS,
        ellipses=st.lists(st.builds(Ellipse, LEVEL, FLOATS, FLOATS, FLOATS), max_size=3),
    ),
    model=st.builds(ModelRef, st.text(max_size=10), st.text(max_size=5)),
    cached=st.booleans(),
    timing_ms=st.builds(Timing, FLOATS, FLOATS, FLOATS, FLOATS),
)
PROBLEM = st.builds(
    Problem,
    title=st.text(max_size=20),
    status=st.integers(400, 599),
    detail=st.text(max_size=60),
    errors=st.lists(st.builds(FieldError, st.text(max_size=10), st.text(max_size=20)), max_size=2),
    request_id=st.none() | st.text(max_size=10),
)
CODECS = [
    (msgspec.json.encode, msgspec.json.decode),
    (msgspec.msgpack.encode, msgspec.msgpack.decode),
]


@settings(max_examples=80, deadline=None)
@given(request=REQUEST)
def test_predict_request_round_trips_in_json_and_msgpack(request: PredictRequest) -> None:
    for encode, decode in CODECS:
        assert decode(encode(request), type=PredictRequest) == request
        batch = BatchRequest([request])
        assert decode(encode(batch), type=BatchRequest) == batch


@settings(max_examples=80, deadline=None)
@given(results=st.lists(st.one_of(RESPONSE, PROBLEM), max_size=4))
def test_responses_round_trip_in_json_and_msgpack(
    results: list[PredictResponse | Problem],
) -> None:
    body = BatchResponse(results)
    for encode, decode in CODECS:
        assert decode(encode(body), type=BatchResponse) == body


JSON_DECODERS = [msgspec.json.Decoder(t) for t in (PredictRequest, BatchRequest)]
MSGPACK_DECODERS = [msgspec.msgpack.Decoder(t) for t in (PredictRequest, BatchRequest)]


@settings(max_examples=300, deadline=None)
@given(junk=st.binary(max_size=512))
def test_random_bytes_only_ever_raise_decode_error(junk: bytes) -> None:
    for decoder in JSON_DECODERS + MSGPACK_DECODERS:
        with contextlib.suppress(msgspec.DecodeError):  # incl. ValidationError (a subclass)
            decoder.decode(junk)


@settings(max_examples=200, deadline=None)
@given(
    value=st.recursive(
        st.none()
        | st.booleans()
        | FLOATS
        | st.integers(-(2**63), 2**63 - 1)
        | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_any_well_formed_document_is_accepted_or_a_validation_error(value: object) -> None:
    for encode, decoder in [(msgspec.json.encode, d) for d in JSON_DECODERS] + [
        (msgspec.msgpack.encode, d) for d in MSGPACK_DECODERS
    ]:
        with contextlib.suppress(msgspec.ValidationError):
            decoder.decode(encode(value))
