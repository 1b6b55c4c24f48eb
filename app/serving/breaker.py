"""A circuit breaker for Redis calls that must never hold up a prediction.

Used by the prediction cache, the answer log and the feedback service (one breaker per
Redis client: the feedback store's client has its own, so feedback traffic cannot trip the
cache's).
"""

from __future__ import annotations

import time


class Breaker:
    """Consecutive Redis failures open it for a cool-down; then one call probes."""

    def __init__(self, failures: int = 3, cooldown_s: float = 2.0) -> None:
        """Open after ``failures`` consecutive errors, for ``cooldown_s`` seconds."""
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._count = 0
        self._open_until = 0.0
        self.last_error: str | None = None

    @property
    def closed(self) -> bool:
        """Whether a call may be tried now."""
        return time.monotonic() >= self._open_until

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success."""
        return self._count

    def failed(self, exc: BaseException) -> bool:
        """Count a failure; open when there were enough in a row. Whether it opened now."""
        self._count += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self._count >= self.failures:
            self._open_until = time.monotonic() + self.cooldown_s
            return True
        return False

    def ok(self) -> None:
        """A call succeeded."""
        self._count = 0
