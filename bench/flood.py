"""Flood a real server with oversized bodies; print status codes and the server's memory.

    .venv/bin/python -m bench.flood [--requests 500] [--mib 5] [--connections 10]
                                    [--url URL --pid PID]

Without ``--url`` it bootstraps a private sqlite registry and starts its own server
(``heimdall-inference serve``, 2 workers, no Redis). Memory is the resident set of the server
process tree (HTTP process + workers), sampled every 50 ms: before, peak during, and after.
Every answer must be 413 (the body limit is 4 MiB); the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from tests.support.procs import Server, bootstrap_registry


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants."""
    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


class Sampler(threading.Thread):
    """Peak RSS of a process tree while running."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            time.sleep(0.05)


def flood(url: str, pid: int, requests: int, mib: float, connections: int) -> int:
    body = b'{"receivers": "' + b"A" * int(mib * 2**20) + b'"}'
    codes: Counter[int | str] = Counter()
    before = tree_rss(pid)
    sampler = Sampler(pid)
    sampler.start()
    started = time.perf_counter()
    with httpx.Client(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=connections)
    ) as client:

        def post(_: int) -> int | str:
            try:
                return client.post(
                    "/v1/predict", content=body, headers={"content-type": "application/json"}
                ).status_code
            except httpx.HTTPError as exc:  # a server may close after answering 413 early
                return type(exc).__name__

        with ThreadPoolExecutor(connections) as pool:
            codes.update(pool.map(post, range(requests)))
    elapsed = time.perf_counter() - started
    time.sleep(1.0)
    sampler.done.set()
    sampler.join()
    after = tree_rss(pid)
    healthy = httpx.get(url + "/health/ready", timeout=10).status_code
    mib_of = lambda n: n / 2**20  # noqa: E731
    print(f"\n{requests} x {mib:g} MiB bodies over {connections} connections, {elapsed:.1f} s\n")
    print("| measure | value |\n| --- | --- |")
    print(f"| status codes | {', '.join(f'{k}: {v}' for k, v in sorted(codes.items(), key=str))} |")
    print(f"| server tree RSS before | {mib_of(before):.1f} MiB |")
    print(f"| server tree RSS peak during | {mib_of(sampler.peak):.1f} MiB |")
    print(f"| server tree RSS 1 s after | {mib_of(after):.1f} MiB |")
    print(f"| /health/ready after | {healthy} |")
    return 0 if set(codes) == {413} and healthy == 200 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--mib", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--url", help="a running server (needs --pid)")
    parser.add_argument("--pid", type=int, help="the running server's main process id")
    args = parser.parse_args()
    if args.url:
        return flood(args.url, args.pid, args.requests, args.mib, args.connections)
    with tempfile.TemporaryDirectory() as tmp:
        env = bootstrap_registry(Path(tmp))
        server = Server(
            {**env, "REDIS_URL": "", "HEIMDALL_POOL_WORKERS": "2"}, Path(tmp) / "server.log"
        ).start()
        try:
            if server.proc is None:
                raise RuntimeError("server did not start")
            return flood(server.url, server.proc.pid, args.requests, args.mib, args.connections)
        finally:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
