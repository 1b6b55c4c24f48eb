"""``python -m bench.trees --before DIR``: this tree against another checkout, interleaved.

For a refactor that must not change performance (issue 22): both servers run at once on one
private registry and Redis; k6 runs alternate between them, the order swapped every round,
so the machine's drift hits both alike. ``DIR`` is a checkout of the other commit (``git
worktree add DIR REV``); ``--before-module`` names its CLI module if it differs (``app.cli``
before issue 22, ``app.ops.cli`` after). Per round and tree: saturation (``load.js``, 16
closed-loop VUs) with the HTTP process's and the pool workers' CPU per request and, unless
``--saturation-only``, an open loop (``arrival.js``) and cache hits (``cache.js``). Prints
each round and a table of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.service import ProcessTree, k6_command, run_k6
from tests.support.k6_smoke import k6_binary
from tests.support.procs import ROOT, RedisServer, Server, bootstrap_registry


class TreeServer(Server):
    """``MODULE serve`` run from another checkout (its code first on ``PYTHONPATH``)."""

    def __init__(self, env: dict[str, str], log_path: Path, root: Path, module: str) -> None:
        """Prepare; :meth:`start` launches."""
        super().__init__(env, log_path)
        self.root, self.module = root, module
        self.env["PYTHONPATH"] = str(root)

    def start(self, wait_ready: bool = True, timeout: float = 90.0) -> TreeServer:
        """Launch from ``root`` and wait until ready."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "serve"],
            env=self.env,
            cwd=self.root,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait("/health/ready", timeout)
        return self


def k6_run(
    k6: str, folder: Path, script: str, url: str, **env: Any
) -> tuple[dict[str, Any], float]:
    """Run one k6 script against ``url``: its summary metrics and wall seconds."""
    export = folder / f"{script}.{time.monotonic_ns()}.json"
    cmd = k6_command(k6, script, url, export, **env)
    _, _, wall = run_k6(cmd)
    return json.loads(export.read_text())["metrics"], wall


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="checkout of the other commit")
    parser.add_argument("--before-module", default="app.ops.cli")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--saturation-only", action="store_true")
    args = parser.parse_args(argv)
    k6 = k6_binary()
    if k6 is None:
        raise SystemExit("bench: no k6 binary")
    folder = Path(tempfile.mkdtemp(prefix="heimdall-trees-"))
    env = bootstrap_registry(folder)
    redis = RedisServer()
    redis.start()
    env["REDIS_URL"] = redis.url
    servers = {
        "before": TreeServer(env, folder / "before.log", args.before.resolve(), args.before_module),
        "after": TreeServer(env, folder / "after.log", ROOT, "app.ops.cli"),
    }
    figures: dict[str, dict[str, list[float]]] = {side: {} for side in servers}
    try:
        for server in servers.values():
            server.start()
        for r in range(args.rounds):
            for side in ("before", "after") if r % 2 == 0 else ("after", "before"):
                server, got = servers[side], figures[side]
                if server.proc is None:
                    raise RuntimeError(f"the {side} server is not running")
                tree = ProcessTree(server.proc.pid)
                before = tree.sample()
                metrics, wall = k6_run(
                    k6,
                    folder,
                    "load.js",
                    server.url,
                    VUS=16,
                    DURATION=f"{args.seconds:g}s",
                    P95_MS=100000,
                )
                cpu = ProcessTree.delta(before, tree.sample())
                n = metrics["http_reqs"]["count"]
                got.setdefault("saturation req/s", []).append(n / wall)
                got.setdefault("HTTP process CPU ms/request", []).append(
                    cpu.get("HTTP worker (app)", 0.0) * 1e3 / n
                )
                got.setdefault("pool workers CPU ms/request", []).append(
                    cpu.get("pool workers", 0.0) * 1e3 / n
                )
                if not args.saturation_only:
                    metrics, _ = k6_run(
                        k6,
                        folder,
                        "arrival.js",
                        server.url,
                        RATE=150,
                        DURATION="15s",
                        P50_MS=1000,
                        P99_MS=100000,
                    )
                    duration = metrics["http_req_duration"]
                    got.setdefault("open loop 150/s p50 ms", []).append(duration["med"])
                    got.setdefault("open loop 150/s p99 ms", []).append(duration["p(99)"])
                    metrics, _ = k6_run(
                        k6, folder, "cache.js", server.url, DURATION="10s", P50_MS=1000
                    )
                    got.setdefault("cache hit p50 ms", []).append(
                        metrics["http_req_duration"]["med"]
                    )
                print(r, side, {k: round(v[-1], 3) for k, v in got.items()}, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        redis.stop()
    print(
        f"\n| figure (median of {args.rounds} interleaved rounds) | before ({args.before}) ", end=""
    )
    print("| after (this tree) |")
    print("|---|---|---|")
    for key, values in figures["before"].items():
        after = statistics.median(figures["after"][key])
        print(f"| {key} | {statistics.median(values):.3f} | {after:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
