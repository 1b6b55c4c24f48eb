"""The transport-agnostic inference service: validate, route, cache, dispatch, assemble.

HTTP handlers call one method here and encode what it returns: ``predict`` with the
undecoded body of one capture set (a pool worker decodes it, issue 23), ``predict_batch``
with decoded items (``/v1``), ``infer`` for ready-made tensors (``/v2``).
Everything between — checks against the served model's capture contract (contract.py),
version routing (versions.py), the prediction cache, dispatch to the worker pool, shadow
traffic, per-version counters and spans, answer assembly (answers.py) — happens below HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta, Struct

from app.serving.answer_log import AnswerLog
from app.serving.answers import build_response, job_timing, positions_distance_m, problem_from
from app.serving.cache import PredictionCache, input_digest
from app.serving.contract import Prepared, validate
from app.serving.schemas import ModelRef, PredictResponse, Problem, Timing
from app.serving.tensors import TensorBatch, tensor_outputs
from app.serving.versions import VersionContext, VersionTable
from telemetry.logs import request_id_var
from telemetry.scope import (
    inference_scope,
    phase,
    phase_spans,
    record_cache,
    record_outcome,
    traced,
)
from workers.errors import MalformedRequest, ServiceError, from_code
from workers.messages import ItemError, Prediction, PredictItem
from workers.pool import JobResult, PredictResult, WorkerPool
from workers.request import Head, PredictRequest, decode_head

if TYPE_CHECKING:
    from telemetry.instruments import Telemetry

log = logging.getLogger("heimdall.service")


class ServiceSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """Request handling settings (prefix ``HEIMDALL_``)."""

    request_timeout_s: Annotated[float, Meta(gt=0, le=600)] = 10.0
    """Deadline of a request from arrival; queued past it → 504 without computing."""


class InferenceService(VersionTable):
    """Serves predictions from the routed model versions through the worker pool.

    Its version table (app/serving/versions.py) says what is resident and how requests are
    routed; the rollout switches it with :meth:`install` and :meth:`retire`. Once a request
    is routed, its telemetry goes through an inference scope (telemetry/scope.py): the steps
    below record phases, cache lookups and the outcome without being handed the instruments.
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
        request_id, ctx = self.route(request.request_id, request.sticky)
        return validate(request, request_id, ctx, prefix)

    def version_ready(self, version: str) -> bool:
        """Whether ``version`` is served by at least one ready worker."""
        return version in self.pool.ready_versions()

    # ------------------------------------------------------------------ prediction

    async def predict(self, body: bytes, encoding: int) -> PredictResponse:
        """Localise one capture set from its undecoded body (JSON or MessagePack).

        This process decodes only the body's head (the schema with each IQ left encoded) to
        route, key the cache and log the answer; the worker that answers decodes the IQ and
        checks the captures against the version's capture contract, so a problem in them
        comes back with its field path (workers/request.py).

        Raises:
            ServiceError: invalid input (4xx), overload, deadline or readiness (5xx).
        """
        started = time.perf_counter()
        head = decode_head(body, encoding, "POST /v1/predict")
        # The HTTP request's X-Request-ID names the prediction whose body names none.
        request_id, ctx = self.route(head.request_id or request_id_var.get(), head.sticky)
        ids = [rx.id for rx in head.receivers]
        # Held from the routing choice on: a rollout that stops routing to this version while
        # the cache lookup waits on Redis must not unload it before the job is submitted.
        with (
            self.pool.holding(ctx.version),
            inference_scope(self.telemetry, version=ctx.version, model=ctx.name, started=started),
        ):
            key = self.cache_key(head, encoding, ctx)
            if key is not None and self.cache is not None:
                # The in-memory tier first. Safe without a worker: the head passed the schema
                # but the IQ, and the key covers the IQ as sent, so a hit is the answer to a
                # body a worker decoded and checked under the same version and spec.
                hit = self.cache.local_get(key)
                if hit is not None:
                    record_cache("hit", "local")
                    return self._cached(request_id, ctx, hit, started, ids)
            item = PredictItem(body, [], [], [], False, encoding=encoding)
            prepared = Prepared(ids, request_id, ctx, item)
            try:
                return await self._predict(prepared, key, started)
            except ServiceError as exc:
                # A body the schema refuses is the API's fault, not the routed version's: not
                # counted against it (canary gates compare versions' error rates), as when
                # the HTTP process decoded it. A refusal by the version's contract counts.
                if not isinstance(exc, MalformedRequest):
                    record_outcome(exc.code)
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
        record_job(result, submitted_ns)
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
        with inference_scope(self.telemetry, version=ctx.version, model=ctx.name, started=started):
            try:
                submitted_ns = time.time_ns()
                (future,) = self.pool.submit_tensors(
                    ctx.version, [batch.job(ctx.version)], self.settings.request_timeout_s
                )
                result = await future
                # Phase metrics and worker-timing spans, as for /v1 (features: the caller's, 0).
                record_job(result, submitted_ns)
                outputs = tensor_outputs(result, ctx.package.spec, batch.size)
            except ServiceError as exc:
                record_outcome(exc.code)
                raise
            record_outcome("ok")
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
        # The shadow's own scope (this task started with a copy of the primary's).
        with inference_scope(self.telemetry, version=version, model=ctx.name) as scope:
            if scope is not None:
                if isinstance(outcome, Prediction):
                    scope.shadow("ok", positions_distance_m(primary, outcome))
                else:
                    scope.shadow(outcome.code)

    def _remember(
        self, request_id: str, ctx: VersionContext, answer: Prediction, receiver_ids: list[str]
    ) -> None:
        """Keep what was answered under ``request_id`` for feedback (after the answer)."""
        if self.answers is not None:
            self.answers.record(request_id, ctx.name, ctx.version, answer, receiver_ids)

    def cache_key(self, head: Head, encoding: int, ctx: VersionContext) -> str | None:
        """Cache key of a body for ``ctx``, or None when the cache is not to be used."""
        cache = self.cache
        if cache is None or not head.cache or cache.client is None:
            return None
        digest = input_digest(
            [(rx.id, rx.latitude, rx.longitude, rx.iq) for rx in head.receivers],
            head.sample_rate_hz,
            head.confidence,
            head.geojson,
            encoding,
        )
        package = ctx.package
        return cache.key(ctx.name, ctx.version, package.info.sha256, package.spec_hash, digest)

    async def cache_lookup(
        self, prepared: Prepared, key: str, started: float
    ) -> PredictResponse | None:
        """A response from Redis, or None on a miss (counted per version)."""
        assert self.cache is not None
        ctx = prepared.context
        if not self.cache.usable:
            record_cache("error", "redis")
            return None
        with traced("cache.lookup") as span:
            hit, result = await self.cache.get(key)
            if span is not None:
                span.set_attribute("cache.result", result)
                span.set_attribute("model.version", ctx.version)
        record_cache(result, "redis")
        if hit is None:
            return None
        return self._cached(prepared.request_id, ctx, hit, started, prepared.receiver_ids)

    def _cached(
        self,
        request_id: str,
        ctx: VersionContext,
        hit: Prediction,
        started: float,
        receiver_ids: list[str],
    ) -> PredictResponse:
        """The answer built from a cached prediction (counted as a request of ``ctx``)."""
        total_ms = (time.perf_counter() - started) * 1e3
        record_outcome("ok", hit.domain_inside, cached=True)
        self._remember(request_id, ctx, hit, receiver_ids)
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
                    with self._scope(prepared, started):
                        record_outcome(exc.code)
                continue
            for offset, (index, prepared) in enumerate(members):
                with self._scope(prepared, started):
                    try:
                        out[index] = self._respond(
                            prepared, result, offset, started, prefix=f"$.items[{index}]"
                        )
                    except ServiceError as exc:
                        out[index] = problem_from(exc, prepared.request_id)
                        record_outcome(exc.code)
        return [o if o is not None else Problem("Internal error", 500, "no result") for o in out]

    def _scope(self, prepared: Prepared, started: float) -> AbstractContextManager[Any]:
        """The inference scope of one batch item (items of one batch may differ in version)."""
        ctx = prepared.context
        return inference_scope(self.telemetry, version=ctx.version, model=ctx.name, started=started)

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
        record_outcome("ok", outcome.domain_inside)
        self._remember(prepared.request_id, ctx, outcome, prepared.receiver_ids)
        return build_response(
            prepared.request_id,
            outcome,
            ModelRef(ctx.name, ctx.version),
            job_timing(result, total_ms),
        )


def record_job(result: JobResult, submitted_ns: int) -> None:
    """Queue, features and inference phases (worker-side times) of the current scope.

    Phase metrics always; for a sampled request also spans with the worker's own clock
    (``/v2`` jobs have no feature phase: 0).
    """
    t = result.timings
    phase("queue", result.queue_s)
    phase("features", (t.features_end_ns - t.features_start_ns) / 1e9)
    phase("inference", (t.inference_end_ns - t.inference_start_ns) / 1e9)
    queue_end_ns = submitted_ns + int(result.queue_s * 1e9)
    phase_spans(
        (
            ("queue", submitted_ns, queue_end_ns),
            ("features", t.features_start_ns, t.features_end_ns),
            ("inference", t.inference_start_ns, t.inference_end_ns),
        ),
        {"worker.id": result.worker_id, "batch.size": result.batch_size},
    )
