"""``heimdall-inference simulate`` writes bodies the API accepts, with their true positions."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from app.ops.cli import main
from workers.request import PredictRequest


def test_simulate_writes_valid_bodies_and_truths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--count", "3", "--seed", "5", "--out", str(tmp_path)]) == 0
    assert "wrote 3 payloads" in capsys.readouterr().out
    bodies = sorted(tmp_path.glob("capture-*[0-9].json"))
    assert len(bodies) == 3
    for body in bodies:
        request = msgspec.json.decode(body.read_bytes(), type=PredictRequest)
        assert len(request.receivers) >= 3
        assert all(len(rx.iq) == 4096 * 8 for rx in request.receivers)
        truth = json.loads(body.with_suffix(".truth.json").read_text())
        assert -90 <= truth["latitude"] <= 90 and -180 <= truth["longitude"] <= 180


def test_simulate_without_out_writes_json_lines_to_stdout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "--count", "2", "--seed", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        request = msgspec.convert(record["request"], PredictRequest, strict=False)
        assert len(request.receivers) >= 3
        assert -90 <= record["truth"]["latitude"] <= 90
    assert list(tmp_path.iterdir()) == []  # nothing written into the working directory
