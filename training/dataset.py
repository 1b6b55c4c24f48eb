"""Dataset building for the reference model (numpy only, no torch).

Every capture is packed with :func:`workers.inputs.pack_capture`, the function the server
uses, over the present receivers in the capture's shuffled order, so the tensors the model
is trained on are exactly those it is served. Targets are the true transmitter position in
the same local east/north frame, in units of ``position_scale_m``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from training.simulate import (
    RECEIVERS,
    SAMPLE_RATE_HZ,
    SAMPLES,
    WIDE,
    CaptureBatch,
    Domain,
    iter_batches,
    receiver_positions,
)
from workers.features import band_power_db
from workers.geo import to_local
from workers.inputs import ModelInputs, pack_capture
from workers.spec import (
    CalibrationSpec,
    CaptureSpec,
    DetectionSpec,
    DomainSpec,
    FeatureSpec,
    ModelSpec,
    OutputSpec,
    Provenance,
    ReceiverSpec,
    TensorSpec,
)

POSITION_SCALE_M = 50_000.0
MAX_RECEIVERS = 7
MIN_RECEIVERS = 4
N_FFT = 128
HOP = 128
N_BANDS = 32
N_FRAMES = 1 + (SAMPLES - N_FFT) // HOP
DB_FLOOR = -150.0
MODEL_NAME = "heimdall-reference"
SNR_THRESHOLD_DB = 0.0
MIN_DETECTED = 3


class PackedSet(NamedTuple):
    """Packed model inputs and targets of many captures (leading axis = capture)."""

    features: npt.NDArray[np.float32]
    """``(n, 7, n_frames, n_bands)`` normalised features."""
    receivers: npt.NDArray[np.float32]
    """``(n, 7, 2)`` receiver east/north in units of ``position_scale_m``."""
    mask: npt.NDArray[np.float32]
    """``(n, 7)`` 1 for a present receiver."""
    target: npt.NDArray[np.float32]
    """``(n, 2)`` true transmitter east/north in units of ``position_scale_m``."""
    origin: npt.NDArray[np.float64]
    """``(n, 2)`` latitude/longitude of each capture's local-frame origin."""
    truth: npt.NDArray[np.float64]
    """``(n, 2)`` true transmitter latitude/longitude."""
    nuisance: npt.NDArray[np.float64]
    """``(n, 7)`` EIRP, exponent, shadowing, receivers present, receivers detecting, the
    strongest estimated received power and the highest estimated noise power (dBm) of each
    capture, for strata and the domain."""


def feature_spec(norm_mean_db: float = 0.0, norm_std_db: float = 1.0) -> FeatureSpec:
    """The reference feature pipeline with the given global normalisation constants."""
    return FeatureSpec(
        kind="stft_band_db",
        n_fft=N_FFT,
        hop=HOP,
        n_bands=N_BANDS,
        n_frames=N_FRAMES,
        db_floor=DB_FLOOR,
        norm_mean_db=float(norm_mean_db),
        norm_std_db=float(norm_std_db),
    )


def capture_spec() -> CaptureSpec:
    """The capture contract of the simulated network."""
    return CaptureSpec(
        sample_rate_hz=SAMPLE_RATE_HZ,
        samples_per_receiver=SAMPLES,
        min_receivers=MIN_RECEIVERS,
        max_receivers=MAX_RECEIVERS,
        receivers=[
            ReceiverSpec(id=rid, latitude=lat, longitude=lon, name=name)
            for rid, name, lat, lon in RECEIVERS
        ],
        position_tolerance_m=500.0,
    )


def detection_spec() -> DetectionSpec:
    """The detection rule the reference model is trained and served with."""
    return DetectionSpec(
        method="band_median_noise", snr_threshold_db=SNR_THRESHOLD_DB, min_detected=MIN_DETECTED
    )


def detected(inputs: ModelInputs) -> int:
    """Receivers of one packed capture that detect the signal under :func:`detection_spec`."""
    return int(np.sum(inputs.detection.snr_db >= SNR_THRESHOLD_DB))


def build_spec(
    features: FeatureSpec,
    calibration_factor: float = 1.0,
    training_data: str = "",
    seed: int = 0,
    metrics: dict[str, float] | None = None,
    domain: DomainSpec | None = None,
    calibration: CalibrationSpec | None = None,
) -> ModelSpec:
    """The complete model spec of the reference model.

    Args:
        features: feature pipeline with its normalisation constants.
        calibration_factor: multiplier on the predicted sigmas.
        training_data: description of the training data.
        seed: training seed.
        metrics: held-out figures.
        domain: the trained domain and detection rule.
        calibration: the spread-dependent sigma scaling.

    Returns:
        The spec to write as ``model_spec.json``.
    """
    k, f, b = MAX_RECEIVERS, features.n_frames, features.n_bands
    return ModelSpec(
        schema_version=1,
        name=MODEL_NAME,
        inputs={
            "features": TensorSpec("features", "FP32", [-1, k, f, b]),
            "receivers": TensorSpec("receivers", "FP32", [-1, k, 2]),
            "mask": TensorSpec("mask", "FP32", [-1, k]),
        },
        outputs={
            "mean": TensorSpec("mean", "FP32", [-1, 2]),
            "sigma": TensorSpec("sigma", "FP32", [-1, 2]),
            "rho": TensorSpec("rho", "FP32", [-1]),
        },
        capture=capture_spec(),
        features=features,
        output=OutputSpec(
            frame="aeqd_receiver_centroid",
            position_scale_m=POSITION_SCALE_M,
            calibration_factor=float(calibration_factor),
            calibration=calibration,
        ),
        provenance=Provenance(
            training_data=training_data,
            seed=int(seed),
            metrics=dict(metrics or {}),
            created_by="training.export",
        ),
        domain=domain,
    )


