"""Fuzz every body decoder: whatever the bytes, the only failure is a 4xx service error.

The targets are the functions the routes run on a body before anything else: /v1/predict and
/v1/predict/batch in JSON and MessagePack (workers/decoding.py), /v2 infer (header split, tensor
decoding and validation, app/web/oip/codec.py) and /v2's gzip/deflate inflation. Inputs are random
bytes, valid bodies mutated byte by byte, bodies with a bomb spliced in (deep nesting, numbers
of hundreds of digits, MessagePack containers that announce more than they hold) and JSON
documents generated from the shapes the schemas expect.

``make test`` runs a short, derandomized pass; ``make fuzz`` sets ``HEIMDALL_FUZZ_EXAMPLES``
for the long run (≥ 100,000 decoder inputs in all) and prints how many ran.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import zlib
from collections import Counter
from collections.abc import Callable
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.serving.schemas import BatchRequest
from app.web.oip.codec import decode_body, prepare
from app.web.oip.inflate import inflate
from tests.support.reference import reference_spec
from training.simulate import iter_batches, request_payload
from workers import decoding
from workers.errors import ServiceError
from workers.request import PredictRequest

EXAMPLES = int(os.environ.get("HEIMDALL_FUZZ_EXAMPLES", "200"))
LONG_RUN = "HEIMDALL_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not LONG_RUN,
    database=None,
    suppress_health_check=list(HealthCheck),
)
RAN: Counter[str] = Counter()
SPEC = reference_spec()

_PAYLOAD = request_payload(next(iter_batches(2, 404, chunk=2)), 0)
_PAYLOAD["receivers"] = [
    {**r, "iq": r["iq"][:64]} for r in _PAYLOAD["receivers"]
]  # short IQ: the decoder does not check lengths, and mutations stay fast
V1_JSON = json.dumps(_PAYLOAD).encode()
V1_MSGPACK = msgspec.msgpack.encode(msgspec.json.decode(V1_JSON, type=PredictRequest))
BATCH_JSON = json.dumps({"items": [_PAYLOAD, _PAYLOAD]}).encode()
BATCH_MSGPACK = msgspec.msgpack.encode(msgspec.json.decode(BATCH_JSON, type=BatchRequest))
V2_JSON = json.dumps(
    {
        "id": "x",
        "inputs": [
            {
                "name": t.name,
                "datatype": "FP32",
                "shape": [1, *t.shape[1:]],
                "data": [0.5] * math.prod(t.shape[1:]),
            }
            for role, t in SPEC.inputs.items()
        ],
        "outputs": [{"name": "mean", "parameters": {"binary_data": True}}],
    }
).encode()

BOMB_PIECES = [
    b"[" * 3000,
    b"]" * 3000,
    b'{"a":' * 3000,
    b"1" + b"0" * 400,
    b"-" + b"9" * 5000,
    b"1e999999",
    b"\x91" * 3000,  # MessagePack: fixarray of one, nested
    b"\x81\xa1a" * 2000,  # fixmap of one, nested
    b"\xdd\xff\xff\xff\xff",  # array32 announcing 4 billion items
    b"\xdb\x7f\xff\xff\xff",  # str32 announcing 2 GiB
    b"\xc7\xff\x01",  # ext8
    b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff",  # uint64 max
    b"\x00",
    b'"\\ud800"',
    b"NaN",
    b"Infinity",
]


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few edits: flips, deletions, truncation, bomb pieces spliced in."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "delete", "splice", "truncate", "bomb"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "splice":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = draw(st.sampled_from(BOMB_PIECES)) * draw(st.integers(1, 3))
    return bytes(data)


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats()
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


BOMB_VALUES = st.sampled_from(
    [10**400, [10**400], [[10**400]], [[-(10**350), 1]], [[1, [2]]], [["a"]], [[]], {}, 2**64]
)
"""Values that once escaped a decoder as OverflowError or ValueError (tensor data above all)."""


def _slots(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place a value can go: each dict key (and a new one), each list's first item."""
    found: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        found.append((*path, "unknown"))
        for key, value in node.items():
            found.append((*path, key))
            found += _slots(value, (*path, key))
    elif isinstance(node, list) and node:
        found.append((*path, 0))
        found += _slots(node[0], (*path, 0))
    return found


@st.composite
def json_documents(draw: st.DrawFn, seed: bytes) -> bytes:
    """A valid document with one value (at any depth, known field or not) replaced."""
    body = json.loads(seed)
    path = draw(st.sampled_from(_slots(body)))
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = draw(JSON_VALUES | BOMB_VALUES)
    text = json.dumps(body, allow_nan=True).encode()
    depth = draw(st.sampled_from([0, 0, 0, 3000]))
    return text[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}" if depth else text


