"""The model package contract: ``model_spec.json`` decoded into declared types.

The spec is the single source of truth that makes serving match training: tensor names and
shapes, the capture contract (sample rate, samples per receiver, the receiver network), the
feature pipeline with its global normalisation constants, and how to decode the outputs.
Its content hash is the feature-pipeline version used in cache keys.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

Latitude = Annotated[float, Meta(ge=-90.0, le=90.0)]
Longitude = Annotated[float, Meta(ge=-180.0, le=180.0)]
PositiveInt = Annotated[int, Meta(gt=0)]
PositiveFloat = Annotated[float, Meta(gt=0.0)]


class TensorSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """One ONNX tensor: name, element type and shape (``-1`` marks the dynamic batch axis)."""

    name: str
    """ONNX graph input/output name."""
    datatype: Literal["FP32", "FP64", "INT64", "BOOL"]
    """Open Inference Protocol datatype name."""
    shape: list[int]
    """Shape with ``-1`` for the dynamic batch axis."""


class ReceiverSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """One receiver of the network the model was trained on."""

    id: str
    """Receiver identifier as sent by clients."""
    latitude: Latitude
    """WGS84 latitude in degrees."""
    longitude: Longitude
    """WGS84 longitude in degrees."""
    name: str = ""
    """Human-readable site name."""


class CaptureSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """What one request must carry for this model to answer meaningfully."""

    sample_rate_hz: PositiveFloat
    """Complex sample rate every capture must have."""
    samples_per_receiver: PositiveInt
    """Exact number of complex64 samples per receiver."""
    min_receivers: PositiveInt
    """Fewest receivers the model was trained to localise from."""
    max_receivers: PositiveInt
    """Receiver slots in the input tensors."""
    receivers: list[ReceiverSpec] = []
    """Receiver network the model was trained on; empty means any position is accepted."""
    position_tolerance_m: PositiveFloat = 500.0
    """Largest accepted distance between a sent receiver position and the trained one."""


class FeatureSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of :func:`workers.features.extract_features` and its global normalisation."""

    kind: Literal["stft_band_db"]
    """Feature pipeline kind."""
    n_fft: PositiveInt
    """STFT frame length (no overlap when ``hop == n_fft``)."""
    hop: PositiveInt
    """STFT hop in samples."""
    n_bands: PositiveInt
    """Number of equal-width frequency bands the FFT bins are summed into."""
    n_frames: PositiveInt
    """Frames per capture (derived from samples, n_fft and hop; stated to check)."""
    db_floor: float
    """Power floor in dB before normalisation, so silence is finite."""
    norm_mean_db: float
    """Global mean of the dB features over the training set."""
    norm_std_db: PositiveFloat
    """Global standard deviation of the dB features over the training set."""


class OutputSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """How to turn output tensors into a bivariate Gaussian in metres (local east/north)."""

    frame: Literal["aeqd_receiver_centroid"]
    """Local frame: azimuthal equidistant around the mean lat/lon of the present receivers."""
    position_scale_m: PositiveFloat
    """Metres per unit of the position inputs and of the mean/sigma outputs."""
    calibration_factor: PositiveFloat = 1.0
    """Multiplier on the predicted sigmas fitted on held-out data so ellipses cover their level."""
    calibration: CalibrationSpec | None = None
    """Spread-dependent sigma scaling applied after ``calibration_factor``, if any."""


class DetectionSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """The per-receiver signal-detection rule applied before inference."""

    method: Literal["band_median_noise"]
    """Noise = median of the time-averaged band powers; signal = total power above it."""
    snr_threshold_db: float
    """A receiver detects the signal when its estimated SNR (whole band) is at least this."""
    min_detected: PositiveInt
    """Fewest detecting receivers; below it the capture is refused as ``no-signal``."""


class CalibrationSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """Sigma scaling as a function of the predicted spread (piecewise linear in log σ)."""

    log_sigma_m: list[float]
    """Knots: natural log of the geometric-mean predicted sigma in metres (ascending)."""
    factor: list[float]
    """Multiplier on the sigmas at each knot (held constant beyond the ends)."""
    method: str = ""
    """How the table was fitted, on which data."""


class DomainSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """The conditions the model was trained and calibrated for, and how the server checks them."""

    description: str
    """The trained world in one line (transmitters, propagation, receivers)."""
    eirp_dbm: list[float]
    """Transmit EIRP range trained on."""
    path_loss_exponent: list[float]
    """Path-loss exponent range trained on."""
    shadowing_db: list[float]
    """Log-normal shadowing standard deviation range trained on."""
    noise_dbm: list[float]
    """Receiver noise power range (whole band) trained on."""
    detection: DetectionSpec
    """Signal-detection rule applied before inference."""
    max_signal_dbm: float
    """Strongest received signal power seen in training; above it a capture is outside."""
    max_noise_dbm: float
    """Highest noise floor seen in training; above it (interference?) a capture is outside."""
    max_offset_m: float
    """Farthest trained transmitter from the receivers' centroid; a predicted position beyond
    it lies outside the region the network can resolve."""
    max_mean_signal_dbm: float | None = None
    """Highest mean received power (dB average over the detecting receivers) in training: a
    transmitter far stronger than trained raises every receiver, not only the nearest."""
    out_of_domain_min_sigma_m: float = 0.0
    """Sigmas of an answer outside the domain are widened to at least this (the model's
    in-domain median sigma), so out-of-domain inputs never get a tight ellipse."""


