"""Small HTTP contracts: ``Accept`` q-values, one problem ``type`` per error, /metrics type."""

from __future__ import annotations

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client import CollectorRegistry, Counter

from app.serving import errors as serving_errors
from app.web import errors as web_errors
from app.web.errors import NotAcceptable
from app.web.negotiation import prefers_msgpack
from app.web.routes import metrics_route
from telemetry.exposition import single
from workers import errors
from workers.errors import ServiceError


@pytest.mark.parametrize(
    ("accept", "msgpack"),
    [
        ("", False),
        ("application/json", False),
        ("application/msgpack", True),
        ("application/json;q=0.1, application/msgpack", True),
        ("application/msgpack;q=0.5, application/json", False),
        ("application/json, application/msgpack", False),
        ("application/msgpack, */*", True),
        ("application/json;q=0, */*", True),
        ("application/msgpack;q=0, */*", False),
        ("application/x-msgpack;q=0.9, application/*;q=0.2", True),
        ("*/*", False),
        ("application/problem+json", False),
        ("application/json; q=0.3 , application/vnd.msgpack; q=0.4", True),
    ],
)
def test_accept_q_values_choose_the_answer(accept: str, msgpack: bool) -> None:
    assert prefers_msgpack(accept) is msgpack


@pytest.mark.parametrize(
    "accept", ["text/html", "application/json;q=0, application/msgpack;q=0", "*/*;q=0"]
)
def test_nothing_acceptable_is_406(accept: str) -> None:
    with pytest.raises(NotAcceptable):
        prefers_msgpack(accept)


def _error_classes() -> list[type[ServiceError]]:
    """Every error class of the three homes: workers, serving and HTTP."""
    return [
        value
        for module in (errors, serving_errors, web_errors)
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, ServiceError)
        and value.__module__ == module.__name__
    ]


def test_every_error_class_has_its_own_problem_type() -> None:
    classes = _error_classes()
    types = {cls.problem_type for cls in classes}
    assert len(types) == len(classes) >= 22
    for cls in classes:
        assert cls.problem_type == "urn:heimdall:problem:" + cls.code.replace("_", "-")
    assert errors.NoSignal.problem_type == "urn:heimdall:problem:no-signal"
    assert "about:blank" not in types


def test_metrics_content_type_names_the_charset_once() -> None:
    registry = CollectorRegistry()
    Counter("probe", "a counter", registry=registry).inc()
    render = single(registry)

    async def scrape() -> bytes:
        return render()

    with TestClient(Litestar([metrics_route(scrape)])) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    content_type = response.headers["content-type"]
    assert content_type.startswith("text/plain; version=")
    assert content_type.count("charset=utf-8") == 1, content_type
    assert "probe_total 1.0" in response.text
