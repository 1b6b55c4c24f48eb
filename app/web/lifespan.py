"""The ASGI lifespan protocol driven from Granian's RSGI hooks (see :mod:`app.web.rsgi`).

Startup runs in ``__rsgi_init__`` before Granian accepts connections (a failure stops the
HTTP process, as Granian does for ASGI); shutdown in ``__rsgi_del__`` after Granian has
drained the in-flight requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
"""An ASGI 3 application (scope, receive, send); loose so any framework's app fits."""

ASGI_VERSION = {"version": "3.0", "spec_version": "2.3"}
"""The ``asgi`` member of every scope the front builds."""


class LifespanFailed(RuntimeError):
    """The application reported ``lifespan.startup.failed`` (or raised during startup)."""


def flush_logs() -> None:
    """Drain queue-based handlers (Litestar's) before the process ends.

    Granian's worker processes end through ``os._exit``, so the ``atexit`` hooks that stop
    queue listeners never run and the last records (the reason for exiting) would be lost.
    """
    for handler in logging.getLogger().handlers:
        listener = getattr(handler, "listener", None)
        if listener is not None and hasattr(listener, "stop"):
            listener.stop()


class Lifespan:
    """The ASGI lifespan protocol driven from outside a running loop."""

    def __init__(self, app: ASGIApp) -> None:
        """Drive ``app``'s lifespan; :meth:`startup` starts it."""
        self.app = app
        self.state: dict[str, Any] = {}
        self._inbox: asyncio.Queue[Message] | None = None
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.supported = True

    async def startup(self) -> None:
        """Send ``lifespan.startup`` and wait for the answer.

        Raises:
            LifespanFailed: the application failed to start.
        """
        loop = asyncio.get_running_loop()
        self._inbox = asyncio.Queue()
        self._waiters = {
            "startup": loop.create_future(),
            "shutdown": loop.create_future(),
        }
        self._task = loop.create_task(self._run())
        await self._inbox.put({"type": "lifespan.startup"})
        await self._waiters["startup"]

    async def shutdown(self) -> None:
        """Send ``lifespan.shutdown`` (when startup was supported) and wait for the answer.

        Raises:
            LifespanFailed: the application failed to stop cleanly.
        """
        if self._inbox is None or not self.supported:
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await self._waiters["shutdown"]

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_VERSION, "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:  # the app's own failure, reported through the waiters
            startup = self._waiters["startup"]
            if startup.done() and not startup.cancelled() and startup.exception() is not None:
                self._waiters["shutdown"].set_result(None)  # failed at startup: nothing to stop
                return
            if not self._waiters["startup"].done():
                self._waiters["startup"].set_exception(LifespanFailed(repr(exc)))
            elif not self._waiters["shutdown"].done():
                self._waiters["shutdown"].set_exception(LifespanFailed(repr(exc)))
            return
        # An application that returns without answering does not support lifespan.
        self.supported = self._waiters["startup"].done()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)

    async def _receive(self) -> Message:
        assert self._inbox is not None
        return await self._inbox.get()

    async def _send(self, message: Message) -> None:
        kind = str(message["type"])
        phase = kind.split(".")[1]
        waiter = self._waiters[phase]
        if kind.endswith(".failed"):
            waiter.set_exception(LifespanFailed(str(message.get("message", ""))))
        else:
            waiter.set_result(None)
