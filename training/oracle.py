"""The physical limit: a grid-posterior estimator that knows the simulator's physics.

It knows the propagation law (log-distance path loss from the same reference loss, log-normal
shadowing) and the domain's ranges, but not a capture's nuisance values: EIRP, path-loss
exponent and shadowing are integrated out over their uniform priors. From each present
receiver it uses what the server can measure (:mod:`workers.detection`): a detecting
receiver's received power is an observation with Gaussian shadowing; a silent one says only
that its power lay below its own noise floor plus the detection threshold (a censored
observation). The posterior over a grid of transmitter positions (uniform prior over the
simulated region) is reduced to its spatial median, the estimate with the least expected
Euclidean error. No learned model can do better on average than this estimator with the same
measurements, so the network's median error is compared with it.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.special import log_ndtr

from training.simulate import (
    REFERENCE_LOSS_DB,
    REGION,
    WIDE,
    Domain,
    haversine_m,
    receiver_positions,
)
from workers.detection import Detection

F64 = npt.NDArray[np.float64]


class GridOracle:
    """Posterior spatial median over a lat/lon grid, nuisances integrated on grids.

    Args:
        domain: priors of the nuisance values (uniform over its ranges).
        snr_threshold_db: receivers whose estimated SNR is at least this are observations of
            their received power; weaker ones only bound it (censored at noise + threshold).
            Lower than the detection rule's threshold: the power of a receiver 10 dB under
            the noise is still measured to about a dB over 4096 samples.
        step_deg: grid spacing in degrees of latitude (longitude scaled to about the same
            distance).
    """

    def __init__(
        self, domain: Domain = WIDE, snr_threshold_db: float = -10.0, step_deg: float = 0.025
    ) -> None:
        lat = np.arange(REGION["lat_min"] + step_deg / 2, REGION["lat_max"], step_deg)
        lon_step = step_deg / np.cos(np.radians(np.mean(lat)))
        lon = np.arange(REGION["lon_min"] + lon_step / 2, REGION["lon_max"], lon_step)
        self.lat, self.lon = (g.ravel() for g in np.meshgrid(lat, lon, indexing="ij"))
        rx_lat, rx_lon = receiver_positions()
        dist_km = haversine_m(self.lat[:, None], self.lon[:, None], rx_lat, rx_lon) / 1e3
        self.log_d = np.log10(np.maximum(dist_km, 0.1))  # (G, 7)
        # Local metric coordinates of the grid for the spatial median.
        self.xy = np.stack(
            [
                (self.lon - self.lon.mean()) * 111_320.0 * np.cos(np.radians(self.lat.mean())),
                (self.lat - self.lat.mean()) * 110_574.0,
            ],
            axis=1,
        )
        self.eirp = np.linspace(*domain.eirp_dbm, 26)
        self.exponent = np.linspace(*domain.path_loss_exponent, 6)
        self.shadowing = np.linspace(*domain.shadowing_db, 5)
        self.threshold = snr_threshold_db

    def posterior(self, slots: list[int], detection: Detection) -> F64:
        """Normalised posterior weights over the grid for one capture.

        Args:
            slots: network slots of the present receivers, in the detection's order.
            detection: the capture's per-receiver estimates.
        """
        slots_a = np.asarray(slots)
        heard = detection.snr_db >= self.threshold
        log_d = self.log_d[:, slots_a]  # (G, k)
        observed = detection.signal_dbm[heard]  # received power of the heard receivers
        ceiling = detection.noise_dbm[~heard] + self.threshold  # silent: power below this
        k_heard = int(heard.sum())
        e = self.eirp[None, :]  # (1, E)
        total = np.full((len(self.lat),), -np.inf)
        for n in self.exponent:
            loss = REFERENCE_LOSS_DB + 10.0 * n * log_d  # (G, k): EIRP minus received power
            # Heard: observation - (EIRP - loss) = a - EIRP with a = observed + loss.
            a = observed[None, :] + loss[:, heard]
            s1, s2 = a.sum(1, keepdims=True), (a * a).sum(1, keepdims=True)
            squares = s2 - 2.0 * e * s1 + k_heard * e * e  # (G, E): sum of (a - EIRP)^2
            b = (ceiling[None, :] + loss[:, ~heard])[:, None, :] - e[:, :, None]  # (G, E, ks)
            for sigma in self.shadowing:
                ll = -0.5 * squares / sigma**2 - k_heard * np.log(sigma)
                if b.shape[-1]:
                    ll = ll + log_ndtr(b / sigma).sum(-1)
                peak = ll.max(axis=1, keepdims=True)
                lse = peak[:, 0] + np.log(np.exp(ll - peak).sum(axis=1))  # over EIRP
                total = np.logaddexp(total, lse)
        weights = np.exp(total - total.max())
        return np.asarray(weights / weights.sum())

    def estimate(self, slots: list[int], detection: Detection) -> tuple[float, float]:
        """Posterior spatial median (latitude, longitude) of one capture."""
        return self.median(self.posterior(slots, detection))

    def median(self, weights: F64) -> tuple[float, float]:
        """Spatial median (latitude, longitude) of posterior ``weights`` over the grid."""
        keep = weights > weights.max() * 1e-6
        w, xy = weights[keep] / weights[keep].sum(), self.xy[keep]
        point = (w[:, None] * xy).sum(0)
        for _ in range(60):  # Weiszfeld iterations
            dist = np.maximum(np.hypot(*(xy - point).T), 1.0)
            new = (w / dist) @ xy / np.sum(w / dist)
            if np.hypot(*(new - point)) < 1.0:
                point = new
                break
            point = new
        lat = point[1] / 110_574.0 + self.lat.mean()
        lon = point[0] / (111_320.0 * np.cos(np.radians(self.lat.mean()))) + self.lon.mean()
        return float(lat), float(lon)

    def level_of(self, weights: F64, lat: float, lon: float) -> float:
        """Posterior mass of the grid cells more probable than the one holding (lat, lon).

        The truth lies inside the posterior's highest-density region of level ``p`` exactly
        when this is at most ``p``: the oracle's own coverage, to compare calibration with.
        """
        scale = np.cos(np.radians(self.lat.mean()))
        cell = int(np.argmin((self.lat - lat) ** 2 + ((self.lon - lon) * scale) ** 2))
        return float(weights[weights > weights[cell]].sum())
