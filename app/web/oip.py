"""Open Inference Protocol (KServe V2) over HTTP, with Triton's binary tensor data extension.

The ``/v2`` routes serve the model's own tensors: no feature extraction, no decoding to
positions. A request names the input tensors of the served version's spec, the answer carries
the raw output tensors. Inference goes through the same worker pool, version routing and
backpressure as ``/v1``; errors follow the protocol (``{"error": "..."}``), not problem details.

Binary tensor data: the body is a JSON header followed by raw little-endian tensor bytes; the
header's length is in the ``Inference-Header-Content-Length`` request header and each binary
input states its size in ``parameters.binary_data_size``. Outputs are sent as binary when
``parameters.binary_data_output`` (request) or ``parameters.binary_data`` (requested output)
is true; the answer is then ``application/octet-stream`` with the same header convention.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import numpy as np
import numpy.typing as npt
from litestar import Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.params import FromPath
from msgspec import Meta, Struct

from app.web import decoding
from workers import malloc
from workers.errors import (
    InvalidInput,
    MalformedRequest,
    NotFound,
    NotReady,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
    from_code,
)
from workers.messages import Infer
from workers.spec import INPUT_ROLES, OUTPUT_ROLES, ModelSpec, TensorSpec

if TYPE_CHECKING:
    from litestar.handlers import HTTPRouteHandler

    from app.factory import Components
    from app.serving.versions import VersionContext

log = logging.getLogger("heimdall.oip")

JSON = "application/json"
OCTET_STREAM = "application/octet-stream"
HEADER_LENGTH = "Inference-Header-Content-Length"
PLATFORM = "onnxruntime_onnx"
SERVER_NAME = "heimdall-inference"
EXTENSIONS = ["binary_tensor_data"]
MAX_BATCH = 256
"""Most items one ``/v2`` infer request may carry (same limit as ``/v1/predict/batch``)."""
OFFLOAD_BYTES = 1 << 20
"""Bodies larger than this are decoded in a thread so the event loop keeps serving."""

_DTYPES: dict[str, str] = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "BOOL": "|b1"}
_json_encoder = msgspec.json.Encoder()

F32 = npt.NDArray[np.float32]
Body = bytes | bytearray
"""A request body (any contiguous buffer msgspec and numpy can read)."""


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


_request_decoder = msgspec.json.Decoder(InferRequest)
_flat_decoder = msgspec.json.Decoder(list[float])


@dataclass(frozen=True)
class PreparedInfer:
    """A validated request: its input tensors by role and the outputs to answer."""

    request: InferRequest
    batch: int
    tensors: dict[str, F32]
    outputs: list[tuple[str, bool]]
    """(output role, as binary) in answer order."""


# --------------------------------------------------------------------------- errors


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> Response[bytes]:
    """The protocol's error body: ``{"error": message}``."""
    return Response(
        _json_encoder.encode({"error": message}),
        status_code=status,
        media_type=JSON,
        headers=headers,
    )


def oip_service_error_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """ServiceError → protocol error with its status (Retry-After on 503)."""
    if not isinstance(exc, ServiceError):
        return oip_internal_error_handler(_, exc)
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    message = f"{exc.field}: {exc.detail}" if exc.field else exc.detail
    return error_response(int(exc.status), message, headers)


