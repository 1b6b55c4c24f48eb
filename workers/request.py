"""The ``/v1/predict`` body: its schema, the head an HTTP process reads, the capture check.

Issue 23 moved the decoding of a single prediction out of the HTTP process: the HTTP process
reads only a :class:`Head` (the schema with each IQ left as its raw encoded value — no base64
decode, no copy) to route, key the cache and keep the answer log, and hands the body itself
to a pool worker. The worker decodes it into :class:`PredictRequest` through
the one decoding boundary (workers/decoding.py) and checks it against the version's capture
contract with :func:`check_capture`, so problems keep the same field paths and wording
wherever the body is decoded (batch items are still decoded by the HTTP process, with the
same two functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar

import msgspec
from msgspec import Meta, Struct

from workers.decoding import Format, decode
from workers.errors import InvalidInput
from workers.geo import pairwise_distance_m
from workers.messages import PredictItem
from workers.spec import CaptureSpec

Latitude = Annotated[float, Meta(ge=-90.0, le=90.0, description="WGS84 latitude, degrees")]
Longitude = Annotated[float, Meta(ge=-180.0, le=180.0, description="WGS84 longitude, degrees")]
Level = Annotated[float, Meta(gt=0.0, lt=1.0)]

JSON_BODY = 1
"""``PredictItem.encoding`` of an undecoded JSON body."""
MSGPACK_BODY = 2
"""``PredictItem.encoding`` of an undecoded MessagePack body."""


ReceiverId = Annotated[str, Meta(min_length=1, max_length=64, description="Receiver identifier")]
Receivers = Meta(min_length=1, max_length=64)
SampleRate = Annotated[float, Meta(gt=0.0)]
CenterFrequency = Annotated[float, Meta(gt=0.0)] | None
Confidence = Annotated[list[Level], Meta(min_length=1, max_length=8)]
RequestId = Annotated[str, Meta(min_length=1, max_length=128)] | None


def _levels() -> list[float]:
    return [0.5, 0.9, 0.95]


R = TypeVar("R")
IQ = TypeVar("IQ")


class _Receiver(Struct, Generic[IQ], frozen=True):
    id: ReceiverId
    latitude: Latitude
    longitude: Longitude
    iq: IQ
    altitude_m: float | None = None


class _Body(Struct, Generic[R], frozen=True):
    receivers: Annotated[list[R], Receivers]
    sample_rate_hz: SampleRate
    center_frequency_hz: CenterFrequency = None
    confidence: Confidence = msgspec.field(default_factory=_levels)
    geojson: bool = False
    cache: bool = True
    request_id: RequestId = None
    sticky: bool = False
    """Route by a hash of ``request_id`` so the same id always reaches the same version."""


IQBytes = Annotated[
    bytes,
    Meta(description="Little-endian complex64 samples (interleaved float32 I,Q); base64 in JSON"),
]


class ReceiverCapture(_Receiver[IQBytes], frozen=True):
    """One receiver's capture: where it is and what it heard."""


class PredictRequest(_Body[ReceiverCapture], frozen=True):
    """``POST /v1/predict`` body."""


class HeadReceiver(_Receiver[msgspec.Raw], frozen=True):
    """:class:`ReceiverCapture` with its IQ left as the raw encoded value (not decoded)."""


class Head(_Body[HeadReceiver], frozen=True):
    """What the HTTP process decodes of a ``/v1/predict`` body: the schema, IQ left encoded.

    The same fields, types and constraints as :class:`PredictRequest` except that each
    ``iq`` is not decoded, so a body the head accepts is one the schema accepts unless an IQ
    value does not decode (the worker decodes it). That is what makes a cache hit safe
    without the worker: the key covers every IQ value as sent, and an entry exists only for
    a body whose IQ decoded and whose captures passed the contract (an outside review found
    cached 200s for bodies the schema refuses when the head checked nothing).
    """


_request_decoders: dict[int, Callable[[Any], PredictRequest]] = {
    JSON_BODY: msgspec.json.Decoder(PredictRequest).decode,
    MSGPACK_BODY: msgspec.msgpack.Decoder(PredictRequest).decode,
}
_head_decoders: dict[int, Callable[[Any], Head]] = {
    JSON_BODY: msgspec.json.Decoder(Head).decode,
    MSGPACK_BODY: msgspec.msgpack.Decoder(Head).decode,
}
_FORMATS: dict[int, Format] = {JSON_BODY: "JSON", MSGPACK_BODY: "MessagePack"}


