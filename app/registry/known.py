"""Whether a version number exists in the registry, asked off the event loop and remembered.

Routes that take any version number (``/v1/models/{v}/field``) use it to answer 404 for a
version the registry never had, instead of zero counts that read like "no feedback yet".
A version found is remembered for good (registries do not reuse numbers); one not found is
remembered for ``negative_ttl_s``. Questions about the same number share one lookup, lookups
run one at a time (a client probing numbers, or a locked registry, takes one thread of the
default pool, which also decodes large bodies), and a client waits at most ``wait_s`` for
an answer; a registry that cannot answer in time, or at all, gives ``None`` (unknown).
"""

from __future__ import annotations

import asyncio
import logging
import time

from app.registry.client import ModelRegistry
from workers.errors import NotFound, ServiceError

log = logging.getLogger("heimdall.registry")


class KnownVersions:
    """Existence of model versions, from the registry, cached."""

    MAX_NEGATIVE = 4096
    """Versions not found remembered at once (the oldest go first)."""

    def __init__(
        self, registry: ModelRegistry, negative_ttl_s: float = 10.0, wait_s: float = 2.0
    ) -> None:
        """Ask ``registry``; remember a missing version for ``negative_ttl_s`` seconds."""
        self.registry = registry
        self.negative_ttl_s = negative_ttl_s
        self.wait_s = wait_s
        self._found: set[str] = set()
        self._missing: dict[str, float] = {}
        self._asking: dict[str, asyncio.Future[bool | None]] = {}
        self._one_at_a_time = asyncio.Semaphore(1)

    async def exists(self, version: str) -> bool | None:
        """True / False from the registry (or memory); None when the registry cannot say."""
        if version in self._found:
            return True
        until = self._missing.get(version)
        if until is not None and until > time.monotonic():
            return False
        lookup = self._asking.get(version)
        if lookup is None:
            lookup = self._asking[version] = asyncio.ensure_future(self._ask(version))
            lookup.add_done_callback(lambda _: self._asking.pop(version, None))
        try:  # shielded: a client that stops waiting leaves the lookup to the others
            return await asyncio.wait_for(asyncio.shield(lookup), self.wait_s)
        except TimeoutError:
            return None

    async def _ask(self, version: str) -> bool | None:
        async with self._one_at_a_time:
            try:
                await asyncio.to_thread(self.registry.resolve, version)
            except NotFound:
                self._missing.pop(version, None)
                if len(self._missing) >= self.MAX_NEGATIVE:
                    self._missing.pop(next(iter(self._missing)))
                self._missing[version] = time.monotonic() + self.negative_ttl_s
                return False
            except Exception as exc:  # any failure: unknown, never a 5xx for the route
                what = (
                    exc.detail if isinstance(exc, ServiceError) else f"{type(exc).__name__}: {exc}"
                )
                log.warning("could not ask the registry whether %s exists: %s", version, what)
                return None
        self._missing.pop(version, None)
        self._found.add(version)
        return True
