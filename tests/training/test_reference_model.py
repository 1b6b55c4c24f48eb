"""Acceptance tests of the committed reference model package (onnxruntime + numpy only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.evaluate import LEVELS, Evaluation, evaluate, load_package, run_session
from training.simulate import iter_batches, receiver_positions
from workers.inputs import pack_capture

PACKAGE = Path(__file__).resolve().parents[2] / "training" / "reference"
TEST_SEED = 20261126  # never used in training, validation or the exporter's evaluation
TEST_CAPTURES = 2_000


@pytest.fixture(scope="module")
def package():
    """The ONNX Runtime session and spec of the committed package."""
    return load_package(PACKAGE)


@pytest.fixture(scope="module")
def evaluation(package) -> Evaluation:
    """Model and baseline results on freshly simulated test captures."""
    session, spec = package
    return evaluate(session, spec, TEST_CAPTURES, TEST_SEED)


def test_model_file_is_small() -> None:
    """The ONNX file stays within 5 MB."""
    assert (PACKAGE / "model.onnx").stat().st_size <= 5 * 1024 * 1024


def test_accuracy_beats_power_weighted_centroid(evaluation: Evaluation) -> None:
    """Median geodesic error is at most 0.6 × that of the power-weighted centroid."""
    model = float(np.median(evaluation.model_error_m))
    baseline = float(np.median(evaluation.baseline_error_m))
    print(
        f"\nmedian error: model {model:.0f} m, baseline {baseline:.0f} m, "
        f"ratio {model / baseline:.3f}"
    )
    assert model <= 0.6 * baseline


@pytest.mark.parametrize("level", LEVELS)
def test_ellipses_cover_their_level(evaluation: Evaluation, level: float) -> None:
    """The calibrated ellipses hold their level of true positions within ±4 points."""
    share = evaluation.coverage(level)
    print(f"\ncoverage of the {level:.0%} ellipse: {share:.1%}")
    assert abs(share - level) <= 0.04


def test_receiver_order_and_padding_do_not_matter(package) -> None:
    """Permuting the present receivers or filling the padded slots leaves outputs unchanged."""
    session, spec = package
    rx_lat, rx_lon = receiver_positions()
    batch = next(iter_batches(32, TEST_SEED + 1, chunk=32))
    rng = np.random.default_rng(0)
    for i in range(len(batch)):
        slots = batch.receivers_of(i)
        p = pack_capture(batch.iq[i, slots], rx_lat[slots], rx_lon[slots], spec)
        ref = run_session(session, spec, p.features[None], p.receivers[None], p.mask[None])
        perm = rng.permutation(len(slots))
        shuffled = [slots[j] for j in perm]
        q = pack_capture(batch.iq[i, shuffled], rx_lat[shuffled], rx_lon[shuffled], spec)
        features, receivers = q.features.copy(), q.receivers.copy()
        features[len(slots) :] = rng.normal(0.0, 3.0, features[len(slots) :].shape)
        receivers[len(slots) :] = rng.normal(0.0, 1.0, receivers[len(slots) :].shape)
        out = run_session(session, spec, features[None], receivers[None], q.mask[None])
        for a, b in zip(ref, out, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4)
