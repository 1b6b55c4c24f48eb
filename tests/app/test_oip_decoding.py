"""Decoding and validation of /v2 infer bodies against the reference model's spec (no server)."""

from __future__ import annotations

import gzip
import json
import os
import tracemalloc
import zlib

import numpy as np
import pytest

from app.serving.errors import PayloadTooLarge
from app.web.oip.codec import decode_body, prepare
from app.web.oip.inflate import INFLATE_SLICE, inflate
from tests.support.reference import reference_spec
from workers.errors import MalformedRequest


def header_and_data(batch: int) -> tuple[bytes, bytes, dict[str, np.ndarray]]:
    spec = reference_spec()
    rng = np.random.default_rng(batch)
    arrays = {
        t.name: rng.standard_normal([batch, *t.shape[1:]]).astype("<f4")
        for t in spec.inputs.values()
    }
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": "FP32",
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for n, a in arrays.items()
            ]
        }
    ).encode()
    return header, b"".join(a.tobytes() for a in arrays.values()), arrays


def test_binary_inputs_are_split_by_header_length_and_sizes() -> None:
    header, data, arrays = header_and_data(3)
    request, binary = decode_body(header + data, str(len(header)))
    prepared = prepare(request, binary, reference_spec())
    assert prepared.batch == 3
    for role, array in prepared.tensors.items():
        np.testing.assert_array_equal(array, arrays[reference_spec().inputs[role].name])
    assert [r for r, _ in prepared.outputs] == ["mean", "sigma", "rho"]
    assert not any(b for _, b in prepared.outputs)


def test_flat_and_nested_json_give_the_same_tensors() -> None:
    _, _, arrays = header_and_data(2)
    flat = {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
            for n, a in arrays.items()
        ]
    }
    nested = {
        "inputs": [{**i, "data": arrays[i["name"]].tolist()} for i in flat["inputs"]],
        "parameters": {"binary_data_output": True},
    }
    a = prepare(*decode_body(json.dumps(flat).encode(), None), reference_spec())
    b = prepare(*decode_body(json.dumps(nested).encode(), None), reference_spec())
    for role in a.tensors:
        np.testing.assert_array_equal(a.tensors[role], b.tensors[role])
    assert all(binary for _, binary in b.outputs)


def test_nested_data_must_match_the_shape() -> None:
    _, _, arrays = header_and_data(2)
    body = {
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.tolist()}
            for n, a in arrays.items()
        ]
    }
    body["inputs"][2]["data"] = np.swapaxes(arrays["receivers"], 1, 2).tolist()
    with pytest.raises(MalformedRequest, match="nested data has shape"):
        prepare(*decode_body(json.dumps(body).encode(), None), reference_spec())
    body["inputs"][2]["data"] = arrays["receivers"].tolist()
    body["inputs"][1]["data"] = arrays["receivers"].tolist()  # one level deeper than [2, 7]
    with pytest.raises(MalformedRequest, match=r"input 'mask': data must be numbers, flat or"):
        prepare(*decode_body(json.dumps(body).encode(), None), reference_spec())


@pytest.mark.parametrize("odd", [True, "1.0", None])
def test_fp32_data_is_numbers_only(odd: object) -> None:
    """`true` and `"1.0"` are not FP32 (numpy cast them to 1.0: answered 200), flat or nested."""
    _, _, arrays = header_and_data(1)
    for nest in (False, True):
        body = {
            "inputs": [
                {
                    "name": n,
                    "datatype": "FP32",
                    "shape": list(a.shape),
                    "data": a.tolist() if nest else a.ravel().tolist(),
                }
                for n, a in arrays.items()
            ]
        }
        if nest:
            body["inputs"][1]["data"][0][3] = odd
        else:
            body["inputs"][1]["data"][3] = odd
        with pytest.raises(MalformedRequest, match="input 'mask'"):
            prepare(*decode_body(json.dumps(body).encode(), None), reference_spec())


def test_per_output_binary_flag_overrides_the_request_flag() -> None:
    header, data, _ = header_and_data(1)
    doc = json.loads(header)
    doc["parameters"] = {"binary_data_output": True}
    doc["outputs"] = [{"name": "rho", "parameters": {"binary_data": False}}, {"name": "mean"}]
    header = json.dumps(doc).encode()
    prepared = prepare(*decode_body(header + data, str(len(header))), reference_spec())
    assert prepared.outputs == [("rho", False), ("mean", True)]


def test_non_boolean_binary_flag_is_rejected() -> None:
    header, data, _ = header_and_data(1)
    doc = json.loads(header)
    doc["parameters"] = {"binary_data_output": "yes"}
    header = json.dumps(doc).encode()
    with pytest.raises(MalformedRequest, match="binary_data_output"):
        prepare(*decode_body(header + data, str(len(header))), reference_spec())


def gzip_zeros(size: int) -> bytes:
    """A gzip bomb: ``size`` zero bytes compress about 1000:1."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    out = [compressor.compress(chunk) for _ in range(size >> 20)]
    return b"".join(out) + compressor.flush()


def test_a_compression_bomb_stops_inflating_at_the_limit() -> None:
    bomb = gzip_zeros(256 << 20)  # 256 MiB of zeros in ≈ 250 kB
    limit = 8 << 20
    tracemalloc.start()
    try:
        with pytest.raises(PayloadTooLarge, match="inflates to more than"):
            inflate(bomb, "gzip", limit)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The limit and a slice in flight (zlib's output buffer and the piece); never 256 MiB.
    assert peak <= limit + 2 * INFLATE_SLICE, peak


def test_inflate_round_trips_and_refuses_corrupt_or_truncated_data() -> None:
    data = os.urandom(3_000_000)
    assert inflate(gzip.compress(data), "gzip", 4 << 20) == data
    assert inflate(zlib.compress(data), "deflate", 4 << 20) == data
    with pytest.raises(MalformedRequest, match="truncated"):
        inflate(gzip.compress(data)[:-100], "gzip", 4 << 20)
    with pytest.raises(MalformedRequest, match="not valid gzip"):
        inflate(b"not gzip at all", "gzip", 4 << 20)
