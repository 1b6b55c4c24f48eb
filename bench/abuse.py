"""Abuse a real server: stalled and trickled uploads, then compression bombs; print a table.

    .venv/bin/python -m bench.abuse [--connections 2000] [--window 12] [--bombs 4]

Starts its own server (``heimdall-inference serve``, 2 workers, no Redis, default settings)
on a free port of 127.0.0.1, then:

1. **Baseline**: a steady client posts predictions back to back (one connection) while a
   probe asks ``/health/live`` every 50 ms; resident memory of the server tree afterwards.
2. **Stall**: ``--connections`` connections send the headers of a 300 kB prediction and its
   first bytes; half then stall, half trickle one byte a second. During ``--window`` seconds
   (inside the body deadline of 5 s + 300 kB / 16 KiB/s = 23 s) the same steady client and
   probe run: prediction p50/p99, /health/live p99/max, non-200 answers.
3. **After**: the attacking connections close; memory 3 s later against the baseline; then a
   second round of 2 and 3 (memory that keeps growing would be a leak).
4. **Bombs**: ``--bombs`` gzip bombs (1 GiB of zeros, ≈ 1 MB on the wire) to /v2 at once
   while the probe asks ``/health/live`` every 5 ms; peak memory above the baseline against
   the 128 MiB inflate limit.
5. **Loop stall, in process**: the same bombs through ``app.web.oip.inflate.inflate`` the way
   /v2 runs it (a thread, one at a time) while a 1 ms ticker measures the longest event-loop
   stall, and the way /v2 ran it before (one ``decompress`` call on the loop) for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import httpx

from app.web.oip.inflate import inflate
from bench.flood import Sampler, tree_rss
from bench.payloads import payloads
from tests.support.procs import Server, bootstrap_registry

V2 = "/v2/models/rf-localizer/infer"


def raise_fd_limit(wanted: int) -> None:
    """Lift this process's open-files soft limit to hold the attacking sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


class Probe(threading.Thread):
    """``GET /health/live`` every ``every`` seconds on one kept-alive connection."""

    def __init__(self, url: str, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every = url, every
        self.latencies: list[float] = []
        self.failures = 0
        self.done = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while not self.done.is_set():
                started = time.perf_counter()
                try:
                    ok = client.get("/health/live").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.perf_counter() - started)
                self.failures += not ok
                time.sleep(self.every)


