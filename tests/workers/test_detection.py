"""Signal detection and domain rules (workers.detection, workers.domain) on simulated data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from training.dataset import detection_spec, feature_spec
from training.simulate import WIDE, iter_batches
from workers.detection import detect
from workers.domain import check_signal, outside_reasons, widen
from workers.errors import NoSignal
from workers.features import band_power_db
from workers.spec import DomainSpec

FEATURES = feature_spec()
DOMAIN = DomainSpec(
    description="test",
    eirp_dbm=[10.0, 60.0],
    path_loss_exponent=[2.8, 4.2],
    shadowing_db=[4.0, 9.0],
    noise_dbm=[-121.0, -115.0],
    detection=detection_spec(),
    max_signal_dbm=-10.0,
    max_noise_dbm=-110.0,
    max_offset_m=100_000.0,
    out_of_domain_min_sigma_m=20_000.0,
)


def detections(**kw: object) -> list[tuple[np.ndarray, np.ndarray]]:
    """(estimated SNR, true SNR) per capture of a simulated stream."""
    batch = next(iter_batches(200, 31, chunk=200, **kw))  # type: ignore[arg-type]
    out = []
    for i in range(len(batch)):
        slots = batch.receivers_of(i)
        d = detect(band_power_db(batch.iq[i, slots], FEATURES), FEATURES)
        out.append((d.snr_db, batch.snr_db[i, slots]))
    return out


def test_noise_only_captures_detect_nothing() -> None:
    for estimated, _ in detections(signal=False):
        assert np.all(estimated < -8.0), estimated
        with pytest.raises(NoSignal, match="0 of"):
            check_signal(detect_from(estimated), DOMAIN)


def detect_from(snr: np.ndarray):  # a Detection with only SNRs that matter to check_signal
    from workers.detection import Detection

    return Detection(snr, snr - 120.0, np.full_like(snr, -120.0))


def test_estimated_snr_follows_the_true_snr_where_it_decides() -> None:
    pairs = [(e, t) for est, tru in detections() for e, t in zip(est, tru, strict=True)]
    near = [(e, t) for e, t in pairs if -6.0 <= t <= 20.0]
    assert len(near) > 100
    deviation = np.array([e - t for e, t in near])
    # Wide modulations (FSK at 9600 Bd) leak into the median band, so the noise is
    # over-estimated and the SNR under-estimated: detection errs on the side of refusing.
    assert np.median(np.abs(deviation)) < 0.5
    assert np.percentile(deviation, 99) < 1.0 and np.percentile(deviation, 1) > -3.5
    # Heard well (>= 10 dB) is always detected (threshold 0 dB).
    assert all(e >= 0.0 for e, t in pairs if t >= 10.0)


def test_all_zero_receivers_have_no_signal() -> None:
    d = detect(band_power_db(np.zeros((4, 4096), np.complex64), FEATURES), FEATURES)
    assert np.all(d.snr_db == -np.inf)
    with pytest.raises(NoSignal):
        check_signal(d, DOMAIN)


def test_outside_reasons_and_widening() -> None:
    d = detect_from(np.array([30.0, 20.0, 10.0]))
    assert outside_reasons(d, 1_000.0, DOMAIN) == []
    strong = d._replace(signal_dbm=np.array([5.0, -90.0, -100.0]))
    assert "above anything" in outside_reasons(strong, 1_000.0, DOMAIN)[0]
    noisy = d._replace(noise_dbm=np.array([-120.0, -90.0, -120.0]))
    assert "noise floor" in outside_reasons(noisy, 1_000.0, DOMAIN)[0]
    assert "outside the region" in outside_reasons(d, 150_000.0, DOMAIN)[0]
    assert widen(100.0, 30_000.0, DOMAIN) == (20_000.0, 30_000.0)


def test_wide_domain_is_the_default_and_spans_the_issue_ranges() -> None:
    assert WIDE.eirp_dbm[0] <= 10 and WIDE.eirp_dbm[1] >= 60
    assert WIDE.path_loss_exponent[0] <= 2.8 and WIDE.path_loss_exponent[1] >= 4.2
    assert WIDE.shadowing_db[0] <= 4 and WIDE.shadowing_db[1] >= 9
    assert set(WIDE.modulations) >= {"cw", "fm", "fsk", "noise"}
    narrow = dataclasses.replace(WIDE, eirp_dbm=(40.0, 40.0))
    batch = next(iter_batches(50, 3, chunk=50, domain=narrow))
    assert np.all(batch.eirp_dbm == 40.0)
    assert batch.exponent.min() >= 2.8 and batch.exponent.max() <= 4.2