def norm_constants(n: int, seed: int, domain: Domain = WIDE) -> tuple[float, float]:
    """Global mean and std of :func:`band_power_db` over present receivers of ``n`` captures."""
    total, total_sq, count = 0.0, 0.0, 0
    spec = feature_spec()
    for batch in iter_batches(n, seed, chunk=512, domain=domain):
        db = band_power_db(batch.iq[batch.present], spec).astype(np.float64)
        total += float(db.sum())
        total_sq += float((db**2).sum())
        count += db.size
    mean = total / count
    return mean, float(np.sqrt(total_sq / count - mean**2))


def pack_one(batch: CaptureBatch, i: int, spec: ModelSpec) -> tuple[ModelInputs, np.ndarray]:
    """Pack capture ``i`` of ``batch`` as the server would, with its target.

    Args:
        batch: simulated captures.
        i: capture index in the batch.
        spec: model spec (features, capture and output sections are used).

    Returns:
        The model inputs and the ``(2,)`` float32 target (east, north) / position scale.
    """
    rx_lat, rx_lon = receiver_positions()
    slots = batch.receivers_of(i)
    inputs = pack_capture(batch.iq[i, slots], rx_lat[slots], rx_lon[slots], spec)
    east, north = to_local(inputs.origin_lat, inputs.origin_lon, batch.tx_lat[i], batch.tx_lon[i])
    scale = spec.output.position_scale_m
    target = np.array([east[0] / scale, north[0] / scale], dtype=np.float32)
    return inputs, target


def build_dataset(
    n: int,
    seed: int,
    spec: ModelSpec,
    chunk: int = 512,
    log: bool = True,
    domain: Domain = WIDE,
) -> PackedSet:
    """Simulate ``n`` captures from ``seed``, pack them with :func:`pack_one`, keep answerable.

    Only captures the server would answer are kept: at least ``MIN_DETECTED`` receivers
    detect the signal (:mod:`workers.detection`, the server's own rule).

    Args:
        n: number of captures to simulate (fewer are returned).
        seed: simulator seed.
        spec: model spec with the final normalisation constants.
        chunk: simulation chunk size.
        log: print progress.
        domain: simulator domain.

    Returns:
        The packed dataset of the answerable captures.
    """
    k, f, b = MAX_RECEIVERS, spec.features.n_frames, spec.features.n_bands
    features = np.zeros((n, k, f, b), dtype=np.float32)
    receivers = np.zeros((n, k, 2), dtype=np.float32)
    mask = np.zeros((n, k), dtype=np.float32)
    target = np.zeros((n, 2), dtype=np.float32)
    origin = np.zeros((n, 2), dtype=np.float64)
    truth = np.zeros((n, 2), dtype=np.float64)
    nuisance = np.zeros((n, 7), dtype=np.float64)
    start, done, kept = time.perf_counter(), 0, 0
    for batch in iter_batches(n, seed, chunk=chunk, domain=domain):
        for i in range(len(batch)):
            inputs, tgt = pack_one(batch, i, spec)
            hits = detected(inputs)
            if hits < MIN_DETECTED:
                continue
            j = kept
            features[j], receivers[j], mask[j] = inputs.features, inputs.receivers, inputs.mask
            target[j] = tgt
            origin[j] = (inputs.origin_lat, inputs.origin_lon)
            truth[j] = (batch.tx_lat[i], batch.tx_lon[i])
            nuisance[j] = (
                batch.eirp_dbm[i],
                batch.exponent[i],
                batch.shadowing_db[i],
                len(batch.receivers_of(i)),
                hits,
                float(np.max(inputs.detection.signal_dbm)),
                float(np.max(inputs.detection.noise_dbm)),
            )
            kept += 1
        done += len(batch)
        if log and (done // chunk) % 10 == 0:
            rate = (time.perf_counter() - start) / done * 1e3
            print(f"  seed {seed}: {done}/{n} captures, {kept} kept ({rate:.2f} ms)", flush=True)
    arrays = (features, receivers, mask, target, origin, truth, nuisance)
    return PackedSet(*(a[:kept] for a in arrays))


def save_dataset(data: PackedSet, directory: Path) -> None:
    """Save a packed dataset as one ``.npy`` file per field (no pickle)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in data._asdict().items():
        np.save(directory / f"{name}.npy", array, allow_pickle=False)


def load_dataset(directory: Path) -> PackedSet:
    """Load a dataset written by :func:`save_dataset`."""
    return PackedSet(
        *(np.load(directory / f"{name}.npy", allow_pickle=False) for name in PackedSet._fields)
    )


def build_sharded(
    n: int, seed: int, spec: ModelSpec, shards: int, workers: int = 2, domain: Domain = WIDE
) -> PackedSet:
    """Build ``n`` captures as ``shards`` independent simulator streams, in parallel.

    Shard ``s`` simulates ``n // shards`` (the last one the remainder) captures from seed
    ``seed * 1000 + s``, so the result depends only on ``(n, seed, shards)``.

    Args:
        n: total number of captures.
        seed: base seed.
        spec: model spec with the final normalisation constants.
        shards: number of simulator streams.
        workers: worker processes.
        domain: simulator domain.

    Returns:
        The concatenated packed dataset.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    size = n // shards
    sizes = [size] * (shards - 1) + [n - size * (shards - 1)]
    seeds = [seed * 1000 + s for s in range(shards)]
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        parts = list(
            pool.map(
                build_dataset,
                sizes,
                seeds,
                [spec] * shards,
                [512] * shards,
                [False] * shards,
                [domain] * shards,
            )
        )
    return PackedSet(*(np.concatenate(f) for f in zip(*parts, strict=True)))
