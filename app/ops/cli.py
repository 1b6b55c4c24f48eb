"""``heimdall-inference``: serve, bootstrap the registry, simulate payloads, operate rollouts.

Exit codes: 0 success; 1 the operation ran and reports a failure (``status`` sees a diverged
fleet, ``canary`` rolled back, a publish was refused); 2 usage error (bad arguments or an
invalid ``HEIMDALL_*`` setting); 3 a dependency is unavailable (Redis or the MLflow registry
unreachable or failing); 4 not found (model, version or alias not in the registry). Errors are
one line on stderr, ``heimdall-inference VERB: what went wrong``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.registry.client import RegistrySettings
from app.settings import SettingsError, load_operator_settings, load_settings, settings_table
from app.web.processes import INDEX_ENV, PEERS_ENV
from workers import malloc

REFERENCE_PACKAGE = Path(__file__).resolve().parents[2] / "training" / "reference"

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
PR_SET_PDEATHSIG = 1


def cmd_serve(args: argparse.Namespace) -> int:
    """Validate settings, then run Granian with the app factory (one HTTP process)."""
    settings = load_settings()
    # Before Granian's extension loads: jemalloc reads its options at its first allocation.
    malloc.granian_decay(settings.server.http_memory_decay_ms)
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.log import LogLevels
    from granian.server.mp import MPServer

    from telemetry.logs import granian_log_config

    class HeimdallServer(MPServer):
        """Granian whose SIGHUP re-resolves model aliases instead of restarting workers."""

        def signal_handler_reload(self, *args: object, **kwargs: object) -> None:
            for worker in list(self.wrks):
                pid = getattr(worker.inner, "pid", None)
                if pid:
                    os.kill(pid, signal.SIGHUP)

        def _spawn_worker(self, idx: int, target: Any, callback_loader: Any, *rest: Any) -> Any:
            # Each HTTP process learns its index before it builds the app (a respawned one
            # keeps its predecessor's): app/web/processes.py.
            loader = functools.partial(_load_as_process, idx, os.getpid(), callback_loader)
            return super()._spawn_worker(idx, target, loader, *rest)

    bootstrap_if_missing(settings.registry)
    server = settings.server
    peers = None
    if server.http_processes > 1:
        peers = tempfile.mkdtemp(prefix="heimdall-http-")
        os.environ[PEERS_ENV] = peers
    _raise_fd_limit(server.granian_backpressure + 1024)
    # Before Granian forks the HTTP process (which spawns the pool workers): both inherit.
    malloc.tune(server.malloc_mmap_threshold_bytes, server.malloc_trim_threshold_bytes)
    try:
        HeimdallServer(
            "app.factory:create_rsgi_app_from_env"
            if server.interface == "rsgi"
            else "app.factory:create_app_from_env",
            factory=True,
            address=args.host or server.host,
            port=args.port if args.port is not None else server.port,
            interface=Interfaces.RSGI if server.interface == "rsgi" else Interfaces.ASGI,
            workers=server.http_processes,
            loop=Loops.asyncio,
            # HTTP/1.1 only: the body intake (deadlines, caps, Connection: close on refusals,
            # which HTTP/2 forbids) is built and tested for it; h2c gave clients stream errors.
            http=HTTPModes.http1,
            backpressure=server.granian_backpressure,
            http1_settings=HTTP1Settings(header_read_timeout=int(server.http_timeout_s * 1000)),
            log_level=LogLevels(server.log_level.lower()),
            log_dictconfig=granian_log_config(server.log_format, server.replica_id),
            websockets=False,
            workers_kill_timeout=int(settings.pool.drain_timeout_s) + 10,
        ).serve()
    finally:  # also when a worker's unexpected exit makes Granian exit 1
        if peers is not None:
            shutil.rmtree(peers, ignore_errors=True)  # the last HTTP process may have done it
    # Granian has stopped and joined its workers: nothing is left to clean up here. A normal
    # interpreter exit runs onnxruntime's C++ exit handlers in this process (it imports ORT
    # through the settings modules), which waited 5-10 s in containers (docs/deploy.md);
    # flush what we wrote and leave at once.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _load_as_process(index: int, main_pid: int, load: Callable[[], Any]) -> Any:
    """Granian's app loader, run in HTTP process ``index`` after it set its index."""
    _die_with_parent(main_pid)
    os.environ[INDEX_ENV] = str(index)
    return load()


