"""One model version inside a worker: its ONNX Runtime session, preprocessing and decoding."""

from __future__ import annotations

import math
import mmap
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from telemetry.logs import job_trace
from workers.domain import check_signal, outside_reasons, widen
from workers.errors import InvalidInput, ModelLoadError, NonFiniteOutput, ServiceError
from workers.geo import from_local
from workers.inputs import ModelInputs, pack_capture
from workers.messages import Ellipse, ItemError, Prediction, PredictItem, Timings
from workers.request import check_capture, decode_request, known_receivers
from workers.spec import ModelSpec, decode_spec
from workers.uncertainty import (
    calibrated_sigmas,
    covariance,
    ellipse_axes,
    feature_collection,
)

F32 = npt.NDArray[np.float32]


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """Session options for one worker: fixed threads, sequential execution, full graph opts."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


class LoadedModel:
    """A validated, warmed-up session for one model version."""

    def __init__(
        self, model_path: str, spec_raw: bytes, intra_op_threads: int, label: str = "model"
    ) -> None:
        """Build the session in this process and validate it against the spec.

        ``label`` names the model and version in the problems of bodies decoded here.

        Raises:
            ModelLoadError: the file does not load, its tensors do not match the spec, or a
                warm-up run gives non-finite outputs.
        """
        self.spec: ModelSpec = decode_spec(spec_raw)
        self.label = label
        self.known = known_receivers(self.spec.capture)
        try:
            self.session = ort.InferenceSession(
                str(Path(model_path)),
                sess_options=session_options(intra_op_threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # ORT raises several private exception types
            raise ModelLoadError(f"ONNX Runtime cannot load the model: {exc}") from exc
        self.input_names = {role: t.name for role, t in self.spec.inputs.items()}
        self.output_names = [self.spec.outputs[r].name for r in ("mean", "sigma", "rho")]
        self._check_signature()
        self._warm_up()

    def _check_signature(self) -> None:
        graph_inputs = {i.name: i.shape for i in self.session.get_inputs()}
        graph_outputs = {o.name: o.shape for o in self.session.get_outputs()}
        for kind, declared, actual in (
            ("input", self.spec.inputs, graph_inputs),
            ("output", self.spec.outputs, graph_outputs),
        ):
            for tensor in declared.values():
                if tensor.name not in actual:
                    raise ModelLoadError(f"model has no {kind} tensor {tensor.name!r}")
                shape = actual[tensor.name]
                fixed = [d if isinstance(d, int) else -1 for d in shape]
                if len(fixed) != len(tensor.shape) or any(
                    a != d and d != -1 and a != -1
                    for a, d in zip(fixed, tensor.shape, strict=False)
                ):
                    raise ModelLoadError(
                        f"{kind} {tensor.name!r} has shape {shape}, spec says {tensor.shape}"
                    )

    def _warm_up(self) -> None:
        cap, feat = self.spec.capture, self.spec.features
        rng = np.random.default_rng(0)
        batch = 2
        features = rng.standard_normal(
            (batch, cap.max_receivers, feat.n_frames, feat.n_bands)
        ).astype(np.float32)
        receivers = rng.uniform(-1, 1, (batch, cap.max_receivers, 2)).astype(np.float32)
        mask = np.zeros((batch, cap.max_receivers), dtype=np.float32)
        mask[:, : cap.min_receivers] = 1.0
        features[mask == 0] = 0.0
        receivers[mask == 0] = 0.0
        try:
            mean, sigma, rho = self.run(features, receivers, mask)
        except Exception as exc:
            raise ModelLoadError(f"warm-up inference failed: {exc}") from exc
        if mean.shape != (batch, 2) or sigma.shape != (batch, 2) or rho.shape != (batch,):
            raise ModelLoadError(
                f"warm-up output shapes {mean.shape}, {sigma.shape}, {rho.shape} do not "
                f"match (batch, 2), (batch, 2), (batch,)"
            )
        finite = np.isfinite(mean).all() and np.isfinite(sigma).all() and np.isfinite(rho).all()
        if not finite or (sigma <= 0).any() or (np.abs(rho) >= 1).any():
            raise ModelLoadError("warm-up produced non-finite or invalid outputs")

    def run(self, features: F32, receivers: F32, mask: F32) -> tuple[F32, F32, F32]:
        """Run the session on a batch of ready-made input tensors."""
        feeds = {
            self.input_names["features"]: features,
            self.input_names["receivers"]: receivers,
            self.input_names["mask"]: mask,
        }
        mean, sigma, rho = self.session.run(self.output_names, feeds)
        return (
            np.asarray(mean, dtype=np.float32),
            np.asarray(sigma, dtype=np.float32),
            np.asarray(rho, dtype=np.float32).reshape(-1),
        )

    def predict(
        self,
        items: list[PredictItem],
        arena: mmap.mmap | None = None,
        traces: Sequence[str] = (),
    ) -> tuple[list[Prediction | ItemError], Timings]:
        """Features, one ONNX batch and decoding for ``items``; bad items become ItemErrors.

        Items whose IQ travelled through shared memory are read from ``arena`` in place; an
        item that is an undecoded body is decoded and checked against the capture contract
        first (its problems carry the body's field paths; the log line of a refused body
        carries its request's trace and id from ``traces``, aligned with ``items``).
        """
        samples = self.spec.capture.samples_per_receiver
        items = list(items)  # undecoded bodies are replaced by their captures below
        t0 = time.time_ns()
        packed = []
        results: list[Prediction | ItemError | None] = [None] * len(items)
        for index, item in enumerate(items):
            try:
                if item.encoding:
                    with job_trace(traces[index] if index < len(traces) else ""):
                        item = items[index] = self.unpack(item, arena)
                if item.iq_offset >= 0 and arena is not None:
                    raw = np.frombuffer(
                        arena, dtype="<c8", count=item.iq_length // 8, offset=item.iq_offset
                    )
                else:
                    raw = np.frombuffer(item.iq, dtype="<c8")
                iq = raw.reshape(-1, samples)
                bad = ~np.isfinite(iq.view(np.float32)).reshape(iq.shape[0], -1).all(axis=1)
                if bad.any():
                    first = int(np.argmax(bad))
                    raise InvalidInput(
                        "IQ samples contain NaN or Inf; send finite float32 values",
                        field=f"$.receivers[{first}].iq",
                    )
                inputs = pack_capture(iq, item.latitudes, item.longitudes, self.spec)
                if self.spec.domain is not None:
                    check_signal(inputs.detection, self.spec.domain)
                packed.append((index, inputs))
            except ServiceError as exc:
                results[index] = ItemError(exc.code, exc.detail, exc.field)
            except ValueError as exc:
                results[index] = ItemError(InvalidInput.code, str(exc))
        t1 = time.time_ns()
        t2 = t3 = t1
        if packed:
            features = np.stack([p.features for _, p in packed])
            receivers = np.stack([p.receivers for _, p in packed])
            mask = np.stack([p.mask for _, p in packed])
            t2 = time.time_ns()
            mean, sigma, rho = self.run(features, receivers, mask)
            t3 = time.time_ns()
            for row, (index, inputs) in enumerate(packed):
                results[index] = self.decode(
                    mean[row], sigma[row], float(rho[row]), inputs, items[index]
                )
        done = [r if r is not None else ItemError("internal", "no result") for r in results]
        return done, Timings(t0, t2 if packed else t1, t2, t3)

    def unpack(self, item: PredictItem, arena: mmap.mmap | None) -> PredictItem:
        """The checked captures of an undecoded request body.

        Raises:
            MalformedRequest: the body does not decode into the request schema.
            InvalidInput: the captures do not fit this model's capture contract.
        """
        body: bytes | memoryview = item.iq
        if item.iq_offset >= 0 and arena is not None:
            body = memoryview(arena)[item.iq_offset : item.iq_offset + item.iq_length]
        try:
            request = decode_request(body, item.encoding, "POST /v1/predict")
        finally:
            if isinstance(body, memoryview):
                body.release()
        return check_capture(request, self.spec.capture, self.known, self.label)

    def decode(
        self, mean: F32, sigma: F32, rho: float, inputs: ModelInputs, item: PredictItem
    ) -> Prediction | ItemError:
        """Model outputs → position on WGS84, covariance in m², ellipses, GeoJSON, domain."""
        out = self.spec.output
        east, north = (float(v) * out.position_scale_m for v in mean)
        s_e, s_n = calibrated_sigmas(float(sigma[0]), float(sigma[1]), out)
        values = {"mean": (east, north), "sigma": (s_e, s_n), "rho": (rho,)}
        bad = [role for role, vs in values.items() if not all(math.isfinite(v) for v in vs)]
        if bad:
            names = ", ".join(repr(self.spec.outputs[role].name) for role in bad)
            return ItemError(
                NonFiniteOutput.code,
                f"the model produced a non-finite value in output {names} for this capture; "
                "it is outside what the model can compute (check the IQ scaling)",
            )
        reasons: list[str] = []
        if self.spec.domain is not None:
            offset = math.hypot(east, north)
            reasons = outside_reasons(inputs.detection, offset, self.spec.domain)
            if reasons:
                s_e, s_n = widen(s_e, s_n, self.spec.domain)
        lat, lon = from_local(inputs.origin_lat, inputs.origin_lon, [east], [north])
        cov = covariance(s_e, s_n, rho)
        ellipses = []
        for level in item.levels:
            major, minor, azimuth = ellipse_axes(cov, level)
            ellipses.append(Ellipse(level, major, minor, azimuth))
        lat_f, lon_f = float(lat[0]), float(lon[0])
        return Prediction(
            latitude=lat_f,
            longitude=lon_f,
            covariance_enu_m2=cov.tolist(),
            sigma_east_m=s_e,
            sigma_north_m=s_n,
            correlation=rho,
            ellipses=ellipses,
            geojson=feature_collection(lat_f, lon_f, cov, item.levels) if item.geojson else None,
            domain_inside=not reasons,
            domain_reasons=reasons,
        )