class FieldCalibration(Struct, frozen=True, forbid_unknown_fields=True):
    """A covariance scale fitted on ground truth from the field (``recalibrate``)."""

    scale: PositiveFloat
    """Sigmas were multiplied by this (the covariance by its square) against the parent."""
    scale_ci95: list[float]
    """Percentile-bootstrap 95 % interval of ``scale``."""
    method: str
    """How the scale was chosen."""
    levels: list[float]
    """Ellipse levels the scale was fitted to."""
    samples: int
    """Feedback samples used (fit and held-out halves together)."""
    fit_samples: int
    """Samples the scale was fitted on."""
    held_out_samples: int
    """Samples kept aside to measure the result."""
    held_out_coverage_before: dict[str, float]
    """Coverage per level on the held-out half with the parent's covariance."""
    held_out_coverage_after: dict[str, float]
    """Coverage per level on the held-out half with the scaled covariance."""
    source: str
    """Feedback ``source`` used (``all`` for every source)."""
    parent_version: str
    """Registry version whose answers the feedback was about."""
    created_at: str
    """When the calibration was made (UTC, RFC 3339)."""


class Provenance(Struct, frozen=True):
    """Where the model came from and how good it is."""

    training_data: str
    """Description of the data the model was trained on."""
    seed: int
    """Seed of the training run."""
    metrics: dict[str, float] = {}
    """Accuracy and calibration figures on held-out data."""
    created_by: str = ""
    """Tool that wrote the package."""
    field_calibrations: list[FieldCalibration] = []
    """Field recalibrations applied on top of training, oldest first."""


class ModelSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """Everything the server needs to serve one model version."""

    schema_version: Literal[1]
    """Version of this spec format."""
    name: str
    """Registered model name."""
    inputs: dict[str, TensorSpec]
    """Input tensors keyed by role: ``features``, ``receivers``, ``mask``."""
    outputs: dict[str, TensorSpec]
    """Output tensors keyed by role: ``mean``, ``sigma``, ``rho``."""
    capture: CaptureSpec
    """Capture contract."""
    features: FeatureSpec
    """Feature pipeline."""
    output: OutputSpec
    """Output decoding."""
    provenance: Provenance
    """Provenance and figures."""
    domain: DomainSpec | None = None
    """Trained domain and signal detection; without it the server detects nothing."""


INPUT_ROLES = ("features", "receivers", "mask")
OUTPUT_ROLES = ("mean", "sigma", "rho")

_decoder = msgspec.json.Decoder(ModelSpec)


class SpecError(ValueError):
    """The spec file does not describe a servable model."""


def decode_spec(raw: bytes) -> ModelSpec:
    """Decode and check a ``model_spec.json`` document.

    Raises:
        SpecError: when the document is not a valid spec.
    """
    try:
        spec = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise SpecError(f"model_spec.json is invalid: {exc}") from exc
    missing = [r for r in INPUT_ROLES if r not in spec.inputs] + [
        r for r in OUTPUT_ROLES if r not in spec.outputs
    ]
    if missing:
        raise SpecError(f"model_spec.json lacks tensor roles: {', '.join(missing)}")
    cap, feat = spec.capture, spec.features
    if cap.min_receivers > cap.max_receivers:
        raise SpecError("capture.min_receivers exceeds capture.max_receivers")
    frames = 1 + (cap.samples_per_receiver - feat.n_fft) // feat.hop
    if frames != feat.n_frames:
        raise SpecError(f"features.n_frames is {feat.n_frames} but the capture yields {frames}")
    if feat.n_fft % feat.n_bands:
        raise SpecError("features.n_fft must be a multiple of features.n_bands")
    table = spec.output.calibration
    if table is not None and (
        len(table.log_sigma_m) != len(table.factor)
        or not table.factor
        or any(f <= 0 for f in table.factor)
        or any(b <= a for a, b in zip(table.log_sigma_m, table.log_sigma_m[1:], strict=False))
    ):
        raise SpecError("output.calibration needs ascending knots and as many positive factors")
    if spec.domain is not None and spec.domain.detection.min_detected > cap.max_receivers:
        raise SpecError("domain.detection.min_detected exceeds capture.max_receivers")
    return spec


def encode_spec(spec: ModelSpec) -> bytes:
    """Encode a spec as stable, indented JSON (sorted keys) for committing and hashing."""
    return msgspec.json.format(msgspec.json.encode(spec, order="sorted"), indent=2) + b"\n"


def spec_hash(raw: bytes) -> str:
    """Feature-pipeline version: sha256 of the spec's canonical encoding, 16 hex digits."""
    canonical = msgspec.json.encode(decode_spec(raw), order="sorted")
    return hashlib.sha256(canonical).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
