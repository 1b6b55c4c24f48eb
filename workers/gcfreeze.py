"""Keep the objects a process builds at start out of the cyclic garbage collector's way.

A serving process imports MLflow, Litestar, OpenTelemetry, ONNX Runtime and numpy and builds
its object graph before it answers anything: hundreds of thousands of long-lived objects.
CPython's oldest-generation collection walks all of them every time it runs, and it runs
under load whenever enough new objects have survived: measured on the 2-core VM, the HTTP
process stopped for 29–53 ms per full collection (150 ms on a busy machine) and each pool
worker for 10–17 ms, and every request in flight waited (docs/benchmarks.md, "Pauses of the
garbage collector").

:func:`freeze_startup_objects` collects once and then moves every surviving object to the
permanent generation (``gc.freeze``, as Instagram's and other CPython services do), so later
collections look only at objects made while serving. It runs once per process, when the
process has built what it holds: the HTTP process when its application starts (before the
pool, the control plane or any other I/O: the collection holds the event loop for tens of ms,
and a Redis read waiting meanwhile would time out), a pool worker after its first model is
loaded. Frozen objects that become garbage are still freed by reference counting; only a
reference cycle among them would stay, and a process's start-up objects live as long as the
process does.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("heimdall.gc")

_done = False


def freeze_startup_objects(process: str) -> int:
    """Collect, then freeze what survived; once per process. Returns the objects frozen."""
    global _done
    if _done:
        return 0
    _done = True
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.debug(
        "%s: %d start-up objects frozen out of the cyclic collector in %.1f ms",
        process,
        frozen,
        (time.perf_counter() - start) * 1e3,
    )
    return frozen
