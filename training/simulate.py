"""Deterministic simulator of a 7-receiver VHF monitoring network (numpy only).

Seven fixed receivers in Piedmont, north-west Italy, cover a region of about 122 km × 122 km
(latitude 44.55–45.65°N, longitude 7.00–8.55°E). A transmitter is drawn uniformly in the
region with a random power (35–45 dBm), a VHF carrier near 145 MHz with one of three
modulations (CW, FM, noise-like) and a random frequency offset (±6 kHz). Each receiver sees
log-distance path loss (exponent 3.5, free-space reference at 1 km) with log-normal shadowing
(σ = 4 dB), plus its own thermal noise (−121 dBm in 48 kHz, with 0–3 dB of receiver-to-receiver
variation). 0–3 receivers are absent from each capture. A capture is 4096 complex64 samples at
48 kHz per present receiver; sample power 1.0 corresponds to 0 dBm.

Distances for the path loss use the haversine on the mean Earth radius: enough for a
propagation model with 4 dB shadowing (the service's own geodesy uses pyproj).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

SAMPLE_RATE_HZ = 48_000.0
SAMPLES = 4096
CENTER_FREQUENCY_HZ = 145_000_000.0
REGION = {"lat_min": 44.55, "lat_max": 45.65, "lon_min": 7.00, "lon_max": 8.55}

# id, site name, latitude, longitude
RECEIVERS: tuple[tuple[str, str, float, float], ...] = (
    ("TRN", "Torino", 45.0703, 7.6869),
    ("IVR", "Ivrea", 45.4670, 7.8760),
    ("BIE", "Biella", 45.5663, 8.0530),
    ("AST", "Asti", 44.9007, 8.2064),
    ("SAL", "Saluzzo", 44.6453, 7.4934),
    ("SUS", "Susa", 45.1385, 7.0487),
    ("CAS", "Casale Monferrato", 45.1335, 8.4530),
)

PATH_LOSS_EXPONENT = 3.5
REFERENCE_LOSS_DB = 75.7  # free-space loss at 1 km and 145 MHz
SHADOWING_DB = 4.0
NOISE_FLOOR_DBM = -121.0
TX_POWER_DBM = (35.0, 45.0)
FREQ_OFFSET_HZ = 6_000.0
MODULATIONS = ("cw", "fm", "noise")
EARTH_RADIUS_M = 6_371_008.8


@dataclass(frozen=True)
class CaptureBatch:
    """A batch of simulated captures in fixed receiver slots (slot i = ``RECEIVERS[i]``)."""

    iq: npt.NDArray[np.complex64]
    """``(n, 7, samples)``; absent receivers hold zeros."""
    present: npt.NDArray[np.bool_]
    """``(n, 7)`` which receivers took part."""
    tx_lat: npt.NDArray[np.float64]
    """True transmitter latitudes."""
    tx_lon: npt.NDArray[np.float64]
    """True transmitter longitudes."""
    modulation: list[str]
    """Modulation of each capture."""
    order: npt.NDArray[np.int64]
    """``(n, 7)`` a random order of the slots, used to shuffle receivers in payloads."""

    def __len__(self) -> int:
        """Number of captures."""
        return len(self.tx_lat)

    def receivers_of(self, i: int) -> list[int]:
        """Slots of capture ``i``'s present receivers, in the capture's shuffled order."""
        return [int(s) for s in self.order[i] if self.present[i, s]]


def receiver_positions() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Latitudes and longitudes of the network's receivers."""
    return (
        np.array([r[2] for r in RECEIVERS], dtype=np.float64),
        np.array([r[3] for r in RECEIVERS], dtype=np.float64),
    )


def haversine_m(
    lat1: npt.ArrayLike, lon1: npt.ArrayLike, lat2: npt.ArrayLike, lon2: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Great-circle distance on the mean Earth radius (propagation model only)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dphi / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2) ** 2
    return np.asarray(2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(a)), dtype=np.float64)


