"""``python -m bench.cores``: does a replica's throughput grow with its cores? (issue 23)

Two private stacks at once, identical but for the CPUs they may use: one pinned to one core,
one to two (the affinity is set before ``serve`` starts, so every process and thread of the
replica inherits it, and ``HEIMDALL_POOL_WORKERS=0`` sizes the pool from it: one worker, then
two). The 2-core replica runs ``--http-processes`` HTTP processes (default: one per core, each
with its share of the pool; ``1`` is the one-process replica). The load is a closed loop of
``--connections`` clients posting 32 distinct captures
(cache off) to ``/v1/predict``, from ``wrk`` (one thread, a Lua script with the requests
built once) when it is installed, else k6 ``load.js``. The client runs on a core of its own
where one is left (the 1-core stack) and shares the cores otherwise; its CPU share is
printed, since on a 2-core machine it takes from the 2-core stack (k6 needs ≈ 1 CPU ms per
300 kB request, wrk ≈ 0.1). Rounds alternate between the stacks, the order swapped every
round; the table gives medians.

From the per-process CPU per request it projects throughput for 4, 8 and 16 cores: with one
HTTP process (the default) an HTTP process can use at most one core, so throughput is
at most ``1000 / HTTP ms``; with HTTP processes added as cores are (each with its share of
pool workers) it is ``cores x 1000 / (HTTP ms + pool ms)``. The projection assumes the
per-request CPU stays what it is here (no contention, no hyper-threading effects).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.__main__ import machine
from bench.payloads import payloads
from bench.service import ProcessTree, Rounds, Stack

HTTP, POOL = "HTTP worker (app)", "pool workers"

WRK_SCRIPT = """
local folder = os.getenv("HEIMDALL_BODIES")
local requests, i = {}, 0
for n = 1, tonumber(os.getenv("HEIMDALL_BODY_COUNT")) do
  local f = assert(io.open(folder .. "/" .. n .. ".json", "rb"))
  requests[n] = wrk.format("POST", "/v1/predict", {["Content-Type"] = "application/json"},
                           f:read("*a"))
  f:close()
end
request = function()
  i = i % #requests + 1
  return requests[i]
