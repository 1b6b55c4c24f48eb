"""Tensors from and to ``/v2`` bodies: the JSON header, JSON ``data`` and binary tensor data.

Decoding checks a request against the answering version's spec (names, datatypes, shapes,
sizes, parameters) and yields float32 arrays by input role; encoding turns a worker's raw
output tensors into the protocol's answer, JSON or JSON header plus binary data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
from litestar import Response

from app.serving.tensors import F32, TensorBatch
from app.serving.versions import VersionContext
from app.web.oip.schemas import (
    PLATFORM,
    ConfigTensor,
    InferInput,
    InferRequest,
    InstanceGroup,
    ModelMetadata,
    TensorMetadata,
    TritonConfig,
)
from workers import decoding
from workers.errors import MalformedRequest
from workers.spec import INPUT_ROLES, OUTPUT_ROLES, ModelSpec, TensorSpec

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_BATCH = 256
"""Most items one ``/v2`` infer request may carry (same limit as ``/v1/predict/batch``)."""

_DTYPES: dict[str, str] = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "BOOL": "|b1"}
_json_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(InferRequest)
_flat_decoder = msgspec.json.Decoder(list[float])

Body = bytes | bytearray
"""A request body (any contiguous buffer msgspec and numpy can read)."""


@dataclass(frozen=True)
class PreparedInfer:
    """A validated request: its input tensors by role and the outputs to answer."""

    request: InferRequest
    batch: int
    tensors: dict[str, F32]
    outputs: list[tuple[str, bool]]
    """(output role, as binary) in answer order."""

    @property
    def inputs(self) -> TensorBatch:
        """The input tensors as the inference service's tensor-in batch."""
        return TensorBatch(self.batch, self.tensors)


# --------------------------------------------------------------------------- decoding


def decode_body(body: Body, header_length: str | None) -> tuple[InferRequest, Body]:
    """Split a body into the JSON header (decoded) and the binary tensor data after it.

    Raises:
        MalformedRequest: bad header length, invalid JSON or a schema violation.
    """
    size = len(body)
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise MalformedRequest(
                f"{HEADER_LENGTH} must be an integer, got {header_length!r}"
            ) from None
        if not 0 < size <= len(body):
            raise MalformedRequest(
                f"{HEADER_LENGTH} is {size} but the body holds {len(body)} bytes"
            )
    header = body if header_length is None else body[:size]
    try:
        request = decoding.decode(_request_decoder.decode, header, "the inference header")
    except MalformedRequest as exc:
        cause = exc.__cause__
        if isinstance(cause, msgspec.ValidationError):
            exc.detail = f"invalid inference request: {exc.detail}"
        elif isinstance(cause, msgspec.DecodeError) and header_length is None:
            exc.detail += f" (binary data needs the {HEADER_LENGTH} header)"
        raise
    return request, body[size:]


def _as_float32(tensor: InferInput, values: Any) -> F32:
    """``values`` as float32; a finite value beyond float32's range is the client's error.

    Raises:
        MalformedRequest: a value overflows float32 (it would become infinity).
    """
    try:
        with np.errstate(over="raise"):
            return np.asarray(values, dtype=np.float32)
    except FloatingPointError:
        raise MalformedRequest(
            f"input {tensor.name!r} holds a value outside the FP32 range (±3.4e38)"
        ) from None


@functools.cache
def _nested_decoder(depth: int) -> msgspec.json.Decoder[Any]:
    """JSON numbers nested ``depth`` lists deep.

    Strict, like the flat decoder: ``true`` and ``"1.0"`` are not FP32 (numpy cast them to
    1.0 when the data was decoded untyped).
    """
    kind: Any = float
    for _ in range(depth):
        kind = list[kind]
    return msgspec.json.Decoder(kind)


def _nested_tensor(tensor: InferInput, raw: msgspec.Raw, shape: tuple[int, ...]) -> F32:
    what = f"input {tensor.name!r}: data"
    try:
        nested = decoding.decode(_nested_decoder(max(len(shape), 1)).decode, raw, what)
    except MalformedRequest as exc:
        raise MalformedRequest(
            f"{what} must be numbers, flat or nested as shape {list(shape)} says ({exc.detail})"
        ) from exc
    try:
        values = _as_float32(tensor, nested)
    except MalformedRequest:
        raise
    except Exception as exc:  # ragged, non-numeric, out of range: the client's data
        raise MalformedRequest(
            f"{what} must be numbers, flat or nested to the shape ({type(exc).__name__}: {exc})"
        ) from exc
    if values.ndim > 1 and values.shape != shape:
        raise MalformedRequest(
            f"input {tensor.name!r}: nested data has shape "
            f"{list(values.shape)} but shape says {list(shape)}"
        )
    return values


