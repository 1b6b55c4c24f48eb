"""glibc malloc thresholds for processes that churn through 100 kB–4 MB buffers.

Every prediction allocates and frees a few buffers of 0.2–0.3 MB (the request body, the
joined IQ, the feature transform's temporaries). With glibc's defaults such buffers are
served by ``mmap`` until the dynamic threshold catches up, and the top of the heap is given
back to the kernel whenever more than a small amount is free, so the next request faults the
same pages in again: ≈15 minor page faults per request in the HTTP process (measured with
``/proc/PID/stat``; ``python -m bench.ab``, docs/benchmarks.md). A fixed mmap threshold above
the largest single body and a trim threshold of tens of MB keep those pages in the process:
0.7 faults per request and ≈3 % less CPU per request in the HTTP process on this VM (a fault
costs ≈5 µs here). The price is up to ``trim_threshold`` bytes of freed heap kept per process
instead of returned to the kernel.

Only glibc has ``mallopt``; elsewhere (musl, macOS) :func:`tune` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger("heimdall.malloc")

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_ENV = {M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_", M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_"}


def tune(mmap_threshold: int, trim_threshold: int) -> dict[str, int]:
    """Set the thresholds in this process and export them to the processes it starts.

    A value of 0 leaves that parameter to glibc. A parameter the operator already set through
    its ``MALLOC_*_`` environment variable is left as the operator set it. The trim threshold
    is only applied together with a fixed mmap threshold: glibc freezes its dynamic mmap
    threshold at 128 KiB as soon as either is set, so the trim threshold alone would send
    every 0.2–0.3 MB buffer to ``mmap`` (one page fault per page it touches). Child processes
    started afterwards (Granian's forked HTTP worker, the spawned pool workers) inherit the
    settings: a fork copies the allocator's state, a spawned interpreter reads the exported
    environment variables when glibc starts.

    Returns:
        The parameters applied in this process, by environment-variable name.
    """
    if platform.libc_ver()[0] != "glibc":
        return {}
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    applied: dict[str, int] = {}
    for param, value in ((M_MMAP_THRESHOLD, mmap_threshold), (M_TRIM_THRESHOLD, trim_threshold)):
        name = _ENV[param]
        if value <= 0 or name in os.environ:
            continue
        if param == M_TRIM_THRESHOLD and _ENV[M_MMAP_THRESHOLD] not in os.environ:
            log.warning(
                "malloc trim threshold %d not applied: without a fixed mmap threshold it would"
                " freeze glibc's dynamic one at 128 KiB (every request buffer mmap'ed)",
                value,
            )
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            log.warning("mallopt(%s, %d) was refused; glibc's default stays", name, value)
            continue
        os.environ[name] = str(value)
        applied[name] = value
    return applied


def trim() -> bool:
    """Give free heap memory of every malloc arena back to the kernel (glibc ``malloc_trim``).

    For after a burst that freed much more than the trim threshold in a thread's own arena
    (glibc trims those only from their top). ctypes releases the GIL during the call, so a
    thread can run it while the event loop goes on. Returns whether memory was released;
    False where the C library is not glibc.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.malloc_trim(ctypes.c_size_t(0)))


JEMALLOC_CONF = "_RJEM_MALLOC_CONF"
"""How Granian's Rust extension (built with tikv-jemallocator) reads jemalloc options."""


def granian_decay(decay_ms: int) -> bool:
    """Have Granian's jemalloc hand freed memory back to the kernel within ``decay_ms``.

    Granian's connections live in jemalloc. With its defaults (nine arenas, per-thread
    caches, freed pages kept 10 s and purged only while the allocator is busy), a do-nothing
    Granian app went from 28 to 82 MiB with 2,000 stalled uploads and stayed at 82 MiB after
    they closed. With one arena (the HTTP process has a handful of threads) and a background
    purging thread: 28 → 42 → 42 MiB; with thread caches off as well 31 MiB, but that cost
    15 % of the throughput and was left out (``python -m bench.abuse``, ``python -m bench.ab``;
    docs/reliability.md: +3.5 % HTTP CPU per request). Must run before Granian's
    extension is imported (jemalloc reads its options once, at its first allocation); the
    forked and spawned processes inherit the variable. An operator's own
    ``_RJEM_MALLOC_CONF`` is left alone. Returns whether the option was set.
    """
    if decay_ms <= 0 or JEMALLOC_CONF in os.environ:
        return False
    os.environ[JEMALLOC_CONF] = (
        f"background_thread:true,dirty_decay_ms:{decay_ms},muzzy_decay_ms:0,narenas:1"
    )
    return True
