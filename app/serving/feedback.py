"""Ground truth from the field: ``POST /v1/feedback`` joins it with what was answered.

Three parts, all on Redis so that every replica sees the same state:

* :class:`~app.serving.answer_log.AnswerLog` — what was answered, per request id, written after
  the answer and never delaying it.
* :class:`FeedbackService` — ``POST /v1/feedback``: rate-limited per client, looks the
  answer up, computes the error and the truth's Mahalanobis distance and records the result
  once (a duplicate gets the same answer and is not counted twice).
* :class:`~app.serving.field_store.FieldStore` — per-version counts and the latest samples,
  read by ``/v1/models/{version}``, canary gates and ``heimdall-inference recalibrate``.

Keys (prefix ``HEIMDALL_FEEDBACK_PREFIX``): ``answer:{id}`` (TTL answer_ttl + grace),
``answers`` (index list for the cap), ``feedback:{id}`` (same TTL), ``figures:{model}:
{version}`` (hash), ``samples:{model}:{version}`` (list, capped), ``sources:{model}:
{version}`` (set, capped). The scripts build key names from the prefix, so they assume one
Redis node (no cluster slot routing).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from typing import Any

import msgspec
import numpy as np
from msgspec import Struct

from app.serving.answer_log import AnswerLog, AnswerRecord, answer_decoder
from app.serving.breaker import Breaker
from app.serving.errors import (
    Conflict,
    ExpiredRequest,
    Forbidden,
    StoreUnavailable,
    TooManyRequests,
    UnknownRequest,
)
from app.serving.feedback_settings import FeedbackSettings
from app.serving.field import LEVELS, chi2_radius2, level_key, mahalanobis2, offset_enu
from app.serving.field_store import FieldSample, FieldStore, field_keys
from app.serving.schemas import EllipseHit, FeedbackRequest, FeedbackResponse, ModelRef


class StoredFeedback(Struct, array_like=True, frozen=True):
    """A joined feedback as recorded (to answer duplicates identically)."""

    latitude: float
    longitude: float
    response: FeedbackResponse


RECHECK_DELAY_S = 0.25
"""A truth that finds no answer looks again after this long: the answer's write may lag."""

_feedback_decoder = msgspec.msgpack.Decoder(StoredFeedback)
_encoder = msgspec.msgpack.Encoder()

_RECORD_FEEDBACK = """
local prev = redis.call('GET', KEYS[1])
if prev then return {0, prev} end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
local src = ARGV[5]
if redis.call('SISMEMBER', KEYS[4], src) == 0 then
  if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[6]) then
    src = 'other'
  else
    redis.call('SADD', KEYS[4], src)
  end
end
local fields = {'n', 'src:' .. src .. ':n'}
if ARGV[7] == '0' then
  table.insert(fields, 'outside_domain')
  table.insert(fields, 'src:' .. src .. ':outside_domain')
end
for i = 8, #ARGV do
  table.insert(fields, 'in:' .. ARGV[i])
  table.insert(fields, 'src:' .. src .. ':in:' .. ARGV[i])
end
for _, f in ipairs(fields) do redis.call('HINCRBY', KEYS[2], f, 1) end
redis.call('LPUSH', KEYS[3], ARGV[3])
redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[4]) - 1)
return {1, src}
"""


