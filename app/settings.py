"""All settings, loaded once from the environment at start-up and validated.

Each component owns a frozen msgspec struct; this module maps environment variables onto
them. Standard names win (``MLFLOW_TRACKING_URI``, ``REDIS_URL``, ``OTEL_*`` — the latter read
by the OpenTelemetry SDK itself); ours carry the ``HEIMDALL_`` prefix.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

if TYPE_CHECKING:  # imported when a section is loaded: the operator verbs need only a few
    from app.control.settings import ControlSettings
    from app.registry.client import RegistrySettings
    from app.serving.cache import CacheSettings
    from app.serving.feedback_settings import FeedbackSettings
    from app.serving.service import ServiceSettings
    from telemetry.config import TelemetrySettings
    from workers.pool import PoolSettings


class ServerSettings(Struct, frozen=True, forbid_unknown_fields=True):
    """HTTP server settings (prefix ``HEIMDALL_``)."""

    host: str = "127.0.0.1"
    """Address Granian binds to."""
    port: Annotated[int, Meta(ge=0, le=65535)] = 8000
    """TCP port Granian binds to."""
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    """Largest accepted body for single requests (413 above)."""
    max_batch_body_bytes: Annotated[int, Meta(ge=1024)] = 128 * 1024 * 1024
    """Largest accepted body for ``/v1/predict/batch``."""
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the server and its workers."""
    log_format: Literal["json", "text", "auto"] = "auto"
    """Log lines of the server and its workers: JSON lines (ts, level, logger, msg, replica,
    pid, trace_id, span_id, request_id) or text; auto: text on a terminal, else JSON."""
    access_log: bool = False
    """Log one line per HTTP request (method, path, status, duration_ms, request_id,
    trace_id) on logger ``heimdall.access``."""
    replica_id: str = ""
    """Name of this replica in fleet status and telemetry; defaults to host:port:pid."""
    http_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    """Granian's header read timeout for slow clients (the body has its own deadline)."""
    body_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    """Longest time a request body may take to arrive, from the end of its headers (408)."""
    body_grace_s: Annotated[float, Meta(ge=0, le=600)] = 5.0
    """Time a body may take before the minimum data rate applies."""
    body_min_rate_bytes_s: Annotated[int, Meta(ge=1)] = 16 * 1024
    """Average rate a body must keep up after the grace time (slower: 408, connection closed)."""
    max_concurrent_uploads: Annotated[int, Meta(ge=1)] = 2048
    """Requests receiving a body at once; one more is answered 503 + Retry-After at once."""
    max_body_bytes_in_flight: Annotated[int, Meta(ge=1024)] = 256 * 1024 * 1024
    """Bytes of request bodies one HTTP process holds at once, counted as they arrive (a
    ``/v2`` gzip body at its inflated size) until the answer is sent, so queued and computing
    requests count; a body that does not fit is answered 503 + Retry-After. At least the
    largest body limit. Bounds the memory large batches take: ≈ 3 × this above the process's
    base (docs/reliability.md)."""
    granian_backpressure: Annotated[int, Meta(ge=1)] = 4096
    """Most connections Granian serves at once (idle and stalled ones included); must exceed
    ``HEIMDALL_MAX_CONCURRENT_UPLOADS`` by 256 so health checks and small requests get in."""
    malloc_mmap_threshold_bytes: Annotated[int, Meta(ge=0, le=32 * 1024 * 1024)] = 8 * 1024 * 1024
    """glibc malloc: larger allocations use mmap (0: glibc's default); workers/malloc.py."""
    malloc_trim_threshold_bytes: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 64 * 1024 * 1024
    """glibc malloc: free heap kept per process before it is returned (0: glibc's default;
    applied only with a fixed mmap threshold)."""
    http_memory_decay_ms: Annotated[int, Meta(ge=0, le=600_000)] = 1000
    """Granian's jemalloc (one arena, a background purging thread) returns memory freed by
    closed connections after this long (0: jemalloc's defaults, which kept ≈ 50 MiB after
    2,000 stalled uploads; an operator's ``_RJEM_MALLOC_CONF`` wins)."""
    interface: Literal["rsgi", "asgi"] = "rsgi"
    """How Granian calls the app: rsgi (body in one piece, app/web/rsgi.py) or Granian's ASGI."""
    http_processes: Annotated[int, Meta(ge=1, le=64)] = 1
    """HTTP processes in this replica (Granian workers sharing the port); each gets its share
    of ``HEIMDALL_POOL_WORKERS`` (at least one), its own control subscriber and in-memory cache,
    and ``/metrics`` from any of them covers all (label ``http_process``). One process uses at
    most one core and takes about half of each request's CPU: one per core scales a replica
    (docs/benchmarks.md); each costs ≈ 200 MiB."""


# ("module:Struct", prefix, {field: standard variable name}); modules are imported on use,
# so the operator verbs do not pay for numpy, ONNX Runtime or OpenTelemetry.
SECTIONS: dict[str, tuple[str, str, dict[str, str]]] = {
    "server": ("app.settings:ServerSettings", "HEIMDALL_", {}),
    "service": ("app.serving.service:ServiceSettings", "HEIMDALL_", {}),
    "registry": (
        "app.registry.client:RegistrySettings",
        "HEIMDALL_",
        {"tracking_uri": "MLFLOW_TRACKING_URI"},
    ),
    "pool": ("workers.pool:PoolSettings", "HEIMDALL_POOL_", {}),
    "cache": ("app.serving.cache:CacheSettings", "HEIMDALL_CACHE_", {"redis_url": "REDIS_URL"}),
    "control": ("app.control.settings:ControlSettings", "HEIMDALL_CONTROL_", {}),
    "feedback": ("app.serving.feedback_settings:FeedbackSettings", "HEIMDALL_FEEDBACK_", {}),
    "telemetry": ("telemetry.config:TelemetrySettings", "HEIMDALL_TELEMETRY_", {}),
}


