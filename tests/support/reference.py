"""In-process reference computation: the same captures through ONNX Runtime directly."""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import Any

import numpy as np
import onnxruntime as ort

from tests.support.procs import REFERENCE
from workers.domain import outside_reasons, widen
from workers.geo import from_local
from workers.inputs import pack_capture
from workers.messages import PredictItem
from workers.spec import ModelSpec, decode_spec
from workers.uncertainty import calibrated_sigmas


@lru_cache(maxsize=1)
def reference_spec() -> ModelSpec:
    """The committed reference model's spec."""
    return decode_spec((REFERENCE / "model_spec.json").read_bytes())


@lru_cache(maxsize=1)
def reference_session() -> ort.InferenceSession:
    """A plain ONNX Runtime session on the reference model."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(
        str(REFERENCE / "model.onnx"), opts, providers=["CPUExecutionProvider"]
    )


def payload_arrays(payload: dict[str, Any]) -> tuple[np.ndarray, list[float], list[float]]:
    """IQ ``(k, samples)`` and positions from a JSON request payload."""
    rx = payload["receivers"]
    iq = np.stack([np.frombuffer(base64.b64decode(r["iq"]), dtype="<c8") for r in rx])
    return iq, [r["latitude"] for r in rx], [r["longitude"] for r in rx]


def reference_predict(payloads: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Position and uncertainty of each payload, computed in this process."""
    spec = reference_spec()
    packed = [pack_capture(*payload_arrays(p), spec) for p in payloads]
    names = {k: t.name for k, t in spec.inputs.items()}
    feeds = {
        names["features"]: np.stack([p.features for p in packed]),
        names["receivers"]: np.stack([p.receivers for p in packed]),
        names["mask"]: np.stack([p.mask for p in packed]),
    }
    outs = [spec.outputs[r].name for r in ("mean", "sigma", "rho")]
    mean, sigma, rho = reference_session().run(outs, feeds)
    scale = spec.output.position_scale_m
    results = []
    for i, p in enumerate(packed):
        lat, lon = from_local(
            p.origin_lat, p.origin_lon, [mean[i][0] * scale], [mean[i][1] * scale]
        )
        s_e, s_n = calibrated_sigmas(float(sigma[i][0]), float(sigma[i][1]), spec.output)
        offset = float(np.hypot(mean[i][0] * scale, mean[i][1] * scale))
        if spec.domain is not None and outside_reasons(p.detection, offset, spec.domain):
            s_e, s_n = widen(s_e, s_n, spec.domain)
        results.append(
            {
                "latitude": float(lat[0]),
                "longitude": float(lon[0]),
                "sigma_east_m": s_e,
                "sigma_north_m": s_n,
                "correlation": float(np.asarray(rho).reshape(-1)[i]),
            }
        )
    return results


def payload_item(payload: dict[str, Any], geojson: bool = False) -> PredictItem:
    """The IPC item the service would build for ``payload``."""
    iq, lats, lons = payload_arrays(payload)
    return PredictItem(iq.astype("<c8").tobytes(), lats, lons, [0.5, 0.9, 0.95], geojson)
