"""``python -m bench.ab --a NAME=VALUE ... --b NAME=VALUE ...``: two configurations, interleaved.

Two private stacks up at once, differing only in the environment given (defaults when a side
has none); k6 ``load.js`` saturation runs (16 closed-loop VUs, distinct bodies, cache off)
alternate between them, the order swapped every round, so the machine's drift hits both
alike. Prints the medians over the rounds: requests/s, CPU per request and minor page faults
per request for the HTTP process and the pool workers (``/proc/PID/stat``).

Example (glibc malloc thresholds, workers/malloc.py)::

    python -m bench.ab --a HEIMDALL_MALLOC_MMAP_THRESHOLD_BYTES=0 \\
        HEIMDALL_MALLOC_TRIM_THRESHOLD_BYTES=0

Two versions of the code: ``BENCH_SERVER_ROOT`` runs a side's server from another checkout
(its working directory, so its modules shadow this one's; same virtualenv)::

    git worktree add /tmp/before HEAD~1
    python -m bench.ab --a BENCH_SERVER_ROOT=/tmp/before --arrival 300

``--arrival RATE`` adds an open-loop run at RATE requests/s per side and round (p50/p99).
"""

from __future__ import annotations

import argparse

from bench.__main__ import machine
from bench.service import Rounds, Stack

ROLES = ("HTTP worker (app)", "pool workers")


def _minflt(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return 0


def _faults(stack: Stack) -> dict[int, tuple[str, int]]:
    return {pid: (role, _minflt(pid)) for pid, (role, _) in stack.tree.sample().items()}


def _env(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--a", nargs="*", default=[], help="environment of configuration A")
    parser.add_argument("--b", nargs="*", default=[], help="environment of configuration B")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--arrival",
        type=int,
        default=0,
        help="also an open loop at this rate (k6 arrival.js) each round: p50/p99 per side",
    )
    args = parser.parse_args(argv)
    envs = {"A": _env(args.a), "B": _env(args.b)}
    command = f"python -m bench.ab --rounds {args.rounds}"
    if args.arrival:
        command += f" --arrival {args.arrival}"
    rounds = Rounds(command, ("A", "B"), machine())
    for i, name, stack in rounds.run(envs, args.rounds):
        before = _faults(stack)
        run = stack.k6("load.js", VUS=16, DURATION=f"{args.seconds:g}s", P95_MS=100000)
        after = _faults(stack)
        count = run.value("http_reqs", "count")
        rounds.add(name, "rps", count / args.seconds)
        for role in ROLES:
            rounds.add(name, f"cpu {role}", run.cpu_ms_per_request(role))
            faults = sum(
                f - before.get(pid, (r, f))[1] for pid, (r, f) in after.items() if r == role
            )
            rounds.add(name, f"faults {role}", faults / count)
        if args.arrival:
            open_loop = stack.k6("arrival.js", RATE=args.arrival, DURATION=f"{args.seconds:g}s")
            for stat in ("med", "p(99)"):
                rounds.add(name, f"open {stat}", open_loop.value("http_req_duration", stat))
                rounds.add(name, f"inside {stat}", open_loop.value("server_total_ms", stat))
        print(f"bench.ab: round {i + 1} of {args.rounds}, {name} done", flush=True)

    med = rounds.med
    print("\n" + rounds.header(f"medians of {args.rounds} rounds of {args.seconds:g} s"))
    print(
        "| configuration | req/s | CPU ms/request: HTTP / pool "
        "| minor page faults per request: HTTP / pool |"
    )
    print("|---|---|---|---|")
    for name in ("A", "B"):
        label = " ".join(f"`{k}={v}`" for k, v in envs[name].items()) or "defaults"
        http, pool = ROLES
        print(
            f"| {name}: {label} | {med(name, 'rps'):.0f} "
            f"| {med(name, f'cpu {http}'):.3f} / {med(name, f'cpu {pool}'):.3f} "
            f"| {med(name, f'faults {http}'):.1f} / {med(name, f'faults {pool}'):.1f} |"
        )
    if args.arrival:
        print(f"\nOpen loop at {args.arrival} req/s (k6 `arrival.js`), medians over the rounds:\n")
        print("| configuration | p50 / p99 ms | inside the service (`timing_ms.total`) p50 / p99 |")
        print("|---|---|---|")
        for name in ("A", "B"):
            label = " ".join(f"`{k}={v}`" for k, v in envs[name].items()) or "defaults"
            print(
                f"| {name}: {label} | {med(name, 'open med'):.2f} / {med(name, 'open p(99)'):.1f} "
                f"| {med(name, 'inside med'):.2f} / {med(name, 'inside p(99)'):.1f} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
