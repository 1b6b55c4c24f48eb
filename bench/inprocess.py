"""Raw ONNX Runtime in-process: the service's per-capture work without the service.

N processes (N = the pool's worker count), each with one session built with the service's own
session options (1 intra-op thread), loop over the same captures for a fixed time:

- ``full``: ``pack_capture`` (feature extraction + local frame) + ``session.run`` with a batch
  of one, the same work a worker does per request before decoding;
- ``ort``: ``session.run`` alone on pre-packed inputs, batch of one;
- ``json`` / ``msgpack``: the design's reference for CPU efficiency (§9: "body decode +
  feature extraction + ONNX Runtime"): the committed request body decoded into
  ``PredictRequest`` (JSON with base64 IQ, or MessagePack with raw IQ), then ``full``.

Each process reports its iterations and its own CPU time (``time.process_time``).
"""

from __future__ import annotations

import base64
import multiprocessing as mp
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "training" / "reference"


@dataclass(frozen=True)
class PhaseResult:
    """Totals over all processes for one phase."""

    name: str
    processes: int
    iterations: int
    wall_s: float
    cpu_s: float

    @property
    def per_s(self) -> float:
        """Captures per second (all processes together)."""
        return self.iterations / self.wall_s

    @property
    def cpu_ms(self) -> float:
        """CPU milliseconds per capture."""
        return self.cpu_s * 1e3 / self.iterations


def _arrays(payload: dict[str, Any]) -> tuple[Any, list[float], list[float]]:
    import numpy as np

    rx = payload["receivers"]
    iq = np.stack([np.frombuffer(base64.b64decode(r["iq"]), dtype="<c8") for r in rx])
    return iq, [r["latitude"] for r in rx], [r["longitude"] for r in rx]


def _child(folder: str, seconds: float, start_at: float, out: Any) -> None:
    import msgspec
    import numpy as np
    import onnxruntime as ort

    from workers.inputs import pack_capture
    from workers.runtime import session_options
    from workers.spec import decode_spec

    spec = decode_spec((REFERENCE / "model_spec.json").read_bytes())
    session = ort.InferenceSession(
        str(REFERENCE / "model.onnx"), session_options(1), providers=["CPUExecutionProvider"]
    )
    names = {k: t.name for k, t in spec.inputs.items()}
    outputs = [spec.outputs[r].name for r in ("mean", "sigma", "rho")]
    from bench.payloads import load

    captures = [_arrays(p) for p in load("predict", Path(folder))]

    def feeds_of(packed: Any) -> dict[str, Any]:
        return {
            names["features"]: packed.features[None],
            names["receivers"]: packed.receivers[None],
            names["mask"]: packed.mask[None],
        }

    from workers.request import PredictRequest

    bodies = {
        "json": (
            msgspec.json.Decoder(PredictRequest).decode,
            [(Path(folder) / f"predict-{i:02d}.json").read_bytes() for i in range(len(captures))],
        ),
        "msgpack": (
            msgspec.msgpack.Decoder(PredictRequest).decode,
            [
                (Path(folder) / f"predict-{i:02d}.msgpack").read_bytes()
                for i in range(len(captures))
            ],
        ),
    }

    def from_body(phase: str, n: int) -> Any:
        decode, raw = bodies[phase]
        request = decode(raw[n % len(raw)])
        iq = np.stack([np.frombuffer(rx.iq, dtype="<c8") for rx in request.receivers])
        lats = [rx.latitude for rx in request.receivers]
        lons = [rx.longitude for rx in request.receivers]
        return feeds_of(pack_capture(iq, lats, lons, spec))

    prepacked = [feeds_of(pack_capture(*c, spec)) for c in captures]
    for f in prepacked:  # warm-up
        session.run(outputs, f)
    results: dict[str, tuple[int, float, float]] = {}
    while time.time() < start_at:
        time.sleep(0.001)
    for phase in PHASES:
        n, t0, c0 = 0, time.perf_counter(), time.process_time()
        end = t0 + seconds
        while time.perf_counter() < end:
            if phase == "full":
                session.run(outputs, feeds_of(pack_capture(*captures[n % len(captures)], spec)))
            elif phase == "ort":
                session.run(outputs, prepacked[n % len(prepacked)])
            else:
                session.run(outputs, from_body(phase, n))
            n += 1
        results[phase] = (n, time.perf_counter() - t0, time.process_time() - c0)
    out.put(results)


PHASES = ("full", "ort", "json", "msgpack")


def run(folder: Path, processes: int, seconds: float) -> list[PhaseResult]:
    """Run every phase (:data:`PHASES`, in order) in ``processes`` processes, ``seconds`` each."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    start_at = time.time() + 4.0  # every child has built its session by then
    procs = [
        ctx.Process(target=_child, args=(str(folder), seconds, start_at, queue))
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    reports = [queue.get(timeout=seconds * 2 + 60) for _ in procs]
    for p in procs:
        p.join(10)
    out = []
    for phase in PHASES:
        rows = [r[phase] for r in reports]
        out.append(
            PhaseResult(
                phase,
                processes,
                sum(r[0] for r in rows),
                max(r[1] for r in rows),
                sum(r[2] for r in rows),
            )
        )
    return out
