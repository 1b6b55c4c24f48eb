"""Complete the OpenAPI document with the msgspec schemas of bodies the handlers decode.

The /v1 handlers decode bodies themselves (JSON or MessagePack, chosen by Content-Type), so
Litestar cannot infer their request and response schemas. This adds them from the same
msgspec types the handlers use, so clients and fuzzers (schemathesis) see the real contract;
likewise the answers of ``GET /v1/models[/{version}]`` and ``GET /health/ready``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar._openapi.plugin import OpenAPIPlugin

from app.serving.schemas import (
    BatchRequest,
    BatchResponse,
    FeedbackRequest,
    FeedbackResponse,
    PredictResponse,
    Problem,
)
from app.serving.status import ModelsState, Readiness, VersionState
from workers.request import PredictRequest

_BODIES: dict[str, tuple[type, type]] = {
    "/v1/predict": (PredictRequest, PredictResponse),
    "/v1/predict/batch": (BatchRequest, BatchResponse),
    "/v1/feedback": (FeedbackRequest, FeedbackResponse),
}
_MEDIA = ("application/json", "application/msgpack")
_STATES: dict[str, tuple[type, str]] = {
    "/v1/models": (ModelsState, "Serving state of this replica"),
    "/v1/models/{version}": (VersionState, "One resident version, with its field figures"),
}


_OVERLOADED = "Overloaded, every upload slot or the body budget taken, or not ready (Retry-After)"
_NOT_ACCEPTABLE = "Accept names no media type the service answers with"
_BODY_TIMEOUT = "The body did not arrive in time (connection closed)"
_OIP_ERROR = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        }
    }
}


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def complete_openapi(app: Litestar) -> None:
    """Add request bodies, responses and problem details to the cached OpenAPI document."""
    plugin = app.plugins.get(OpenAPIPlugin)
    schema: dict[str, Any] = plugin.provide_openapi_schema()
    types = [t for pair in _BODIES.values() for t in pair] + [Problem, Readiness]
    types += [kind for kind, _ in _STATES.values()]
    _, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    schema.setdefault("components", {}).setdefault("schemas", {}).update(components)
    problem = {"application/problem+json": {"schema": _ref(Problem)}}
    for path, (request, response) in _BODIES.items():
        operation = schema["paths"][path]["post"]
        operation["requestBody"] = {
            "required": True,
            "content": {media: {"schema": _ref(request)} for media in _MEDIA},
        }
        if path == "/v1/feedback":
            operation["responses"] = {
                "200": {
                    "description": "The truth joined with the answer (duplicate: true on repeats)",
                    "content": {media: {"schema": _ref(response)} for media in _MEDIA},
                },
                "400": {"description": "Malformed body", "content": problem},
                "403": {"description": "Feedback is turned off", "content": problem},
                "404": {"description": "Unknown or expired request id", "content": problem},
                "409": {"description": "Another truth was recorded for the id", "content": problem},
                "413": {"description": "Body too large", "content": problem},
                "415": {"description": "Unsupported media type", "content": problem},
                "429": {"description": "Rate limit (Retry-After)", "content": problem},
                "503": {
                    "description": f"Feedback store unavailable; {_OVERLOADED}",
                    "content": problem,
                },
            }
            continue
        operation["responses"] = {
            "200": {
                "description": "Prediction",
                "content": {media: {"schema": _ref(response)} for media in _MEDIA},
            },
            "400": {"description": "Malformed or incomplete body", "content": problem},
            "413": {"description": "Body too large", "content": problem},
            "415": {"description": "Unsupported media type", "content": problem},
            "422": {"description": "Input does not fit the model", "content": problem},
            "503": {"description": _OVERLOADED, "content": problem},
            "504": {"description": "Deadline passed while queued", "content": problem},
        }
    for path in _BODIES:
        operation = schema["paths"][path]["post"]
        operation["responses"]["406"] = {"description": _NOT_ACCEPTABLE, "content": problem}
        operation["responses"]["408"] = {"description": _BODY_TIMEOUT, "content": problem}
    _describe_states(schema["paths"], problem)
    _describe_oip(schema["paths"])


def _describe_states(paths: dict[str, Any], problem: dict[str, Any]) -> None:
    """Answers of the state endpoints (/v1/models, /v1/models/{version}, /health/ready)."""
    for path, (kind, description) in _STATES.items():
        responses = paths[path]["get"].setdefault("responses", {})
        responses["200"] = {
            "description": description,
            "content": {media: {"schema": _ref(kind)} for media in _MEDIA},
        }
        if path.endswith("{version}"):
            responses["404"] = {"description": "Not resident here", "content": problem}
        responses["406"] = {"description": _NOT_ACCEPTABLE, "content": problem}
    field = paths["/v1/models/{version}/field"]["get"].setdefault("responses", {})
    field["200"] = {
        "description": "Field figures from ground truth (counts, coverage, errors, sources)",
        "content": {"application/json": {"schema": {"type": "object"}}},
    }
    field["404"] = {
        "description": "Not a version number, not in the registry, or no feedback store",
        "content": problem,
    }
    field["406"] = {"description": _NOT_ACCEPTABLE, "content": problem}
    field["503"] = {"description": "Feedback store unavailable (Retry-After)", "content": problem}
    ready = {"application/json": {"schema": _ref(Readiness)}}
    responses = paths["/health/ready"]["get"].setdefault("responses", {})
    responses["200"] = {"description": "Ready", "content": ready}
    responses["503"] = {"description": "Not ready (Retry-After)", "content": ready}


def _describe_oip(paths: dict[str, Any]) -> None:
    """The ``/v2`` answers: ``{"error": ...}`` for every error, binary tensor data on infer."""
    for path, item in paths.items():
        if not path.startswith("/v2/models/"):
            continue
        for method, operation in item.items():
            responses = operation.setdefault("responses", {})
            responses["404"] = {"description": "Unknown model or version", "content": _OIP_ERROR}
            if method != "post":
                continue
            operation["requestBody"] = {
                "required": True,
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/octet-stream": {
                        "schema": {"type": "string", "format": "binary"},
                        "description": "JSON header (Inference-Header-Content-Length bytes), "
                        "then binary tensor data",
                    },
                },
            }
            responses["200"] = {
                "description": "Outputs; binary tensor data after the JSON header when asked "
                "(Inference-Header-Content-Length)",
                "content": {
                    "application/json": {"schema": {"type": "object"}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            }
            for status, description in (
                ("400", "Malformed or incomplete body, or tensors that do not fit the model"),
                ("408", _BODY_TIMEOUT),
                ("413", "Body (inflated or not) too large"),
                ("415", "Unsupported Content-Encoding"),
                ("422", "Input the model cannot answer"),
                ("503", _OVERLOADED),
                ("504", "Deadline passed while queued"),
            ):
                responses[status] = {"description": description, "content": _OIP_ERROR}
