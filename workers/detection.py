"""Signal detection and received-power estimates from a capture's own band powers.

A localization service must say "I cannot tell" rather than draw an ellipse around noise. Per
receiver, the noise floor is estimated from the capture itself — the median of the
time-averaged band powers: the transmissions this network monitors occupy at most about a
third of the 48 kHz band, so the median band holds receiver noise only — and the signal power
is the total power above that floor. Used by the server before inference (refusing captures
in which too few receivers hear a signal, flagging received powers the model was never trained
on) and by the trainer, which keeps exactly the captures the server would answer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from workers.spec import FeatureSpec

F64 = npt.NDArray[np.float64]


class Detection(NamedTuple):
    """Per-receiver estimates for one capture (one value per present receiver, in order)."""

    snr_db: F64
    """Signal power over noise power in the whole capture band; ``-inf`` for no excess."""
    signal_dbm: F64
    """Estimated received signal power (noise removed); ``-inf`` when there is none."""
    noise_dbm: F64
    """Estimated noise power in the whole capture band."""


def detect(band_db: npt.NDArray[np.float32], features: FeatureSpec) -> Detection:
    """Estimate noise, signal power and SNR per receiver from unnormalised band powers.

    Args:
        band_db: ``(receivers, n_frames, n_bands)`` from
            :func:`workers.features.band_power_db` (dB, floored, before normalisation).
        features: the feature parameters the band powers were computed with.

    Returns:
        The per-receiver estimates. Sample power 1.0 is 0 dBm.
    """
    bands = np.mean(10.0 ** (band_db.astype(np.float64) / 10.0), axis=-2)  # (k, n_bands)
    # Hann-normalised bins each hold the full power of white noise, and the bins of one frame
    # sum to n_fft times the frame's mean sample power.
    noise = np.median(bands, axis=-1) * features.n_bands / features.n_fft
    total = bands.sum(axis=-1) / features.n_fft
    signal = total - noise
    with np.errstate(divide="ignore", invalid="ignore"):
        signal_dbm = np.where(signal > 0, 10.0 * np.log10(np.maximum(signal, 1e-300)), -np.inf)
        noise_dbm = 10.0 * np.log10(np.maximum(noise, 1e-300))
        snr_db = signal_dbm - noise_dbm
    return Detection(snr_db, signal_dbm, noise_dbm)
