"""Write the k6 payload files in ``k6/data/`` from the simulator (deterministic seeds).

``python -m bench.payloads`` writes:

- ``predict-NN.json``: distinct ``POST /v1/predict`` bodies with ``cache: false`` (load
  tests; ``batch.js`` builds its 16-item batch from these);
- ``predict-NN.msgpack``: the same bodies as MessagePack with raw IQ bytes (the API's other
  media type; ``FORMAT=msgpack`` in the k6 scripts that post predict bodies);
- ``cache-NN.json``: a few bodies with ``cache: true`` for the cache-hit test;
- ``index.json``: how many of each there are.

One body per file so that k6 VUs read them with ``open()`` without parsing. Each body is about
170-350 kB (base64 IQ of 4-7 receivers x 4096 complex64 samples), so the counts stay small to
keep the committed files to a few MB.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path
from typing import Any

import msgspec

from training.simulate import heard_batch, request_payload

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "k6" / "data"
PREDICT_SEED = 1001
CACHE_SEED = 2002


def payloads(count: int, seed: int, cache: bool, tag: str) -> list[dict[str, Any]]:
    """``count`` distinct predict bodies simulated from ``seed`` (captures the service answers:
    at least three receivers hear the transmitter well)."""
    batch = heard_batch(count, seed)
    return [
        request_payload(batch, i, cache=cache, request_id=f"{tag}-{seed}-{i}")
        for i in range(len(batch))
    ]


def as_msgpack(body: dict[str, Any]) -> bytes:
    """The MessagePack form of a JSON body: the same fields, IQ as raw bytes."""
    receivers = [{**rx, "iq": base64.b64decode(rx["iq"])} for rx in body["receivers"]]
    return msgspec.msgpack.encode({**body, "receivers": receivers})


def write(out: Path, predict: int, cache: int) -> list[Path]:
    """Write the files (replacing earlier ones); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob("*.json"), *out.glob("*.msgpack")]:
        old.unlink()
    groups = {
        "predict": payloads(predict, PREDICT_SEED, cache=False, tag="k6"),
        "cache": payloads(cache, CACHE_SEED, cache=True, tag="k6-cache"),
    }
    paths = []
    for kind, bodies in groups.items():
        for i, body in enumerate(bodies):
            path = out / f"{kind}-{i:02d}.json"
            path.write_text(json.dumps(body, separators=(",", ":")))
            paths.append(path)
            if kind == "predict":
                packed = out / f"{kind}-{i:02d}.msgpack"
                packed.write_bytes(as_msgpack(body))
                paths.append(packed)
    index = out / "index.json"
    index.write_text(json.dumps({k: len(v) for k, v in groups.items()}) + "\n")
    return [*paths, index]


def load(kind: str = "predict", folder: Path = DATA) -> list[dict[str, Any]]:
    """The committed bodies of one kind, in order."""
    count = json.loads((folder / "index.json").read_text())[kind]
    return [json.loads((folder / f"{kind}-{i:02d}.json").read_text()) for i in range(count)]


def predict_items(folder: Path = DATA) -> list[Any]:
    """The committed predict bodies as the pool's ``PredictItem``s (decoded as the API does)."""
    from workers.messages import PredictItem
    from workers.request import PredictRequest

    decoder = msgspec.json.Decoder(PredictRequest)
    items = []
    for payload in load("predict", folder):
        rx = decoder.decode(json.dumps(payload).encode()).receivers
        items.append(
            PredictItem(
                b"".join(r.iq for r in rx),
                [r.latitude for r in rx],
                [r.longitude for r in rx],
                [0.5, 0.9, 0.95],
                False,
            )
        )
    return items


def main(argv: list[str] | None = None) -> int:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA)
    parser.add_argument("--predict", type=int, default=8, help="distinct cache=false bodies")
    parser.add_argument("--cache", type=int, default=4, help="cache=true bodies")
    args = parser.parse_args(argv)
    for path in write(args.out, args.predict, args.cache):
        print(
            f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
            f"({path.stat().st_size / 1e3:.0f} kB)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
