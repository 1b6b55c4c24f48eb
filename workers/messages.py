"""Typed IPC between the pool (parent) and its worker processes.

Every message is a msgspec Struct in a tagged union, encoded as MessagePack; arrays travel as
raw little-endian bytes. Nothing is pickled. Each request carries an ``id`` that the reply
echoes, so the parent resolves exactly one future per message.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct


class PredictItem(Struct, array_like=True, frozen=True):
    """One capture set: ``k`` receivers' IQ (complex64, concatenated) and their positions.

    Or, with ``encoding`` set, a whole undecoded ``/v1/predict`` body in ``iq`` (or in the
    arena) that the worker decodes and checks itself (workers/request.py); the other fields
    are then empty.
    """

    iq: bytes
    latitudes: list[float]
    longitudes: list[float]
    levels: list[float]
    geojson: bool = False
    iq_offset: int = -1
    """When ≥ 0, ``iq`` is empty and the samples are in the worker's arena at this offset."""
    iq_length: int = 0
    """Bytes of IQ in the arena."""
    encoding: int = 0
    """0: ``iq`` is complex64 samples; 1/2: it is a JSON/MessagePack request body."""


class Ellipse(Struct, frozen=True):
    """One confidence ellipse."""

    confidence: float
    semi_major_m: float
    semi_minor_m: float
    azimuth_deg: float


class Prediction(Struct, tag="ok", frozen=True):
    """A decoded prediction for one item."""

    latitude: float
    longitude: float
    covariance_enu_m2: list[list[float]]
    sigma_east_m: float
    sigma_north_m: float
    correlation: float
    ellipses: list[Ellipse]
    geojson: dict[str, Any] | None = None
    domain_inside: bool = True
    """Whether the capture lies inside the model's trained domain."""
    domain_reasons: list[str] = []
    """Why it does not (empty when inside)."""


class ItemError(Struct, tag="err", frozen=True):
    """A per-item failure, as data (see :func:`workers.errors.from_code`)."""

    code: str
    detail: str
    field: str | None = None


class Timings(Struct, array_like=True, frozen=True):
    """Worker-side phase boundaries, wall-clock nanoseconds (``time.time_ns``)."""

    features_start_ns: int = 0
    features_end_ns: int = 0
    inference_start_ns: int = 0
    inference_end_ns: int = 0


# Parent → worker --------------------------------------------------------------------------


class Load(Struct, tag="load", frozen=True):
    """Build, warm up and validate a session for ``version``."""

    id: int
    version: str
    model_path: str
    spec: bytes
    sha256: str = ""
    """Digest the file had when it was verified; the worker re-checks it before loading."""
    label: str = ""
    """The model and version as problems name them (``model heimdall v3``)."""


class Unload(Struct, tag="unload", frozen=True):
    """Drop the session of ``version``."""

    id: int
    version: str


class Predict(Struct, tag="predict", frozen=True):
    """Localise ``items`` with ``version`` as one ONNX batch."""

    id: int
    version: str
    items: list[PredictItem]
    deadlines_ns: list[int] = []
    """Per item: wall-clock time (``time.time_ns``) after which it is not computed."""
    traces: list[str] = []
    """Per item: the request's trace as ``TRACEID-SPANID`` for the worker's log lines (empty
    when no request of the message is traced)."""


class Infer(Struct, tag="infer", frozen=True):
    """Run ``version`` on ready-made input tensors (Open Inference Protocol path)."""

    id: int
    version: str
    batch: int
    features: bytes
    receivers: bytes
    mask: bytes
    trace: str = ""
    """The request's trace as ``TRACEID-SPANID`` for the worker's log lines ('' untraced)."""


class Ping(Struct, tag="ping", frozen=True):
    """Liveness probe, answered by the worker's receive thread."""

    id: int


class Stop(Struct, tag="stop", frozen=True):
    """Finish queued work and exit."""

    id: int


Request = Load | Unload | Predict | Infer | Ping | Stop
"""What a production worker accepts; test-only messages are not part of it."""


# Test-only, parent → worker ---------------------------------------------------------------


class Hang(Struct, tag="hang", frozen=True):
    """Test hook: block the compute thread for ``seconds``.

    Not in :data:`Request`: :data:`request_decoder` refuses it, so a production worker drops
    it as undecodable. Only a worker started with ``test_hooks`` decodes it, with
    :data:`test_request_decoder`.
    """

    id: int
    seconds: float


TestRequest = Request | Hang
"""What a worker started with test hooks accepts."""

# Worker → parent --------------------------------------------------------------------------


class Hello(Struct, tag="hello", frozen=True):
    """Sent once when the worker is up and can take messages."""

    pid: int


class Ack(Struct, tag="ack", frozen=True):
    """Outcome of Load/Unload (and of the test-only Hang)."""

    id: int
    ok: bool
    code: str = ""
    detail: str = ""


class Pong(Struct, tag="pong", frozen=True):
    """Answer to Ping; ``busy_s`` is how long the current message has been computing."""

    id: int
    busy_s: float


class PredictReply(Struct, tag="predicted", frozen=True):
    """Results of a Predict, aligned with its items."""

    id: int
    results: list[Prediction | ItemError]
    timings: Timings


class InferReply(Struct, tag="inferred", frozen=True):
    """Raw output tensors of an Infer, or an error."""

    id: int
    mean: bytes = b""
    sigma: bytes = b""
    rho: bytes = b""
    error: ItemError | None = None
    timings: Timings = Timings()


Reply = Hello | Ack | Pong | PredictReply | InferReply

request_encoder = msgspec.msgpack.Encoder()
request_decoder = msgspec.msgpack.Decoder(Request)
test_request_decoder = msgspec.msgpack.Decoder(TestRequest)
reply_decoder = msgspec.msgpack.Decoder(Reply)
