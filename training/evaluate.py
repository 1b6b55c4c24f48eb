"""Evaluate a model package on fresh simulated captures (numpy + onnxruntime, no torch).

Used by the exporter (figures in the spec's provenance), the acceptance tests and
``python -m training.report``. Captures go through what the server does: the same packing,
the same signal detection (a capture in which fewer than the spec's ``min_detected``
receivers detect the signal is refused, not scored), positions decoded as ``mean *
position_scale_m`` in the local frame around the present receivers' centroid, sigmas
calibrated by :func:`workers.uncertainty.calibrated_sigmas`, errors as geodesic distances.
Baselines are received-power-weighted centroids with three weightings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from training.simulate import WIDE, Domain, iter_batches, receiver_positions
from workers.geo import distance_m, from_local, to_local
from workers.inputs import ModelInputs, pack_capture
from workers.spec import ModelSpec, decode_spec
from workers.uncertainty import calibrated_sigmas

if TYPE_CHECKING:
    from training.oracle import GridOracle

LEVELS = (0.5, 0.9, 0.95)
CENTROIDS = ("linear", "sqrt", "db")
F64 = npt.NDArray[np.float64]


class Evaluation(NamedTuple):
    """Per-capture results of an evaluation run (answered captures only, but ``refused``)."""

    model_error_m: F64
    """Geodesic error of the model's mean."""
    baseline_error_m: F64
    """``(n, 3)`` geodesic errors of the linear, square-root and dB power-weighted centroids."""
    mahalanobis_sq: F64
    """Squared Mahalanobis distance of the truth under the calibrated Gaussian."""
    sigma_m: F64
    """Geometric-mean calibrated sigma of each answer."""
    nuisance: F64
    """``(n, 4)`` EIRP, exponent, shadowing and receivers present of each answered capture."""
    refused: int
    """Captures refused as ``no-signal`` (fewer detecting receivers than the spec requires)."""
    simulated: int
    """Captures simulated."""
    offsets_m: F64
    """Truth's distance from the receivers' centroid of each answered capture."""
    oracle_error_m: F64
    """Geodesic error of the grid-posterior oracle (empty unless asked for)."""
    oracle_level: F64
    """Posterior mass the oracle puts above the truth's cell: the truth is inside its
    level-``p`` region when this is at most ``p`` (empty unless asked for)."""

    def oracle_coverage(self, level: float, where: npt.NDArray[np.bool_] | None = None) -> float:
        """Share of truths inside the oracle's own ``level`` highest-density region."""
        levels = self.oracle_level if where is None else self.oracle_level[where]
        return float(np.mean(levels <= level))

    def coverage(self, level: float, where: npt.NDArray[np.bool_] | None = None) -> float:
        """Share of true positions inside the ``level`` ellipse (optionally of a subset)."""
        d2 = self.mahalanobis_sq if where is None else self.mahalanobis_sq[where]
        return float(np.mean(d2 <= -2.0 * math.log1p(-level)))

    def best_baseline(self) -> tuple[str, float]:
        """Name and median error of the best of the three centroids."""
        medians = np.median(self.baseline_error_m, axis=0)
        best = int(np.argmin(medians))
        return CENTROIDS[best], float(medians[best])

    def metrics(self) -> dict[str, float]:
        """Summary figures: medians, ratio to the best centroid and coverages."""
        model = float(np.median(self.model_error_m))
        _, base = self.best_baseline()
        out = {
            "median_error_m": round(model, 1),
            "baseline_median_error_m": round(base, 1),
            "error_ratio": round(model / base, 4),
            "p90_error_m": round(float(np.percentile(self.model_error_m, 90)), 1),
            "answered_share": round(len(self.model_error_m) / max(self.simulated, 1), 4),
            "median_sigma_m": round(float(np.median(self.sigma_m)), 1),
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


def weighted_centroids(
    inputs: ModelInputs, latitudes: F64, longitudes: F64
) -> list[tuple[float, float]]:
    """Power-weighted centroids of the receivers: linear, square-root and dB weights.

    Weights come from each receiver's estimated signal power above its own noise
    (:mod:`workers.detection`); dB weights are the power in dB above the weakest detectable
    level (``noise``), clipped at zero. Plain equal weights are used when all are zero.
    """
    det = inputs.detection
    linear = np.where(np.isfinite(det.signal_dbm), 10.0 ** (det.signal_dbm / 10.0), 0.0)
    db = np.clip(np.where(np.isfinite(det.snr_db), det.snr_db, 0.0), 0.0, None)
    out = []
    for weights in (linear, np.sqrt(linear), db):
        w = weights if np.any(weights > 0) else np.ones_like(weights)
        w = w / w.sum()
        out.append((float(np.sum(w * latitudes)), float(np.sum(w * longitudes))))
    return out


def evaluate(
    session: ort.InferenceSession,
    spec: ModelSpec,
    n: int,
    seed: int,
    domain: Domain = WIDE,
    oracle: GridOracle | None = None,
) -> Evaluation:
    """Simulate ``n`` captures of ``domain`` from ``seed``; score the answered ones.

    With ``oracle``, the grid-posterior estimator is scored on the same captures.
    """
    rx_lat, rx_lon = receiver_positions()
    scale = spec.output.position_scale_m
    detection = spec.domain.detection if spec.domain is not None else None
    model_err, base_err, d2, sig, nuis, offsets = [], [], [], [], [], []
    oracle_err, oracle_level = [], []
    refused = 0
    for batch in iter_batches(n, seed, chunk=500, domain=domain):
        packed, rows = [], []
        for i in range(len(batch)):
            slots = batch.receivers_of(i)
            p = pack_capture(batch.iq[i, slots], rx_lat[slots], rx_lon[slots], spec)
            if detection is not None and (
                np.sum(p.detection.snr_db >= detection.snr_threshold_db) < detection.min_detected
            ):
                refused += 1
                continue
            packed.append(p)
            rows.append(i)
            errs = []
            for b_lat, b_lon in weighted_centroids(p, rx_lat[slots], rx_lon[slots]):
                errs.append(distance_m(b_lat, b_lon, batch.tx_lat[i], batch.tx_lon[i])[0])
            base_err.append(errs)
            if oracle is not None:
                weights = oracle.posterior(slots, p.detection)
                o_lat, o_lon = oracle.median(weights)
                oracle_err.append(distance_m(o_lat, o_lon, batch.tx_lat[i], batch.tx_lon[i])[0])
                oracle_level.append(oracle.level_of(weights, batch.tx_lat[i], batch.tx_lon[i]))
            nuis.append((batch.eirp_dbm[i], batch.exponent[i], batch.shadowing_db[i], len(slots)))
        if not packed:
            continue
        mean, sigma, rho = run_session(
            session,
            spec,
            np.stack([p.features for p in packed]),
            np.stack([p.receivers for p in packed]),
            np.stack([p.mask for p in packed]),
        )
        for j, (i, p) in enumerate(zip(rows, packed, strict=True)):
            east, north = mean[j].astype(np.float64) * scale
            lat, lon = from_local(p.origin_lat, p.origin_lon, east, north)
            model_err.append(distance_m(lat[0], lon[0], batch.tx_lat[i], batch.tx_lon[i])[0])
            # Truth in the same local frame, as the mean's error vector for the ellipse test.
            te, tn = to_local(p.origin_lat, p.origin_lon, batch.tx_lat[i], batch.tx_lon[i])
            offsets.append(math.hypot(te[0], tn[0]))
            se, sn = calibrated_sigmas(float(sigma[j, 0]), float(sigma[j, 1]), spec.output)
            r = float(rho[j])
            de, dn = (te[0] - east) / se, (tn[0] - north) / sn
            d2.append((de**2 - 2.0 * r * de * dn + dn**2) / (1.0 - r**2))
            sig.append(math.sqrt(se * sn))
    return Evaluation(
        np.array(model_err),
        np.array(base_err).reshape(-1, len(CENTROIDS)),
        np.array(d2),
        np.array(sig),
        np.array(nuis).reshape(-1, 4),
        refused,
        n,
        np.array(offsets),
        np.array(oracle_err),
        np.array(oracle_level),
    )
