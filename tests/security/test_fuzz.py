"""Fuzz the real server: schemathesis over the OpenAPI document, hypothesis over payloads.

A fuzzer must never find a 5xx (other than 503 not-ready/overload), every 4xx of the /v1 and
/health routes must be RFC 9457 problem details, and the pool must come out unharmed.
"""

from __future__ import annotations

import base64
import math
import os
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.support.procs import Server
from training.simulate import heard_batch, request_payload

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Per operation and mode (constant GETs exhaust after a few): `make test` runs a short,
# derandomized pass; `make fuzz` runs 300 (HEIMDALL_SCHEMA_FUZZ_EXAMPLES).
EXAMPLES_PER_OPERATION = int(os.environ.get("HEIMDALL_SCHEMA_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    derandomize=True,  # reproducible in CI; change the seed locally to explore
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzz_server(
    tmp_path_factory: pytest.TempPathFactory, registry_env: dict[str, str]
) -> Iterator[Server]:
    """A private server (no Redis: fuzzed payloads must not fill a shared cache)."""
    env = {**registry_env, "REDIS_URL": "", "HEIMDALL_POOL_WORKERS": "1"}
    server = Server(env, tmp_path_factory.mktemp("fuzz") / "server.log").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server) -> Any:
    """The server's own OpenAPI document."""
    return schemathesis.openapi.from_url(fuzz_server.url + "/schema/openapi.json")


def check_response(method: str, path: str, response: Any) -> None:
    """The contract a fuzzer checks on every answer."""
    status = response.status_code
    what = f"{method} {path} -> {status}: {response.text[:300]}"
    assert status < 500 or status == 503, what  # 503: not ready / overload only
    if path.startswith("/v2"):
        if 400 <= status < 500:  # KServe V2 answers {"error": ...}
            assert "error" in response.json(), what
        return
    if 400 <= status < 500 and (path.startswith("/v1") or path.startswith("/health")):
        media = response.headers.get("content-type")
        media = media[0] if isinstance(media, list) else media  # schemathesis: lists
        assert media == "application/problem+json", what
        problem = response.json()
        assert {"title", "status", "detail"} <= set(problem), what
        assert problem["status"] == status, what


def undeclared_status(document: dict[str, Any], method: str, path: str, status: int) -> str | None:
    """``METHOD path status`` when the OpenAPI document does not declare that answer."""
    declared = document["paths"][path][method.lower()].get("responses", {})
    if str(status) in declared or "default" in declared:
        return None
    return f"{method} {path} {status}"


def fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    seen: dict[str, int],
    document: dict[str, Any],
    undeclared: set[str],
) -> None:
    """Run the generated cases of one operation in one generation mode."""
    label = f"{operation.label} [{mode.value}]"

    @given(case=operation.as_strategy(generation_mode=mode))
    @FUZZ
    def run(case: Any) -> None:
        response = case.call(timeout=30)
        seen[label] = seen.get(label, 0) + 1
        check_response(case.method, case.operation.path, response)
        missing = undeclared_status(
            document, case.method, case.operation.path, response.status_code
        )
        if missing is not None:
            undeclared.add(missing)

    try:
        run()
    except Unsatisfiable:
        # Nothing to violate (e.g. a GET without parameters has no negative cases).
        assert mode is GenerationMode.NEGATIVE, label


def test_schema_fuzzing_finds_no_server_error(api_schema: Any, fuzz_server: Server) -> None:
    """Every operation, valid (positive) and schema-violating (negative) cases."""
    seen: dict[str, int] = {}
    undeclared: set[str] = set()
    document = httpx.get(fuzz_server.url + "/schema/openapi.json", timeout=10).json()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    for operation in operations:
        for mode in modes:
            fuzz_operation(operation, mode, seen, document, undeclared)
    total = sum(seen.values())
    print(f"\nschemathesis: {total} cases over {len(operations)} operations")
    # Every answer the fuzzer saw is one the document declares (clients generated from it
    # know every status they can get).
    assert not undeclared, "\n".join(sorted(undeclared))
    assert total >= 8 * EXAMPLES_PER_OPERATION, seen
    assert {op.path for op in operations} >= {"/v1/predict", "/v1/predict/batch", "/v1/models"}
    assert_pool_healthy(fuzz_server)


