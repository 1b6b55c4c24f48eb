"""The inference scope: one prediction's telemetry, reachable from anywhere below it.

The serving code opens a scope once it knows which version answers a request; every
function it calls, however deep, records phases, cache lookups and the outcome through the
module functions here, without the :class:`~telemetry.instruments.Telemetry` object or the
labels being passed down::

    with inference_scope(telemetry, version=ctx.version, model=ctx.name, started=started):
        ...
        phase("queue", result.queue_s)  # deep in the call stack
        record_outcome("ok", domain_inside=answer.domain_inside)

The scope lives in a :class:`~contextvars.ContextVar`, so each asyncio task sees its own:
concurrent requests never see each other's scope, and a task created inside a scope
(``asyncio.create_task`` copies the context) starts with it but whatever scope it opens
stays its own. Outside a scope, and when telemetry is off (``inference_scope(None, ...)``),
the recording functions do nothing. The measurements are the ones ``Telemetry`` records —
same instruments, names, units and attributes (``model_version`` only); the model name
appears on spans, as before.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any

from opentelemetry import trace

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.trace import Span

    from telemetry.instruments import Telemetry

_current: ContextVar[InferenceScope | None] = ContextVar("heimdall_inference_scope", default=None)


class InferenceScope:
    """Telemetry of one prediction answered by one model version.

    A context manager: entering makes it the current scope of this context (task), leaving
    restores the one before. Its methods record whether or not it is entered.
    """

    __slots__ = ("_token", "model", "started", "telemetry", "version")

    def __init__(
        self, telemetry: Telemetry, version: str, model: str = "", started: float | None = None
    ) -> None:
        """Bind the labels; ``started`` is the request's ``time.perf_counter()`` (now if None)."""
        self.telemetry = telemetry
        self.version = version
        """The ``model_version`` attribute of every measurement."""
        self.model = model
        """The model name, put on spans as ``model.name``."""
        self.started = time.perf_counter() if started is None else started
        """When the request arrived; the ``total`` phase is measured from here."""
        self._token: Token[InferenceScope | None] | None = None

    def __enter__(self) -> InferenceScope:
        """Make this the current scope."""
        self._token = _current.set(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Restore the scope that was current before."""
        if self._token is not None:
            _current.reset(self._token)
            self._token = None

    def phase(self, name: str, seconds: float) -> None:
        """Record one phase duration (``heimdall.inference.duration{phase=name}``)."""
        self.telemetry.duration(self.version, name, seconds)

    def outcome(
        self, outcome: str, domain_inside: bool | None = None, cached: bool = False
    ) -> None:
        """Count the answer (or failure), its total duration since ``started``, its domain.

        A ``cached`` answer's duration is left out of the canary's latency figures.
        """
        telemetry, version = self.telemetry, self.version
        telemetry.request(version, outcome)
        seconds = time.perf_counter() - self.started
        telemetry.duration(version, "total", seconds)
        if not cached:
            telemetry.computed(version, seconds)
        if domain_inside is not None:
            telemetry.domain(version, domain_inside)

    def cache(self, result: str, tier: str) -> None:
        """Count one cache lookup; a sampled request also gets a span for an in-memory one."""
        telemetry = self.telemetry
        telemetry.cache(result, self.version, tier)
        if tier == "local" and self.sampled():
            attrs = {"cache.result": result, "cache.tier": tier, "model.version": self.version}
            telemetry.tracer.start_span("cache.lookup", attributes=attrs).end()

    def shadow(self, outcome: str, distance_m: float | None = None) -> None:
        """Count one shadow request (no duration) and the distance to the primary's answer."""
        self.telemetry.request(self.version, outcome)
        if distance_m is not None:
            self.telemetry.shadow_distance(self.version, distance_m)

    def sampled(self) -> bool:
        """Whether this request is traced (spans are exported and the current one records)."""
        return self.telemetry.traces and trace.get_current_span().is_recording()

    def phase_spans(
        self, phases: Iterable[tuple[str, int, int]], attributes: Mapping[str, str | int]
    ) -> None:
        """Spans for phases timed elsewhere (``(name, start_ns, end_ns)``, wall clock).

        Only for a sampled request; a phase with no end (0) is skipped. Each span carries
        ``model.name``, ``model.version`` and ``attributes``.
        """
        if not self.sampled():
            return
        attrs: dict[str, str | int] = {"model.name": self.model, "model.version": self.version}
        attrs.update(attributes)
        tracer = self.telemetry.tracer
        for name, start_ns, end_ns in phases:
            if end_ns:
                span = tracer.start_span(name, start_time=start_ns, attributes=attrs)
                span.end(end_time=max(end_ns, start_ns))

    @contextmanager
    def traced(self, name: str) -> Iterator[Span | None]:
        """A current child span around a step of a sampled request; None (no span) otherwise."""
        if not self.sampled():
            yield None
            return
        with self.telemetry.tracer.start_as_current_span(name) as span:
            yield span


class _Unrecorded:
    """The scope of a request when telemetry is off: no scope (nothing is recorded)."""

    __slots__ = ("_token",)

    def __enter__(self) -> None:
        self._token = _current.set(None)

    def __exit__(self, *exc: object) -> None:
        _current.reset(self._token)


def inference_scope(
    telemetry: Telemetry | None, *, version: str, model: str = "", started: float | None = None
) -> AbstractContextManager[InferenceScope | None]:
    """The scope of one prediction of ``version`` (use with ``with``; ``as`` gives it or None).

    Args:
        telemetry: where measurements go; None when telemetry is off (nothing is recorded).
        version: the answering model version (the ``model_version`` attribute).
        model: the model name (``model.name`` on spans).
        started: the request's arrival, ``time.perf_counter()``; now when None.
    """
    if telemetry is None:
        return _Unrecorded()
    return InferenceScope(telemetry, version, model, started)


def current_scope() -> InferenceScope | None:
    """The scope of the prediction this code runs for, if any."""
    return _current.get()


def phase(name: str, seconds: float) -> None:
    """Record one phase duration in the current scope (nothing outside one)."""
    scope = _current.get()
    if scope is not None:
        scope.phase(name, seconds)


def record_outcome(outcome: str, domain_inside: bool | None = None, cached: bool = False) -> None:
    """Count the current prediction's outcome, total duration and domain flag."""
    scope = _current.get()
    if scope is not None:
        scope.outcome(outcome, domain_inside, cached)


def record_cache(result: str, tier: str) -> None:
    """Count one cache lookup (hit, miss, error) of a tier (local, redis) in the current scope."""
    scope = _current.get()
    if scope is not None:
        scope.cache(result, tier)


def phase_spans(phases: Iterable[tuple[str, int, int]], attributes: Mapping[str, Any]) -> None:
    """Spans for phases timed elsewhere, when the current prediction is sampled."""
    scope = _current.get()
    if scope is not None:
        scope.phase_spans(phases, attributes)


@contextmanager
def traced(name: str) -> Iterator[Span | None]:
    """A current child span around a step when the current prediction is sampled, else None."""
    scope = _current.get()
    if scope is None:
        yield None
        return
    with scope.traced(name) as span:
        yield span
