"""Open Inference Protocol (KServe V2) over HTTP, with Triton's binary tensor data extension.

The ``/v2`` routes serve the model's own tensors: no feature extraction, no decoding to
positions. A request names the input tensors of the served version's spec, the answer carries
the raw output tensors. Inference goes through the inference service's tensor-in path (the same
worker pool, version routing, deadlines, counters and backpressure as ``/v1``); errors follow
the protocol (``{"error": "..."}``), not problem details.

Binary tensor data: the body is a JSON header followed by raw little-endian tensor bytes; the
header's length is in the ``Inference-Header-Content-Length`` request header and each binary
input states its size in ``parameters.binary_data_size``. Outputs are sent as binary when
``parameters.binary_data_output`` (request) or ``parameters.binary_data`` (requested output)
is true; the answer is then ``application/octet-stream`` with the same header convention.

Modules: :mod:`.schemas` (bodies and metadata types), :mod:`.codec` (tensors from and to
bodies), :mod:`.inflate` (``Content-Encoding``), :mod:`.errors` (the protocol's error bodies)
and :mod:`.routes` (the handlers).
"""
