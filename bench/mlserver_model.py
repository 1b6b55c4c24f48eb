"""MLServer custom runtime serving the reference ONNX model (benchmark comparison only).

Runs inside MLServer's own virtualenv (``python -m bench.oip`` creates it outside the repo;
MLServer is not a project dependency). The session is built like a pool worker's: one
intra-op thread, ``workers.runtime.session_options(1)`` when the repo is importable (its path
comes in ``parameters.extra.repo``), else the same options spelled out here.

model-settings.json::

    {"name": "rf-localizer", "implementation": "mlserver_model.OnnxModel",
     "parameters": {"uri": "/abs/path/model.onnx", "extra": {"repo": "/abs/repo"}}}
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse

INPUTS = ("features", "receivers", "mask")
OUTPUTS = ("mean", "sigma", "rho")
log = logging.getLogger("mlserver")


def _session_options(repo: str | None) -> tuple[ort.SessionOptions, str]:
    if repo:
        if repo not in sys.path:
            sys.path.append(repo)
        try:
            from workers.runtime import session_options

            return session_options(1), "workers.runtime.session_options(1)"
        except Exception:  # noqa: S110 - fall back to the equivalent options below
            pass
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts, "equivalent options (workers.runtime not importable)"


class OnnxModel(MLModel):
    """``features``/``receivers``/``mask`` in, ``mean``/``sigma``/``rho`` out."""

    async def load(self) -> bool:
        """Build the ONNX Runtime session."""
        params = self.settings.parameters
        uri = params.uri if params else None
        extra: dict[str, Any] = (params.extra or {}) if params else {}
        opts, how = _session_options(extra.get("repo"))
        self._session = ort.InferenceSession(uri, opts, providers=["CPUExecutionProvider"])
        log.info("heimdall-bench runtime: session options %s", how)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """One ``session.run`` per request."""
        feeds = {}
        for tensor in payload.inputs:
            if tensor.name in INPUTS:
                feeds[tensor.name] = np.asarray(NumpyCodec.decode_input(tensor), dtype=np.float32)
        missing = [n for n in INPUTS if n not in feeds]
        if missing:
            raise ValueError(f"missing inputs: {missing}")
        results = self._session.run(list(OUTPUTS), feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(OUTPUTS, results, strict=True)
            ],
        )
