"""A request checked against the answering version's capture contract, packed for a worker.

The served model's spec states what it can answer: the sample rate, how many receivers, how
many samples each, and (for a model trained on one network) which receivers and where. A
request that does not fit is refused here with the failing field's path, before any work is
queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from app.serving.schemas import PredictRequest
from app.serving.versions import VersionContext
from workers.errors import InvalidInput
from workers.geo import pairwise_distance_m
from workers.messages import PredictItem


@dataclass
class Prepared:
    """A validated request bound to the version that will answer it."""

    request: PredictRequest
    request_id: str
    context: VersionContext
    item: PredictItem


def validate(
    request: PredictRequest, request_id: str, ctx: VersionContext, prefix: str = "$"
) -> Prepared:
    """Check one request against ``ctx``'s capture contract and pack it for a worker.

    Raises:
        InvalidInput: the captures do not fit the model (with the field path).
    """
    cap = ctx.package.spec.capture
    if not math.isclose(request.sample_rate_hz, cap.sample_rate_hz, rel_tol=1e-9):
        raise InvalidInput(
            f"sample_rate_hz is {request.sample_rate_hz:g} but model {ctx.name} v{ctx.version}"
            f" expects {cap.sample_rate_hz:g} Hz captures; resample or send matching captures",
            field=f"{prefix}.sample_rate_hz",
        )
    count = len(request.receivers)
    if not cap.min_receivers <= count <= cap.max_receivers:
        raise InvalidInput(
            f"{count} receivers sent; this model needs between {cap.min_receivers} and "
            f"{cap.max_receivers}",
            field=f"{prefix}.receivers",
        )
    expected = cap.samples_per_receiver * 8
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
                f"{cap.samples_per_receiver} complex64 samples per receiver",
                field=f"{path}.iq",
            )
    if ctx.known:
        check_network(ctx, request, prefix)
    iq = b"".join(rx.iq for rx in request.receivers)
    item = PredictItem(
        iq,
        [rx.latitude for rx in request.receivers],
        [rx.longitude for rx in request.receivers],
        list(request.confidence),
        request.geojson,
    )
    return Prepared(request, request_id, ctx, item)


def check_network(ctx: VersionContext, request: PredictRequest, prefix: str) -> None:
    """Every receiver is one the model was trained on, near its trained position.

    Raises:
        InvalidInput: an unknown receiver id, or one beyond the position tolerance.
    """
    tolerance = ctx.package.spec.capture.position_tolerance_m
    for i, rx in enumerate(request.receivers):
        if rx.id not in ctx.known:
            raise InvalidInput(
                f"receiver {rx.id!r} is not part of the network model {ctx.name} "
                f"v{ctx.version} was trained on (known: {', '.join(sorted(ctx.known))})",
                field=f"{prefix}.receivers[{i}].id",
            )
    trained = [ctx.known[rx.id] for rx in request.receivers]
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
