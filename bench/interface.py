"""``python -m bench.interface``: Granian's RSGI (our front, the default) against its ASGI.

Two private stacks up at once, identical but for ``HEIMDALL_INTERFACE``; k6 runs alternate
between them (the order swapped every round) so the machine's drift hits both alike. Per
round and interface: saturation (``load.js``, 16 closed-loop VUs), an open loop at a moderate
rate (``arrival.js``) and cache hits at 20 req/s (``cache.js``). Prints one table of medians
over the rounds: throughput, latency and the HTTP process's and pool workers' CPU per request.
"""

from __future__ import annotations

import argparse

from bench.__main__ import machine
from bench.service import Rounds

HTTP = "HTTP worker (app)"
POOL = "pool workers"


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=int, default=150, help="open-loop requests per second")
    args = parser.parse_args(argv)
    dur = f"{args.seconds:g}s"
    rounds = Rounds(
        f"python -m bench.interface --rounds {args.rounds}", ("rsgi", "asgi"), machine()
    )
    add = rounds.add
    envs = {"rsgi": {}, "asgi": {"HEIMDALL_INTERFACE": "asgi"}}
    for i, name, stack in rounds.run(envs, args.rounds):
        sat = stack.k6("load.js", VUS=16, DURATION=dur, P95_MS=100000)
        add(name, "sat_rps", sat.value("http_reqs", "count") / args.seconds)
        add(name, "sat_http", sat.cpu_ms_per_request(HTTP))
        add(name, "sat_pool", sat.cpu_ms_per_request(POOL))
        half = stack.k6("arrival.js", RATE=args.rate, DURATION=dur)
        add(name, "open_p50", half.value("http_req_duration", "med"))
        add(name, "open_p99", half.value("http_req_duration", "p(99)"))
        add(name, "open_http", half.cpu_ms_per_request(HTTP))
        hits = stack.k6("cache.js", RATE=20, DURATION=dur)
        add(name, "hit_p50", hits.value("cache_hit_duration", "med"))
        print(f"bench.interface: round {i + 1} {name} done", flush=True)

    med = rounds.med
    print(rounds.header(f"medians of {args.rounds} rounds"))
    print(
        "| interface | saturation req/s | CPU ms/request at saturation: HTTP / pool "
        f"| open loop {args.rate} req/s: p50 / p99 ms | HTTP CPU ms/request there "
        "| cache hit p50 ms |"
    )
    print("|---|---|---|---|---|---|")
    for name in ("rsgi", "asgi"):
        label = "RSGI front (default)" if name == "rsgi" else "Granian ASGI"
        print(
            f"| {label} | {med(name, 'sat_rps'):.0f} "
            f"| {med(name, 'sat_http'):.3f} / {med(name, 'sat_pool'):.3f} "
            f"| {med(name, 'open_p50'):.2f} / {med(name, 'open_p99'):.1f} "
            f"| {med(name, 'open_http'):.3f} | {med(name, 'hit_p50'):.2f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
