"""The tensor-in path's values: ready-made model inputs in, raw model outputs out.

Used by the Open Inference Protocol (``/v2``): the caller sends the model's own input tensors
(no feature extraction) and receives its output tensors (no decoding to positions).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from workers.errors import InvalidInput, MalformedRequest, ServiceError, from_code
from workers.messages import Infer
from workers.pool import TensorResult
from workers.spec import OUTPUT_ROLES, ModelSpec

F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class TensorBatch:
    """Input tensors by role (``features``, ``receivers``, ``mask``), batch axis first."""

    size: int
    """Items in the batch (the inputs' shared first axis)."""
    tensors: dict[str, F32]
    """One float32 array per input role, already checked against the version's spec."""

    def job(self, version: str) -> Infer:
        """The worker message running ``version`` on these tensors (little-endian FP32)."""
        t = self.tensors
        return Infer(
            0,
            version,
            self.size,
            t["features"].astype("<f4", copy=False).tobytes(),
            t["receivers"].astype("<f4", copy=False).tobytes(),
            t["mask"].astype("<f4", copy=False).tobytes(),
        )


def tensor_outputs(result: TensorResult, spec: ModelSpec, batch: int) -> dict[str, bytes]:
    """The raw FP32 output tensors of an infer job, by output role.

    Raises:
        MalformedRequest: the worker refused the tensors (the caller's input).
        ServiceError: the worker failed, or answered without (or with misshapen) tensors.
    """
    reply = result.reply
    if reply.error is not None:
        error = from_code(reply.error.code, reply.error.detail, reply.error.field)
        raise MalformedRequest(error.detail) if isinstance(error, InvalidInput) else error
    raw = {"mean": reply.mean, "sigma": reply.sigma, "rho": reply.rho}
    for role in OUTPUT_ROLES:
        want = spec.outputs[role]
        shape = [batch if d == -1 else d for d in want.shape]
        if len(raw[role]) != math.prod(shape) * 4:
            raise ServiceError(
                f"output {want.name!r} has {len(raw[role])} bytes, expected shape {shape} of FP32"
            )
    return raw
