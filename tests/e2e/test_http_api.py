"""The HTTP API through a real Granian server, real workers and the reference model."""

from __future__ import annotations

import base64
import gzip
import json
import re
from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from app.serving.status import ModelsState, Readiness, VersionState
from app.web.oip.schemas import ModelMetadata, ServerMetadata, TritonConfig
from tests.support.procs import ROOT, Server
from tests.support.rawhttp import connect, parse, read_all, request_head
from tests.support.reference import reference_predict
from training.simulate import heard_batch, request_payload
from workers.geo import distance_m

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def payloads(n: int, seed: int) -> list[dict[str, Any]]:
    batch = heard_batch(n, seed)
    return [request_payload(batch, i, cache=False) for i in range(n)]


def post(server: Server, path: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60.0, **kw)


def assert_matches(got: dict[str, Any], want: dict[str, float]) -> None:
    assert got["position"]["latitude"] == pytest.approx(want["latitude"], abs=1e-4)
    assert got["position"]["longitude"] == pytest.approx(want["longitude"], abs=1e-4)
    unc = got["uncertainty"]
    assert unc["sigma_east_m"] == pytest.approx(want["sigma_east_m"], rel=1e-4)
    assert unc["sigma_north_m"] == pytest.approx(want["sigma_north_m"], rel=1e-4)
    assert unc["correlation"] == pytest.approx(want["correlation"], abs=1e-4)


def test_single_prediction_matches_in_process_onnx_runtime(shared_server: Server) -> None:
    body = payloads(1, 101)[0]
    response = post(shared_server, "/v1/predict", {**body, "request_id": "abc-1"})
    assert response.status_code == 200, response.text
    got = response.json()
    assert_matches(got, reference_predict([body])[0])
    assert got["request_id"] == "abc-1"
    assert got["model"] == {"name": "rf-localizer", "version": "1"}
    assert got["cached"] is False
    levels = [e["confidence"] for e in got["uncertainty"]["ellipses"]]
    assert levels == [0.5, 0.9, 0.95]
    majors = [e["semi_major_m"] for e in got["uncertainty"]["ellipses"]]
    assert majors == sorted(majors) and majors[0] > 0
    assert all(0 <= e["azimuth_deg"] < 180 for e in got["uncertainty"]["ellipses"])
    assert set(got["timing_ms"]) == {"queue", "features", "inference", "total"}