def oip_http_error_handler(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Framework errors (413, path parameters) → protocol error."""
    if not isinstance(exc, HTTPException):
        return oip_internal_error_handler(_, exc)
    detail = str(exc.detail)
    if exc.status_code == 413:
        detail = f"{detail}: the body exceeds the /v2 infer size limit"
    return error_response(exc.status_code, detail, dict(exc.headers or {}) or None)


ExceptionHandler = Callable[[Request[Any, Any, Any], Exception], Response[bytes]]


def v2_aware(handler: ExceptionHandler) -> ExceptionHandler:
    """An app-level handler that answers ``/v2`` paths in the protocol's error format.

    The ``/v2`` routes carry their own handlers; this covers what reaches the application
    level on a ``/v2`` path: unknown paths (404), wrong methods (405) and the like, which
    tritonclient and perf_analyzer cannot read as problem details.
    """

    def dispatch(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
        path = request.url.path
        if path == "/v2" or path.startswith("/v2/"):
            if isinstance(exc, HTTPException):
                return oip_http_error_handler(request, exc)
            return oip_service_error_handler(request, exc)
        return handler(request, exc)

    return dispatch


def oip_internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    """Anything unexpected: log it, answer a 500 protocol error."""
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "an unexpected error occurred; it has been logged")


EXCEPTION_HANDLERS: Mapping[type[Exception], Callable[..., Response[bytes]]] = {
    ServiceError: oip_service_error_handler,
    HTTPException: oip_http_error_handler,
    Exception: oip_internal_error_handler,
}


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


def _nested_tensor(tensor: InferInput, raw: msgspec.Raw, shape: tuple[int, ...]) -> F32:
    what = f"input {tensor.name!r}: data"
    nested = decoding.decode(msgspec.json.decode, raw, what)
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
    """The infer answer: JSON, or JSON header plus binary tensors when any output is binary."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for role, as_binary in prepared.outputs:
        want = spec.outputs[role]
        shape = [prepared.batch if d == -1 else d for d in want.shape]
        data = raw[role]
        if len(data) != math.prod(shape) * 4:
            raise ServiceError(
                f"output {want.name!r} has {len(data)} bytes, expected shape {shape} of FP32"
            )
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


def tensor_metadata(tensors: Mapping[str, TensorSpec], roles: tuple[str, ...]) -> list[Any]:
    """Metadata entries (name, datatype, shape) in role order, then any extra tensors."""
    order = [r for r in roles if r in tensors] + [r for r in tensors if r not in roles]
    return [
        {"name": tensors[r].name, "datatype": tensors[r].datatype, "shape": tensors[r].shape}
        for r in order
    ]


def triton_config(name: str, metadata: dict[str, Any], max_batch: int) -> dict[str, Any]:
    """Triton's model configuration (``GET /v2/models/{name}/config``) from the metadata.

    perf_analyzer and Triton clients read ``max_batch_size`` and the tensors' ``dims``
    (without the batch axis when batching) from it before their first request.
    """

    def tensors(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {
                "name": t["name"],
                "data_type": f"TYPE_{t['datatype']}",
                "dims": list(t["shape"][1:]),
                "format": "FORMAT_NONE",
                "is_shape_tensor": False,
            }
            for t in entries
        ]

    return {
        "name": name,
        "platform": PLATFORM,
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": max_batch,
        "input": tensors(metadata["inputs"]),
        "output": tensors(metadata["outputs"]),
        "instance_group": [{"name": name, "kind": "KIND_CPU", "count": 1}],
        "dynamic_batching": {},
        "parameters": {},
    }


def server_version() -> str:
    """Installed package version of the server."""
    try:
        return importlib.metadata.version(SERVER_NAME)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "0"


# --------------------------------------------------------------------------- the protocol


class OipProtocol:
    """The protocol's operations over a replica's components (no HTTP here but status)."""

    def __init__(self, components: Components) -> None:
        """Keep the replica's collaborators."""
        self.components = components

    @property
    def model_name(self) -> str:
        """The one model name this server answers to."""
        return self.components.settings.registry.model_name()

    def _check_name(self, name: str) -> None:
        if name != self.model_name:
            raise NotFound(f"unknown model {name!r}; this server serves {self.model_name!r}")

    def context(self, name: str, version: str | None, request_id: str | None) -> VersionContext:
        """The version answering a request: the path's, else the routing's choice.

        Raises:
            NotFound: unknown model name, or the version is not resident here.
            NotReady: no version is routed yet.
        """
        self._check_name(name)
        service = self.components.service
        if version is None:
            if service.routing is None:
                raise NotReady("no model version is loaded yet", retry_after=2)
            version = service.routing.choose(request_id, False)
        ctx = service.contexts.get(version)
        if ctx is None:
            resident = ", ".join(self.versions()) or "none"
            raise NotFound(
                f"version {version!r} of model {name!r} is not served here (resident: {resident})"
            )
        return ctx

    def versions(self) -> list[str]:
        """Resident versions, oldest first."""
        keys = list(self.components.service.contexts)
        return sorted(keys, key=lambda v: (len(v), v))

    def metadata(self, name: str, version: str | None) -> dict[str, Any]:
        """Model metadata; without a version, the one with the largest routing weight."""
        self._check_name(name)
        routing = self.components.service.routing
        if version is None and routing is not None and routing.weights:
            version = max(routing.weights, key=lambda v: (routing.weights[v], len(v), v))
        ctx = self.context(name, version, None)
        spec = ctx.package.spec
        return {
            "name": ctx.name,
            "versions": self.versions() if version is None else [ctx.version],
            "platform": PLATFORM,
            "inputs": tensor_metadata(spec.inputs, INPUT_ROLES),
            "outputs": tensor_metadata(spec.outputs, OUTPUT_ROLES),
        }

    def model_ready(self, name: str, version: str | None) -> bool:
        """Whether the routed versions (or the given one) are served by a ready worker."""
        self._check_name(name)
        if version is None:
            return self.components.service.ready()[0]
        self.context(name, version, None)
        return version in self.components.pool.ready_versions()

    async def infer(
        self, name: str, version: str | None, body: Body, header_length: str | None
    ) -> Response[bytes]:
        """Validate, dispatch to the pool as one Infer job, encode the outputs."""
        started = time.perf_counter()
        self._check_name(name)
        offload = len(body) > OFFLOAD_BYTES
        if offload:
            request, binary = await asyncio.to_thread(decode_body, body, header_length)
        else:
            request, binary = decode_body(body, header_length)
        ctx = self.context(name, version, request.id)
        spec = ctx.package.spec
        if offload:
            prepared = await asyncio.to_thread(prepare, request, binary, spec)
        else:
            prepared = prepare(request, binary, spec)
        t = prepared.tensors
        job = Infer(
            0,
            ctx.version,
            prepared.batch,
            t["features"].astype("<f4", copy=False).tobytes(),
            t["receivers"].astype("<f4", copy=False).tobytes(),
            t["mask"].astype("<f4", copy=False).tobytes(),
        )
        service = self.components.service
        settings = service.settings
        try:
            submitted_ns = time.time_ns()
            (future,) = self.components.pool.submit_tensors(
                ctx.version, [job], settings.request_timeout_s
            )
            result = await future
            # Phase metrics and worker-timing spans, as for /v1 (features are the caller's: 0).
            service.trace_job(ctx, result, submitted_ns)
            reply = result.reply
            if reply.error is not None:
                error = from_code(reply.error.code, reply.error.detail, reply.error.field)
                raise MalformedRequest(error.detail) if isinstance(error, InvalidInput) else error
        except ServiceError as exc:
            service.count(ctx.version, exc.code, started)
            raise
        response = encode_answer(
            prepared, {"mean": reply.mean, "sigma": reply.sigma, "rho": reply.rho}, spec, ctx
        )
        service.count(ctx.version, "ok", started)
        return response


INFLATE_SLICE = 1 << 20
"""Output bytes inflated per step: the running total is checked after each one."""
TRIM_AFTER = 16 << 20
"""Inflated bytes above which their memory is handed back to the kernel once freed."""
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def _drop(pieces: list[bytes]) -> None:
    """Free inflated pieces one at a time, then give the memory back to the kernel.

    The event loop's thread can take the GIL between pieces (freeing 128 MiB at once holds it
    for ≈ 15 ms). The pieces live in this thread's malloc arena, which glibc trims only from
    its top: without ``malloc_trim`` a bomb left ≈ 190 MiB resident after it was refused.
    """
    size = sum(len(p) for p in pieces)
    while pieces:
        pieces.pop()
    if size > TRIM_AFTER:
        malloc.trim()


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """Inflate ``body`` step by step, stopping as soon as the output passes ``limit``.

    At most ``limit`` bytes of output exist at any time, however small the input (a 1 MB gzip
    bomb expands to 1 GB). Runs in a thread: zlib releases the GIL while it inflates, and the
    output is kept as 1 MiB pieces (a growing buffer is copied and remapped with the GIL
    held, ≈ 10 ms at a time near 128 MiB), joined once only when the whole body fits.

    Raises:
        PayloadTooLarge: the inflated body exceeds ``limit``.
        MalformedRequest: not valid ``encoding`` data, or truncated.
    """
    inflater = zlib.decompressobj(_WBITS[encoding])
    pieces: list[bytes] = []
    total = 0
    data = body
    try:
        while True:
            # One byte past the limit is enough to know; never inflate more than that.
            want = min(INFLATE_SLICE, limit + 1 - total)
            piece = inflater.decompress(data, want)
            if total + len(piece) > limit:
                _drop(pieces)
                raise PayloadTooLarge(
                    f"the {encoding} body inflates to more than {limit} bytes (stopped there)"
                )
            pieces.append(piece)
            total += len(piece)
            data = inflater.unconsumed_tail
            if inflater.eof or (not data and len(piece) < want):
                break
    except zlib.error as exc:
        _drop(pieces)
        raise MalformedRequest(f"the body is not valid {encoding} data: {exc}") from exc
    if not inflater.eof:
        _drop(pieces)
        raise MalformedRequest(f"the {encoding} body is truncated")
    if len(pieces) == 1:
        return pieces[0]
    body = b"".join(pieces)
    _drop(pieces)
    return body


async def read_body(
    request: Request[Any, Any, Any], limit: int, inflating: asyncio.Semaphore
) -> Body:
    """The request body, inflated (off the event loop) when sent gzip- or deflate-encoded.

    ``inflating`` lets one body inflate at a time, so compression bombs sent together cost
    the limit in memory once, not once each.

    Raises:
        UnsupportedMediaType: another content encoding.
        PayloadTooLarge: the inflated body exceeds ``limit``.
        MalformedRequest: the encoded body is corrupt or truncated.
    """
    body = await request.body()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding in ("identity", ""):
        return body
    if encoding not in _WBITS:
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send identity, gzip or deflate"
        )
    async with inflating:
        return await asyncio.to_thread(inflate, body, encoding, limit)


