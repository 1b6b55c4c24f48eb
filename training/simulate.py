"""Deterministic simulator of a 7-receiver VHF monitoring network (numpy only).

Seven fixed receivers in Piedmont, north-west Italy, cover a region of about 122 km × 122 km
(latitude 44.55–45.65°N, longitude 7.00–8.55°E). A transmitter is drawn uniformly in the
region, with a VHF carrier near 145 MHz, one of four modulations (CW, FM, 2-FSK, noise-like)
and a random frequency offset (±6 kHz). Each receiver sees log-distance path loss (free-space
reference at 1 km) with log-normal shadowing, plus its own thermal noise. 0–3 receivers are
absent from each capture. A capture is 4096 complex64 samples at 48 kHz per present receiver;
sample power 1.0 corresponds to 0 dBm.

The nuisance values are drawn per capture from a :class:`Domain`. The default, ``WIDE``, is
the reference model's domain: EIRP 10–60 dBm (a handheld far away to a repeater), path-loss
exponent 2.8–4.2 (open country to dense clutter), shadowing 4–9 dB, noise floors 0–6 dB
above −121 dBm. ``LAB`` is the narrow world of the first reference model (exponent 3.5,
shadowing 4 dB, 35–45 dBm), kept as a named preset for comparison.

Distances for the path loss use the haversine on the mean Earth radius: enough for a
propagation model with several dB of shadowing (the service's own geodesy uses pyproj).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass, fields
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

REFERENCE_LOSS_DB = 75.7  # free-space loss at 1 km and 145 MHz
THERMAL_NOISE_DBM = -121.0  # kTB in 48 kHz with a 5 dB noise figure
FREQ_OFFSET_HZ = 6_000.0
MODULATIONS = ("cw", "fm", "fsk", "noise")
EARTH_RADIUS_M = 6_371_008.8


@dataclass(frozen=True)
class Domain:
    """The world a simulated capture is drawn from (every range is sampled uniformly).

    The ``wide`` preset is the reference model's trained domain; ``lab`` is the narrow world
    of the first reference model (fixed propagation, 35–45 dBm), kept for comparison.
    """

    name: str
    """Preset name."""
    eirp_dbm: tuple[float, float]
    """Transmitter EIRP range."""
    path_loss_exponent: tuple[float, float]
    """Log-distance path-loss exponent range (one value per capture)."""
    shadowing_db: tuple[float, float]
    """Log-normal shadowing standard deviation range (one value per capture)."""
    noise_figure_spread_db: float
    """Receiver noise floors lie between the thermal floor and this much above it."""
    modulations: tuple[str, ...]
    """Modulations drawn with equal probability."""
    absent: tuple[int, int] = (0, 3)
    """Fewest and most receivers absent from a capture."""

    def describe(self) -> str:
        """One line for provenance and cache keys."""
        return (
            f"{self.name}: EIRP {self.eirp_dbm[0]:g}-{self.eirp_dbm[1]:g} dBm, path-loss exponent "
            f"{self.path_loss_exponent[0]:g}-{self.path_loss_exponent[1]:g}, shadowing "
            f"{self.shadowing_db[0]:g}-{self.shadowing_db[1]:g} dB, noise floor "
            f"{THERMAL_NOISE_DBM:g} dBm + 0-{self.noise_figure_spread_db:g} dB, "
            f"{self.absent[0]}-{self.absent[1]} receivers absent, {'/'.join(self.modulations)}"
        )


WIDE = Domain(
    name="wide",
    eirp_dbm=(10.0, 60.0),
    path_loss_exponent=(2.8, 4.2),
    shadowing_db=(4.0, 9.0),
    noise_figure_spread_db=6.0,
    modulations=MODULATIONS,
)
LAB = Domain(
    name="lab",
    eirp_dbm=(35.0, 45.0),
    path_loss_exponent=(3.5, 3.5),
    shadowing_db=(4.0, 4.0),
    noise_figure_spread_db=3.0,
    modulations=("cw", "fm", "noise"),
)
PRESETS = {d.name: d for d in (WIDE, LAB)}


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
    """Modulation of each capture (``none`` for noise-only captures)."""
    order: npt.NDArray[np.int64]
    """``(n, 7)`` a random order of the slots, used to shuffle receivers in payloads."""
    eirp_dbm: npt.NDArray[np.float64]
    """``(n,)`` transmitter EIRP (``-inf`` for noise-only captures)."""
    exponent: npt.NDArray[np.float64]
    """``(n,)`` path-loss exponent of each capture."""
    shadowing_db: npt.NDArray[np.float64]
    """``(n,)`` shadowing standard deviation of each capture."""
    snr_db: npt.NDArray[np.float64]
    """``(n, 7)`` true received signal power over noise power in the whole 48 kHz band."""

    def __len__(self) -> int:
        """Number of captures."""
        return len(self.tx_lat)

    def select(self, rows: npt.NDArray[np.int64]) -> CaptureBatch:
        """The captures at ``rows``, in that order."""
        picked: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            picked[f.name] = [value[r] for r in rows] if isinstance(value, list) else value[rows]
        return CaptureBatch(**picked)

    @staticmethod
    def concat(parts: list[CaptureBatch]) -> CaptureBatch:
        """The captures of ``parts``, one after the other."""
        joined: dict[str, Any] = {}
        for f in fields(CaptureBatch):
            values = [getattr(p, f.name) for p in parts]
            joined[f.name] = (
                [x for v in values for x in v]
                if isinstance(values[0], list)
                else np.concatenate(values)
            )
        return CaptureBatch(**joined)

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


def _band_limited_noise(
    rng: np.random.Generator, offset: npt.NDArray[np.float64], width: npt.NDArray[np.float64]
) -> npt.NDArray[np.complex128]:
    """Unit-power complex Gaussian noise in ``offset ± width / 2`` (rows = captures)."""
    m = len(offset)
    white = rng.standard_normal((m, SAMPLES)) + 1j * rng.standard_normal((m, SAMPLES))
    freqs = np.fft.fftfreq(SAMPLES, 1.0 / SAMPLE_RATE_HZ)
    band = np.abs(freqs[None, :] - offset) <= width / 2
    shaped = np.fft.ifft(np.fft.fft(white, axis=1) * band, axis=1)
    return np.asarray(shaped / np.sqrt(np.mean(np.abs(shaped) ** 2, axis=1, keepdims=True)))


def _waveforms(
    rng: np.random.Generator, n: int, modulations: tuple[str, ...]
) -> tuple[npt.NDArray[np.complex64], list[str]]:
    """Unit-power baseband waveforms ``(n, samples)`` with random modulation and offset.

    CW: a carrier. FM: tone modulation, 300–3000 Hz, deviation 1.5–5 kHz. FSK: 2-FSK at
    1200–9600 Bd with a ±1–3 kHz shift and random bits. Noise-like: Gaussian noise
    band-limited to 2–12 kHz (e.g. a wideband digital mode).
    """
    t = np.arange(SAMPLES, dtype=np.float64) / SAMPLE_RATE_HZ
    kinds = rng.integers(0, len(modulations), size=n)
    names = [modulations[k] for k in kinds]
    offset = rng.uniform(-FREQ_OFFSET_HZ, FREQ_OFFSET_HZ, size=(n, 1))
    phase = 2 * np.pi * offset * t + rng.uniform(0, 2 * np.pi, size=(n, 1))
    f_mod = rng.uniform(300.0, 3000.0, size=(n, 1))
    deviation = rng.uniform(1500.0, 5000.0, size=(n, 1))
    is_fm = np.array([m == "fm" for m in names])[:, None]
    phase = phase + np.where(is_fm, (deviation / f_mod) * np.sin(2 * np.pi * f_mod * t), 0.0)
    baud = rng.uniform(1200.0, 9600.0, size=(n, 1))
    shift = rng.uniform(1000.0, 3000.0, size=(n, 1))
    symbols = rng.integers(0, 2, size=(n, int(SAMPLES * 9600 / SAMPLE_RATE_HZ) + 2)) * 2 - 1
    index = np.minimum((t[None, :] * baud).astype(np.int64), symbols.shape[1] - 1)
    freq = shift * np.take_along_axis(symbols, index, axis=1)
    is_fsk = np.array([m == "fsk" for m in names])[:, None]
    phase = phase + np.where(is_fsk, 2 * np.pi * np.cumsum(freq, axis=1) / SAMPLE_RATE_HZ, 0.0)
    wave = np.exp(1j * phase)
    noisy = np.array([m == "noise" for m in names])
    if noisy.any():
        width = rng.uniform(2000.0, 12000.0, size=(int(noisy.sum()), 1))
        wave[noisy] = _band_limited_noise(rng, offset[noisy], width)
    return wave.astype(np.complex64), names


def simulate_batch(
    rng: np.random.Generator, n: int, domain: Domain = WIDE, signal: bool = True
) -> CaptureBatch:
    """Simulate ``n`` captures of ``domain`` with the given generator.

    Args:
        rng: random generator (the only source of randomness).
        n: number of captures.
        domain: the world to draw transmitters and propagation from.
        signal: ``False`` for noise-only captures (no transmitter: receiver noise only).
    """
    rx_lat, rx_lon = receiver_positions()
    k = len(RECEIVERS)
    tx_lat = rng.uniform(REGION["lat_min"], REGION["lat_max"], size=n)
    tx_lon = rng.uniform(REGION["lon_min"], REGION["lon_max"], size=n)
    eirp = rng.uniform(*domain.eirp_dbm, size=n)
    exponent = rng.uniform(*domain.path_loss_exponent, size=n)
    shadow = rng.uniform(*domain.shadowing_db, size=n)
    dist_km = np.maximum(haversine_m(tx_lat[:, None], tx_lon[:, None], rx_lat, rx_lon) / 1e3, 0.1)
    loss = REFERENCE_LOSS_DB + 10 * exponent[:, None] * np.log10(dist_km)
    rx_dbm = eirp[:, None] - loss + rng.normal(0.0, 1.0, size=(n, k)) * shadow[:, None]
    noise_dbm = THERMAL_NOISE_DBM + rng.uniform(0.0, domain.noise_figure_spread_db, size=(n, k))
    wave, kinds = _waveforms(rng, n, domain.modulations)
    amp = np.sqrt(10 ** (rx_dbm / 10))[..., None]
    carrier_phase = np.exp(1j * rng.uniform(0, 2 * np.pi, size=(n, k, 1)))
    noise_amp = np.sqrt(10 ** (noise_dbm / 10) / 2)[..., None].astype(np.float32)
    noise = rng.standard_normal((n, k, SAMPLES), dtype=np.float32) + 1j * rng.standard_normal(
        (n, k, SAMPLES), dtype=np.float32
    )
    iq = noise * noise_amp
    if signal:
        iq = (amp * carrier_phase * wave[:, None, :]).astype(np.complex64) + iq
        snr = rx_dbm - noise_dbm
    else:
        eirp = np.full(n, -np.inf)
        kinds = ["none"] * n
        snr = np.full((n, k), -np.inf)
    absent_count = rng.integers(domain.absent[0], domain.absent[1] + 1, size=n)
    order = np.argsort(rng.random((n, k)), axis=1)
    present = np.ones((n, k), dtype=bool)
    for i in range(n):
        present[i, order[i, : absent_count[i]]] = False
    iq[~present] = 0
    shuffle = np.argsort(rng.random((n, k)), axis=1)
    return CaptureBatch(
        iq.astype(np.complex64),
        present,
        tx_lat,
        tx_lon,
        kinds,
        shuffle,
        eirp,
        exponent,
        shadow,
        snr,
    )


def iter_batches(
    n: int, seed: int, chunk: int = 1024, domain: Domain = WIDE, signal: bool = True
) -> Iterator[CaptureBatch]:
    """Yield ``n`` captures of ``domain`` in chunks, deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n:
        size = min(chunk, n - done)
        yield simulate_batch(rng, size, domain, signal)
        done += size


def heard_batch(
    n: int, seed: int, domain: Domain = WIDE, min_snr_db: float = 10.0, receivers: int = 3
) -> CaptureBatch:
    """``n`` captures of ``domain`` that at least ``receivers`` present receivers hear well.

    Captures are drawn from ``seed`` and kept when ``receivers`` or more present receivers
    have a true SNR of ``min_snr_db`` or more: the captures a service must answer (tests and
    benchmarks of the serving path use these; refusals have tests of their own).
    """
    parts, kept = [], 0
    for batch in iter_batches(4 * n + 16, seed, chunk=min(max(2 * n, 16), 512), domain=domain):
        snr = np.where(batch.present, batch.snr_db, -np.inf)
        rows = np.flatnonzero(np.sum(snr >= min_snr_db, axis=1) >= receivers)[: n - kept]
        parts.append(batch.select(rows))
        kept += len(rows)
        if kept >= n:
            break
    return CaptureBatch.concat(parts)


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