class Steady(threading.Thread):
    """A client posting predictions back to back on one connection."""

    def __init__(self, url: str, bodies: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.url, self.bodies = url, bodies
        self.latencies: list[float] = []
        self.failures = 0
        self.statuses: collections.Counter[int | str] = collections.Counter()
        self.done = threading.Event()

    def run(self) -> None:
        headers = {"content-type": "application/json"}
        with httpx.Client(base_url=self.url, timeout=10) as client:
            i = 0
            while not self.done.is_set():
                started = time.perf_counter()
                status: int | str
                try:
                    status = client.post(
                        "/v1/predict", content=self.bodies[i % len(self.bodies)], headers=headers
                    ).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.latencies.append(time.perf_counter() - started)
                self.statuses[status] += 1
                self.failures += status != 200
                i += 1


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(url: str, bodies: list[bytes], seconds: float) -> tuple[Steady, Probe]:
    steady, probe = Steady(url, bodies), Probe(url, 0.05)
    steady.start()
    probe.start()
    time.sleep(seconds)
    steady.done.set()
    probe.done.set()
    steady.join()
    probe.join()
    return steady, probe


def attack(port: int, count: int, length: int) -> tuple[list[socket.socket], threading.Event]:
    """Open ``count`` uploads that stall (even) or trickle a byte a second (odd)."""
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode() + b'{"receivers": ['
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(head)
        sock.setblocking(False)
        socks.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(1.0):
            for sock in socks[1::2]:
                with contextlib.suppress(OSError):
                    sock.send(b" ")

    threading.Thread(target=trickle, daemon=True).start()
    return socks, stop


def gzip_bomb(size: int) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    return b"".join(compressor.compress(chunk) for _ in range(size >> 20)) + compressor.flush()


def bombs(url: str, pid: int, count: int) -> tuple[list[int], Probe, int]:
    bomb = gzip_bomb(1 << 30)
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    statuses: list[int] = []

    def send() -> None:
        statuses.append(
            httpx.post(url + V2, content=bomb, headers=headers, timeout=120).status_code
        )

    sampler, probe = Sampler(pid), Probe(url, 0.005)
    sampler.start()
    probe.start()
    time.sleep(0.5)
    threads = [threading.Thread(target=send) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    time.sleep(0.5)
    probe.done.set()
    sampler.done.set()
    probe.join()
    sampler.join()
    return statuses, probe, sampler.peak


async def _loop_lag(work: Any) -> float:
    """Longest stall (s) of a 1 ms ticker on this event loop while ``work()`` runs."""
    loop = asyncio.get_running_loop()
    worst, running = 0.0, True

    async def tick() -> None:
        nonlocal worst
        last = loop.time()
        while running:
            await asyncio.sleep(0.001)
            now = loop.time()
            worst, last = max(worst, now - last - 0.001), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    await work()
    running = False
    await ticker
    return worst


def inflate_lag(count: int, limit: int = 128 << 20) -> tuple[float, float]:
    """Event-loop stall while ``count`` bombs inflate: the service's way, then on the loop."""
    bomb = gzip_bomb(1 << 30)
    gate = asyncio.Semaphore(1)

    async def one() -> None:
        with contextlib.suppress(Exception):
            async with gate:
                await asyncio.to_thread(inflate, bomb, "gzip", limit)

    async def threaded() -> None:
        await asyncio.gather(*(one() for _ in range(count)))

    async def on_loop() -> None:  # what /v2 did before: one decompress call on the loop
        for _ in range(count):
            zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(bomb, limit + 1)

    return asyncio.run(_loop_lag(threaded)), asyncio.run(_loop_lag(on_loop))


def repeat(measure_once: Any, times: int = 5) -> tuple[float, float]:
    """Median and max of ``times`` measurements (the shared machine preempts us at times)."""
    values = [measure_once() for _ in range(times)]
    return statistics.median(values), max(values)


def idle_lag(seconds: float = 1.5) -> float:
    """The same ticker's longest stall with nothing else running: this machine's noise floor."""
    return asyncio.run(_loop_lag(lambda: asyncio.sleep(seconds)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--window", type=float, default=12.0)
    parser.add_argument("--bombs", type=int, default=4)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args()
    raise_fd_limit(args.connections + 1024)
    # Captures the detector answers (a steady client's, not 422 no-signal refusals).
    bodies = [json.dumps(body).encode() for body in payloads(32, 5150, False, "abuse")]
    with tempfile.TemporaryDirectory() as folder:
        env = {
            **bootstrap_registry(Path(folder)),
            "REDIS_URL": "",
            "HEIMDALL_POOL_WORKERS": "2",
            **dict(a.split("=", 1) for a in args.env),
        }
        server = Server(env, Path(folder) / "server.log").start()
        try:
            if server.proc is None:
                return 1
            pid = server.proc.pid
            measure(server.url, bodies, 3.0)  # warm-up
            base_steady, base_probe = measure(server.url, bodies, args.window / 2)
            base_rss = tree_rss(pid)
            after_rounds = []
            for _ in range(2):  # the second round shows whether memory keeps growing
                started = time.perf_counter()
                socks, stop = attack(server.port, args.connections, len(bodies[0]))
                opened = time.perf_counter() - started
                time.sleep(1.0)
                during_rss = tree_rss(pid)
                steady, probe = measure(server.url, bodies, args.window)
                stop.set()
                for sock in socks:
                    sock.close()
                time.sleep(3.0)
                after_rounds.append(tree_rss(pid))
            after_rss = after_rounds[0]
            statuses, bomb_probe, bomb_peak = bombs(server.url, pid, args.bombs)
            time.sleep(2.0)
            after_bombs = tree_rss(pid)
            log = server.log_path.read_text()
        finally:
            server.stop()
    lag_idle = repeat(idle_lag)
    lags = [inflate_lag(args.bombs) for _ in range(5)]
    lag_thread = (statistics.median(t for t, _ in lags), max(t for t, _ in lags))
    lag_loop = statistics.median(loop for _, loop in lags)
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    ms = lambda s: f"{s * 1000:.1f} ms"  # noqa: E731
    n = args.connections
    rows = [
        (
            "attack",
            f"{n} uploads of 300 kB: {n // 2} stall after 15 bytes, {n // 2} trickle "
            f"1 B/s (opened in {opened:.1f} s)",
        ),
        (
            "baseline: predictions p50 / p99",
            f"{ms(quantile(base_steady.latencies, 0.5))} / "
            f"{ms(quantile(base_steady.latencies, 0.99))}",
        ),
        (
            "baseline: /health/live p99 / max",
            f"{ms(quantile(base_probe.latencies, 0.99))} / {ms(max(base_probe.latencies))}",
        ),
        (
            f"during ({args.window:g} s): predictions",
            f"{len(steady.latencies)}, {steady.failures} not 200"
            + (f" ({dict(steady.statuses)})" if steady.failures else ""),
        ),
        (
            "during: predictions p50 / p99",
            f"{ms(quantile(steady.latencies, 0.5))} / {ms(quantile(steady.latencies, 0.99))}",
        ),
        (
            "during: /health/live p99 / max",
            f"{ms(quantile(probe.latencies, 0.99))} / "
            f"{ms(max(probe.latencies))} "
            f"({len(probe.latencies)} probes, "
            f"{probe.failures} failed)",
        ),
        (
            "server tree RSS: baseline / during / 3 s after close",
            f"{mib(base_rss)} / {mib(during_rss)} / {mib(after_rss)} "
            f"({(after_rss - base_rss) / base_rss * 100:+.1f} %)",
        ),
        (
            "server tree RSS 3 s after a second attack round",
            f"{mib(after_rounds[1])} ({(after_rounds[1] - base_rss) / base_rss * 100:+.1f} % "
            f"of baseline, {(after_rounds[1] - after_rss) / after_rss * 100:+.1f} % of round 1)",
        ),
        (f"{args.bombs} gzip bombs (1 GiB of zeros each) at once", f"statuses {statuses}"),
        (
            "during bombs: /health/live p99 / max (probe every 5 ms)",
            f"{ms(quantile(bomb_probe.latencies, 0.99))} / {ms(max(bomb_probe.latencies))}",
        ),
        (
            "during bombs: peak RSS above the RSS before them (inflate limit 128 MiB)",
            f"{mib(bomb_peak - after_rounds[-1])}; 2 s after: {mib(after_bombs)}",
        ),
        ("tracebacks in the server log", str(log.count("Traceback"))),
        (
            f"in process: longest event-loop stall while {args.bombs} bombs inflate "
            "(5 runs, median and max: in a thread, one at a time / nothing running; median "
            "before: on the loop)",
            f"{ms(lag_thread[0])}, {ms(lag_thread[1])} / {ms(lag_idle[0])}, {ms(lag_idle[1])}"
            f" / {ms(lag_loop)}",
        ),
    ]
    print("| measure | value |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    ok = (
        steady.failures == 0
        and max(probe.latencies) < 0.1
        and quantile(steady.latencies, 0.99) <= 0.05
        and abs(after_rss - base_rss) <= 0.1 * base_rss
        and set(statuses) == {413}
        and "Traceback" not in log
        and lag_thread[0] <= 0.02
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
