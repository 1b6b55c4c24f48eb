"""``python -m bench.telemetry_cost``: the HTTP process's CPU per request, telemetry on vs off.

The k6 comparison in ``python -m bench`` (f) measures throughput on a machine shared with the
load generator, where single runs differ by ±8 %. This one removes the network and the load
generator: the real app (real pool workers, the reference model, a private redis-server) is
driven through ASGI in process by eight concurrent callers, and the process's own CPU time
per request is compared with telemetry on (the defaults) and off, in interleaved runs, each
in a fresh interpreter. The pool workers' CPU does not depend on telemetry (they always
return their timings), so the difference is the whole cost of telemetry.

With ``--otlp`` the "on" runs also export traces and metrics over OTLP/HTTP to a receiver in
this process (which accepts and drops them): the cost of sampled spans and their export
(serialisation in the exporter's thread counts, it is the measured process's CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.service import ROOT, otlp_sink

CONCURRENCY = 8


async def _call(app: Any, body: bytes) -> int:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/predict",
        "raw_path": b"/v1/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 40000),
        "state": {},
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # no disconnect while the request runs
        raise AssertionError  # pragma: no cover

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _measure(telemetry: bool, requests: int, rounds: int) -> list[float]:
    from app.factory import create_app
    from app.settings import load_settings
    from bench.payloads import load
    from tests.support.procs import RedisServer, bootstrap_registry

    bodies = [json.dumps(b).encode() for b in load("predict")]
    with tempfile.TemporaryDirectory(prefix="heimdall-telemetry-cost-") as tmp:
        env = bootstrap_registry(Path(tmp))
        redis = RedisServer()
        redis.start()
        try:
            env |= {
                "REDIS_URL": redis.url,
                "HEIMDALL_POOL_WORKERS": "2",
                "HEIMDALL_CONTROL_ENABLED": "false",
                "HEIMDALL_TELEMETRY_ENABLED": str(telemetry).lower(),
            }
            app = create_app(load_settings(env))
            inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
            life = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
            lifespan = asyncio.create_task(app(life, inbox.get, outbox.put))  # type: ignore[arg-type]
            await inbox.put({"type": "lifespan.startup"})
            started = await outbox.get()
            if started["type"] != "lifespan.startup.complete":
                raise RuntimeError(f"app did not start: {started}")

            async def wave(n: int) -> None:
                async def caller(k: int) -> None:
                    for j in range(n // CONCURRENCY):
                        status = await _call(app, bodies[(k * 31 + j) % len(bodies)])
                        if status != 200:
                            raise RuntimeError(f"predict answered {status}")

                await asyncio.gather(*(caller(k) for k in range(CONCURRENCY)))

            deadline = time.monotonic() + 60
            while True:  # until the routed version is served
                try:
                    await wave(CONCURRENCY)
                    break
                except RuntimeError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            await wave(requests // 2)  # warm-up
            out = []
            for _ in range(rounds):
                t0 = time.process_time()
                await wave(requests)
                out.append((time.process_time() - t0) / requests * 1e6)
            await inbox.put({"type": "lifespan.shutdown"})
            await outbox.get()
            await lifespan
            return out
        finally:
            redis.stop()


def main(argv: list[str] | None = None) -> int:
    """Interleaved runs in fresh interpreters; print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="interleaved on/off runs")
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (median taken)")
    parser.add_argument("--otlp", action="store_true", help="on = export over OTLP/HTTP too")
    parser.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    env = dict(os.environ)
    stack = ExitStack()
    if args.otlp and not args.one:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = stack.enter_context(otlp_sink())
    if args.one:
        figures = asyncio.run(_measure(args.one == "on", args.requests, args.rounds))
        print(json.dumps(figures))
        return 0
    results: dict[str, list[float]] = {"on": [], "off": []}
    for i in range(args.pairs):
        for mode in ("on", "off") if i % 2 == 0 else ("off", "on"):
            done = subprocess.run(
                [sys.executable, "-m", "bench.telemetry_cost", "--one", mode,
                 "--requests", str(args.requests), "--rounds", str(args.rounds)],
                cwd=ROOT, env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            median = statistics.median(json.loads(done.stdout.strip().splitlines()[-1]))
            results[mode].append(median)
            print(f"telemetry {mode:>3}: {median:.0f} CPU µs per request (HTTP process)")
    on, off = statistics.median(results["on"]), statistics.median(results["off"])
    print()
    print("| telemetry | HTTP-process CPU µs per request (median of runs) | runs |")
    print("|---|---|---|")
    label = "on (OTLP export of traces and metrics)" if args.otlp else "on (defaults)"
    for mode, value in ((label, on), ("off", off)):
        runs = results["on" if mode.startswith("on") else "off"]
        print(f"| {mode} | {value:.0f} | {', '.join(f'{v:.0f}' for v in runs)} |")
    print(f"\ncost of telemetry: {on - off:.0f} µs per request in the HTTP process")
    stack.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
