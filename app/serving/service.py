"""The transport-agnostic inference service: validate, route, cache, dispatch, assemble.

HTTP handlers decode a body, call one method here and encode what it returns: ``predict``
and ``predict_batch`` for captures (``/v1``), ``infer`` for ready-made tensors (``/v2``).
Everything between — checks against the served model's capture contract (contract.py),
version routing (versions.py), the prediction cache, dispatch to the worker pool, shadow
traffic, per-version counters and spans, answer assembly (answers.py) — happens below HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct
from opentelemetry import trace

from app.serving.answer_log import AnswerLog
from app.serving.answers import build_response, job_timing, positions_distance_m, problem_from
from app.serving.cache import PredictionCache, input_digest
from app.serving.contract import Prepared, validate
from app.serving.schemas import ModelRef, PredictRequest, PredictResponse, Problem, Timing
from app.serving.tensors import TensorBatch, tensor_outputs
from app.serving.versions import VersionContext, VersionTable
from telemetry.instruments import Telemetry
from telemetry.logs import request_id_var
from workers.errors import ServiceError, from_code
from workers.messages import ItemError, Prediction
from workers.pool import JobResult, PredictResult, WorkerPool

log = logging.getLogger("heimdall.service")


class ServiceSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Request handling settings (prefix ``HEIMDALL_``)."""

    request_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0
    """Deadline of a request from arrival; queued past it → 504 without computing."""