def _json(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response[bytes]:
    return Response(
        _json_encoder.encode(value), status_code=status, media_type=JSON, headers=headers
    )


def config_routes(oip: OipProtocol) -> list[HTTPRouteHandler]:
    """Triton's ``/v2/models/{name}[/versions/{v}]/config`` (read by perf_analyzer)."""
    common: dict[str, Any] = {"exception_handlers": EXCEPTION_HANDLERS, "tags": ["v2"]}

    @get("/v2/models/{name:str}/config", summary="Model configuration (Triton)", **common)
    async def model_config(name: FromPath[str]) -> Response[bytes]:
        return _json(triton_config(name, oip.metadata(name, None), MAX_BATCH))

    @get(
        "/v2/models/{name:str}/versions/{version:str}/config",
        summary="Model version configuration (Triton)",
        **common,
    )
    async def version_config(name: FromPath[str], version: FromPath[str]) -> Response[bytes]:
        return _json(triton_config(name, oip.metadata(name, version), MAX_BATCH))

    return [model_config, version_config]


def build_oip_routes(components: Components) -> list[HTTPRouteHandler]:
    """Route handlers of the ``/v2`` protocol bound to ``components``."""
    oip = OipProtocol(components)
    limit = components.settings.server.max_batch_body_bytes
    inflating = asyncio.Semaphore(1)
    common: dict[str, Any] = {"exception_handlers": EXCEPTION_HANDLERS, "tags": ["v2"]}

    @get("/v2/health/live", summary="Server live (OIP)", **common)
    async def live() -> Response[bytes]:
        return _json({"live": True})

    @get("/v2/health/ready", summary="Server ready (OIP)", **common)
    async def ready() -> Response[bytes]:
        ok = components.readiness()[0]
        return _json({"ready": ok}, 200 if ok else 503, None if ok else {"Retry-After": "2"})

    @get("/v2", summary="Server metadata (OIP)", **common)
    async def server_metadata() -> Response[bytes]:
        return _json({"name": SERVER_NAME, "version": server_version(), "extensions": EXTENSIONS})

    @get("/v2/models/{name:str}", summary="Model metadata (OIP)", **common)
    async def model_metadata(name: FromPath[str]) -> Response[bytes]:
        return _json(oip.metadata(name, None))

    @get(
        "/v2/models/{name:str}/versions/{version:str}",
        summary="Model version metadata (OIP)",
        **common,
    )
    async def version_metadata(name: FromPath[str], version: FromPath[str]) -> Response[bytes]:
        return _json(oip.metadata(name, version))

    def readiness(name: str, version: str | None) -> Response[bytes]:
        ok = oip.model_ready(name, version)
        body = {"name": name, "ready": ok} | ({"version": version} if version else {})
        return _json(body, 200 if ok else 503, None if ok else {"Retry-After": "2"})

    @get("/v2/models/{name:str}/ready", summary="Model ready (OIP)", **common)
    async def model_ready(name: FromPath[str]) -> Response[bytes]:
        return readiness(name, None)

    @get(
        "/v2/models/{name:str}/versions/{version:str}/ready",
        summary="Model version ready (OIP)",
        **common,
    )
    async def version_ready(name: FromPath[str], version: FromPath[str]) -> Response[bytes]:
        return readiness(name, version)

    @post(
        "/v2/models/{name:str}/infer",
        summary="Infer (OIP)",
        status_code=200,
        request_max_body_size=limit,
        **common,
    )
    async def infer(request: Request[Any, Any, Any], name: FromPath[str]) -> Response[bytes]:
        body = await read_body(request, limit, inflating)
        return await oip.infer(name, None, body, request.headers.get(HEADER_LENGTH))

    @post(
        "/v2/models/{name:str}/versions/{version:str}/infer",
        summary="Infer on a version (OIP)",
        status_code=200,
        request_max_body_size=limit,
        **common,
    )
    async def infer_version(
        request: Request[Any, Any, Any], name: FromPath[str], version: FromPath[str]
    ) -> Response[bytes]:
        body = await read_body(request, limit, inflating)
        return await oip.infer(name, version, body, request.headers.get(HEADER_LENGTH))

    return [
        live,
        ready,
        server_metadata,
        model_metadata,
        version_metadata,
        model_ready,
        version_ready,
        infer,
        infer_version,
        *config_routes(oip),
    ]
