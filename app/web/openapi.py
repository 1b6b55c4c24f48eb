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
                "503": {"description": "Feedback store unavailable", "content": problem},
            }
            continue
        operation["responses"] = {
            "200": {
                "description": "Prediction",
                "content": {media: {"schema": _ref(response)} for media in _MEDIA},
            },
            "400": {"description": "Malformed body", "content": problem},
            "413": {"description": "Body too large", "content": problem},
            "415": {"description": "Unsupported media type", "content": problem},
            "422": {"description": "Input does not fit the model", "content": problem},
            "503": {"description": "Overloaded or not ready (Retry-After)", "content": problem},
            "504": {"description": "Deadline passed while queued", "content": problem},
        }
    _describe_states(schema["paths"], problem)


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
    ready = {"application/json": {"schema": _ref(Readiness)}}
    responses = paths["/health/ready"]["get"].setdefault("responses", {})
    responses["200"] = {"description": "Ready", "content": ready}
    responses["503"] = {"description": "Not ready (Retry-After)", "content": ready}