def test_messagepack_request_and_response(shared_server: Server) -> None:
    body = payloads(1, 102)[0]
    raw = {**body, "receivers": [{**r, "iq": base64.b64decode(r["iq"])} for r in body["receivers"]]}
    response = httpx.post(
        shared_server.url + "/v1/predict",
        content=msgspec.msgpack.encode(raw),
        headers={"content-type": "application/msgpack", "accept": "application/msgpack"},
        timeout=30.0,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/msgpack")
    assert_matches(msgspec.msgpack.decode(response.content), reference_predict([body])[0])
    weighted = post(
        shared_server, "/v1/predict", body, headers={"accept": "application/json;q=0.1, */*"}
    )
    assert weighted.headers["content-type"].startswith("application/msgpack")
    metrics = httpx.get(shared_server.url + "/metrics", timeout=10)
    assert metrics.headers["content-type"].count("charset=utf-8") == 1


def test_batch_of_256_matches_reference_and_uses_every_worker(shared_server: Server) -> None:
    items = payloads(256, 103)
    before = [
        w["served"] for w in httpx.get(shared_server.url + "/v1/models").json()["pool"]["workers"]
    ]
    response = post(shared_server, "/v1/predict/batch", {"items": items})
    assert response.status_code == 200, response.text[:500]
    results = response.json()["results"]
    assert len(results) == 256
    for got, want in zip(results, reference_predict(items), strict=True):
        assert got["kind"] == "prediction"
        assert_matches(got, want)
    after = [
        w["served"] for w in httpx.get(shared_server.url + "/v1/models").json()["pool"]["workers"]
    ]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(after) - sum(before) == 256


def test_batch_item_errors_do_not_fail_the_others(shared_server: Server) -> None:
    items = payloads(3, 104)
    items[1] = {**items[1], "sample_rate_hz": 96000.0}
    results = post(shared_server, "/v1/predict/batch", {"items": items}).json()["results"]
    assert [r["kind"] for r in results] == ["prediction", "problem", "prediction"]
    assert results[1]["status"] == 422
    assert results[1]["errors"][0]["field"] == "$.items[1].sample_rate_hz"
    # A body that breaks the schema is refused whole, with the item's field path (decoded in
    # a thread above 1 MiB: these 6 items are ~1.8 MB).
    items = payloads(6, 108)
    items[4]["receivers"][0]["latitude"] = 91
    refused = post(shared_server, "/v1/predict/batch", {"items": items})
    assert refused.status_code == 400, refused.text[:300]
    assert refused.json()["errors"][0]["field"] == "$.items[4].receivers[0].latitude"


def test_geojson_feature_collection(shared_server: Server) -> None:
    body = {**payloads(1, 105)[0], "geojson": True, "confidence": [0.9]}
    got = post(shared_server, "/v1/predict", body).json()
    fc = got["geojson"]
    assert fc["type"] == "FeatureCollection"
    point, polygon = fc["features"]
    assert point["geometry"]["coordinates"] == [
        got["position"]["longitude"],
        got["position"]["latitude"],
    ]
    ring = polygon["geometry"]["coordinates"][0]
    assert len(ring) >= 65 and ring[0] == ring[-1]


def test_readme_example_is_answered_near_the_truth(shared_server: Server) -> None:
    body = json.loads((ROOT / "examples" / "request.json").read_text())
    truth = json.loads((ROOT / "examples" / "request.truth.json").read_text())
    got = post(shared_server, "/v1/predict", body).json()
    err = distance_m(
        truth["latitude"],
        truth["longitude"],
        got["position"]["latitude"],
        got["position"]["longitude"],
    )[0]
    outer = max(e["semi_major_m"] for e in got["uncertainty"]["ellipses"])
    assert err <= outer, f"error {err:.0f} m outside the 95 % ellipse ({outer:.0f} m)"


def test_models_endpoints(shared_server: Server) -> None:
    state = httpx.get(shared_server.url + "/v1/models").json()
    assert state["routing"]["weights"] == {"1": 1.0}
    assert state["rollout"]["last_outcome"] == "applied"
    assert "1" in state["versions"]
    one = httpx.get(shared_server.url + "/v1/models/1").json()
    assert one["capture"]["samples_per_receiver"] == 4096
    assert one["sha256"] and one["feature_pipeline_version"]
    assert one["live"]["requests"] >= 0
    missing = httpx.get(shared_server.url + "/v1/models/999")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert httpx.get(shared_server.url + "/schema/openapi.json").status_code == 200
    assert httpx.get(shared_server.url + "/health/live").status_code == 200
    nowhere = httpx.get(shared_server.url + "/v1/nowhere")
    assert nowhere.status_code == 404 and nowhere.json()["status"] == 404
    assert nowhere.json()["type"] == missing.json()["type"] == "urn:heimdall:problem:not-found"


def test_state_and_metadata_answers_are_the_types_the_openapi_document_names(
    shared_server: Server,
) -> None:
    """/v1/models[/{v}], /health/ready and /v2 metadata: documented, and exactly that shape."""
    paths = httpx.get(shared_server.url + "/schema/openapi.json").json()["paths"]
    model = "rf-localizer"
    answers: list[tuple[str, str, type]] = [
        ("/v1/models", "/v1/models", ModelsState),
        ("/v1/models/{version}", "/v1/models/1", VersionState),
        ("/health/ready", "/health/ready", Readiness),
        ("/v2", "/v2", ServerMetadata),
        ("/v2/models/{name}", f"/v2/models/{model}", ModelMetadata),
        ("/v2/models/{name}/versions/{version}", f"/v2/models/{model}/versions/1", ModelMetadata),
        ("/v2/models/{name}/config", f"/v2/models/{model}/config", TritonConfig),
    ]
    for documented, path, kind in answers:
        ok = paths[documented]["get"]["responses"]["200"]["content"]["application/json"]
        assert ok["schema"]["$ref"] == f"#/components/schemas/{kind.__name__}", documented
        body = httpx.get(shared_server.url + path).content
        # Every member is declared, in the order the answer has them.
        assert msgspec.json.encode(msgspec.json.decode(body, type=kind)) == body, path


def _iq(samples: int, fill: float | None = None) -> str:
    data = np.full(samples * 2, 1e-6 if fill is None else fill, dtype="<f4")
    return base64.b64encode(data.tobytes()).decode()


def _variant(**changes: Any) -> dict[str, Any]:
    body = payloads(1, 106)[0]
    rx = [dict(r) for r in body["receivers"]]
    if "rx0" in changes:
        rx[0].update(changes.pop("rx0"))
    if "receivers" in changes:
        rx = changes.pop("receivers")(rx)
    return {**body, "receivers": rx, **changes}


BAD_INPUTS: list[tuple[str, Any, dict[str, str], int, str]] = [
    ("malformed JSON", b'{"receivers": [', {}, 400, "not valid JSON"),
    ("wrong media type", b"receivers=1", {"content-type": "text/plain"}, 415, "Content-Type"),
    # A content coding was ignored: gzip read as JSON (400), a plain body labelled br served.
    ("gzip on /v1", gzip.compress(b"{}"), {"content-encoding": "gzip"}, 415, "Content-Encoding"),
    ("br label on /v1", _variant(), {"content-encoding": "br"}, 415, "Content-Encoding"),
    ("undecodable base64", _variant(rx0={"iq": "%%%not-base64%%%"}), {}, 400, "base64"),
    ("wrong sample count", _variant(rx0={"iq": _iq(1000)}), {}, 422, "4096"),
    (
        "odd byte length",
        _variant(rx0={"iq": base64.b64encode(b"\0" * 32771).decode()}),
        {},
        422,
        "8 bytes",
    ),
    ("NaN samples", _variant(rx0={"iq": _iq(4096, float("nan"))}), {}, 422, "NaN"),
    ("Inf samples", _variant(rx0={"iq": _iq(4096, float("inf"))}), {}, 422, "Inf"),
    ("too few receivers", _variant(receivers=lambda rx: rx[:2]), {}, 422, "between"),
    ("too many receivers", _variant(receivers=lambda rx: rx * 3), {}, 422, "between"),
    (
        "duplicate receiver ids",
        _variant(receivers=lambda rx: [rx[0], dict(rx[0]), *rx[1:3]]),
        {},
        422,
        "more than once",
    ),
    ("latitude 91", _variant(rx0={"latitude": 91.0}), {}, 400, "<= 90"),
    ("unknown receiver", _variant(rx0={"id": "XYZ"}), {}, 422, "not part of the network"),
    ("receiver moved", _variant(rx0={"latitude": 44.0}), {}, 422, "tolerance"),
    ("sample rate mismatch", _variant(sample_rate_hz=44100.0), {}, 422, "48000"),
    ("confidence out of range", _variant(confidence=[1.5]), {}, 400, "< 1"),
    ("body over the limit", b"{" + b" " * (5 * 1024 * 1024) + b"}", {}, 413, "size limit"),
]


@pytest.mark.parametrize(
    ("case", "body", "headers", "status", "needle"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_gets_a_clear_4xx_problem(
    shared_server: Server,
    case: str,
    body: Any,
    headers: dict[str, str],
    status: int,
    needle: str,
) -> None:
    if isinstance(body, bytes):
        response = httpx.post(
            shared_server.url + "/v1/predict",
            content=body,
            headers={"content-type": "application/json", **headers},
            timeout=30.0,
        )
    else:
        response = post(shared_server, "/v1/predict", body, headers=headers)
    assert response.status_code == status, (case, response.text[:300])
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    text = problem["detail"] + " ".join(e["message"] for e in problem.get("errors", []))
    assert needle in text, (case, problem)
    assert problem["type"].startswith("urn:heimdall:problem:"), problem


def test_batch_over_256_is_refused(shared_server: Server) -> None:
    body = payloads(1, 107)[0]
    response = post(shared_server, "/v1/predict/batch", {"items": [body] * 257})
    assert response.status_code == 400
    assert "256" in response.json()["detail"]


def test_pool_is_healthy_after_all_bad_inputs(shared_server: Server) -> None:
    ready = httpx.get(shared_server.url + "/health/ready")
    assert ready.status_code == 200
    assert ready.json()["pool"]["ready"] == 2
    state = httpx.get(shared_server.url + "/v1/models").json()
    assert state["pool"]["restarts"] == 0
    good = post(shared_server, "/v1/predict", payloads(1, 108)[0])
    assert good.status_code == 200


FIELD_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("undecodable base64", _variant(rx0={"iq": "%%%not-base64%%%"}), "$.receivers[0].iq"),
    ("wrong sample count", _variant(rx0={"iq": _iq(1000)}), "$.receivers[0].iq"),
    ("latitude 91", _variant(rx0={"latitude": 91.0}), "$.receivers[0].latitude"),
    ("unknown receiver", _variant(rx0={"id": "XYZ"}), "$.receivers[0].id"),
    ("receiver moved", _variant(rx0={"latitude": 44.0}), "$.receivers[0]"),
    ("sample rate mismatch", _variant(sample_rate_hz=44100.0), "$.sample_rate_hz"),
    ("NaN samples", _variant(rx0={"iq": _iq(4096, float("nan"))}), "$.receivers[0].iq"),
    ("request id too long", _variant(request_id="x" * 129), "$.request_id"),
]


@pytest.mark.parametrize(("case", "body", "field"), FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_a_single_body_decoded_by_a_worker_gets_the_problem_a_batch_item_gets(
    shared_server: Server, case: str, body: dict[str, Any], field: str
) -> None:
    """Issue 23: a pool worker decodes and checks a single body, the HTTP process a batch item.

    Both must tell the client the same thing: status, type, detail and field path (the batch
    item's under ``$.items[1]``), for JSON and for MessagePack bodies (raw IQ, where base64
    cannot be wrong). A schema violation (400) refuses the whole batch body, a contract
    violation (422) only its item.
    """
    single = post(shared_server, "/v1/predict", body)
    good = payloads(1, 108)[0]
    batch = post(shared_server, "/v1/predict/batch", {"items": [good, body]})
    assert single.status_code in (400, 422), (case, single.text[:300])
    problem = single.json()
    assert problem["errors"][0]["field"] == field, (case, problem)
    if single.status_code == 400:
        assert batch.status_code == 400, (case, batch.text[:300])
        item = batch.json()
    else:
        assert batch.status_code == 200, (case, batch.text[:300])
        item = batch.json()["results"][1]
        assert batch.json()["results"][0]["kind"] == "prediction"
    assert item["errors"][0]["field"] == field.replace("$", "$.items[1]", 1), (case, item)
    for key in ("status", "type", "detail"):
        assert item[key] == problem[key], (case, key, item, problem)
    if case == "undecodable base64":
        return
    raw = {**body, "receivers": [{**r, "iq": base64.b64decode(r["iq"])} for r in body["receivers"]]}
    packed = httpx.post(
        shared_server.url + "/v1/predict",
        content=msgspec.msgpack.encode(raw),
        headers={"content-type": "application/msgpack"},
        timeout=30.0,
    )
    assert packed.status_code == single.status_code, (case, packed.text[:300])
    assert packed.json()["errors"][0]["field"] == field, (case, packed.json())


CACHE_BYPASS: list[tuple[str, dict[str, Any], str]] = [
    ("center frequency -1", {"center_frequency_hz": -1.0}, "$.center_frequency_hz"),
    ("center frequency a string", {"center_frequency_hz": "abc"}, "$.center_frequency_hz"),
    ("request id of 500 characters", {"request_id": "x" * 500}, "$.request_id"),
    ("empty request id", {"request_id": ""}, "$.request_id"),
    ("altitude a string", {"rx0": {"altitude_m": "very high"}}, "$.receivers[0].altitude_m"),
    ("geojson a string", {"geojson": "yes"}, "$.geojson"),
    ("sample rate missing", {"drop": "sample_rate_hz"}, "$"),
]


@pytest.mark.parametrize(
    ("case", "change", "field"), CACHE_BYPASS, ids=[c[0] for c in CACHE_BYPASS]
)
def test_a_cached_capture_does_not_let_a_body_the_schema_refuses_through(
    shared_server: Server, case: str, change: dict[str, Any], field: str
) -> None:
    """Found by an outside review of issue 23: once the captures were cached, a body with the
    same captures but a field the schema refuses (outside the cache key) got the cached 200.
    The HTTP process now checks the whole schema but the IQ values before any cache lookup.
    """
    good = {**payloads(1, 109)[0], "cache": True}
    first = post(shared_server, "/v1/predict", good)
    assert first.status_code == 200, first.text[:300]
    again = post(shared_server, "/v1/predict", good)
    assert again.json()["cached"] is True  # the captures are in the cache
    bad = dict(good)
    if "rx0" in change:
        bad["receivers"] = [{**good["receivers"][0], **change["rx0"]}, *good["receivers"][1:]]
    elif "drop" in change:
        del bad[change["drop"]]
    else:
        bad.update(change)
    refused = post(shared_server, "/v1/predict", bad)
    assert refused.status_code == 400, (case, refused.text[:300])
    assert refused.json()["errors"][0]["field"] == field, (case, refused.json())


def test_a_coding_in_any_content_encoding_header_is_refused(shared_server: Server) -> None:
    """`identity` then `gzip` in two headers (or one list) is a gzip body: 415, not served
    as if unencoded (only the first header was read)."""
    body = json.dumps(payloads(1, 109)[0]).encode()
    for codings in (["identity", "gzip"], ["identity, br"]):
        headers = [("content-type", "application/json")]
        headers += [("content-encoding", c) for c in codings]
        answer = httpx.post(shared_server.url + "/v1/predict", content=body, headers=headers)
        assert answer.status_code == 415, (codings, answer.text[:200])
    plain = [("content-type", "application/json"), ("content-encoding", "identity")]
    assert httpx.post(shared_server.url + "/v1/predict", content=body, headers=plain).is_success


def test_head_is_answered_like_get_without_a_body(shared_server: Server) -> None:
    # Load balancers and link checkers probe with HEAD: the GET route answers it, hyper sends
    # the headers (Content-Length of the GET body) and no body, and telemetry names it HEAD.
    for path in ("/health/live", "/health/ready", "/v1/models", "/metrics"):
        head = httpx.head(shared_server.url + path, timeout=10)
        get = httpx.get(shared_server.url + path, timeout=10)
        assert head.status_code == get.status_code == 200, (path, head.status_code)
        assert head.content == b""
        assert head.headers["content-type"] == get.headers["content-type"]
        assert "x-request-id" in head.headers
    live = httpx.get(shared_server.url + "/health/live", timeout=10)
    sock = connect(shared_server.port)
    try:  # on the wire: the headers, then nothing; the connection stays usable
        sock.sendall(request_head("HEAD", "/health/live") + request_head("GET", "/health/live"))
        data = read_all(sock, timeout=1.0)  # keep-alive: whatever came within a second
    finally:
        sock.close()
    head, after = data.split(b"\r\n\r\n", 1)  # a HEAD answer ends with its headers
    assert head.startswith(b"HTTP/1.1 200"), data
    assert f"content-length: {len(live.content)}".encode() in head.lower()
    answers, rest = parse(after)
    assert [a.status for a in answers] == [200] and rest == b"", (answers, rest)
    assert answers[0].body == live.content
    assert httpx.head(shared_server.url + "/v1/predict", timeout=10).status_code == 405
    metrics = httpx.get(shared_server.url + "/metrics", timeout=10).text
    counted = r'http_server_request_duration_seconds_count\{[^}]*http_request_method="HEAD"'
    assert re.search(counted, metrics)


def test_the_openapi_document_declares_the_answers_clients_get(shared_server: Server) -> None:
    # A client generated from the document must know every status it can get: provoke the
    # answers fuzzing rarely reaches and look each one up in the document.
    document = httpx.get(shared_server.url + "/schema/openapi.json", timeout=10).json()
    body = json.dumps(payloads(1, 120)[0]).encode()
    v2 = "/v2/models/{name}/infer"
    cases = [
        ("POST", "/v1/predict", {"accept": "text/html"}, body, 406),
        ("POST", "/v1/predict", {"content-type": "text/plain"}, body, 415),
        ("POST", "/v1/predict/batch", {"accept": "text/html"}, b"{}", 406),
        ("POST", "/v1/feedback", {"accept": "text/html"}, b"{}", 406),
        ("GET", "/v1/models", {"accept": "text/html"}, None, 406),
        ("GET", "/v1/models/{version}", {}, None, 404),
        ("GET", "/v1/models/{version}/field", {}, None, 404),
        ("POST", v2, {"content-type": "application/json"}, b"{", 400),
        ("POST", v2, {"content-encoding": "br"}, b"{}", 415),
        ("POST", v2.replace("{name}", "{other}"), {}, b"{}", 404),
        ("GET", "/v2/models/{other}/config", {}, None, 404),
    ]
    concrete = {"{version}": "4242", "{name}": "rf-localizer", "{other}": "nope"}
    for method, path, headers, content, want in cases:
        url = path
        for template, value in concrete.items():
            url = url.replace(template, value)
        answer = httpx.request(
            method, shared_server.url + url, headers=headers, content=content, timeout=30
        )
        assert answer.status_code == want, (method, url, answer.status_code, answer.text)
        operation = document["paths"][path.replace("{other}", "{name}")][method.lower()]
        declared = operation["responses"]
        assert str(want) in declared, (method, path, want, sorted(declared))
    infer = document["paths"][v2]["post"]["responses"]
    assert "application/octet-stream" in infer["200"]["content"]
