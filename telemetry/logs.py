"""Structured logging: one JSON-lines schema for the HTTP process and the workers.

Every record carries ``ts``, ``level``, ``logger``, ``msg``, ``replica`` and ``pid``; inside a
request also ``trace_id`` and ``span_id`` (the current OpenTelemetry span, or in a worker the
trace context that came with the job message) and ``request_id`` (the HTTP process's
``X-Request-ID``). A log store can then join a slow request's lines with its trace. JSON is
the default when stderr is not a terminal (containers, systemd); a terminal gets text.

Framework-free on purpose: the HTTP layer sets :data:`request_id_var`, the workers call
:func:`job_trace` around a job, and both call :func:`configure_logging` once at start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import IO, Any, Literal

import msgspec
from opentelemetry import trace

LogFormat = Literal["json", "text", "auto"]

request_id_var: ContextVar[str | None] = ContextVar("heimdall_request_id", default=None)
"""The current HTTP request's id (``X-Request-ID``), set by the HTTP layer."""

_job_trace: ContextVar[tuple[str, str] | None] = ContextVar("heimdall_job_trace", default=None)
_request_trace: ContextVar[list[str] | None] = ContextVar("heimdall_request_trace", default=None)

_encoder = msgspec.json.Encoder()

# Attributes every LogRecord has: anything else passed with ``extra=`` is a field of its own.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "trace_id",
    "span_id",
    "request_id",
    "replica",
}


def current_trace() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` in hex of the current span or job, None outside any trace."""
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")
    return _job_trace.get()


def trace_token() -> str:
    """The current trace and request id for a job message: ``TRACEID-SPANID-REQUESTID``.

    Either part may be empty (an unsampled request has no trace; work outside a request has
    no id); '' when both are. Trace and span ids are hex, so the request id is everything
    after the second ``-``.
    """
    current = current_trace()
    request_id = request_id_var.get() or ""
    if current is None and not request_id:
        return ""
    trace_id, span_id = current or ("", "")
    return f"{trace_id}-{span_id}-{request_id}"


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[list[str]]:
    """Mark a request: its log lines carry ``request_id``; yields where its trace is noted.

    The server span starts inside this block and ends before it does; :func:`note_trace`,
    called under the span, leaves ``[trace_id, span_id]`` in the yielded list so the access
    line written after the span can still name the trace.
    """
    holder: list[str] = []
    reset_id = request_id_var.set(request_id)
    reset_trace = _request_trace.set(holder)
    try:
        yield holder
    finally:
        _request_trace.reset(reset_trace)
        request_id_var.reset(reset_id)


def note_trace() -> None:
    """Remember the current span's ids for the enclosing :func:`request_scope`."""
    holder = _request_trace.get()
    current = current_trace()
    if holder is not None and current is not None:
        holder[:] = current


@contextlib.contextmanager
def job_trace(token: str) -> Iterator[None]:
    """Log lines inside the block carry the trace and request id of ``token``.

    ``token`` comes from :func:`trace_token` in the HTTP process, with the job.
    """
    trace_id, span_id, request_id = [*token.split("-", 2), "", ""][:3]
    reset = _job_trace.set((trace_id, span_id) if trace_id and span_id else None)
    reset_id = request_id_var.set(request_id) if request_id else None  # else: keep the current
    try:
        yield
    finally:
        if reset_id is not None:
            request_id_var.reset(reset_id)
        _job_trace.reset(reset)


class ContextFilter(logging.Filter):
    """Adds ``replica``, ``trace_id``, ``span_id`` and ``request_id`` to every record."""

    def __init__(self, replica: str) -> None:
        """Remember the replica name written on every line."""
        super().__init__()
        self.replica = replica

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate the record (never drops it)."""
        if getattr(record, "trace_id", None) is None:
            current = current_trace()
            record.trace_id, record.span_id = current if current else (None, None)
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        record.replica = self.replica
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (the schema in the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record``; ``extra=`` fields are kept, exceptions go into ``exc``."""
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "replica": getattr(record, "replica", ""),
            "pid": record.process,
        }
        for key in ("trace_id", "span_id", "request_id"):
            value = getattr(record, key, None)
            if value:
                line[key] = value
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _encoder.encode(line).decode()


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, with the trace id when there is one."""

    def __init__(self) -> None:
        """The text layout."""
        super().__init__("%(asctime)s %(levelname)s %(replica)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` and append request and trace ids."""
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        trace_id = getattr(record, "trace_id", None)
        if request_id:
            text += f" request_id={request_id}"
        if trace_id:
            text += f" trace_id={trace_id}"
        return text


def resolve_format(fmt: LogFormat, stream: IO[str] | None = None) -> Literal["json", "text"]:
    """``auto`` means text on a terminal, JSON otherwise."""
    if fmt != "auto":
        return fmt
    stream = stream or sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def configure_logging(
    level: str, fmt: LogFormat, replica: str, stream: IO[str] | None = None
) -> Literal["json", "text"]:
    """Route the root logger to ``stream`` (stderr) in ``fmt``; returns the format chosen.

    Replaces handlers a previous call (or ``logging.basicConfig``) installed on the root
    logger, so the server and the workers write one schema.
    """
    chosen = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(ContextFilter(replica or f"{os.uname().nodename}:{os.getpid()}"))
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # MLflow installs a text handler on its "mlflow" logger when it is imported (lazily, after
    # this): ask it not to, and undo it if it already happened, so its lines join the schema.
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    mlflow_logger = logging.getLogger("mlflow")
    for old in list(mlflow_logger.handlers):
        mlflow_logger.removeHandler(old)
    mlflow_logger.propagate = True
    return chosen


def granian_log_config(fmt: LogFormat, replica: str = "") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for Granian's own loggers in this module's schema.

    Granian logs its start, listen, worker and stop lines through ``_granian`` (and requests
    through ``granian.access``) with a handler of its own; passed as Granian's
    ``log_dictconfig``, this routes them to stderr through the same filter and formatter as
    every other line, so a log store parses one schema from the first line to the last.
    """
    formatter = "JsonFormatter" if resolve_format(fmt) == "json" else "TextFormatter"
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "heimdall",
        "filters": ["context"],
        "stream": "ext://sys.stderr",
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "context": {
                "()": f"{__name__}.ContextFilter",
                "replica": replica or f"{os.uname().nodename}:{os.getpid()}",
            }
        },
        "formatters": {"heimdall": {"()": f"{__name__}.{formatter}"}},
        "handlers": {"heimdall": handler},
        "loggers": {
            "_granian": {"handlers": ["heimdall"], "level": "INFO", "propagate": False},
            "granian.access": {"handlers": ["heimdall"], "level": "INFO", "propagate": False},
        },
    }
