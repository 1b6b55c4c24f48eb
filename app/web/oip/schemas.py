"""The protocol's request bodies and metadata answers (msgspec types, in the OpenAPI schema)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "heimdall-inference"
EXTENSIONS = ["binary_tensor_data"]


class InferInput(Struct, frozen=True, forbid_unknown_fields=True):
    """One input tensor of an infer request."""

    name: str
    """Tensor name from the model metadata."""
    datatype: str
    """Protocol datatype (``FP32``...)."""
    shape: list[Annotated[int, Meta(ge=0)]]
    """Shape, batch axis first."""
    parameters: dict[str, Any] = {}
    """``binary_data_size`` when the tensor's bytes follow the JSON header."""
    data: msgspec.Raw = msgspec.Raw(b"")
    """Elements in row-major order, flat or nested; absent (empty) for binary tensors."""


class RequestedOutput(Struct, frozen=True, forbid_unknown_fields=True):
    """An output the client asks for."""

    name: str
    """Output tensor name from the model metadata."""
    parameters: dict[str, Any] = {}
    """``binary_data`` (bool) overrides the request-wide ``binary_data_output``."""


class InferRequest(Struct, frozen=True, forbid_unknown_fields=True):
    """The JSON part of an infer request."""

    inputs: list[InferInput]
    """Input tensors."""
    id: str | None = None
    """Request identifier, echoed in the answer and used for version routing."""
    outputs: list[RequestedOutput] | None = None
    """Outputs to return (all when absent)."""
    parameters: dict[str, Any] = {}
    """``binary_data_output`` (bool): return every output as binary data."""


class ServerLive(Struct, frozen=True):
    """``GET /v2/health/live``."""

    live: bool


class ServerReady(Struct, frozen=True):
    """``GET /v2/health/ready`` (503 when not ready)."""

    ready: bool


class ModelReady(Struct, frozen=True):
    """``GET /v2/models/{name}[/versions/{version}]/ready`` (503 when not ready)."""

    name: str
    ready: bool
    version: str | msgspec.UnsetType = msgspec.UNSET
    """The version asked about (absent for the model as routed)."""


class ServerMetadata(Struct, frozen=True):
    """``GET /v2``: who answers and which protocol extensions it speaks."""

    name: str
    version: str
    extensions: list[str]


class TensorMetadata(Struct, frozen=True):
    """One input or output tensor of the model."""

    name: str
    datatype: str
    shape: list[int]
    """Shape, -1 for the batch axis."""


class ModelMetadata(Struct, frozen=True):
    """``GET /v2/models/{name}[/versions/{version}]``."""

    name: str
    versions: list[str]
    """Resident versions (the one asked about, when a version is in the path)."""
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ConfigTensor(Struct, frozen=True):
    """A tensor in Triton's model configuration."""

    name: str
    data_type: str
    """``TYPE_`` and the protocol datatype."""
    dims: list[int]
    """Shape without the batch axis."""
    format: str = "FORMAT_NONE"
    is_shape_tensor: bool = False


class LatestPolicy(Struct, frozen=True):
    """Serve the latest ``num_versions`` versions."""

    num_versions: int = 1


class VersionPolicy(Struct, frozen=True):
    """Triton's version policy (always the latest one here)."""

    latest: LatestPolicy = LatestPolicy()


class InstanceGroup(Struct, frozen=True):
    """Where the model's instances run."""

    name: str
    kind: str = "KIND_CPU"
    count: int = 1


class DynamicBatching(Struct, frozen=True):
    """Triton's dynamic batching block; present and empty (the pool batches under load)."""


class TritonConfig(Struct, frozen=True, kw_only=True):
    """``GET /v2/models/{name}[/versions/{version}]/config``, read by perf_analyzer."""

    name: str
    platform: str = PLATFORM
    backend: str = "onnxruntime"
    version_policy: VersionPolicy = VersionPolicy()
    max_batch_size: int
    input: list[ConfigTensor]
    output: list[ConfigTensor]
    instance_group: list[InstanceGroup]
    dynamic_batching: DynamicBatching = DynamicBatching()
    parameters: dict[str, str] = {}