def decode_request(body: Any, encoding: int, where: str = "") -> PredictRequest:
    """The full, checked request of a body (``encoding``: :data:`JSON_BODY`/:data:`MSGPACK_BODY`).

    Raises:
        MalformedRequest: undecodable or schema-violating body (with the field path).
    """
    fmt = _FORMATS[encoding]
    return decode(_request_decoders[encoding], body, "the body", where, fmt)


def decode_head(body: bytes, encoding: int, where: str = "") -> Head:
    """The head of a body, checked by the schema except for the IQ values.

    A body with several faults may name a later one than the full decode would (an IQ value
    that does not decode is only found by the worker).

    Raises:
        MalformedRequest: undecodable or schema-violating body (with the field path).
    """
    fmt = _FORMATS[encoding]
    return decode(_head_decoders[encoding], body, "the body", where, fmt)


def known_receivers(capture: CaptureSpec) -> dict[str, tuple[float, float]]:
    """The trained receiver network by id, for :func:`check_capture` (empty: any position)."""
    return {r.id: (r.latitude, r.longitude) for r in capture.receivers}


def check_capture(
    request: PredictRequest,
    capture: CaptureSpec,
    known: dict[str, tuple[float, float]],
    label: str,
    prefix: str = "$",
) -> PredictItem:
    """Check one request against a version's capture contract and pack it for the model.

    Args:
        request: the decoded request.
        capture: the answering version's capture contract.
        known: its trained receiver network by id (empty: any position is accepted).
        label: the model and version for messages (``"model heimdall v3"``).
        prefix: JSON path of the request in the body (``$`` or ``$.items[4]``).

    Raises:
        InvalidInput: the captures do not fit the model (with the field path).
    """
    if not math.isclose(request.sample_rate_hz, capture.sample_rate_hz, rel_tol=1e-9):
        raise InvalidInput(
            f"sample_rate_hz is {request.sample_rate_hz:g} but {label} expects "
            f"{capture.sample_rate_hz:g} Hz captures; resample or send matching captures",
            field=f"{prefix}.sample_rate_hz",
        )
    count = len(request.receivers)
    if not capture.min_receivers <= count <= capture.max_receivers:
        raise InvalidInput(
            f"{count} receivers sent; this model needs between {capture.min_receivers} and "
            f"{capture.max_receivers}",
            field=f"{prefix}.receivers",
        )
    expected = capture.samples_per_receiver * 8
    seen: set[str] = set()
    for i, rx in enumerate(request.receivers):
        path = f"{prefix}.receivers[{i}]"
        if rx.id in seen:
            raise InvalidInput(
                f"receiver id {rx.id!r} appears more than once; send each receiver once",
                field=f"{path}.id",
            )
        seen.add(rx.id)
        size = len(rx.iq)
        if size % 8:
            raise InvalidInput(
                f"iq has {size} bytes, not a whole number of complex64 samples "
                "(8 bytes each: little-endian float32 I then Q)",
                field=f"{path}.iq",
            )
        if size != expected:
            raise InvalidInput(
                f"iq holds {size // 8} samples; this model needs exactly "
                f"{capture.samples_per_receiver} complex64 samples per receiver",
                field=f"{path}.iq",
            )
    if known:
        check_network(request, capture.position_tolerance_m, known, label, prefix)
    return PredictItem(
        b"".join(rx.iq for rx in request.receivers),
        [rx.latitude for rx in request.receivers],
        [rx.longitude for rx in request.receivers],
        list(request.confidence),
        request.geojson,
    )


def check_network(
    request: PredictRequest,
    tolerance: float,
    known: dict[str, tuple[float, float]],
    label: str,
    prefix: str,
) -> None:
    """Every receiver is one the model was trained on, near its trained position.

    Raises:
        InvalidInput: an unknown receiver id, or one beyond the position tolerance.
    """
    for i, rx in enumerate(request.receivers):
        if rx.id not in known:
            raise InvalidInput(
                f"receiver {rx.id!r} is not part of the network {label} was trained on "
                f"(known: {', '.join(sorted(known))})",
                field=f"{prefix}.receivers[{i}].id",
            )
    trained = [known[rx.id] for rx in request.receivers]
    offsets = pairwise_distance_m(
        [t[0] for t in trained],
        [t[1] for t in trained],
        [rx.latitude for rx in request.receivers],
        [rx.longitude for rx in request.receivers],
    )
    for i, off in enumerate(offsets.tolist()):
        if off > tolerance:
            rx = request.receivers[i]
            lat, lon = trained[i]
            raise InvalidInput(
                f"receiver {rx.id!r} is reported {off:.0f} m from its trained position "
                f"({lat:.5f}, {lon:.5f}); the tolerance is {tolerance:.0f} m",
                field=f"{prefix}.receivers[{i}]",
            )
