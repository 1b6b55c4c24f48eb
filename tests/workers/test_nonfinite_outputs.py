"""Non-finite model outputs are refused as a 422 naming the output, never answered as data."""

from __future__ import annotations

import numpy as np

from tests.support.procs import REFERENCE
from tests.support.reference import payload_arrays, payload_item
from training.simulate import iter_batches, request_payload
from workers.errors import NonFiniteOutput, from_code
from workers.inputs import pack_capture
from workers.messages import Infer, ItemError
from workers.runtime import LoadedModel
from workers.worker import Worker


def reference_model() -> LoadedModel:
    return LoadedModel(
        str(REFERENCE / "model.onnx"), (REFERENCE / "model_spec.json").read_bytes(), 1
    )


def test_v1_decoding_refuses_a_non_finite_output_by_name() -> None:
    model = reference_model()
    payload = request_payload(next(iter_batches(1, 3, chunk=1)), 0)
    inputs = pack_capture(*payload_arrays(payload), model.spec)
    result = model.decode(
        np.array([np.inf, 0.0], np.float32),
        np.array([1.0, 1.0], np.float32),
        0.1,
        inputs,
        payload_item(payload),
    )
    assert isinstance(result, ItemError)
    error = from_code(result.code, result.detail)
    assert isinstance(error, NonFiniteOutput) and error.status == 422
    assert repr(model.spec.outputs["mean"].name) in error.detail


def test_v2_infer_with_huge_finite_tensors_is_refused_not_answered_null() -> None:
    model = reference_model()
    spec = model.spec
    cap, feat = spec.capture, spec.features
    batch = 2
    features = np.full((batch, cap.max_receivers, feat.n_frames, feat.n_bands), 3e38, "<f4")
    features[0] = 0.0  # item 0 is fine, item 1 overflows
    receivers = np.zeros((batch, cap.max_receivers, 2), "<f4")
    mask = np.ones((batch, cap.max_receivers), "<f4")
    message = Infer(1, "1", batch, features.tobytes(), receivers.tobytes(), mask.tobytes())
    worker = Worker.__new__(Worker)
    worker.models = {"1": model}
    reply = worker.infer(message)
    assert reply.error is not None, "huge finite inputs gave finite outputs: test is moot"
    assert reply.error.code == NonFiniteOutput.code
    assert "item 1 of the batch" in reply.error.detail
    assert not reply.mean  # no tensor data travels with the error
