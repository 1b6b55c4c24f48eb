"""Open Inference Protocol (/v2) through a real Granian server, real workers and the reference
model, spoken by the official Triton HTTP client and by hand-built bodies."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.support.procs import Server
from tests.support.reference import payload_arrays, reference_session, reference_spec
from training.simulate import heard_batch, request_payload
from workers.inputs import pack_capture

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MODEL = "rf-localizer"
HEADER_LENGTH = "Inference-Header-Content-Length"


def model_inputs(n: int, seed: int) -> dict[str, np.ndarray]:
    """Input tensors of ``n`` simulated captures, built by the serving code's own packer."""
    spec = reference_spec()
    batch = heard_batch(n, seed)
    packed = [pack_capture(*payload_arrays(request_payload(batch, i)), spec) for i in range(n)]
    return {
        spec.inputs["features"].name: np.stack([p.features for p in packed]),
        spec.inputs["receivers"].name: np.stack([p.receivers for p in packed]),
        spec.inputs["mask"].name: np.stack([p.mask for p in packed]),
    }


def expected(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of the same tensors through ONNX Runtime in this process."""
    spec = reference_spec()
    names = [spec.outputs[r].name for r in ("mean", "sigma", "rho")]
    return dict(zip(names, reference_session().run(names, feeds), strict=True))


@pytest.fixture(scope="module")
def client(shared_server: Server) -> Iterator[triton.InferenceServerClient]:
    """The official Triton HTTP client pointed at the server."""
    with triton.InferenceServerClient(shared_server.url.removeprefix("http://")) as c:
        yield c


def triton_inputs(feeds: dict[str, np.ndarray], binary: bool) -> list[triton.InferInput]:
    out = []
    for name, array in feeds.items():
        tensor = triton.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array, binary_data=binary)
        out.append(tensor)
    return out


def v2_post(server: Server, path: str, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60.0, **kw)


def json_body(feeds: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
    inputs = [
        {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.reshape(-1).tolist()}
        for n, a in feeds.items()
    ]
    return {"inputs": inputs, **extra}


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    for word in words:
        assert word in body["error"]


# ----------------------------------------------------------------------------- health/metadata


def test_server_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta["name"] == "heimdall-inference"
    assert meta["version"]
    assert "binary_tensor_data" in meta["extensions"]


def test_model_metadata_comes_from_the_served_spec(client: triton.InferenceServerClient) -> None:
    spec = reference_spec()
    for meta in (
        client.get_model_metadata(MODEL),
        client.get_model_metadata(MODEL, model_version="1"),
    ):
        assert meta["name"] == MODEL
        assert meta["versions"] == ["1"]
        assert meta["platform"] == "onnxruntime_onnx"
        assert meta["inputs"] == [
            {"name": spec.inputs[r].name, "datatype": "FP32", "shape": spec.inputs[r].shape}
            for r in ("features", "receivers", "mask")
        ]
        assert [o["name"] for o in meta["outputs"]] == ["mean", "sigma", "rho"]
        assert meta["outputs"][2]["shape"] == [-1]
    assert meta["inputs"][0]["shape"] == [-1, 7, 32, 32]


def test_model_ready(client: triton.InferenceServerClient, shared_server: Server) -> None:
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, model_version="1")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready(MODEL, model_version="99")
    response = httpx.get(shared_server.url + "/v2/models/no-such-model/ready", timeout=10)
    assert_error(response, 404, "no-such-model")


def test_unknown_model_and_version_are_404(
    client: triton.InferenceServerClient, shared_server: Server
) -> None:
    with pytest.raises(InferenceServerException) as info:
        client.get_model_metadata("no-such-model")
    assert info.value.status() == "404"
    assert_error(
        httpx.get(shared_server.url + "/v2/models/rf-localizer/versions/99", timeout=10), 404, "99"
    )
    feeds = model_inputs(1, 7)
    assert_error(
        v2_post(shared_server, "/v2/models/other/infer", json=json_body(feeds)), 404, "other", MODEL
    )
    assert_error(
        v2_post(shared_server, f"/v2/models/{MODEL}/versions/42/infer", json=json_body(feeds)),
        404,
        "42",
    )


# ----------------------------------------------------------------------------- inference


def test_binary_infer_matches_in_process_onnx_runtime(
    client: triton.InferenceServerClient,
) -> None:
    feeds = model_inputs(5, 201)
    result = client.infer(MODEL, triton_inputs(feeds, binary=True), request_id="bin-1")
    response = result.get_response()
    assert response["model_name"] == MODEL
    assert response["model_version"] == "1"
    assert response["id"] == "bin-1"
    assert all("data" not in o for o in response["outputs"])
    for name, want in expected(feeds).items():
        got = result.as_numpy(name)
        assert got is not None
        assert got.dtype == np.float32
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_json_infer_with_output_selection_on_a_version(
    client: triton.InferenceServerClient,
) -> None:
    feeds = model_inputs(3, 202)
    outputs = [
        triton.InferRequestedOutput("rho", binary_data=False),
        triton.InferRequestedOutput("mean", binary_data=False),
    ]
    result = client.infer(
        MODEL,
        triton_inputs(feeds, binary=False),
        model_version="1",
        outputs=outputs,
        request_id="json-1",
    )
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["rho", "mean"]
    assert response["outputs"][0]["shape"] == [3]
    assert response["outputs"][1]["shape"] == [3, 2]
    assert response["id"] == "json-1"
    want = expected(feeds)
    for name in ("rho", "mean"):
        np.testing.assert_allclose(result.as_numpy(name), want[name], atol=1e-5, rtol=0)
    assert result.as_numpy("sigma") is None


def test_mixed_binary_and_json_outputs(client: triton.InferenceServerClient) -> None:
    feeds = model_inputs(2, 203)
    outputs = [
        triton.InferRequestedOutput("sigma", binary_data=True),
        triton.InferRequestedOutput("mean", binary_data=False),
    ]
    result = client.infer(MODEL, triton_inputs(feeds, binary=True), outputs=outputs)
    response = result.get_response()
    assert response["outputs"][0]["parameters"]["binary_data_size"] == 2 * 2 * 4
    assert "data" in response["outputs"][1]
    want = expected(feeds)
    np.testing.assert_allclose(result.as_numpy("sigma"), want["sigma"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.as_numpy("mean"), want["mean"], atol=1e-5, rtol=0)


def test_nested_json_data_and_plain_json_answer(shared_server: Server) -> None:
    feeds = model_inputs(2, 204)
    body = {
        "id": "nested",
        "inputs": [
            {"name": n, "datatype": "FP32", "shape": list(a.shape), "data": a.tolist()}
            for n, a in feeds.items()
        ],
    }
    response = v2_post(shared_server, f"/v2/models/{MODEL}/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert HEADER_LENGTH.lower() not in response.headers
    got = response.json()
    assert got["id"] == "nested"
    want = expected(feeds)
    for out in got["outputs"]:
        assert out["datatype"] == "FP32"
        np.testing.assert_allclose(
            np.asarray(out["data"], np.float32).reshape(out["shape"]),
            want[out["name"]],
            atol=1e-5,
            rtol=0,
        )


def test_hand_built_binary_body_and_binary_answer(shared_server: Server) -> None:
    """The binary extension byte for byte: header length, sizes, order of the tensors."""
    feeds = model_inputs(4, 205)
    order = ["mask", "features", "receivers"]  # any input order; bytes follow that order
    header = json.dumps(
        {
            "id": "raw-1",
            "inputs": [
                {
                    "name": n,
                    "datatype": "FP32",
                    "shape": list(feeds[n].shape),
                    "parameters": {"binary_data_size": feeds[n].nbytes},
                }
                for n in order
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    body = header + b"".join(feeds[n].astype("<f4").tobytes() for n in order)
    response = v2_post(
        shared_server,
        f"/v2/models/{MODEL}/infer",
        content=body,
        headers={HEADER_LENGTH: str(len(header))},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    size = int(response.headers[HEADER_LENGTH])
    answer = json.loads(response.content[:size])
    assert answer["id"] == "raw-1"
    assert answer["model_version"] == "1"
    rest = response.content[size:]
    want = expected(feeds)
    offset = 0
    for out in answer["outputs"]:
        n = out["parameters"]["binary_data_size"]
        got = np.frombuffer(rest[offset : offset + n], "<f4").reshape(out["shape"])
        offset += n
        np.testing.assert_allclose(got, want[out["name"]], atol=1e-5, rtol=0)
    assert offset == len(rest)
    assert [o["name"] for o in answer["outputs"]] == ["mean", "sigma", "rho"]


def test_gzip_request_body(client: triton.InferenceServerClient) -> None:
    feeds = model_inputs(1, 206)
    result = client.infer(
        MODEL, triton_inputs(feeds, binary=True), request_compression_algorithm="gzip"
    )
    np.testing.assert_allclose(result.as_numpy("mean"), expected(feeds)["mean"], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- errors


def rename(feeds: dict[str, np.ndarray], old: str, new: str) -> dict[str, np.ndarray]:
    return {(new if k == old else k): v for k, v in feeds.items()}


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda f: rename(f, "mask", "mask2"), ["mask2", "unknown input"]),
        (lambda f: {k: v for k, v in f.items() if k != "mask"}, ["missing", "mask"]),
        (lambda f: {**f, "mask": f["mask"][:, :5]}, ["shape", "mask"]),
        (lambda f: {**f, "receivers": f["receivers"].reshape(1, 14)}, ["shape", "receivers"]),
        (lambda f: {**f, "mask": f["mask"][:0]}, ["batch"]),
        (lambda f: {**f, "mask": np.concatenate([f["mask"], f["mask"]])}, ["batch"]),
    ],
    ids=["wrong-name", "missing", "wrong-dim", "wrong-rank", "batch-mismatch", "batch-differs"],
)
def test_invalid_inputs_are_400_with_the_triton_client(
    client: triton.InferenceServerClient,
    mutate: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    words: list[str],
) -> None:
    feeds = mutate(model_inputs(1, 210))
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, triton_inputs(feeds, binary=True))
    assert info.value.status() == "400"
    for word in words:
        assert word in info.value.message()


@pytest.mark.parametrize(("datatype", "dtype"), [("FP64", np.float64), ("INT32", np.int32)])
def test_wrong_datatype_is_400(
    client: triton.InferenceServerClient, shared_server: Server, datatype: str, dtype: Any
) -> None:
    feeds = model_inputs(1, 211)
    inputs = triton_inputs({k: v for k, v in feeds.items() if k != "mask"}, binary=True)
    wrong = triton.InferInput("mask", list(feeds["mask"].shape), datatype)
    wrong.set_data_from_numpy(feeds["mask"].astype(dtype), binary_data=True)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [*inputs, wrong])
    assert info.value.status() == "400"
    assert datatype in info.value.message()
    assert "FP32" in info.value.message()
    body = json_body(feeds)
    body["inputs"][2]["datatype"] = datatype
    assert_error(v2_post(shared_server, f"/v2/models/{MODEL}/infer", json=body), 400, datatype)


def test_malformed_bodies_are_400(shared_server: Server) -> None:
    feeds = model_inputs(1, 212)
    path = f"/v2/models/{MODEL}/infer"
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": n,
                    "datatype": "FP32",
                    "shape": list(a.shape),
                    "parameters": {"binary_data_size": a.nbytes},
                }
                for n, a in feeds.items()
            ]
        }
    ).encode()
    data = b"".join(a.tobytes() for a in feeds.values())
    cases = [
        (header + data, {}, "JSON"),  # binary data without the header length
        (header + data, {HEADER_LENGTH: "abc"}, "integer"),
        (header + data, {HEADER_LENGTH: str(len(header) + len(data) + 1)}, "holds"),
        (header + data[:-4], {HEADER_LENGTH: str(len(header))}, "ends before"),
        (header + data + b"\0" * 4, {HEADER_LENGTH: str(len(header))}, "after"),
        (b'{"inputs": 3}', {}, "invalid inference request"),
    ]
    for content, headers, word in cases:
        assert_error(v2_post(shared_server, path, content=content, headers=headers), 400, word)
    short = json_body(feeds)
    short["inputs"][0]["data"] = short["inputs"][0]["data"][:-1]
    assert_error(v2_post(shared_server, path, json=short), 400, "elements")
    nan = np.full(feeds["mask"].shape, np.nan, "<f4").tobytes()
    assert_error(
        v2_post(
            shared_server,
            path,
            content=header + data[: -len(nan)] + nan,
            headers={HEADER_LENGTH: str(len(header))},
        ),
        400,
        "NaN",
    )
    unknown_output = json_body(feeds, outputs=[{"name": "position"}])
    assert_error(v2_post(shared_server, path, json=unknown_output), 400, "position")


def test_batch_over_256_is_400(shared_server: Server) -> None:
    spec = reference_spec()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": t.name,
                    "datatype": "FP32",
                    "shape": [257, *t.shape[1:]],
                    "parameters": {"binary_data_size": 257 * int(np.prod(t.shape[1:])) * 4},
                }
                for t in spec.inputs.values()
            ]
        }
    ).encode()
    zeros = b"".join(b"\0" * (257 * int(np.prod(t.shape[1:])) * 4) for t in spec.inputs.values())
    response = v2_post(
        shared_server,
        f"/v2/models/{MODEL}/infer",
        content=header + zeros,
        headers={HEADER_LENGTH: str(len(header))},
    )
    assert_error(response, 400, "256")


def test_v2_traffic_shows_in_version_counters(shared_server: Server) -> None:
    def requests() -> int:
        body = httpx.get(shared_server.url + "/v1/models/1", timeout=10).json()
        return int(body["live"]["requests"])

    before = requests()
    response = v2_post(
        shared_server, f"/v2/models/{MODEL}/infer", json=json_body(model_inputs(1, 213))
    )
    assert response.status_code == 200
    assert requests() == before + 1


def test_overload_is_503_with_retry_after(start_server: Callable[..., Server]) -> None:
    """A request larger than the whole dispatch queue is refused at once, not computed."""
    server = start_server(HEIMDALL_POOL_QUEUE_SIZE="4", HEIMDALL_POOL_WORKERS="1")
    response = v2_post(server, f"/v2/models/{MODEL}/infer", json=json_body(model_inputs(8, 214)))
    assert_error(response, 503, "queued")
    assert int(response.headers["retry-after"]) >= 1
    small = v2_post(server, f"/v2/models/{MODEL}/infer", json=json_body(model_inputs(2, 215)))
    assert small.status_code == 200, small.text


# ----------------------------------------------------------------------------- Triton config


def test_triton_model_config_lists_batching_and_tensors(
    client: triton.InferenceServerClient,
) -> None:
    for config in (client.get_model_config(MODEL), client.get_model_config(MODEL, "1")):
        assert config["name"] == MODEL
        assert config["platform"] == "onnxruntime_onnx"
        assert config["max_batch_size"] == 256
        assert config["input"][0] == {
            "name": "features",
            "data_type": "TYPE_FP32",
            "dims": [7, 32, 32],
            "format": "FORMAT_NONE",
            "is_shape_tensor": False,
        }
        assert [o["name"] for o in config["output"]] == ["mean", "sigma", "rho"]
        assert config["output"][2]["dims"] == []
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("no-such-model")
    assert info.value.status() == "404"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v2/nowhere", 404),
        ("GET", "/v2/models/rf-localizer/nowhere", 404),
        ("DELETE", "/v2/models/rf-localizer", 405),
        ("GET", "/v2/models/rf-localizer/infer", 405),
    ],
)
def test_every_v2_error_is_a_protocol_error(
    shared_server: Server, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, shared_server.url + path, timeout=10)
    assert_error(response, status)
    assert response.json()["error"]
    # /v1 keeps problem details.
    v1 = httpx.request(method, shared_server.url + path.replace("/v2", "/v1", 1), timeout=10)
    assert v1.headers["content-type"] == "application/problem+json"