def _json_tensor(tensor: InferInput, raw: msgspec.Raw, shape: tuple[int, ...]) -> F32:
    """Elements of a JSON ``data`` field (flat or nested) as float32 with ``shape``."""
    try:
        flat = _flat_decoder.decode(raw)
    except msgspec.ValidationError:
        values = _nested_tensor(tensor, raw, shape)
    except Exception as exc:  # any other decoder failure is the client's
        raise decoding.reject(exc, f"input {tensor.name!r}: data") from exc
    else:
        values = _as_float32(tensor, flat)
    if values.size != math.prod(shape):
        raise MalformedRequest(
            f"input {tensor.name!r}: data holds {values.size} elements but "
            f"shape {list(shape)} needs {math.prod(shape)}"
        )
    return values.reshape(shape)


def _check_shape(tensor: InferInput, spec: TensorSpec) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if len(shape) != len(spec.shape) or any(
        want not in (-1, got) for want, got in zip(spec.shape, shape, strict=True)
    ):
        raise MalformedRequest(
            f"input {tensor.name!r} has shape {list(shape)}; the model "
            f"expects {spec.shape} (-1: batch size, 1 to {MAX_BATCH})"
        )
    return shape


def _read_input(tensor: InferInput, want: TensorSpec, binary: Body, offset: int) -> tuple[F32, int]:
    """One input as float32 (from JSON ``data`` or the binary section at ``offset``)."""
    if tensor.datatype != want.datatype:
        raise MalformedRequest(
            f"input {tensor.name!r} has datatype {tensor.datatype}; the "
            f"model expects {want.datatype}"
        )
    shape = _check_shape(tensor, want)
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if not len(tensor.data):
            raise MalformedRequest(
                f"input {tensor.name!r} has neither data nor parameters.binary_data_size"
            )
        return _json_tensor(tensor, tensor.data, shape), offset
    if len(tensor.data):
        raise MalformedRequest(f"input {tensor.name!r} has both data and binary_data_size")
    itemsize = np.dtype(_DTYPES[want.datatype]).itemsize
    if not isinstance(size, int) or size != math.prod(shape) * itemsize:
        raise MalformedRequest(
            f"input {tensor.name!r}: binary_data_size is {size!r} but shape {list(shape)} "
            f"of {want.datatype} needs {math.prod(shape) * itemsize} bytes"
        )
    if offset + size > len(binary):
        raise MalformedRequest(
            f"input {tensor.name!r}: the body ends before its {size} bytes of binary data"
        )
    values = np.frombuffer(
        binary, dtype=_DTYPES[want.datatype], count=math.prod(shape), offset=offset
    )
    return _as_float32(tensor, values).reshape(shape), offset + size


def _read_inputs(
    request: InferRequest, binary: Body, spec: ModelSpec
) -> tuple[int, dict[str, F32]]:
    """Validate the inputs against the spec and build one float32 array per input role."""
    roles = {t.name: role for role, t in spec.inputs.items() if role in INPUT_ROLES}
    tensors: dict[str, F32] = {}
    batches: set[int] = set()
    offset = 0
    for tensor in request.inputs:
        role = roles.get(tensor.name)
        if role is None:
            raise MalformedRequest(
                f"unknown input {tensor.name!r}; the model's inputs are {sorted(roles)}"
            )
        if role in tensors:
            raise MalformedRequest(f"input {tensor.name!r} is given more than once")
        tensors[role], offset = _read_input(tensor, spec.inputs[role], binary, offset)
        batches.add(tensor.shape[0])
    missing = [spec.inputs[r].name for r in INPUT_ROLES if r not in tensors]
    if missing:
        raise MalformedRequest(
            f"missing input(s) {missing}; the model needs "
            f"{[spec.inputs[r].name for r in INPUT_ROLES]}"
        )
    if offset != len(binary):
        raise MalformedRequest(
            f"{len(binary) - offset} bytes of binary data after the inputs' "
            "binary_data_size total; check the header length and sizes"
        )
    if len(batches) != 1:
        raise MalformedRequest(
            f"the inputs have different batch sizes {sorted(batches)}; "
            "all inputs share the batch axis"
        )
    batch = batches.pop()
    if not 1 <= batch <= MAX_BATCH:
        raise MalformedRequest(f"batch size is {batch}; send between 1 and {MAX_BATCH} items")
    for role, array in tensors.items():
        if not np.isfinite(array).all():
            raise MalformedRequest(f"input {spec.inputs[role].name!r} holds NaN or Inf")
    return batch, tensors


