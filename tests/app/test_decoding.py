"""The decoding boundary (workers/decoding.py): any decoder failure is a 400, never an exception
that escapes as a 500 — nesting bombs, number bombs, junk, for JSON and MessagePack."""

from __future__ import annotations

import json
import logging

import msgspec
import pytest

from app.serving.schemas import BatchRequest
from app.web.oip.codec import decode_body, prepare
from tests.support.reference import reference_spec
from workers import decoding
from workers.errors import MalformedRequest
from workers.request import PredictRequest

DEPTH = 5000  # far beyond the interpreter's recursion limit


def json_nesting_bomb() -> bytes:
    """A 10 kB body: a deep list inside a field no schema knows."""
    return b'{"unknown": ' + b"[" * DEPTH + b"]" * DEPTH + b', "receivers": []}'


def msgpack_nesting_bomb() -> bytes:
    """The same in MessagePack: {"unknown": [[[...]]]} (fixarray of one, DEPTH times)."""
    return b"\x81\xa7unknown" + b"\x91" * DEPTH + b"\xc0"


@pytest.mark.parametrize("kind", [PredictRequest, BatchRequest])
@pytest.mark.parametrize(
    ("fmt", "body"),
    [("JSON", json_nesting_bomb()), ("MessagePack", msgpack_nesting_bomb())],
)
def test_nesting_bomb_in_an_unknown_field_is_a_400(kind: type, fmt: str, body: bytes) -> None:
    decoder = msgspec.msgpack.Decoder(kind) if fmt == "MessagePack" else msgspec.json.Decoder(kind)
    with pytest.raises(MalformedRequest, match="nested too deeply") as caught:
        decoding.decode(decoder.decode, body, "the body", fmt=fmt)  # type: ignore[arg-type]
    assert caught.value.status == 400


def test_any_exception_a_decoder_raises_is_a_400_logged_on_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(_: bytes) -> None:
        raise OverflowError("int too large to convert to float")

    with caplog.at_level(logging.INFO, "heimdall.decoding"):
        with pytest.raises(MalformedRequest, match="out of range"):
            decoding.decode(explode, b"x", "the body", "POST /v1/predict")
        with pytest.raises(MalformedRequest, match="not valid JSON"):
            decoding.decode(msgspec.json.decode, b"{", "the body", "POST /v1/predict")
    lines = [r for r in caplog.records if r.name == "heimdall.decoding"]
    assert len(lines) == 2 and all(r.exc_info is None for r in lines)
    assert "POST /v1/predict" in lines[0].getMessage()


def test_schema_violation_keeps_its_field_path() -> None:
    body = json.dumps({"receivers": [{"id": 1}], "sample_rate_hz": 48000}).encode()
    with pytest.raises(MalformedRequest) as caught:
        decoding.decode(msgspec.json.Decoder(PredictRequest).decode, body, "the body")
    assert caught.value.field == "$.receivers[0].id"


def v2_body(data: bytes) -> bytes:
    """A /v2 infer body whose first input's JSON data is ``data`` (raw JSON text)."""
    spec = reference_spec()
    inputs = []
    for tensor in spec.inputs.values():
        shape = [1, *tensor.shape[1:]]
        inputs.append(
            f'{{"name": "{tensor.name}", "datatype": "FP32", "shape": {shape}, "data": DATA}}'
        )
    return (
        ('{"inputs": [' + ", ".join(inputs) + "]}")
        .replace("DATA", data.decode(), 1)
        .replace("DATA", "[0]")
        .encode()
    )


@pytest.mark.parametrize(
    "data",
    [
        b"[[" + b"1" + b"0" * 400 + b"]]",  # 400-digit integer in nested data: OverflowError
        b"[" * DEPTH + b"]" * DEPTH,  # nesting bomb in tensor data: RecursionError
        b"[1" + b"0" * 400 + b"]",  # in flat data
        b"[[1, [2]]]",  # ragged
        b'[["a"]]',  # not numbers
        b"[1e300]",  # finite in JSON, infinite in FP32 (found by make fuzz)
        b"[[-1e300]]",
    ],
    ids=[
        "huge-int-nested",
        "nesting-bomb",
        "huge-int-flat",
        "ragged",
        "strings",
        "fp32-over",
        "fp32-over-nested",
    ],
)
def test_v2_tensor_data_bombs_are_a_400(data: bytes) -> None:
    with pytest.raises(MalformedRequest):
        prepare(*decode_body(v2_body(data), None), reference_spec())


def test_v2_value_beyond_fp32_says_so() -> None:
    with pytest.raises(MalformedRequest, match="outside the FP32 range"):
        prepare(*decode_body(v2_body(b"[1e300]"), None), reference_spec())


def test_v2_header_nesting_bomb_is_a_400() -> None:
    body = b'{"inputs": [], "parameters": {"x": ' + b"[" * DEPTH + b"]" * DEPTH + b"}}"
    with pytest.raises(MalformedRequest, match="nested too deeply"):
        decode_body(body, None)
