"""``python -m bench.floor``: the latency floor of this machine next to the cache-hit path.

At low load (one client, 20 ms between requests) every request pays the wake-up of the
client, the kernel's loopback and the server's event loop. This prints the p50 of a route
that does nothing (``/health/live``), of a 175 kB POST that ends in a 404, and of a cache
hit with the same body, measured the same way, so the cache-hit figure can be read against
what the machine allows.
"""

from __future__ import annotations

import json
import statistics
import time

import httpx

from bench.service import ROOT, Stack


def p50(client: httpx.Client, method: str, url: str, body: bytes | None = None) -> float:
    """Median latency in ms of 200 requests, 20 ms apart."""
    times = []
    for _ in range(200):
        start = time.perf_counter()
        client.request(
            method,
            url,
            content=body,
            headers={"content-type": "application/json"} if body else None,
        )
        times.append((time.perf_counter() - start) * 1e3)
        time.sleep(0.02)
    return statistics.median(times)


def main() -> int:
    """Print the three medians."""
    raw = (ROOT / "k6" / "data" / "cache-00.json").read_bytes()
    json.loads(raw)
    with Stack() as stack, httpx.Client() as client:
        base = stack.server.url
        client.post(
            base + "/v1/predict", content=raw, headers={"content-type": "application/json"}
        )  # prime the cache
        rows = [
            ("GET /health/live", p50(client, "GET", base + "/health/live")),
            ("POST 175 kB -> 404", p50(client, "POST", base + "/v1/nowhere", raw)),
            ("POST /v1/predict, cache hit", p50(client, "POST", base + "/v1/predict", raw)),
        ]
    print("| request (one client, 20 ms apart) | p50 ms |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
