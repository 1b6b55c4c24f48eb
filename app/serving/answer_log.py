"""What the service answered, kept per request id so that field feedback can join it.

Every answer (model name and version, mean position, covariance, domain flag, receiver ids)
is written under its request id with a TTL, after the answer, in one script call per 50 ms (a
batch is one call), and never delays or fails a prediction: with Redis down or its breaker
open the answer is simply not kept. The number of kept answers is capped; the oldest are
deleted first. Keys (prefix ``HEIMDALL_FEEDBACK_PREFIX``): ``answer:{id}`` (TTL answer_ttl +
grace) and ``answers`` (index list for the cap). :class:`app.serving.feedback.FeedbackService`
reads them back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import msgspec
from msgspec import Struct

from app.serving.breaker import Breaker
from app.serving.feedback_settings import FeedbackSettings
from workers.messages import Prediction


class AnswerRecord(Struct, array_like=True, frozen=True):
    """What the service answered for one request id (stored in Redis)."""

    model: str
    version: str
    latitude: float
    longitude: float
    covariance_enu_m2: list[list[float]]
    domain_inside: bool
    receivers: list[str]
    answered_at: float
    accept_until: float


WRITE_DELAY_S = 0.05
"""Answers given within this time are written to Redis in one call."""
answer_decoder = msgspec.msgpack.Decoder(AnswerRecord)
"""Decodes what :class:`AnswerLog` stored under ``answer:{id}``."""
_encoder = msgspec.msgpack.Encoder()

_RECORD_ANSWERS = """
local n = 0
for i = 4, #ARGV, 2 do
  redis.call('SET', ARGV[1] .. ARGV[i], ARGV[i + 1], 'EX', ARGV[2])
  n = redis.call('RPUSH', KEYS[1], ARGV[i])
end
local cap = tonumber(ARGV[3])
if n > cap then
  local old = redis.call('LPOP', KEYS[1], n - cap)
  for _, id in ipairs(old) do redis.call('DEL', ARGV[1] .. id) end
end
return n
"""


class AnswerLog:
    """Keeps what was answered per request id, written after the answer in the background."""

    def __init__(self, settings: FeedbackSettings, client: Any | None, breaker: Breaker) -> None:
        """Write through ``client`` (``redis.asyncio.Redis``; None or disabled: keep nothing)."""
        self.settings = settings
        self.client = client if settings.enabled else None
        self.breaker = breaker
        self._pending: list[tuple[str, bytes]] = []
        self._flush: asyncio.Task[None] | None = None
        self._script = (
            self.client.register_script(_RECORD_ANSWERS) if self.client is not None else None
        )
        self.dropped = 0

    def record(
        self,
        request_id: str,
        model: str,
        version: str,
        prediction: Prediction,
        receivers: Sequence[str],
    ) -> None:
        """Queue one answer; answers queued within ``WRITE_DELAY_S`` are written at once."""
        if self.client is None:
            return
        if not self.breaker.closed:
            self.dropped += 1
            return
        now = time.time()
        record = AnswerRecord(
            model,
            version,
            prediction.latitude,
            prediction.longitude,
            prediction.covariance_enu_m2,
            prediction.domain_inside,
            list(receivers),
            now,
            now + self.settings.answer_ttl_s,
        )
        self._pending.append((request_id, _encoder.encode(record)))
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        # Gather what the next 50 ms answer into one call: a Redis call per request cost the
        # HTTP process ≈100 µs CPU per request at 8 concurrent callers, batched ≈20 µs.
        await asyncio.sleep(WRITE_DELAY_S)
        pending, self._pending = self._pending, []
        self._flush = None
        args: list[Any] = [
            self.settings.prefix + "answer:",
            self.settings.answer_ttl_s + self.settings.expired_grace_s,
            self.settings.max_answers,
        ]
        for request_id, data in pending:
            args += [request_id, data]
        assert self._script is not None
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                await self._script(keys=[self.settings.prefix + "answers"], args=args)
        except Exception as exc:  # any Redis failure only means "not kept"
            self.breaker.failed(exc)
            self.dropped += len(pending)
        else:
            self.breaker.ok()

    async def close(self) -> None:
        """Let a pending write finish (briefly)."""
        if self._flush is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flush), 1.0)
