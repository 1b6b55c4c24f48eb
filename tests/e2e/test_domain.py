"""Honest answers through a real server: no position for noise, no tight ellipse outside the
trained domain (the reference model's spec, real workers, real HTTP)."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import httpx
import numpy as np
import pytest

from tests.support.procs import REFERENCE, Server
from training.simulate import WIDE, heard_batch, iter_batches, request_payload
from workers.spec import decode_spec

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = decode_spec((REFERENCE / "model_spec.json").read_bytes())
NO_SIGNAL = "urn:heimdall:problem:no-signal"


def post(server: Server, path: str, body: Any) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60.0)


def with_iq(body: dict[str, Any], make: Any) -> dict[str, Any]:
    """``body`` with every receiver's IQ replaced by ``make(rng)`` (complex64, 4096)."""
    rng = np.random.default_rng(5)
    receivers = [
        {**r, "iq": base64.b64encode(make(rng).astype("<c8").tobytes()).decode()}
        for r in body["receivers"]
    ]
    return {**body, "receivers": receivers, "cache": False}


def good() -> dict[str, Any]:
    return request_payload(heard_batch(1, 4401), 0, cache=False)


def assert_no_signal(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 422, response.text[:300]
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["type"] == NO_SIGNAL
    assert "needs at least 3" in problem["detail"]
    return dict(problem)


def test_noise_only_captures_are_refused_as_no_signal(shared_server: Server) -> None:
    batch = next(iter_batches(20, 4402, chunk=20, signal=False))
    for i in range(len(batch)):
        problem = assert_no_signal(post(shared_server, "/v1/predict", request_payload(batch, i)))
        assert problem["detail"].startswith("0 of ")


def test_all_zero_and_full_scale_noise_are_refused(shared_server: Server) -> None:
    n = 4096
    zeros = with_iq(good(), lambda rng: np.zeros(n, np.complex64))
    assert_no_signal(post(shared_server, "/v1/predict", zeros))
    loud = with_iq(
        good(), lambda rng: (rng.standard_normal(n) + 1j * rng.standard_normal(n)) * 1e17
    )
    assert_no_signal(post(shared_server, "/v1/predict", loud))


def assert_wide_outside(got: dict[str, Any], needle: str) -> None:
    assert got["domain"]["inside"] is False, got["domain"]
    assert any(needle in r for r in got["domain"]["reasons"]), got["domain"]
    assert SPEC.domain is not None
    floor = SPEC.domain.out_of_domain_min_sigma_m
    in_domain_median = SPEC.provenance.metrics["median_sigma_m"]
    unc = got["uncertainty"]
    assert min(unc["sigma_east_m"], unc["sigma_north_m"]) >= floor * 0.999
    assert min(unc["sigma_east_m"], unc["sigma_north_m"]) >= in_domain_median * 0.9


def test_full_scale_tone_is_answered_outside_the_domain_with_a_wide_ellipse(
    shared_server: Server,
) -> None:
    tone = with_iq(good(), lambda rng: np.full(4096, 3e18 + 3e18j, np.complex64))
    response = post(shared_server, "/v1/predict", tone)
    assert response.status_code == 200, response.text[:300]
    assert_wide_outside(response.json(), "above anything the model was trained on")


def test_a_transmitter_40_db_stronger_than_trained_gets_no_tight_ellipse(
    shared_server: Server,
) -> None:
    strong = dataclasses.replace(WIDE, name="strong", eirp_dbm=(100.0, 100.0))
    batch = heard_batch(5, 4403, domain=strong)
    for i in range(len(batch)):
        response = post(shared_server, "/v1/predict", request_payload(batch, i, cache=False))
        assert response.status_code == 200, response.text[:300]
        assert_wide_outside(response.json(), "above anything the model was trained on")
    metrics = httpx.get(shared_server.url + "/metrics").text
    assert 'heimdall_inference_domain_total{inside="false"' in metrics.replace(
        'model_version="1",', ""
    ) or ('inside="false"' in metrics and "heimdall_inference_domain_total" in metrics)


def test_in_domain_answers_say_so(shared_server: Server) -> None:
    got = post(shared_server, "/v1/predict", good()).json()
    assert got["domain"] == {"inside": True, "reasons": []}


def test_batch_refuses_the_noise_item_only(shared_server: Server) -> None:
    noise = request_payload(next(iter_batches(1, 4404, chunk=1, signal=False)), 0)
    items = [good(), noise, good()]
    results = post(shared_server, "/v1/predict/batch", {"items": items}).json()["results"]
    assert [r["kind"] for r in results] == ["prediction", "problem", "prediction"]
    assert results[1]["status"] == 422
    assert results[1]["type"] == NO_SIGNAL
    assert results[1]["errors"][0]["field"] == "$.items[1].receivers"