end
"""


@dataclass
class Load:
    """One closed-loop run: requests, seconds, server CPU by role, client CPU, p50 (ms)."""

    requests: float
    seconds: float
    cpu_by_role: dict[str, float]
    client_cpu_s: float
    p50_ms: float


def _bodies(folder: Path) -> int:
    """Write 32 captures the replica answers (cache off) as 1.json, 2.json, ...; the count."""
    bodies = payloads(32, 7070, False, "cores")
    for i, body in enumerate(bodies, 1):
        (folder / f"{i}.json").write_bytes(json.dumps(body).encode())
    return len(bodies)


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


def run_wrk(
    stack: Stack, cpus: str | None, connections: int, seconds: float, folder: Path, count: int
) -> Load:
    """``wrk`` against ``stack`` (pinned to ``cpus``): the figures of the run."""
    script = folder / "bodies.lua"
    script.write_text(WRK_SCRIPT)
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script)]
    cmd.append(stack.server.url)
    if cpus is not None:
        cmd = ["taskset", "-c", cpus, *cmd]
    env = {**os.environ, "HEIMDALL_BODIES": str(folder), "HEIMDALL_BODY_COUNT": str(count)}
    before, ru0 = stack.tree.sample(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    after, ru1 = stack.tree.sample(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = done.stdout
    requests = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw answers other than 2xx:\n{out}")
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    client = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime
    return Load(requests, seconds, ProcessTree.delta(before, after), client, p50)


def run_k6(stack: Stack, cpus: str | None, connections: int, seconds: float) -> Load:
    """k6 ``load.js`` against ``stack``: the figures of the run."""
    run = stack.k6("load.js", cpus, VUS=connections, DURATION=f"{seconds:g}s", P95_MS=100000)
    return Load(
        run.value("http_reqs", "count"),
        seconds,
        run.cpu_by_role,
        run.k6_cpu_s,
        run.value("http_req_duration", "med"),
    )


def main(argv: list[str] | None = None) -> int:
    """Run the rounds, print the tables; exit 1 when 1 → 2 cores gives < 1.7 x."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--client", choices=("wrk", "k6"), default=None)
    parser.add_argument(
        "--http-processes", type=int, default=0, help="of the 2-core replica (0: one per core)"
    )
    args = parser.parse_args(argv)
    client = args.client or ("wrk" if shutil.which("wrk") else "k6")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit("bench.cores: needs at least 2 usable CPUs")
    sides = {"1 core": cpus[:1], "2 cores": cpus[:2]}
    http_processes = {"1 core": 1, "2 cores": args.http_processes or 2}
    client_cpus = {
        side: ",".join(map(str, cpus[len(mine) :])) if len(cpus) > len(mine) else None
        for side, mine in sides.items()
    }
    rounds = Rounds(
        f"python -m bench.cores --rounds {args.rounds} --seconds {args.seconds:g} "
        f"--connections {args.connections} --client {client} "
        f"--http-processes {http_processes['2 cores']}",
        list(sides),
        machine(),
    )
    with contextlib.ExitStack() as exit_stack:
        stacks: dict[str, Stack] = {}
        for side, mine in sides.items():
            os.sched_setaffinity(0, mine)  # serve and everything it starts inherit it
            try:
                env = {"HEIMDALL_HTTP_PROCESSES": str(http_processes[side])}
                stack = Stack({"HEIMDALL_POOL_WORKERS": "0", **env})
                stacks[side] = exit_stack.enter_context(stack)
            finally:
                os.sched_setaffinity(0, cpus)
        temp = tempfile.TemporaryDirectory(prefix="heimdall-cores-")
        folder = Path(exit_stack.enter_context(temp))
        count = _bodies(folder)

        def load(side: str, seconds: float) -> Load:
            if client == "wrk":
                return run_wrk(
                    stacks[side], client_cpus[side], args.connections, seconds, folder, count
                )
            return run_k6(stacks[side], client_cpus[side], args.connections, seconds)

        for side in stacks:
            load(side, 3.0)  # warm-up
        for i in range(args.rounds):
            for side in rounds.order(i):
                run = load(side, args.seconds)
                cpu = sum(run.cpu_by_role.values())
                rounds.add(side, "rps", run.requests / run.seconds)
                rounds.add(side, "cores used", cpu / run.seconds)
                rounds.add(side, "k6 cores", run.client_cpu_s / run.seconds)
                rounds.add(side, "http", run.cpu_by_role.get(HTTP, 0.0) * 1e3 / run.requests)
                rounds.add(side, "pool", run.cpu_by_role.get(POOL, 0.0) * 1e3 / run.requests)
                rounds.add(side, "total", cpu * 1e3 / run.requests)
                rounds.add(side, "p50", run.p50_ms)
                print(f"bench.cores: round {i + 1} of {args.rounds}, {side} done", flush=True)
        workers = {side: stack.pool_pids() for side, stack in stacks.items()}

    med = rounds.med
    print("\n" + rounds.header(f"medians of {args.rounds} rounds of {args.seconds:g} s"))
    print(
        f"| server CPUs | HTTP processes | pool workers | {client} on | req/s "
        f"| server cores used | {client} cores | CPU ms/request: HTTP / pool / all | p50 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for side, mine in sides.items():
        print(
            f"| {side} ({','.join(map(str, mine))}) | {http_processes[side]} | {workers[side]} "
            f"| {client_cpus[side] or 'the same cores'} | {med(side, 'rps'):.0f} "
            f"| {med(side, 'cores used'):.2f} | {med(side, 'k6 cores'):.2f} "
            f"| {med(side, 'http'):.3f} / {med(side, 'pool'):.3f} / {med(side, 'total'):.3f} "
            f"| {med(side, 'p50'):.1f} |"
        )
    ratio = med("2 cores", "rps") / med("1 core", "rps")
    print(f"\nthroughput 1 → 2 cores: {ratio:.2f} x (target ≥ 1.7 x)")
    http, total = med("2 cores", "http"), med("2 cores", "total")
    print(
        f"\nProjection from the 2-core run's CPU per request (HTTP {http:.3f} ms, all "
        f"{total:.3f} ms):\n"
    )
    print("| cores | one HTTP process (the default) | an HTTP process per core |")
    print("|---|---|---|")
    for n in (1, 2, 4, 8, 16):
        today = min(1000 / http, n * 1000 / total)
        scaled = n * 1000 / total
        print(f"| {n} | {today:.0f} req/s | {scaled:.0f} req/s |")
    return 0 if ratio >= 1.7 else 1


if __name__ == "__main__":
    raise SystemExit(main())
