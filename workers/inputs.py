"""Turn one capture set (receivers' IQ and positions) into the model's input tensors.

Used by the trainer to build its dataset and by the workers to serve, so the tensors a
model sees in production are built by exactly the code it was trained with.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from workers.detection import Detection, detect
from workers.features import band_power_db, normalise
from workers.geo import centroid, to_local
from workers.spec import ModelSpec


class ModelInputs(NamedTuple):
    """Input tensors for one capture set (no batch axis) and the local frame's origin."""

    features: npt.NDArray[np.float32]
    """``(max_receivers, n_frames, n_bands)``; absent slots are zeros."""
    receivers: npt.NDArray[np.float32]
    """``(max_receivers, 2)`` east/north in units of ``position_scale_m``."""
    mask: npt.NDArray[np.float32]
    """``(max_receivers,)``: 1 for a present receiver, 0 for padding."""
    origin_lat: float
    """Latitude of the local frame's origin (receiver centroid)."""
    origin_lon: float
    """Longitude of the local frame's origin (receiver centroid)."""
    detection: Detection
    """Per-receiver noise, signal power and SNR estimated from the capture itself."""


def pack_capture(
    iq: npt.NDArray[np.complex64],
    latitudes: npt.ArrayLike,
    longitudes: npt.ArrayLike,
    spec: ModelSpec,
) -> ModelInputs:
    """Build model inputs from ``k`` receivers' IQ ``(k, samples)`` and their positions.

    Receivers fill the first ``k`` slots in the order given; the model is permutation
    invariant and masks the rest.
    """
    count = iq.shape[0]
    slots = spec.capture.max_receivers
    feat = spec.features
    features = np.zeros((slots, feat.n_frames, feat.n_bands), dtype=np.float32)
    band_db = band_power_db(np.asarray(iq, dtype=np.complex64), feat)
    features[:count] = normalise(band_db, feat)
    lat0, lon0 = centroid(latitudes, longitudes)
    east, north = to_local(lat0, lon0, latitudes, longitudes)
    receivers = np.zeros((slots, 2), dtype=np.float32)
    scale = spec.output.position_scale_m
    receivers[:count, 0] = east / scale
    receivers[:count, 1] = north / scale
    mask = np.zeros(slots, dtype=np.float32)
    mask[:count] = 1.0
    return ModelInputs(features, receivers, mask, lat0, lon0, detect(band_db, feat))
