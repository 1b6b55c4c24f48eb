"""The one feature function shared by the trainer and the server.

IQ (complex64) → Hann-windowed STFT → power per bin → equal-width frequency bands →
dB (with a floor) → global normalisation with constants from the training set. Global, never
per-sample, normalisation keeps the received-power differences between receivers, which is
what the model localises from.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from workers.spec import FeatureSpec


@lru_cache(maxsize=8)
def _window(n_fft: int) -> npt.NDArray[np.float32]:
    """Hann window scaled so that a bin's power is the signal power in that bin."""
    win = np.hanning(n_fft + 1)[:-1]  # periodic Hann
    scaled: npt.NDArray[np.float32] = (win / np.sqrt(np.sum(win**2))).astype(np.float32)
    return scaled


def _band_power(frames: npt.NDArray[np.complexfloating[Any, Any]], spec: FeatureSpec) -> Any:
    spectrum = np.fft.fft(frames * _window(spec.n_fft), axis=-1)
    power = spectrum.real**2 + spectrum.imag**2
    power = np.fft.fftshift(power, axes=-1)
    return power.reshape(*power.shape[:-1], spec.n_bands, spec.n_fft // spec.n_bands).sum(-1)


def band_power_db(iq: npt.NDArray[np.complex64], spec: FeatureSpec) -> npt.NDArray[np.float32]:
    """Band power in dB, before normalisation.

    Args:
        iq: complex64 array of shape ``(..., samples)``.
        spec: feature parameters.

    Returns:
        float32 array of shape ``(..., n_frames, n_bands)``; bands run from ``-fs/2`` to
        ``+fs/2``.
    """
    samples = iq.shape[-1]
    n_frames = 1 + (samples - spec.n_fft) // spec.hop
    if spec.hop == spec.n_fft:
        frames = iq[..., : n_frames * spec.n_fft].reshape(*iq.shape[:-1], n_frames, spec.n_fft)
    else:
        view = np.lib.stride_tricks.sliding_window_view(iq, spec.n_fft, axis=-1)
        frames = view[..., :: spec.hop, :][..., :n_frames, :]
    with np.errstate(over="ignore", invalid="ignore"):
        bands = _band_power(frames, spec)
    if not np.isfinite(bands).all():
        # A finite float32 capture near full scale (|x| ~ 1e38) overflows a complex64 FFT;
        # redo it in double precision (rare: the fast path stays single precision).
        bands = _band_power(frames.astype(np.complex128), spec)
    floor = np.float32(10.0 ** (spec.db_floor / 10.0))
    db: npt.NDArray[np.float32] = (10.0 * np.log10(np.maximum(bands, floor))).astype(np.float32)
    return db


def extract_features(iq: npt.NDArray[np.complex64], spec: FeatureSpec) -> npt.NDArray[np.float32]:
    """Normalised features for a model's ``features`` input.

    Args:
        iq: complex64 array of shape ``(..., samples)`` (e.g. receivers × samples).
        spec: feature parameters including the global normalisation constants.

    Returns:
        float32 array of shape ``(..., n_frames, n_bands)``.
    """
    return normalise(band_power_db(np.asarray(iq, dtype=np.complex64), spec), spec)


def normalise(db: npt.NDArray[np.float32], spec: FeatureSpec) -> npt.NDArray[np.float32]:
    """Global normalisation of :func:`band_power_db` output with the training-set constants."""
    return ((db - np.float32(spec.norm_mean_db)) / np.float32(spec.norm_std_db)).astype(
        np.float32, copy=False
    )