def assert_pool_healthy(server: Server) -> None:
    ready = httpx.get(server.url + "/health/ready", timeout=10)
    assert ready.status_code == 200, ready.text
    pool = httpx.get(server.url + "/v1/models", timeout=10).json()["pool"]
    assert pool["restarts"] == 0, pool


# ------------------------------------------------------------- mutated valid payloads

BASE = request_payload(heard_batch(1, 4242), 0, cache=False)
IQ = [np.frombuffer(base64.b64decode(r["iq"]), dtype="<f4") for r in BASE["receivers"]]
COORD = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([90.0, -90.0, 180.0, -180.0, 90.0000001, 1e308, -0.0]),
)


@st.composite
def mutated(draw: st.DrawFn) -> dict[str, Any]:
    """A valid request, then a few mutations a buggy client could make."""
    every = list(range(len(IQ)))
    indices = draw(
        st.one_of(
            st.just(every),
            st.permutations(every),
            st.lists(st.integers(0, len(IQ) - 1), max_size=len(IQ) + 2),
        )
    )
    receivers = []
    for i in indices:
        rx = dict(BASE["receivers"][i])
        iq = IQ[i].copy()
        change = draw(
            st.sampled_from(["keep"] * 8 + ["truncate", "extend", "nan", "inf", "huge", "bytes"])
        )
        if change == "truncate":
            iq = iq[: draw(st.integers(0, iq.size - 1))]
        elif change == "extend":
            iq = np.concatenate([iq, np.zeros(draw(st.integers(1, 64)), dtype="<f4")])
        elif change in ("nan", "inf", "huge"):
            value = {"nan": math.nan, "inf": -math.inf, "huge": 3.0e38}[change]
            iq[draw(st.integers(0, iq.size - 1))] = value
        raw = iq.astype("<f4").tobytes()
        if change == "bytes":
            raw = raw[: draw(st.integers(0, len(raw)))] + draw(st.binary(max_size=7))
        rx["iq"] = base64.b64encode(raw).decode()
        if draw(st.integers(0, 7)) == 7:  # the minimal draw (0) keeps the valid value
            rx["latitude"] = draw(COORD)
        if draw(st.integers(0, 7)) == 7:  # the minimal draw (0) keeps the valid value
            rx["longitude"] = draw(COORD)
        receivers.append(rx)
    body = {**BASE, "receivers": receivers}
    if draw(st.integers(0, 4)) == 4:
        body["sample_rate_hz"] = draw(st.floats(allow_nan=False, allow_infinity=True))
    if draw(st.integers(0, 4)) == 4:
        body["confidence"] = draw(st.lists(st.floats(-1, 2), max_size=10))
    return body


def encode_json(body: dict[str, Any]) -> bytes:
    """JSON with NaN/Infinity spelled as Python's json does (invalid JSON: must be a 400)."""
    import json

    return json.dumps(body).encode()


def test_mutated_payloads_get_200_or_4xx_and_the_pool_stays_healthy(fuzz_server: Server) -> None:
    codes: dict[int, int] = {}
    with httpx.Client(base_url=fuzz_server.url, timeout=30) as client:
        document = client.get("/schema/openapi.json").json()

        @given(body=mutated())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION + 30,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        def run(body: dict[str, Any]) -> None:
            response = client.post(
                "/v1/predict",
                content=encode_json(body),
                headers={"content-type": "application/json"},
            )
            codes[response.status_code] = codes.get(response.status_code, 0) + 1
            assert response.status_code == 200 or 400 <= response.status_code < 500, (
                response.status_code,
                response.text[:300],
            )
            check_response("POST", "/v1/predict", response)
            missing = undeclared_status(document, "POST", "/v1/predict", response.status_code)
            assert missing is None, missing

        run()
    print(f"\nmutated payloads: status counts {dict(sorted(codes.items()))}")
    assert codes.get(200, 0) > 0 and sum(v for k, v in codes.items() if k >= 400) > 0, codes
    assert_pool_healthy(fuzz_server)