def inputs(seed: bytes, *, is_json: bool) -> st.SearchStrategy[bytes]:
    """Random bytes, mutations of ``seed`` and (for JSON, half the time) generated documents."""
    choices = [st.binary(max_size=256), mutated(seed)]
    if is_json:
        choices += [json_documents(seed)] * 2
    return st.one_of(*choices)


def with_value(seed: bytes, path: tuple[Any, ...], value: Any) -> bytes:
    """``seed`` (JSON) with the value at ``path`` replaced: the bombs issue 17 reported."""
    body = json.loads(seed)
    parent = body
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return json.dumps(body).encode()


NESTING = b'{"unknown": ' + b"[" * 5000 + b"]" * 5000 + b"}"


def only_client_errors(name: str, call: Callable[[], Any]) -> None:
    """Run one decoder input: success, or a ServiceError with a 4xx status; nothing else."""
    RAN[name] += 1
    status = 200
    try:
        call()
    except ServiceError as exc:
        status = int(exc.status)
    assert status < 500, name


def v1(kind: type, fmt: decoding.Format) -> Callable[[bytes], Any]:
    decoder = msgspec.msgpack.Decoder(kind) if fmt == "MessagePack" else msgspec.json.Decoder(kind)
    return lambda body: decoding.decode(decoder.decode, body, "the body", fmt=fmt)


V1_TARGETS = [
    ("v1-predict-json", v1(PredictRequest, "JSON"), V1_JSON, True),
    ("v1-predict-msgpack", v1(PredictRequest, "MessagePack"), V1_MSGPACK, False),
    ("v1-batch-json", v1(BatchRequest, "JSON"), BATCH_JSON, True),
    ("v1-batch-msgpack", v1(BatchRequest, "MessagePack"), BATCH_MSGPACK, False),
]


@pytest.mark.parametrize(
    ("name", "target", "seed", "is_json"), V1_TARGETS, ids=[t[0] for t in V1_TARGETS]
)
def test_v1_body_decoders_raise_only_client_errors(
    name: str, target: Callable[[bytes], Any], seed: bytes, is_json: bool
) -> None:
    target(seed)  # the seed itself decodes

    @FUZZ
    @given(body=inputs(seed, is_json=is_json))
    @example(body=NESTING)
    @example(body=b"\x81\xa7unknown" + b"\x91" * 5000 + b"\xc0")
    def run(body: bytes) -> None:
        only_client_errors(name, lambda: target(body))

    run()


def v2_infer(body: bytes, header_length: str | None) -> None:
    request, binary = decode_body(body, header_length)
    prepare(request, binary, SPEC)


def test_v2_infer_decoding_raises_only_client_errors() -> None:
    v2_infer(V2_JSON, None)

    @FUZZ
    @given(body=inputs(V2_JSON, is_json=True), split=st.none() | st.integers(-5, 400))
    @example(body=with_value(V2_JSON, ("inputs", 0, "data"), [[10**400]]), split=None)
    @example(body=with_value(V2_JSON, ("inputs", 0, "data"), [10**400]), split=None)
    @example(body=NESTING, split=None)
    @example(body=with_value(V2_JSON, ("inputs", 0, "data"), [1e300]), split=None)
    def run(body: bytes, split: int | None) -> None:
        only_client_errors(
            "v2-infer", lambda: v2_infer(body, None if split is None else str(split))
        )

    run()


GZIP_SEED = gzip.compress(V2_JSON)
DEFLATE_SEED = zlib.compress(V2_JSON)


def test_v2_inflation_raises_only_client_errors() -> None:
    assert inflate(GZIP_SEED, "gzip", 1 << 20) == V2_JSON

    @FUZZ
    @given(
        body=st.one_of(mutated(GZIP_SEED), mutated(DEFLATE_SEED), st.binary(max_size=256)),
        encoding=st.sampled_from(["gzip", "deflate"]),
        limit=st.integers(0, 1 << 16),
    )
    def run(body: bytes, encoding: str, limit: int) -> None:
        only_client_errors("v2-inflate", lambda: inflate(body, encoding, limit))

    run()


def test_report_how_many_inputs_ran() -> None:
    """Runs last in this module: the total, and the ≥ 100,000 promise of ``make fuzz``."""
    total = sum(RAN.values())
    print(f"\ndecoder fuzzing: {total} inputs ({dict(RAN)})")
    if LONG_RUN:
        assert total >= 100_000, total
