"""The upload gate (app/web/intake.py): the cap, and the end of a burst of uploads."""

from __future__ import annotations

from app.web.intake import RouteLimits, UploadGate


def test_the_gate_refuses_beyond_its_limit_and_counts_it() -> None:
    gate = UploadGate(3)
    assert [gate.enter() for _ in range(4)] == [True, True, True, False]
    assert (gate.active, gate.refused) == (3, 1)
    gate.leave()
    assert gate.enter()


def test_the_end_of_a_burst_hands_memory_back_once() -> None:
    drained: list[int] = []
    gate = UploadGate(2048, on_drained=lambda: drained.append(gate.active))
    for _ in range(300):  # a burst: more than limit // 8 uploads at once
        assert gate.enter()
    for _ in range(291):
        gate.leave()
    assert drained == []  # nine still arriving: not over yet
    gate.leave()
    assert drained == [8]
    for _ in range(8):
        gate.leave()
    assert drained == [8]  # once per burst
    for _ in range(3):  # steady traffic of a few uploads never counts as a burst
        for _ in range(10):
            gate.enter()
        for _ in range(10):
            gate.leave()
    assert drained == [8]


def test_route_limits_match_paths_as_the_router_does() -> None:
    # The router takes /v1/predict/, //v1/predict and /v1//predict to the predict route: the
    # front must find the same limit (a fourth review saw them miss the 413-unread).
    limits = RouteLimits(
        [
            ("/v1/predict", {"POST"}, 10),
            ("/v1/predict/batch", {"POST"}, 20),
            ("/v2/models/{name:str}/infer", {"POST"}, 30),
        ]
    )
    for path in ("/v1/predict", "/v1/predict/", "//v1/predict", "/v1//predict", "/v1/predict//"):
        assert limits("POST", path) == 10, path
    assert limits("POST", "/v1/predict/batch/") == 20
    assert limits("POST", "/v2/models/rf-localizer/infer/") == 30
    assert limits("POST", "/v2/models//infer") is None  # an empty name is no route
    assert limits("GET", "/v1/predict") is None
    assert limits("POST", "/v1/predictions") is None
    assert limits("POST", "/") is None