def _die_with_parent(main_pid: int) -> None:
    """Linux: SIGTERM this HTTP process when Granian's main process dies, even by SIGKILL.

    Without it a killed main process left its HTTP processes serving as orphans (holding the
    port and their pools). SIGTERM is their graceful drain.
    """
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != main_pid:  # it died before prctl took effect (main may be PID 1)
        os.kill(os.getpid(), signal.SIGTERM)


def bootstrap_if_missing(settings: RegistrySettings) -> str | None:
    """Register the reference package when asked to and the embedded registry lacks the model.

    Only for a ``sqlite:`` registry (the one inside the container or the working directory)
    and an ``@alias`` reference: a remote registry is the operator's, and a pinned version
    number cannot be created on demand. Returns the version registered, or None.
    """
    if not settings.bootstrap_reference or not settings.tracking_uri.startswith("sqlite:"):
        return None
    from app.registry.authoring import register_package
    from app.registry.client import ModelRegistry, parse_ref
    from workers.errors import NotFound

    name, _, alias = parse_ref(settings.model_uri, "")
    if alias is None:
        return None
    registry = ModelRegistry(settings)
    try:
        registry.resolve(settings.model_uri)
    except NotFound:
        version = register_package(registry, REFERENCE_PACKAGE, name, alias=alias)
        print(
            f"bootstrapped the reference model as {name} version {version} (alias {alias}) in "
            f"{registry.tracking_uri}; HEIMDALL_BOOTSTRAP_REFERENCE=false turns this off",
            flush=True,
        )
        return version
    return None


