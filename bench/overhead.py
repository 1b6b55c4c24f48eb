"""``python -m bench.overhead``: where the service's CPU per request goes.

1. In-process timings (CPU ms, ``time.process_time``) of the pieces of one request: JSON
   decode of a body into ``PredictRequest`` (base64 IQ), the network check (pyproj distances),
   the worker's ``LoadedModel.predict`` for one item and its parts.
2. The server's CPU per request, per process role, for three k6 ``overhead.js`` modes:
   ``live`` (framework floor), ``invalid`` (a full body decoded and rejected with 422: body
   ingestion without the pool) and ``predict`` (the whole path).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from bench.service import Stack
from tests.support.procs import REFERENCE


def cpu_ms(fn: Callable[[], Any], n: int = 300) -> float:
    """Mean CPU milliseconds of ``fn`` over ``n`` calls after one warm-up call."""
    fn()
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e3


def pieces() -> list[tuple[str, float]]:
    """CPU ms of each piece, on the first committed k6 body."""
    import msgspec
    import numpy as np

    from bench.payloads import load, predict_items
    from workers.features import extract_features
    from workers.geo import distance_m
    from workers.inputs import pack_capture
    from workers.request import PredictRequest
    from workers.runtime import LoadedModel

    body = json.dumps(load("predict")[0]).encode()
    decoder = msgspec.json.Decoder(PredictRequest)
    rx = decoder.decode(body).receivers
    item = predict_items()[0]
    model = LoadedModel(
        str(REFERENCE / "model.onnx"), (REFERENCE / "model_spec.json").read_bytes(), 1
    )
    iq = np.frombuffer(item.iq, dtype="<c8").reshape(len(rx), -1)
    mean, sigma = np.zeros(2, np.float32), np.full(2, 0.1, np.float32)
    return [
        (
            f"HTTP: JSON decode of a {len(body) / 1e3:.0f} kB body ({len(rx)} receivers)",
            cpu_ms(lambda: decoder.decode(body)),
        ),
        (
            "HTTP: network check (pyproj distance per receiver)",
            cpu_ms(
                lambda: [distance_m(r.latitude, r.longitude, r.latitude, r.longitude) for r in rx]
            ),
        ),
        ("worker: LoadedModel.predict, one item", cpu_ms(lambda: model.predict([item]))),
        (
            "worker:   pack_capture",
            cpu_ms(lambda: pack_capture(iq, item.latitudes, item.longitudes, model.spec)),
        ),
        ("worker:     extract_features", cpu_ms(lambda: extract_features(iq, model.spec.features))),
        (
            "worker:   decode (position, covariance, 3 ellipses)",
            cpu_ms(lambda: model.decode(mean, sigma, 0.1, 45.0, 7.5, item)),
        ),
    ]


def main() -> int:
    """Print both tables."""
    print("| piece (in-process) | CPU ms |\n|---|---|")
    for name, value in pieces():
        print(f"| {name} | {value:.3f} |")
    print()
    print("| k6 overhead.js mode | req/s | service CPU ms/request | by process |")
    print("|---|---|---|---|")
    with Stack() as stack:
        stack.k6("overhead.js", MODE="predict", DURATION="3s")  # warm-up
        for mode in ("live", "invalid", "predict"):
            run = stack.k6("overhead.js", MODE=mode)
            n = run.value("http_reqs", "count")
            roles = ", ".join(
                f"{r} {c * 1e3 / n:.3f}" for r, c in sorted(run.cpu_by_role.items()) if c > 0
            )
            print(
                f"| {mode} | {n / 8:.0f} | {run.cpu_s * 1e3 / n:.3f} | {roles} |"
                + ("" if run.exit_code == 0 else f" (k6 exit {run.exit_code})"),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