def _flag(parameters: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise MalformedRequest(f"{where}parameters.{key} must be true or false")
    return value


def _read_outputs(request: InferRequest, spec: ModelSpec) -> list[tuple[str, bool]]:
    """The output roles to answer, each with whether it goes as binary data."""
    binary = _flag(request.parameters, "binary_data_output", False, "")
    if request.outputs is None:
        return [(role, binary) for role in OUTPUT_ROLES]
    roles = {t.name: role for role, t in spec.outputs.items() if role in OUTPUT_ROLES}
    chosen: list[tuple[str, bool]] = []
    for out in request.outputs:
        role = roles.get(out.name)
        if role is None:
            raise MalformedRequest(
                f"unknown output {out.name!r}; the model's outputs are {sorted(roles)}"
            )
        if any(r == role for r, _ in chosen):
            raise MalformedRequest(f"output {out.name!r} is requested more than once")
        if out.parameters.get("classification"):
            raise MalformedRequest("the classification extension is not supported")
        chosen.append(
            (role, _flag(out.parameters, "binary_data", binary, f"output {out.name!r}: "))
        )
    return chosen


def prepare(request: InferRequest, binary: Body, spec: ModelSpec) -> PreparedInfer:
    """Validate an infer request against a version's spec.

    Raises:
        MalformedRequest: names, datatypes, shapes, sizes or parameters do not fit the model.
    """
    batch, tensors = _read_inputs(request, binary, spec)
    return PreparedInfer(request, batch, tensors, _read_outputs(request, spec))


# --------------------------------------------------------------------------- encoding


def encode_answer(
    prepared: PreparedInfer, raw: dict[str, bytes], spec: ModelSpec, ctx: VersionContext
) -> Response[bytes]:
    """The infer answer: JSON, or JSON header plus binary tensors when any output is binary.

    ``raw`` holds FP32 outputs by role whose sizes the service checked against the spec.
    """
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for role, as_binary in prepared.outputs:
        want = spec.outputs[role]
        shape = [prepared.batch if d == -1 else d for d in want.shape]
        data = raw[role]
        entry: dict[str, Any] = {"name": want.name, "datatype": want.datatype, "shape": shape}
        if as_binary:
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = np.frombuffer(data, dtype="<f4").tolist()
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": ctx.name, "model_version": ctx.version}
    if prepared.request.id is not None:
        answer["id"] = prepared.request.id
    answer["outputs"] = outputs
    header = _json_encoder.encode(answer)
    if not blobs:
        return Response(header, media_type=JSON)
    return Response(
        header + b"".join(blobs), media_type=OCTET_STREAM, headers={HEADER_LENGTH: str(len(header))}
    )


# --------------------------------------------------------------------------- metadata


def tensor_metadata(
    tensors: Mapping[str, TensorSpec], roles: tuple[str, ...]
) -> list[TensorMetadata]:
    """Metadata entries (name, datatype, shape) in role order, then any extra tensors."""
    order = [r for r in roles if r in tensors] + [r for r in tensors if r not in roles]
    return [TensorMetadata(tensors[r].name, tensors[r].datatype, tensors[r].shape) for r in order]


def model_metadata(ctx: VersionContext, versions: list[str]) -> ModelMetadata:
    """Model metadata of ``ctx``'s version, listing ``versions``."""
    spec = ctx.package.spec
    return ModelMetadata(
        name=ctx.name,
        versions=versions,
        platform=PLATFORM,
        inputs=tensor_metadata(spec.inputs, INPUT_ROLES),
        outputs=tensor_metadata(spec.outputs, OUTPUT_ROLES),
    )


def triton_config(name: str, metadata: ModelMetadata, max_batch: int) -> TritonConfig:
    """Triton's model configuration (``GET /v2/models/{name}/config``) from the metadata.

    perf_analyzer and Triton clients read ``max_batch_size`` and the tensors' ``dims``
    (without the batch axis when batching) from it before their first request.
    """

    def tensors(entries: list[TensorMetadata]) -> list[ConfigTensor]:
        return [ConfigTensor(t.name, f"TYPE_{t.datatype}", list(t.shape[1:])) for t in entries]

    return TritonConfig(
        name=name,
        max_batch_size=max_batch,
        input=tensors(metadata.inputs),
        output=tensors(metadata.outputs),
        instance_group=[InstanceGroup(name)],
    )
