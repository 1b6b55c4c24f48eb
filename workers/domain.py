"""What the server does with a capture's detection figures: refuse, or flag outside the domain.

Both rules come from the model spec's ``domain`` section (see :mod:`workers.detection` for the
estimates): a capture in which fewer receivers than ``detection.min_detected`` detect a signal
is refused as ``no-signal`` — never a position for noise. An answered capture whose received
power, noise floor or estimated position lies beyond anything the model was trained on is
answered with ``domain.inside = false`` and the reasons, and its sigmas are widened to at least
the model's in-domain median, so an input the model cannot back never gets a tight ellipse.
"""

from __future__ import annotations

import numpy as np

from workers.detection import Detection
from workers.errors import NoSignal
from workers.spec import DomainSpec


def check_signal(detection: Detection, domain: DomainSpec) -> None:
    """Refuse a capture that too few receivers hear.

    Raises:
        NoSignal: fewer than ``min_detected`` receivers have an estimated SNR at or above
            the threshold; the detail says how many did, what is needed and each SNR.
    """
    rule = domain.detection
    snr = detection.snr_db
    hits = int(np.sum(snr >= rule.snr_threshold_db))
    if hits >= rule.min_detected:
        return
    shown = ", ".join("none" if not np.isfinite(v) else f"{v:.1f} dB" for v in snr)
    raise NoSignal(
        f"{hits} of {len(snr)} receivers detect a signal (estimated SNR at least "
        f"{rule.snr_threshold_db:g} dB over the capture band); this model needs at least "
        f"{rule.min_detected} to localise a transmitter. Estimated SNR per receiver, in request "
        f"order: {shown}. Send captures in which the transmitter is heard by more receivers.",
        field="$.receivers",
    )


def outside_reasons(detection: Detection, offset_m: float, domain: DomainSpec) -> list[str]:
    """Why an answered capture lies outside the trained domain (empty when inside).

    Args:
        detection: the capture's per-receiver estimates.
        offset_m: distance of the estimated position from the receivers' centroid.
        domain: the model's domain.
    """
    reasons = []
    strongest = int(np.argmax(detection.signal_dbm))
    if detection.signal_dbm[strongest] > domain.max_signal_dbm:
        reasons.append(
            f"received power {detection.signal_dbm[strongest]:.0f} dBm at $.receivers"
            f"[{strongest}] is above anything the model was trained on "
            f"({domain.max_signal_dbm:.0f} dBm)"
        )
    heard = detection.snr_db >= domain.detection.snr_threshold_db
    if domain.max_mean_signal_dbm is not None and heard.any():
        mean = float(np.mean(detection.signal_dbm[heard]))
        if mean > domain.max_mean_signal_dbm:
            reasons.append(
                f"mean received power {mean:.0f} dBm over the {int(heard.sum())} detecting "
                f"receivers is above anything the model was trained on "
                f"({domain.max_mean_signal_dbm:.0f} dBm)"
            )
    noisiest = int(np.argmax(detection.noise_dbm))
    if detection.noise_dbm[noisiest] > domain.max_noise_dbm:
        reasons.append(
            f"noise floor {detection.noise_dbm[noisiest]:.0f} dBm at $.receivers[{noisiest}] is "
            f"above the trained range (up to {domain.max_noise_dbm:.0f} dBm): interference or "
            "a receiver fault?"
        )
    if offset_m > domain.max_offset_m:
        reasons.append(
            f"the estimated position is {offset_m / 1e3:.0f} km from the receivers' centroid, "
            f"outside the region the network can resolve ({domain.max_offset_m / 1e3:.0f} km)"
        )
    return reasons


def widen(sigma_east: float, sigma_north: float, domain: DomainSpec) -> tuple[float, float]:
    """Sigmas of an out-of-domain answer: at least the model's in-domain median each."""
    floor = domain.out_of_domain_min_sigma_m
    return max(sigma_east, floor), max(sigma_north, floor)
