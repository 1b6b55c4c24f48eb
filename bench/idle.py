"""``python -m bench.idle``: what a pause between predictions costs the next one.

The in-process reference of ``python -m bench`` (a) runs captures back to back; a serving
worker waits for each request. This runs the worker's own ``LoadedModel.predict`` (features,
ONNX Runtime, decoding; glibc malloc tuned as in a served worker) on the committed k6
captures in one process, with a pause of 0, 0.5,
2 and 10 ms between calls, the pauses interleaved over rounds, and prints the CPU per call
(user and system, ``getrusage``) and minor page faults per call. The growth with the pause
is the price of caches and branch predictors gone cold (and of the CPU's idle states) —
something a latency-oriented service pays whenever it is not saturated.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from bench.__main__ import machine

PAUSES_MS = (0.0, 0.5, 2.0, 10.0)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200, help="calls per pause and round")
    args = parser.parse_args(argv)

    from app.settings import ServerSettings
    from bench.payloads import predict_items
    from tests.support.procs import REFERENCE
    from workers import malloc
    from workers.runtime import LoadedModel

    server = ServerSettings()  # the allocator settings a served worker runs with
    malloc.tune(server.malloc_mmap_threshold_bytes, server.malloc_trim_threshold_bytes)
    items = predict_items()
    model = LoadedModel(
        str(REFERENCE / "model.onnx"), (REFERENCE / "model_spec.json").read_bytes(), 1
    )
    facts = machine()
    rows: dict[float, list[tuple[float, float, float]]] = {p: [] for p in PAUSES_MS}
    for rnd in range(args.rounds):
        order = PAUSES_MS if rnd % 2 == 0 else tuple(reversed(PAUSES_MS))
        for pause_ms in order:
            model.predict([items[0]])
            r0 = resource.getrusage(resource.RUSAGE_SELF)
            for i in range(args.calls):
                model.predict([items[i % len(items)]])
                if pause_ms:
                    time.sleep(pause_ms / 1e3)
            r1 = resource.getrusage(resource.RUSAGE_SELF)
            n = args.calls
            rows[pause_ms].append(
                (
                    (r1.ru_utime - r0.ru_utime) / n * 1e3,
                    (r1.ru_stime - r0.ru_stime) / n * 1e3,
                    (r1.ru_minflt - r0.ru_minflt) / n,
                )
            )
    print(
        f"Command: `python -m bench.idle` ({facts['date']}, {facts['CPU']}, load average at "
        f"start {facts['load average (1/5/15 min) at start']}; medians of {args.rounds} rounds "
        f"of {args.calls} calls)\n"
    )
    print("| pause between calls | CPU ms per call (user + system) | minor faults per call |")
    print("|---|---|---|")
    base = statistics.median(u + s for u, s, _ in rows[0.0])
    for pause_ms in PAUSES_MS:
        user = statistics.median(r[0] for r in rows[pause_ms])
        system = statistics.median(r[1] for r in rows[pause_ms])
        faults = statistics.median(r[2] for r in rows[pause_ms])
        total = user + system
        print(
            f"| {pause_ms:g} ms | {total:.3f} ({user:.3f} + {system:.3f}), "
            f"{total / base:.2f} x | {faults:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
