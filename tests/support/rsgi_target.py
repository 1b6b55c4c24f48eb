"""Small apps behind :class:`app.web.rsgi.RSGIFront`, served by Granian in tests/app/test_rsgi.py.

``HEIMDALL_TEST_MARKS`` names a folder where the lifespan leaves ``started``/``stopped``;
``HEIMDALL_TEST_FAIL_STARTUP=1`` makes startup fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, get, post
from litestar.params import FromPath
from litestar.response import Stream

from app.web.rsgi import RSGIFront
from workers.errors import ServiceError

ENTERED = {"echo": 0}
"""Requests the /echo handler has started on (before it reads the body)."""


@post("/echo", status_code=200)
async def echo(request: Request[Any, Any, Any]) -> dict[str, Any]:
    ENTERED["echo"] += 1
    body = await request.body()
    return {
        "length": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
        "query": request.url.query,
        "x_tag": request.headers.getall("x-tag", []),
        "client": list(request.client) if request.client else None,
    }


@post("/direct", status_code=200)
async def direct_by_app(request: Request[Any, Any, Any]) -> dict[str, Any]:
    body = await request.body()
    return {"by": "app", "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}


async def direct_echo(
    scope: Any, read: Callable[[], Awaitable[bytes]]
) -> tuple[int, list[tuple[str, str]], bytes]:
    """The direct route of ``POST /direct``: answers without the application."""
    if scope.headers.get("x-raise") is not None:
        raise RuntimeError("direct route failure")
    try:
        body = await read()
    except ServiceError as exc:  # the intake's client error: the route renders it
        return int(exc.status), [("content-type", "text/plain")], exc.code.encode()
    answer = {"by": "direct", "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    return 200, [("content-type", "application/json")], json.dumps(answer).encode()


@get("/items/{name:str}")
async def item(name: FromPath[str]) -> dict[str, str]:
    return {"name": name}


@get("/entered")
async def entered() -> dict[str, int]:
    return ENTERED


@get("/stream")
async def stream() -> Stream:
    async def parts() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"part-{i};".encode()
            await asyncio.sleep(0)

    return Stream(parts())


@get("/slow")
async def slow() -> dict[str, bool]:
    await asyncio.sleep(1.0)
    return {"slow": True}


@get("/boom")
async def boom() -> None:
    raise RuntimeError("boom")


@contextlib.asynccontextmanager
async def lifespan(_: Litestar) -> AsyncIterator[None]:
    marks = Path(os.environ["HEIMDALL_TEST_MARKS"])
    if os.environ.get("HEIMDALL_TEST_FAIL_STARTUP") == "1":
        raise RuntimeError("startup refused on purpose")
    (marks / "started").write_text("1")
    try:
        yield
    finally:
        (marks / "stopped").write_text("1")


def front() -> RSGIFront:
    """Granian factory: the Litestar app (1 MiB body limit) behind the front."""
    logging.basicConfig(level=logging.INFO)
    app = Litestar(
        route_handlers=[echo, direct_by_app, entered, item, stream, slow, boom],
        lifespan=[lifespan],
        request_max_body_size=1024 * 1024,
    )
    return RSGIFront(app, one_piece_limit=64 * 1024, direct={("POST", "/direct"): direct_echo})


async def _raw(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        return  # no lifespan support: the front must carry on
    if scope["path"] == "/raise":
        raise RuntimeError("raw app failure")
    # "/silent": returns without answering


def raw_front() -> RSGIFront:
    """Granian factory: a bare ASGI app that fails or never answers, behind the front."""
    return RSGIFront(_raw, one_piece_limit=1024)