def _waveforms(rng: np.random.Generator, n: int) -> tuple[npt.NDArray[np.complex64], list[str]]:
    """Unit-power baseband waveforms ``(n, samples)`` with random modulation and offset."""
    t = np.arange(SAMPLES, dtype=np.float64) / SAMPLE_RATE_HZ
    kinds = rng.integers(0, len(MODULATIONS), size=n)
    offset = rng.uniform(-FREQ_OFFSET_HZ, FREQ_OFFSET_HZ, size=(n, 1))
    phase = 2 * np.pi * offset * t + rng.uniform(0, 2 * np.pi, size=(n, 1))
    # FM: tone modulation, modulating frequency 300–3000 Hz, deviation 1.5–5 kHz.
    f_mod = rng.uniform(300.0, 3000.0, size=(n, 1))
    deviation = rng.uniform(1500.0, 5000.0, size=(n, 1))
    fm_phase = (deviation / f_mod) * np.sin(2 * np.pi * f_mod * t)
    phase = phase + np.where((kinds == 1)[:, None], fm_phase, 0.0)
    wave = np.exp(1j * phase)
    noisy = kinds == 2
    if noisy.any():
        # Noise-like: complex Gaussian noise band-limited to 2–12 kHz around the offset.
        m = int(noisy.sum())
        white = rng.standard_normal((m, SAMPLES)) + 1j * rng.standard_normal((m, SAMPLES))
        freqs = np.fft.fftfreq(SAMPLES, 1.0 / SAMPLE_RATE_HZ)
        width = rng.uniform(2000.0, 12000.0, size=(m, 1))
        band = np.abs(freqs[None, :] - offset[noisy]) <= width / 2
        shaped = np.fft.ifft(np.fft.fft(white, axis=1) * band, axis=1)
        shaped /= np.sqrt(np.mean(np.abs(shaped) ** 2, axis=1, keepdims=True))
        wave[noisy] = shaped
    return wave.astype(np.complex64), [MODULATIONS[k] for k in kinds]


def simulate_batch(rng: np.random.Generator, n: int) -> CaptureBatch:
    """Simulate ``n`` captures with the given generator."""
    rx_lat, rx_lon = receiver_positions()
    k = len(RECEIVERS)
    tx_lat = rng.uniform(REGION["lat_min"], REGION["lat_max"], size=n)
    tx_lon = rng.uniform(REGION["lon_min"], REGION["lon_max"], size=n)
    tx_dbm = rng.uniform(*TX_POWER_DBM, size=(n, 1))
    dist_km = np.maximum(haversine_m(tx_lat[:, None], tx_lon[:, None], rx_lat, rx_lon) / 1e3, 0.1)
    loss = REFERENCE_LOSS_DB + 10 * PATH_LOSS_EXPONENT * np.log10(dist_km)
    rx_dbm = tx_dbm - loss + rng.normal(0.0, SHADOWING_DB, size=(n, k))
    noise_dbm = NOISE_FLOOR_DBM + rng.uniform(0.0, 3.0, size=(n, k))
    wave, kinds = _waveforms(rng, n)
    amp = np.sqrt(10 ** (rx_dbm / 10))[..., None]
    carrier_phase = np.exp(1j * rng.uniform(0, 2 * np.pi, size=(n, k, 1)))
    noise_amp = np.sqrt(10 ** (noise_dbm / 10) / 2)[..., None].astype(np.float32)
    noise = rng.standard_normal((n, k, SAMPLES), dtype=np.float32) + 1j * rng.standard_normal(
        (n, k, SAMPLES), dtype=np.float32
    )
    iq = (amp * carrier_phase * wave[:, None, :]).astype(np.complex64) + noise * noise_amp
    absent_count = rng.integers(0, 4, size=n)
    order = np.argsort(rng.random((n, k)), axis=1)
    present = np.ones((n, k), dtype=bool)
    for i in range(n):
        present[i, order[i, : absent_count[i]]] = False
    iq[~present] = 0
    shuffle = np.argsort(rng.random((n, k)), axis=1)
    return CaptureBatch(iq.astype(np.complex64), present, tx_lat, tx_lon, kinds, shuffle)


def iter_batches(n: int, seed: int, chunk: int = 1024) -> Iterator[CaptureBatch]:
    """Yield ``n`` captures in chunks, deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        size = min(chunk, n - done)
        yield simulate_batch(rng, size)
        done += size


def request_payload(batch: CaptureBatch, i: int, **options: Any) -> dict[str, Any]:
    """A JSON ``POST /v1/predict`` body for capture ``i`` (IQ as base64 little-endian)."""
    rx_lat, rx_lon = receiver_positions()
    receivers = [
        {
            "id": RECEIVERS[s][0],
            "latitude": float(rx_lat[s]),
            "longitude": float(rx_lon[s]),
            "iq": base64.b64encode(batch.iq[i, s].astype("<c8").tobytes()).decode("ascii"),
        }
        for s in batch.receivers_of(i)
    ]
    body: dict[str, Any] = {
        "receivers": receivers,
        "sample_rate_hz": SAMPLE_RATE_HZ,
        "center_frequency_hz": CENTER_FREQUENCY_HZ,
    }
    body.update(options)
    return body


def truth_of(batch: CaptureBatch, i: int) -> dict[str, float]:
    """The true transmitter position of capture ``i``."""
    return {"latitude": float(batch.tx_lat[i]), "longitude": float(batch.tx_lon[i])}