def section_struct(section: str) -> type[Struct]:
    """The settings struct of ``section`` (importing its module)."""
    module, _, name = SECTIONS[section][0].partition(":")
    cls: type[Struct] = getattr(importlib.import_module(module), name)
    return cls


class SettingsError(ValueError):
    """Invalid configuration; the message names the variable and what is wrong."""


@dataclass(frozen=True)
class Settings:
    """Every component's settings."""

    server: ServerSettings
    service: ServiceSettings
    registry: RegistrySettings
    pool: PoolSettings
    cache: CacheSettings
    control: ControlSettings
    feedback: FeedbackSettings
    telemetry: TelemetrySettings


RESERVED_CONNECTIONS = 256
"""Connections kept free of uploads for health checks and bodiless requests."""


def _check_combinations(settings: Settings) -> None:
    """Settings that are valid alone but not together.

    Raises:
        SettingsError: the message names the variables and the rule.
    """
    server = settings.server
    if server.http_processes > settings.pool.worker_count():
        raise SettingsError(
            f"invalid setting: HEIMDALL_HTTP_PROCESSES ({server.http_processes}) must not exceed "
            f"the pool workers ({settings.pool.worker_count()}, HEIMDALL_POOL_WORKERS): each "
            "HTTP process needs a pool worker of its own"
        )
    largest = max(server.max_body_bytes, server.max_batch_body_bytes)
    if server.max_body_bytes_in_flight < largest:
        raise SettingsError(
            "invalid setting: HEIMDALL_MAX_BODY_BYTES_IN_FLIGHT "
            f"({server.max_body_bytes_in_flight}) must be at least the largest body limit "
            f"({largest}, HEIMDALL_MAX_BODY_BYTES / HEIMDALL_MAX_BATCH_BODY_BYTES), or a body "
            "the limits accept could never be admitted"
        )
    if server.max_concurrent_uploads + RESERVED_CONNECTIONS > server.granian_backpressure:
        raise SettingsError(
            "invalid setting: HEIMDALL_GRANIAN_BACKPRESSURE "
            f"({server.granian_backpressure}) must be at least HEIMDALL_MAX_CONCURRENT_UPLOADS "
            f"({server.max_concurrent_uploads}) + {RESERVED_CONNECTIONS}, so stalled uploads "
            "cannot take the connections health checks need"
        )


def env_name(section: str, field: str) -> str:
    """Environment variable of one setting."""
    _, prefix, standard = SECTIONS[section]
    return standard.get(field, prefix + field.upper())


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Read and validate every setting from ``env`` (default: ``os.environ``).

    ``overrides`` maps section names to dicts of field values (used by tests and the CLI).

    Raises:
        SettingsError: a variable does not parse or violates its constraint.
    """
    source = os.environ if env is None else env
    parts = {section: _load_section(section, source, overrides) for section in SECTIONS}
    settings = Settings(**parts)  # type: ignore[arg-type]
    _check_combinations(settings)
    return settings


@dataclass(frozen=True)
class OperatorSettings:
    """What the operator verbs (promote, route, shadow, status) need."""

    registry: RegistrySettings
    cache: CacheSettings
    control: ControlSettings


def load_operator_settings(env: Mapping[str, str] | None = None) -> OperatorSettings:
    """Like :func:`load_settings` for the registry, cache and control sections only.

    Raises:
        SettingsError: a variable does not parse or violates its constraint.
    """
    source = os.environ if env is None else env
    parts = {section: _load_section(section, source, {}) for section in ("registry", "cache")}
    return OperatorSettings(**parts, control=_load_section("control", source, {}))  # type: ignore[arg-type]


def _load_section(section: str, source: Mapping[str, str], overrides: Mapping[str, Any]) -> Struct:
    cls = section_struct(section)
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(cls):
        name = env_name(section, field.name)
        # An empty string means "unset", except for text settings where it is a value
        # (``REDIS_URL=`` disables Redis).
        if name in source and (source[name] != "" or field.type is str):
            values[field.name] = source[name]
    values.update(overrides.get(section, {}))
    try:
        return msgspec.convert(values, cls, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        for field in msgspec.structs.fields(cls):
            message = message.replace(f"`$.{field.name}`", env_name(section, field.name))
        raise SettingsError(f"invalid setting: {message}") from exc


def _docstrings(cls: type) -> dict[str, str]:
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def settings_table() -> str:
    """Markdown table of every variable, its default and its meaning."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for section in SECTIONS:
        cls = section_struct(section)
        docs = _docstrings(cls)
        for field in msgspec.structs.fields(cls):
            default = field.default if field.default is not msgspec.NODEFAULT else ""
            shown = f"`{default}`" if default not in ("", None) else "—"
            rows.append(
                f"| `{env_name(section, field.name)}` | {shown} | {docs.get(field.name, '')} |"
            )
    return "\n".join(rows)


def all_env_names() -> set[str]:
    """Every environment variable the service reads itself."""
    return {
        env_name(section, f.name)
        for section in SECTIONS
        for f in msgspec.structs.fields(section_struct(section))
    }
