"""Evaluate a model package on fresh simulated captures (numpy + onnxruntime, no torch).

Used by the exporter (figures in the spec's provenance) and by the acceptance tests.
Positions are decoded as the server does: ``mean * position_scale_m`` in the local frame
around the present receivers' centroid, back to WGS84 with :func:`workers.geo.from_local`,
errors as geodesic distances. The baseline is a received-power-weighted centroid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from training.simulate import iter_batches, receiver_positions
from workers.features import band_power_db
from workers.geo import distance_m, from_local, to_local
from workers.inputs import pack_capture
from workers.spec import ModelSpec, decode_spec

LEVELS = (0.5, 0.9, 0.95)


class Evaluation(NamedTuple):
    """Per-capture results of an evaluation run."""

    model_error_m: npt.NDArray[np.float64]
    """Geodesic error of the model's mean."""
    baseline_error_m: npt.NDArray[np.float64]
    """Geodesic error of the power-weighted centroid."""
    mahalanobis_sq: npt.NDArray[np.float64]
    """Squared Mahalanobis distance of the truth under the calibrated Gaussian."""

    def coverage(self, level: float) -> float:
        """Share of true positions inside the ``level`` ellipse."""
        return float(np.mean(self.mahalanobis_sq <= -2.0 * math.log1p(-level)))

    def metrics(self) -> dict[str, float]:
        """Summary figures: medians, ratio and coverages."""
        model, base = float(np.median(self.model_error_m)), float(np.median(self.baseline_error_m))
        out = {
            "median_error_m": round(model, 1),
            "baseline_median_error_m": round(base, 1),
            "error_ratio": round(model / base, 4),
            "p90_error_m": round(float(np.percentile(self.model_error_m, 90)), 1),
        }
        for level in LEVELS:
            out[f"coverage_{round(level * 100)}"] = round(self.coverage(level), 4)
        return out


def load_package(directory: Path, threads: int = 1) -> tuple[ort.InferenceSession, ModelSpec]:
    """Open ``model.onnx`` and ``model_spec.json`` of a package directory."""
    spec = decode_spec((directory / "model_spec.json").read_bytes())
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        str(directory / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    return session, spec


def run_session(
    session: ort.InferenceSession,
    spec: ModelSpec,
    features: npt.NDArray[np.float32],
    receivers: npt.NDArray[np.float32],
    mask: npt.NDArray[np.float32],
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Run the model on batched inputs; returns ``mean``, ``sigma``, ``rho``."""
    feeds = {
        spec.inputs["features"].name: features,
        spec.inputs["receivers"].name: receivers,
        spec.inputs["mask"].name: mask,
    }
    names = [spec.outputs[r].name for r in ("mean", "sigma", "rho")]
    mean, sigma, rho = session.run(names, feeds)
    return mean, sigma, rho


def weighted_centroid(
    iq: npt.NDArray[np.complex64],
    latitudes: npt.NDArray[np.float64],
    longitudes: npt.NDArray[np.float64],
    spec: ModelSpec,
) -> tuple[float, float]:
    """Received-power-weighted centroid of the receivers (the baseline estimator).

    Weights are each receiver's linear mean power minus a noise estimate (the 25th percentile
    of its band powers times the number of bands), clipped at zero; plain linear power is used
    if every weight is zero.
    """
    power = np.mean(np.abs(iq.astype(np.complex128)) ** 2, axis=-1)
    bands = 10.0 ** (band_power_db(iq, spec.features).astype(np.float64) / 10.0)
    # Hann-normalised bins each hold the full power of white noise: scale bands to sample power.
    per_band = np.percentile(bands.mean(axis=-2), 25, axis=-1)
    noise = per_band * spec.features.n_bands / spec.features.n_fft
    weights = np.clip(power - noise, 0.0, None)
    if not np.any(weights > 0):
        weights = power
    weights = weights / weights.sum()
    return float(np.sum(weights * latitudes)), float(np.sum(weights * longitudes))


def evaluate(session: ort.InferenceSession, spec: ModelSpec, n: int, seed: int) -> Evaluation:
    """Simulate ``n`` captures from ``seed`` and score the model and the baseline on them."""
    rx_lat, rx_lon = receiver_positions()
    scale = spec.output.position_scale_m
    factor = spec.output.calibration_factor
    model_err, base_err, d2 = [], [], []
    for batch in iter_batches(n, seed, chunk=500):
        packed = []
        for i in range(len(batch)):
            slots = batch.receivers_of(i)
            packed.append(pack_capture(batch.iq[i, slots], rx_lat[slots], rx_lon[slots], spec))
            b_lat, b_lon = weighted_centroid(batch.iq[i, slots], rx_lat[slots], rx_lon[slots], spec)
            base_err.append(distance_m(b_lat, b_lon, batch.tx_lat[i], batch.tx_lon[i])[0])
        mean, sigma, rho = run_session(
            session,
            spec,
            np.stack([p.features for p in packed]),
            np.stack([p.receivers for p in packed]),
            np.stack([p.mask for p in packed]),
        )
        for i, p in enumerate(packed):
            east, north = mean[i].astype(np.float64) * scale
            lat, lon = from_local(p.origin_lat, p.origin_lon, east, north)
            model_err.append(distance_m(lat[0], lon[0], batch.tx_lat[i], batch.tx_lon[i])[0])
            # Truth in the same local frame, as the mean's error vector for the ellipse test.
            te, tn = to_local(p.origin_lat, p.origin_lon, batch.tx_lat[i], batch.tx_lon[i])
            err = np.array([te[0] - east, tn[0] - north])
            se, sn = sigma[i].astype(np.float64) * scale * factor
            r = float(rho[i])
            de, dn = err[0] / se, err[1] / sn
            d2.append((de**2 - 2.0 * r * de * dn + dn**2) / (1.0 - r**2))
    return Evaluation(np.array(model_err), np.array(base_err), np.array(d2))
