"""Whether a version number exists in the registry, asked off the event loop and remembered.

Routes that take any version number (``/v1/models/{v}/field``) use it to answer 404 for a
version the registry never had, instead of zero counts that read like "no feedback yet".
A version found is remembered for good (registries do not reuse numbers); one not found is
remembered for ``negative_ttl_s``, so a client probing numbers costs the registry at most one
lookup per number and period; a registry that cannot answer gives ``None`` (unknown).
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

    def __init__(self, registry: ModelRegistry, negative_ttl_s: float = 10.0) -> None:
        """Ask ``registry``; remember a missing version for ``negative_ttl_s`` seconds."""
        self.registry = registry
        self.negative_ttl_s = negative_ttl_s
        self._found: set[str] = set()
        self._missing: dict[str, float] = {}

    async def exists(self, version: str) -> bool | None:
        """True / False from the registry (or memory); None when the registry cannot say."""
        if version in self._found:
            return True
        now = time.monotonic()
        until = self._missing.get(version)
        if until is not None and until > now:
            return False
        try:
            await asyncio.to_thread(self.registry.resolve, version)
        except NotFound:
            self._missing.pop(version, None)
            if len(self._missing) >= self.MAX_NEGATIVE:
                self._missing.pop(next(iter(self._missing)))
            self._missing[version] = now + self.negative_ttl_s
            return False
        except (ServiceError, OSError) as exc:
            log.warning("could not ask the registry whether version %s exists: %s", version, exc)
            return None
        self._missing.pop(version, None)
        self._found.add(version)
        return True
