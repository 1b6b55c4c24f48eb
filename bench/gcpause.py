"""``python -m bench.gcpause``: how long the garbage collector stops each serving process.

A private stack per side (this checkout, or another one given with ``--before ROOT``, run from
its own working directory as in ``bench.ab``), each process started with a ``sitecustomize``
that times every cyclic-GC run (``gc.callbacks``) and writes those of 5 ms or more to a file
per process. Under load — a 15 s k6 ``load.js`` saturation run, then ``--runs`` open-loop runs
(``arrival.js``) at ``--rate`` — it counts per process role the pauses, the full (oldest
generation) collections among them and the longest, next to each open-loop run's p99 and
maximum latency. Sides alternate for ``--rounds`` rounds. workers/gcfreeze.py says why.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from bench.__main__ import machine
from bench.ab import ROLES
from bench.service import Stack

SITECUSTOMIZE = """
import gc, os, time
_folder = os.environ["BENCH_GC_LOG"]
_start = [0.0]
def _timed(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _start[0]) * 1e3
    if ms >= 5.0:
        with open(os.path.join(_folder, f"gc.{os.getpid()}"), "a") as out:
            out.write(f"{time.time():.3f} {info['generation']} {ms:.2f}\\n")
gc.callbacks.append(_timed)
"""


def _pauses(folder: Path, since: float) -> dict[int, list[tuple[int, float]]]:
    found: dict[int, list[tuple[int, float]]] = {}
    for path in folder.glob("gc.*"):
        rows = [line.split() for line in path.read_text().splitlines()]
        found[int(path.suffix[1:])] = [
            (int(gen), float(ms)) for when, gen, ms in rows if float(when) >= since
        ]
    return found


def _side(root: str | None, runs: int, rate: int, seconds: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="heimdall-gc-") as tmp:
        folder = Path(tmp)
        (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env = {"PYTHONPATH": tmp, "BENCH_GC_LOG": tmp}
        if root:
            env["BENCH_SERVER_ROOT"] = root
        with Stack(env) as stack:
            roles = {pid: role for pid, (role, _) in stack.tree.sample().items()}
            since = time.time()
            sat = stack.k6("load.js", VUS=16, DURATION="15s", P95_MS=100000)
            lat = []
            for _ in range(runs):
                run = stack.k6("arrival.js", RATE=rate, DURATION=f"{seconds}s", P99_MS=100000)
                lat.append(
                    f"{run.value('http_req_duration', 'p(99)'):.1f}"
                    f"/{run.value('http_req_duration', 'max'):.0f}"
                )
            time.sleep(1)
            pauses = _pauses(folder, since)
    side = root or "this checkout"
    rows = []
    for role in ROLES:
        mine = [p for pid, found in pauses.items() if roles.get(pid) == role for p in found]
        full = [ms for gen, ms in mine if gen == 2]
        rows.append(
            f"| {side} | {role} | {sat.value('http_reqs', 'rate'):.0f} | {' '.join(lat)} | "
            f"{len(mine)} | {len(full)} | {max((ms for _, ms in mine), default=0.0):.1f} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run the sides and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", help="another checkout to compare (BENCH_SERVER_ROOT)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="open-loop runs per side and round")
    parser.add_argument("--rate", type=int, default=340, help="open-loop requests/s")
    parser.add_argument("--seconds", type=int, default=20, help="length of each open-loop run")
    args = parser.parse_args(argv)
    facts = machine()
    sides: list[str | None] = [None] if args.before is None else [args.before, None]
    rows = []
    for i in range(args.rounds):
        for root in sides if i % 2 == 0 else sides[::-1]:
            rows += _side(root, args.runs, args.rate, args.seconds)
            done = root or "this checkout"
            print(f"bench.gcpause: round {i + 1} of {args.rounds}, {done} done", flush=True)
    before = f"--before {args.before} " if args.before else ""
    print(
        f"\nCommand: `python -m bench.gcpause {before}--rounds {args.rounds} --runs {args.runs} "
        f"--rate {args.rate} --seconds {args.seconds}` ({facts['date']}, {facts['CPU']}, "
        "load average at start "
        f"{facts['load average (1/5/15 min) at start']})\n"
    )
    print(
        "| side | process | saturation req/s | open-loop runs: p99 / max ms | GC pauses >= 5 ms "
        "| of them full collections | longest pause ms |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