def _raise_fd_limit(wanted: int) -> None:
    """Lift the soft open-files limit towards ``wanted``; warn when the hard limit is lower.

    Granian holds one descriptor per connection (idle and stalled ones included), plus the
    pool's pipes, logs and sockets.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        print(
            f"warning: open-files hard limit {hard} is below the {wanted} that "
            "HEIMDALL_GRANIAN_BACKPRESSURE needs; raise it (ulimit -Hn)",
            file=sys.stderr,
        )


def cmd_bootstrap(args: argparse.Namespace) -> int:
    """Register the reference package as ``rf-localizer`` with alias ``production``."""
    from app.registry.authoring import register_package
    from app.registry.client import ModelRegistry

    settings = load_settings()
    registry = ModelRegistry(settings.registry)
    name = args.name or settings.registry.model_name()
    version = register_package(registry, Path(args.package), name, alias=args.alias)
    print(f"registered {name} version {version} (alias {args.alias}) in {registry.tracking_uri}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    """Log a model and its spec as a new ONNX-flavor version (app/registry/authoring.py)."""
    from app.registry.authoring import register_onnx
    from app.registry.client import ModelRegistry
    from app.registry.package import MODEL_FILE, SPEC_FILE

    path = Path(args.path)
    model = path / MODEL_FILE if path.is_dir() else path
    spec = Path(args.spec) if args.spec else model.parent / SPEC_FILE
    for what, file in (("model", model), ("spec", spec)):
        if not file.is_file():
            raise ValueError(f"no {what} file at {file} (give DIR, DIR/model.onnx and --spec)")
    settings = load_operator_settings().registry
    name = args.name or settings.model_name()
    registry = ModelRegistry(settings)
    done = register_onnx(registry, model, spec, name, alias=args.alias, reuse=args.reuse)
    print(
        f"{'reused' if done.reused else 'registered'} {name} version {done.version} "
        f"(run {done.run_id}, sha256 {done.sha256[:12]}…"
        + (f", alias {args.alias}" if args.alias else "")
        + f") in {registry.tracking_uri}"
    )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    """Write simulated request payloads with their true positions.

    With ``--out DIR``: ``capture-NNNNN.json`` bodies and ``.truth.json`` files. Without it:
    JSON lines on stdout, ``{"request": BODY, "truth": {...}}`` (``jq -c .request``).
    """
    from training.simulate import iter_batches, request_payload, truth_of

    if args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    out = Path(args.out) if args.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    written = 0
    for batch in iter_batches(args.count, args.seed, chunk=min(args.count, 256)):
        for i in range(len(batch)):
            payload: dict[str, Any] = request_payload(
                batch, i, request_id=f"sim-{args.seed}-{written}"
            )
            truth = truth_of(batch, i)
            if out is None:
                sys.stdout.write(json.dumps({"request": payload, "truth": truth}) + "\n")
            else:
                (out / f"capture-{written:05d}.json").write_text(json.dumps(payload))
                (out / f"capture-{written:05d}.truth.json").write_text(json.dumps(truth))
            written += 1
    if out is not None:
        print(f"wrote {written} payloads to {out}")
    return 0


def cmd_settings(_: argparse.Namespace) -> int:
    """Print the settings table (the README's is generated from it)."""
    print(settings_table())
    return 0


def package_version() -> str:
    """The installed distribution's version (``pyproject.toml``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("heimdall-inference")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="heimdall-inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the HTTP service (Granian)")
    serve.add_argument("--host", default=None, help="address to bind (default HEIMDALL_HOST)")
    serve.add_argument(
        "--port", type=int, default=None, help="TCP port to bind (default HEIMDALL_PORT)"
    )
    serve.set_defaults(func=cmd_serve)
    boot = sub.add_parser("bootstrap", help="register the reference model in the registry")
    boot.add_argument(
        "--package",
        default=str(REFERENCE_PACKAGE),
        help="folder with model.onnx and model_spec.json (default: the reference model)",
    )
    boot.add_argument(
        "--name", default=None, help="registered model name (default: from HEIMDALL_MODEL_URI)"
    )
    boot.add_argument(
        "--alias", default="production", help="alias to point at the version (production)"
    )
    boot.set_defaults(func=cmd_bootstrap)
    reg = sub.add_parser(
        "register",
        help="log a model (DIR or model.onnx) and its spec as a new ONNX-flavor version",
    )
    reg.add_argument("path", help="folder with model.onnx (and model_spec.json), or a .onnx file")
    reg.add_argument(
        "--spec", default=None, help="model_spec.json (default: the one next to the model)"
    )
    reg.add_argument(
        "--name", default=None, help="registered model name (default: from HEIMDALL_MODEL_URI)"
    )
    reg.add_argument("--alias", default=None, help="point this alias at the new version")
    reg.add_argument(
        "--reuse",
        action="store_true",
        help="reuse a version with the same model sha256 and spec instead of a new one",
    )
    reg.set_defaults(func=cmd_register)
    sim = sub.add_parser("simulate", help="write simulated request payloads")
    sim.add_argument("--count", type=int, default=10, help="number of payloads (10)")
    sim.add_argument("--seed", type=int, default=7, help="random seed (7)")
    sim.add_argument(
        "--out",
        default=None,
        help="folder for capture-N.json and .truth.json files "
        "(default: JSON lines {request, truth} on stdout)",
    )
    sim.set_defaults(func=cmd_simulate)
    table = sub.add_parser("settings", help="print every setting as a Markdown table")
    table.set_defaults(func=cmd_settings)
    from app.ops.operate import add_operator_commands

    add_operator_commands(sub)
    from app.ops.recalibrate_command import add_recalibrate_command

    add_recalibrate_command(sub)
    return parser


def _exit_code(exc: BaseException) -> int | None:
    """The documented exit code of an expected failure, None for a bug."""
    from app.ops.publish import UsageError
    from workers.errors import ModelLoadError, NotFound, ServiceError

    if isinstance(exc, SettingsError | UsageError | ValueError):
        return EXIT_USAGE
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, ModelLoadError | ConnectionError | TimeoutError):
        return EXIT_UNAVAILABLE
    module = type(exc).__module__
    if module.startswith("redis"):
        return EXIT_UNAVAILABLE
    if module.startswith("mlflow"):
        return EXIT_UNAVAILABLE
    if isinstance(exc, ServiceError | OSError):
        return EXIT_FAILED
    return None


def _one_line(exc: BaseException) -> str:
    text = exc.detail if hasattr(exc, "detail") else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script: one line on stderr and a documented exit code."""
    args = build_parser().parse_args(argv)
    verb = f"heimdall-inference {args.command}"
    try:
        return int(args.func(args))
    except SystemExit as exc:
        if isinstance(exc.code, str):  # a refusal with its reason
            print(f"{verb}: {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        raise
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            print(f"{verb}: unexpected {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
            return EXIT_FAILED
        module = type(exc).__module__.split(".")[0]
        where = {"redis": "Redis: ", "mlflow": "MLflow registry: "}.get(module, "")
        print(f"{verb}: {where}{_one_line(exc)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
