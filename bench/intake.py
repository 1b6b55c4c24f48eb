"""``python -m bench.intake``: what taking a 306 kB body costs Granian, ASGI against RSGI.

Bare applications (no framework) under Granian on a free port: each answers a short text,
after reading the whole body or without reading it, through Granian's ASGI interface (the
body arrives in ≈38 kB ``http.request`` messages) or its RSGI interface (one
``await protocol()``). k6 posts the committed ``k6/data/predict-00.json`` at a constant
rate; the server's CPU (psutil, whole process tree) per request is printed for each variant,
the variants interleaved over rounds. "read − no read" is the cost of the body intake itself.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.__main__ import machine
from bench.service import ROOT, run_k6
from tests.support.k6_smoke import k6_binary
from tests.support.procs import free_port

VARIANTS = ("asgi_read", "asgi_noread", "rsgi_read", "rsgi_noread")

K6_SCRIPT = """
import http from 'k6/http';
const body = open(__ENV.FILE, 'b');
export const options = { scenarios: { s: { executor: 'constant-arrival-rate',
  rate: Number(__ENV.RATE), timeUnit: '1s', duration: __ENV.DURATION, preAllocatedVUs: 20 } } };
export default function () {
  http.post(__ENV.URL, body, { headers: { 'content-type': 'application/json' } });
}
"""


async def asgi_read(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: read every body message, answer the byte count."""
    if scope["type"] != "http":
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(size).encode()})


async def asgi_noread(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI: answer without reading the body."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"0"})


async def rsgi_read(scope: Any, proto: Any) -> None:
    """RSGI: read the body in one call, answer the byte count."""
    body = await proto()
    proto.response_bytes(200, [], str(len(body)).encode())


async def rsgi_noread(scope: Any, proto: Any) -> None:
    """RSGI: answer without reading the body."""
    proto.response_bytes(200, [], b"0")


def measure(variant: str, script: Path, k6: str, rate: int, seconds: float) -> float:
    """Server CPU ms per request for one variant."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            variant.split("_")[0],
            "--port",
            str(port),
            "--no-ws",
            "--log-level",
            "warning",
            f"bench.intake:{variant}",
        ],
        cwd=ROOT,
    )
    try:
        time.sleep(2.0)
        root = psutil.Process(server.pid)
        tree = [root, *root.children(recursive=True)]

        def cpu() -> float:
            return sum(p.cpu_times().user + p.cpu_times().system for p in tree)

        before = cpu()
        done, _, _ = run_k6(
            [
                k6,
                "run",
                "--quiet",
                "-e",
                f"URL=http://127.0.0.1:{port}/",
                "-e",
                f"FILE={ROOT / 'k6' / 'data' / 'predict-00.json'}",
                "-e",
                f"RATE={rate}",
                "-e",
                f"DURATION={seconds:g}s",
                str(script),
            ]
        )
        used = cpu() - before
        found = re.search(r"http_reqs\.*: (\d+)", done.stdout)
        count = int(found.group(1)) if found else 0
        return used * 1e3 / count if count else float("nan")
    finally:
        server.terminate()
        server.wait(30)


def main(argv: list[str] | None = None) -> int:
    """Run the variants over the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    k6 = k6_binary()
    if k6 is None:
        raise SystemExit("bench.intake: no k6 binary")
    facts = machine()
    rows: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.js"
        script.write_text(K6_SCRIPT)
        for rnd in range(args.rounds):
            for variant in VARIANTS if rnd % 2 == 0 else tuple(reversed(VARIANTS)):
                rows[variant].append(measure(variant, script, k6, args.rate, args.seconds))
    med = {v: statistics.median(rows[v]) for v in VARIANTS}
    print(
        f"Command: `python -m bench.intake` ({facts['date']}, {facts['CPU']}, load average at "
        f"start {facts['load average (1/5/15 min) at start']}; {args.rate} req/s for "
        f"{args.seconds:g} s, medians of {args.rounds} rounds)\n"
    )
    print("| interface | read the body | answer without reading | body intake |")
    print("|---|---|---|---|")
    for name in ("asgi", "rsgi"):
        read, skip = med[f"{name}_read"], med[f"{name}_noread"]
        print(f"| {name.upper()} | {read:.3f} | {skip:.3f} | {read - skip:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
