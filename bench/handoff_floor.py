"""``python -m bench.handoff_floor``: what an HTTP process that only routes bytes costs (issue 23).

The design question of issue 23 is whether the HTTP process can get under 0.25 CPU ms per
``/v1/predict`` by handing the undecoded body to a worker. This measures the floor of that
design on this machine, next to today's server in the same run:

- ``floor``: a bare RSGI application under Granian (one HTTP process) that does exactly what
  the HTTP process would keep doing per request — read the whole body (Rust collects it),
  hash it for the cache key (``HASH``: blake2b-128 by default, or sha256), copy it into a
  shared-memory slot, send a 32-byte job to a helper process over a pipe, await its reply
  (the helper answers a 1 kB body, standing for the worker's encoded answer) and send that
  reply. It answers no prediction: it prices the plumbing, not the product.
- ``service``: ``heimdall-inference serve`` as shipped (JSON bodies decoded in the HTTP
  process), same k6 script, same bodies.

Both are driven by k6 ``load.js`` (closed loop, distinct 175-306 kB bodies); the table gives
requests per second and the HTTP process's CPU ms per request (process CPU accounting; k6 and
the helper/pool processes are reported apart).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import struct
import subprocess
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

SLOT_BYTES = 1 << 20
SLOTS = 64
REPLY = b'{"floor":true,"pad":"' + b"x" * 1000 + b'"}'


def _helper(read_fd: int, write_fd: int) -> None:
    """Stand-in worker: read 32-byte jobs, answer each with a 1 kB reply."""
    with os.fdopen(read_fd, "rb", buffering=0) as rx, os.fdopen(write_fd, "wb", buffering=0) as tx:
        header = struct.Struct("<IQ20s")
        while True:
            job = rx.read(header.size)
            if len(job) < header.size:
                return
            slot, _, _ = header.unpack(job)
            tx.write(struct.pack("<II", slot, len(REPLY)) + REPLY)


class Floor:
    """The RSGI application: read, hash, copy to shared memory, one pipe round trip, answer."""

    def __init__(self) -> None:
        """Nothing heavy before Granian's init hook."""
        self.hash_name = os.environ.get("HASH", "blake2b")
        self.pending: dict[int, asyncio.Future[bytes]] = {}
        self.free: list[int] = list(range(SLOTS))

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the helper process and the shared-memory slots."""
        self.shm = shared_memory.SharedMemory(create=True, size=SLOT_BYTES * SLOTS)
        to_helper_r, self.to_helper = os.pipe()
        self.from_helper, from_helper_w = os.pipe()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from bench.handoff_floor import _helper; _helper({to_helper_r}, {from_helper_w})",
            ],
            pass_fds=(to_helper_r, from_helper_w),
        )
        os.close(to_helper_r)
        os.close(from_helper_w)
        os.set_blocking(self.from_helper, False)
        self.buffer = b""
        loop.add_reader(self.from_helper, self._on_readable)

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        """Stop the helper."""
        loop.remove_reader(self.from_helper)
        os.close(self.to_helper)
        self.proc.wait(5)
        self.shm.close()
        self.shm.unlink()

    def _on_readable(self) -> None:
        try:
            self.buffer += os.read(self.from_helper, 1 << 16)
        except BlockingIOError:
            return
        while len(self.buffer) >= 8:
            slot, size = struct.unpack_from("<II", self.buffer)
            if len(self.buffer) < 8 + size:
                return
            reply, self.buffer = self.buffer[8 : 8 + size], self.buffer[8 + size :]
            future = self.pending.pop(slot)
            self.free.append(slot)
            future.set_result(reply)

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        """One request."""
        body = await protocol()
        if self.hash_name == "none":
            digest = b"\0" * 20
        elif self.hash_name == "sha256":
            digest = hashlib.sha256(body).digest()[:20]
        else:
            digest = hashlib.blake2b(body, digest_size=20).digest()
        slot = self.free.pop()
        start = slot * SLOT_BYTES
        self.shm.buf[start : start + len(body)] = body
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[slot] = future
        os.write(self.to_helper, struct.pack("<IQ20s", slot, len(body), digest))
        reply = await future
        protocol.response_bytes(200, [("content-type", "application/json")], reply)


app = Floor()


def _floor_run(seconds: float, vus: int, hash_name: str, fmt: str) -> dict[str, float]:
    """Serve the floor app with Granian and load it with k6; its figures."""
    import httpx
    import psutil

    from bench.service import k6_command, run_k6
    from tests.support.k6_smoke import k6_binary
    from tests.support.procs import ROOT, free_port

    port = free_port()
    env = {**os.environ, "HASH": hash_name, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "rsgi",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--no-ws",
            "--log-level",
            "warning",
            "bench.handoff_floor:app",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                httpx.post(url + "/v1/predict", content=b"{}", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        root = psutil.Process(server.pid)
        procs = [root, *root.children(recursive=True)]

        def cpu() -> dict[int, float]:
            out = {}
            for p in procs:
                try:
                    t = p.cpu_times()
                    out[p.pid] = t.user + t.system
                    out[-p.pid] = t.system
                except psutil.Error:
                    pass
            return out

        http_pid = next(
            (p.pid for p in procs if p.pid != root.pid and "_helper" not in " ".join(p.cmdline())),
            root.pid,
        )
        binary = k6_binary()
        if binary is None:
            raise SystemExit("bench: no k6 binary")
        export = Path(tempfile.mkdtemp(prefix="heimdall-floor-")) / "summary.json"
        before = cpu()
        _, k6_cpu, wall = run_k6(
            k6_command(
                binary, "load.js", url, export, VUS=vus, DURATION=f"{seconds:g}s", FORMAT=fmt
            )
        )
        after = cpu()
        import json

        count = json.loads(export.read_text())["metrics"]["http_reqs"]["count"]
        http_cpu = after.get(http_pid, 0.0) - before.get(http_pid, 0.0)
        http_sys = after.get(-http_pid, 0.0) - before.get(-http_pid, 0.0)
        total = sum(after.get(pid, 0.0) - before.get(pid, 0.0) for pid in after if pid > 0)
        return {
            "rps": count / wall,
            "http_ms": http_cpu * 1e3 / count,
            "http_sys_ms": http_sys * 1e3 / count,
            "rest_ms": (total - http_cpu) * 1e3 / count,
            "k6_ms": k6_cpu * 1e3 / count,
        }
    finally:
        server.terminate()
        server.wait(10)


def main(argv: list[str] | None = None) -> int:
    """Print the table: the floor with each hash, then today's service."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--vus", type=int, default=16)
    parser.add_argument("--floor-only", action="store_true", help="skip the shipped service")
    parser.add_argument("--format", choices=("json", "msgpack"), default="json")
    args = parser.parse_args(argv)
    from bench.service import Stack

    rows = []
    for hash_name in ("none", "blake2b", "sha256"):
        f = _floor_run(args.seconds, args.vus, hash_name, args.format)
        rows.append((f"floor: RSGI, {hash_name}, shm copy, pipe round trip", f))
    if not args.floor_only:
        with Stack() as stack:
            run = stack.k6(
                "load.js", VUS=args.vus, DURATION=f"{args.seconds:g}s", FORMAT=args.format
            )
        count = run.value("http_reqs", "count")
        http = run.cpu_by_role.get("HTTP worker (app)", 0.0)
        shipped = {
            "rps": count / run.wall_s,
            "http_ms": http * 1e3 / count,
            "http_sys_ms": float("nan"),
            "rest_ms": (run.cpu_s - http) * 1e3 / count,
            "k6_ms": run.k6_cpu_s * 1e3 / count,
        }
        rows.append(("service as shipped (this checkout)", shipped))
    print(
        f"k6 load.js ({args.format} bodies), {args.vus} closed-loop VUs, {args.seconds:g} s "
        "each, one HTTP process\n"
    )
    http_column = "HTTP process CPU ms/request (of which kernel)"
    print(f"| path | req/s | {http_column} | other server processes | k6 |")
    print("|---|---|---|---|---|")
    for name, f in rows:
        http_cpu = f"{f['http_ms']:.3f} ({f['http_sys_ms']:.3f})"
        print(f"| {name} | {f['rps']:.0f} | {http_cpu} | {f['rest_ms']:.3f} | {f['k6_ms']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