class InferenceService(VersionTable):
    """Serves predictions from the routed model versions through the worker pool.

    Its version table (app/serving/versions.py) says what is resident and how requests are
    routed; the rollout switches it with :meth:`install` and :meth:`retire`.
    """

    def __init__(self, pool: WorkerPool, settings: ServiceSettings) -> None:
        """Keep collaborators; versions arrive through :meth:`install`."""
        super().__init__()
        self.pool = pool
        self.settings = settings
        self.cache: PredictionCache | None = None
        self.telemetry: Telemetry | None = None
        self.answers: AnswerLog | None = None
        """Where answers are kept for ground-truth feedback (None: not kept)."""
        self._background: set[asyncio.Task[Any]] = set()

    # ------------------------------------------------------------------ readiness

    def ready(self) -> tuple[bool, list[str], list[str]]:
        """Readiness: every routed version is served by at least one ready worker.

        Returns:
            Whether ready, the routed versions and the versions a ready worker serves.
        """
        routed = set(self.routing.weights) if self.routing else set()
        served = self.pool.ready_versions()
        ok = bool(routed) and routed <= served and not self.pool.closing
        return ok, sorted(routed), sorted(served)

    def prepare(self, request: PredictRequest, prefix: str = "$") -> Prepared:
        """Route and validate one request against the answering version's contract.

        Raises:
            NotReady: nothing is routed yet.
            InvalidInput: the captures do not fit the model (with the field path).
        """
        request_id, ctx = self.route(request)
        return validate(request, request_id, ctx, prefix)

    def version_ready(self, version: str) -> bool:
        """Whether ``version`` is served by at least one ready worker."""
        return version in self.pool.ready_versions()

    # ------------------------------------------------------------------ prediction

    async def predict(self, request: PredictRequest) -> PredictResponse:
        """Localise one capture set.

        Raises:
            ServiceError: invalid input (4xx), overload, deadline or readiness (5xx).
        """
        started = time.perf_counter()
        if request.request_id is None and (header_id := request_id_var.get()):
            # The HTTP request's X-Request-ID names the prediction whose body names none.
            request = msgspec.structs.replace(request, request_id=header_id)
        request_id, ctx = self.route(request)
        key = self.cache_key(request, ctx)
        if key is not None and self.cache is not None:
            # The in-memory tier first, before validation: only a request this process
            # validated and answered under the same version, spec and input can be there.
            hit = self.cache.local_get(key)
            if hit is not None:
                self._cache_result("hit", "local", ctx)
                return self._cached(request_id, ctx, hit, started, request)
        prepared = validate(request, request_id, ctx)
        try:
            return await self._predict(prepared, key, started)
        except ServiceError as exc:
            self.count(prepared.context.version, exc.code, started)
            raise

    async def _predict(
        self, prepared: Prepared, key: str | None, started: float
    ) -> PredictResponse:
        if key is not None:
            cached = await self.cache_lookup(prepared, key, started)
            if cached is not None:
                return cached
        submitted_ns = time.time_ns()
        (future,) = self.pool.submit(
            prepared.context.version, [[prepared.item]], self.settings.request_timeout_s
        )
        result = await future
        response = self._respond(prepared, result, 0, started)
        self.trace_job(prepared.context, result, submitted_ns)
        outcome = result.results[0]
        if isinstance(outcome, Prediction):
            if key is not None and self.cache is not None:
                self.cache.put(key, outcome)
            self._maybe_shadow(prepared, outcome)
        return response

    async def infer(
        self, ctx: VersionContext, batch: TensorBatch, started: float | None = None
    ) -> dict[str, bytes]:
        """Run ``ctx``'s model on ready-made input tensors; its raw outputs by role.

        The tensor-in counterpart of :meth:`predict` (``/v2``): same pool, deadline, counters
        and spans. ``started`` is when the caller began on the request (default: now).

        Raises:
            ServiceError: tensors the worker refused (400), overload, deadline (5xx).
        """
        started = time.perf_counter() if started is None else started
        try:
            submitted_ns = time.time_ns()
            (future,) = self.pool.submit_tensors(
                ctx.version, [batch.job(ctx.version)], self.settings.request_timeout_s
            )
            result = await future
            # Phase metrics and worker-timing spans, as for /v1 (features are the caller's: 0).
            self.trace_job(ctx, result, submitted_ns)
            outputs = tensor_outputs(result, ctx.package.spec, batch.size)
        except ServiceError as exc:
            self.count(ctx.version, exc.code, started)
            raise
        self.count(ctx.version, "ok", started)
        return outputs

    def _maybe_shadow(self, prepared: Prepared, primary: Prediction) -> None:
        """Run a sampled request on the shadow version after the answer; never fails it."""
        routing = self.routing
        if routing is None or not routing.take_shadow():
            return
        shadow = routing.shadow
        if shadow is None or shadow == prepared.context.version or shadow not in self.contexts:
            return
        task = asyncio.create_task(self._shadow(shadow, prepared, primary))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(self, version: str, prepared: Prepared, primary: Prediction) -> None:
        ctx = self.contexts.get(version)
        if ctx is None:
            return
        try:
            (future,) = self.pool.submit(
                version, [[prepared.item]], self.settings.request_timeout_s
            )
            result = await future
        except ServiceError as exc:
            log.debug("shadow request on %s skipped: %s", version, exc.detail)
            return
        outcome = result.results[0]
        if self.telemetry is not None:
            self.telemetry.request(
                version, "ok" if isinstance(outcome, Prediction) else outcome.code
            )
            if isinstance(outcome, Prediction):
                self.telemetry.shadow_distance(version, positions_distance_m(primary, outcome))

    def count(
        self, version: str, outcome: str, started: float, answer: Prediction | None = None
    ) -> None:
        """Count one answer (or failure) of ``version``, its duration and its domain flag."""
        if self.telemetry is not None:
            self.telemetry.request(version, outcome)
            self.telemetry.duration(version, "total", time.perf_counter() - started)
            if answer is not None:
                self.telemetry.domain(version, answer.domain_inside)

    def _remember(
        self, request_id: str, ctx: VersionContext, answer: Prediction, request: PredictRequest
    ) -> None:
        """Keep what was answered under ``request_id`` for feedback (after the answer)."""
        if self.answers is not None:
            self.answers.record(
                request_id, ctx.name, ctx.version, answer, [rx.id for rx in request.receivers]
            )

    def trace_job(self, ctx: VersionContext, result: JobResult, submitted_ns: int) -> None:
        """Queue, features and inference spans (worker-side times) and phase metrics.

        Also used by :meth:`infer` (``/v2``), whose jobs have no feature phase.
        """
        telemetry = self.telemetry
        if telemetry is None:
            return
        t = result.timings
        version = ctx.version
        queue_ns = int(result.queue_s * 1e9)
        telemetry.duration(version, "queue", result.queue_s)
        telemetry.duration(version, "features", (t.features_end_ns - t.features_start_ns) / 1e9)
        telemetry.duration(version, "inference", (t.inference_end_ns - t.inference_start_ns) / 1e9)
        if not telemetry.traces or not trace.get_current_span().is_recording():
            return  # not sampled: no worker-timing spans either
        attrs: dict[str, str | int] = {
            "model.name": ctx.name,
            "model.version": version,
            "worker.id": result.worker_id,
            "batch.size": result.batch_size,
        }
        tracer = telemetry.tracer
        for name, start_ns, end_ns in (
            ("queue", submitted_ns, submitted_ns + queue_ns),
            ("features", t.features_start_ns, t.features_end_ns),
            ("inference", t.inference_start_ns, t.inference_end_ns),
        ):
            if end_ns:
                span = tracer.start_span(name, start_time=start_ns, attributes=attrs)
                span.end(end_time=max(end_ns, start_ns))

    def cache_key(self, request: PredictRequest, ctx: VersionContext) -> str | None:
        """Cache key of a request for ``ctx``, or None when the cache is not to be used."""
        cache = self.cache
        if cache is None or not request.cache or cache.client is None:
            return None
        digest = input_digest(
            [(rx.id, rx.latitude, rx.longitude, rx.iq) for rx in request.receivers],
            request.sample_rate_hz,
            list(request.confidence),
            request.geojson,
        )
        return cache.key(ctx.name, ctx.version, ctx.package.spec_hash, digest)

    async def cache_lookup(
        self, prepared: Prepared, key: str, started: float
    ) -> PredictResponse | None:
        """A response from Redis, or None on a miss (counted per version)."""
        assert self.cache is not None
        ctx = prepared.context
        if not self.cache.usable:
            self._cache_result("error", "redis", ctx)
            return None
        telemetry = self.telemetry
        if telemetry is not None and telemetry.traces and trace.get_current_span().is_recording():
            with telemetry.tracer.start_as_current_span("cache.lookup") as span:
                hit, result = await self.cache.get(key)
                span.set_attribute("cache.result", result)
                span.set_attribute("model.version", ctx.version)
        else:
            hit, result = await self.cache.get(key)
        self._cache_result(result, "redis", ctx)
        if hit is None:
            return None
        return self._cached(prepared.request_id, ctx, hit, started, prepared.request)

    def _cache_result(self, result: str, tier: str, ctx: VersionContext) -> None:
        """Count one lookup; a sampled request also gets a span for an in-memory hit."""
        telemetry = self.telemetry
        if telemetry is None:
            return
        telemetry.cache(result, ctx.version, tier)
        if tier == "local" and telemetry.traces and trace.get_current_span().is_recording():
            attrs = {"cache.result": result, "cache.tier": tier, "model.version": ctx.version}
            telemetry.tracer.start_span("cache.lookup", attributes=attrs).end()

    def _cached(
        self,
        request_id: str,
        ctx: VersionContext,
        hit: Prediction,
        started: float,
        request: PredictRequest,
    ) -> PredictResponse:
        """The answer built from a cached prediction (counted as a request of ``ctx``)."""
        total_ms = (time.perf_counter() - started) * 1e3
        self.count(ctx.version, "ok", started, hit)
        self._remember(request_id, ctx, hit, request)
        return build_response(
            request_id,
            hit,
            ModelRef(ctx.name, ctx.version),
            Timing(queue=0.0, features=0.0, inference=0.0, total=round(total_ms, 3)),
            cached=True,
        )

    async def predict_batch(
        self, requests: Sequence[PredictRequest]
    ) -> list[PredictResponse | Problem]:
        """Localise many capture sets; a bad item yields a problem, the rest still answer."""
        started = time.perf_counter()
        out: list[PredictResponse | Problem | None] = [None] * len(requests)
        groups: dict[str, list[tuple[int, Prepared]]] = {}
        for index, request in enumerate(requests):
            try:
                prepared = self.prepare(request, prefix=f"$.items[{index}]")
            except ServiceError as exc:
                out[index] = problem_from(exc, request.request_id)
                continue
            groups.setdefault(prepared.context.version, []).append((index, prepared))
        chunk = self.pool.settings.max_batch
        waits: list[tuple[list[tuple[int, Prepared]], asyncio.Future[PredictResult]]] = []
        for version, members in groups.items():
            slices = [members[i : i + chunk] for i in range(0, len(members), chunk)]
            futures = self.pool.submit(
                version, [[p.item for _, p in s] for s in slices], self.settings.request_timeout_s
            )
            waits.extend(zip(slices, futures, strict=True))
        for members, future in waits:
            try:
                result = await future
            except ServiceError as exc:
                for index, prepared in members:
                    out[index] = problem_from(exc, prepared.request_id)
                    self.count(prepared.context.version, exc.code, started)
                continue
            for offset, (index, prepared) in enumerate(members):
                try:
                    out[index] = self._respond(
                        prepared, result, offset, started, prefix=f"$.items[{index}]"
                    )
                except ServiceError as exc:
                    out[index] = problem_from(exc, prepared.request_id)
                    self.count(prepared.context.version, exc.code, started)
        return [o if o is not None else Problem("Internal error", 500, "no result") for o in out]

    def _respond(
        self,
        prepared: Prepared,
        result: PredictResult,
        offset: int,
        started: float,
        prefix: str = "$",
    ) -> PredictResponse:
        ctx = prepared.context
        outcome = result.results[offset]
        total_ms = (time.perf_counter() - started) * 1e3
        if isinstance(outcome, ItemError):
            field = outcome.field.replace("$", prefix, 1) if outcome.field else None
            raise from_code(outcome.code, outcome.detail, field)
        self.count(ctx.version, "ok", started, outcome)
        self._remember(prepared.request_id, ctx, outcome, prepared.request)
        return build_response(
            prepared.request_id,
            outcome,
            ModelRef(ctx.name, ctx.version),
            job_timing(result, total_ms),
        )
