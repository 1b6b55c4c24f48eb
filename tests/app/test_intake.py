"""The upload gate (app/web/intake.py): the cap, and the end of a burst of uploads."""

from __future__ import annotations

from app.web.intake import UploadGate


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
