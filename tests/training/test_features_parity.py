"""The trainer's dataset tensors are exactly what the server builds from a request."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from training.dataset import MIN_DETECTED, build_dataset, detected, pack_one
from training.simulate import iter_batches, request_payload
from workers.features import extract_features
from workers.inputs import pack_capture
from workers.spec import decode_spec

PACKAGE = Path(__file__).resolve().parents[2] / "training" / "reference"
SPEC = decode_spec((PACKAGE / "model_spec.json").read_bytes())


def _server_inputs(payload: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack a ``POST /v1/predict`` body the way the server does."""
    iq = np.stack(
        [np.frombuffer(base64.b64decode(r["iq"]), dtype="<c8") for r in payload["receivers"]]
    )
    lats = np.array([r["latitude"] for r in payload["receivers"]])
    lons = np.array([r["longitude"] for r in payload["receivers"]])
    p = pack_capture(iq, lats, lons, SPEC)
    return p.features, p.receivers, p.mask


def test_trainer_and_server_build_identical_tensors() -> None:
    """For the same captures, the training dataset equals the server-side packing bit for bit.

    The dataset keeps only the captures the server answers (its own detection rule), so
    the refused ones are skipped here by the same rule.
    """
    n, seed = 12, 4242
    data = build_dataset(n, seed, SPEC, chunk=n, log=False)
    batch = next(iter_batches(n, seed, chunk=n))
    kept = 0
    for i in range(n):
        inputs, _ = pack_one(batch, i, SPEC)
        if detected(inputs) < MIN_DETECTED:
            continue
        features, receivers, mask = _server_inputs(request_payload(batch, i))
        np.testing.assert_array_equal(data.features[kept], features)
        np.testing.assert_array_equal(data.receivers[kept], receivers)
        np.testing.assert_array_equal(data.mask[kept], mask)
        np.testing.assert_array_equal(inputs.features, features)
        kept += 1
    assert 0 < kept == len(data.features) < n


def test_features_are_finite_and_shift_with_power() -> None:
    """Features are finite (also for silence) and +10 dB shifts them by 10 / norm_std_db."""
    batch = next(iter_batches(4, 99, chunk=4))
    iq = batch.iq[batch.present][:6]
    feats = extract_features(iq, SPEC.features)
    assert np.all(np.isfinite(feats))
    assert np.all(np.isfinite(extract_features(np.zeros((1, 4096), np.complex64), SPEC.features)))
    louder = extract_features((iq * np.float32(np.sqrt(10.0))).astype(np.complex64), SPEC.features)
    np.testing.assert_allclose(louder - feats, 10.0 / SPEC.features.norm_std_db, atol=2e-4)