class RateLimiter:
    """A token bucket per client key, in process (each replica limits what it receives)."""

    def __init__(self, rate_per_s: float, burst: int, max_clients: int = 10_000) -> None:
        """``burst`` tokens per client, refilled at ``rate_per_s``; at most ``max_clients``."""
        self.rate = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, client: str) -> float:
        """Take a token: 0.0 when allowed, else the seconds until one is available."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


class FeedbackService:
    """``POST /v1/feedback``: join the truth with the answer, count it once per version."""

    def __init__(
        self,
        settings: FeedbackSettings,
        client: Any | None,
        breaker: Breaker,
        telemetry: Any | None = None,
    ) -> None:
        """Use ``client`` (``redis.asyncio.Redis``) for answers and figures."""
        self.settings = settings
        self.client = client
        self.breaker = breaker
        self.telemetry = telemetry
        self.answers = AnswerLog(settings, client, breaker)
        self.store = FieldStore(settings, client) if client is not None else None
        self.limiter = RateLimiter(settings.rate_per_s, settings.burst)
        self._script = client.register_script(_RECORD_FEEDBACK) if client is not None else None

    def _available(self) -> Any:
        if not self.settings.enabled:
            raise Forbidden("feedback is turned off on this service (HEIMDALL_FEEDBACK_ENABLED)")
        if self.client is None:
            raise StoreUnavailable("feedback needs Redis and REDIS_URL is empty", retry_after=60)
        if not self.breaker.closed:
            raise StoreUnavailable(
                f"the feedback store (Redis) is failing: {self.breaker.last_error}",
                retry_after=max(1, math.ceil(self.breaker.cooldown_s)),
            )
        return self.client

    async def _call(self, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                result = await coro
        except Exception as exc:
            self.breaker.failed(exc)
            raise StoreUnavailable(
                f"the feedback store (Redis) did not answer: {type(exc).__name__}", retry_after=1
            ) from exc
        self.breaker.ok()
        return result

    async def submit(self, request: FeedbackRequest, client: str) -> FeedbackResponse:
        """Record the truth for an earlier answer and return the joined figures.

        Raises:
            Forbidden: feedback is turned off.
            TooManyRequests: ``client`` exceeded its rate (with ``retry_after``).
            StoreUnavailable: Redis is missing, failing or slow.
            UnknownRequest: no answer is kept under ``request_id``.
            ExpiredRequest: the answer is older than the retention window.
            Conflict: a different truth was already recorded for ``request_id``.
        """
        redis = self._available()
        wait = self.limiter.take(client)
        if wait > 0:
            raise TooManyRequests(
                f"more than {self.settings.burst} feedback requests at once or "
                f"{self.settings.rate_per_s:g}/s from {client}; slow down",
                retry_after=max(1, math.ceil(wait)),
            )
        answer = await self._answer(redis, request.request_id)
        if time.time() > answer.accept_until:
            raise ExpiredRequest(
                f"the answer to request {request.request_id!r} was given at "
                f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(answer.answered_at))} and "
                f"feedback is accepted for {self.settings.answer_ttl_s} s after an answer",
                field="$.request_id",
            )
        response, sample = self._join(request, answer)
        stored = StoredFeedback(request.position.latitude, request.position.longitude, response)
        figures_key, samples_key, sources_key = field_keys(
            self.settings.prefix, answer.model, answer.version
        )
        assert self._script is not None
        inside = [level_key(e.confidence) for e in response.ellipses if e.inside]
        created, value = await self._call(
            self._script(
                keys=[
                    self.settings.prefix + "feedback:" + request.request_id,
                    figures_key,
                    samples_key,
                    sources_key,
                ],
                args=[
                    _encoder.encode(stored),
                    self.settings.answer_ttl_s + self.settings.expired_grace_s,
                    _encoder.encode(sample),
                    self.settings.max_samples,
                    request.source,
                    self.settings.max_sources,
                    "1" if answer.domain_inside else "0",
                    *inside,
                ],
            )
        )
        if not created:
            return self._duplicate(request, value)
        if self.telemetry is not None:
            self.telemetry.field_feedback(
                answer.version,
                value.decode() if isinstance(value, bytes) else str(value),
                {e.confidence: e.inside for e in response.ellipses},
                answer.domain_inside,
                response.error_m,
                response.mahalanobis,
            )
        return response

    async def _answer(self, redis: Any, request_id: str) -> AnswerRecord:
        key = self.settings.prefix + "answer:" + request_id
        raw = await self._call(redis.get(key))
        if raw is None:
            # The answering replica writes right after it answered; a truth sent at once
            # may overtake that write by a few milliseconds.
            await asyncio.sleep(RECHECK_DELAY_S)
            raw = await self._call(redis.get(key))
        if raw is None:
            raise UnknownRequest(
                f"no answer is kept for request id {request_id!r}: this service never "
                "answered it, or answered it longer ago than the retention "
                f"({self.settings.answer_ttl_s} s) allows",
                field="$.request_id",
            )
        try:
            return answer_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise UnknownRequest(
                f"the answer kept for request id {request_id!r} cannot be read",
                field="$.request_id",
            ) from exc

    @staticmethod
    def _join(
        request: FeedbackRequest, answer: AnswerRecord
    ) -> tuple[FeedbackResponse, FieldSample]:
        east, north = offset_enu(
            answer.latitude,
            answer.longitude,
            request.position.latitude,
            request.position.longitude,
        )
        d2 = mahalanobis2(answer.covariance_enu_m2, east, north)
        error = float(np.hypot(east, north))
        response = FeedbackResponse(
            request_id=request.request_id,
            model=ModelRef(answer.model, answer.version),
            source=request.source,
            error_m=round(error, 2),
            error_east_m=round(east, 2),
            error_north_m=round(north, 2),
            mahalanobis=round(math.sqrt(d2), 5) if math.isfinite(d2) else 1e300,
            ellipses=[EllipseHit(p, d2 <= chi2_radius2(p)) for p in LEVELS],
            domain_inside=answer.domain_inside,
        )
        observed = request.observed_at.timestamp() if request.observed_at else time.time()
        sample = FieldSample(
            request.request_id, d2, error, request.source, answer.domain_inside, observed
        )
        return response, sample

    @staticmethod
    def _duplicate(request: FeedbackRequest, raw: bytes) -> FeedbackResponse:
        try:
            previous = _feedback_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise Conflict(
                f"feedback for request id {request.request_id!r} was already recorded",
                field="$.request_id",
            ) from exc
        moved = offset_enu(
            previous.latitude,
            previous.longitude,
            request.position.latitude,
            request.position.longitude,
        )
        if math.hypot(*moved) > 1.0 or previous.response.source != request.source:
            raise Conflict(
                f"feedback for request id {request.request_id!r} was already recorded with "
                f"position ({previous.latitude:.6f}, {previous.longitude:.6f}) and source "
                f"{previous.response.source!r}; a request id takes one truth",
                field="$.request_id",
            )
        return msgspec.structs.replace(previous.response, duplicate=True)

    async def figures(self, model: str, version: str) -> dict[str, Any] | None:
        """Field figures of ``version`` (None without Redis; StoreUnavailable when failing)."""
        if self.store is None or not self.settings.enabled:
            return None
        self._available()
        return dict(await self._call(self.store.figures(model, version)))

    def state(self) -> dict[str, Any]:
        """For /health/ready details."""
        if not self.settings.enabled or self.client is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "breaker": "closed" if self.breaker.closed else "open",
            "last_error": self.breaker.last_error,
            "answers_not_kept": self.answers.dropped,
        }

    async def close(self) -> None:
        """Finish a pending answer write."""
        await self.answers.close()
