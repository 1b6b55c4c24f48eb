"""One /metrics for several HTTP processes: the union, labelled, and a sibling that is down."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from telemetry.exposition import PeerExposition, merge, single


def _registry(requests: int, seconds: float) -> CollectorRegistry:
    registry = CollectorRegistry()
    Counter("probe_requests", "requests", ["outcome"], registry=registry).labels("ok").inc(requests)
    Histogram("probe_seconds", "latency", registry=registry, buckets=(0.1, 1.0)).observe(seconds)
    return registry


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


def test_the_union_labels_every_sample_with_its_process_and_keeps_types() -> None:
    texts = {0: generate_latest(_registry(3, 0.05)), 1: generate_latest(_registry(5, 0.5))}
    merged = merge(texts)
    samples = _samples(merged)
    ok = (("http_process", "0"), ("outcome", "ok"))
    assert samples[("probe_requests_total", ok)] == 3
    assert samples[("probe_requests_total", (("http_process", "1"), ("outcome", "ok")))] == 5
    assert samples[("probe_seconds_bucket", (("http_process", "0"), ("le", "0.1")))] == 1
    assert samples[("probe_seconds_bucket", (("http_process", "1"), ("le", "0.1")))] == 0
    assert merged.count(b"# TYPE probe_requests_total counter") == 1
    assert merged.count(b"# TYPE probe_seconds histogram") == 1
    assert samples[("heimdall_http_process_up", (("http_process", "1"),))] == 1


def test_a_process_that_does_not_answer_is_reported_down() -> None:
    merged = merge({0: generate_latest(_registry(3, 0.05)), 1: None})
    samples = _samples(merged)
    assert samples[("heimdall_http_process_up", (("http_process", "0"),))] == 1
    assert samples[("heimdall_http_process_up", (("http_process", "1"),))] == 0
    down = [name for name, labels in samples if ("http_process", "1") in labels]
    assert down == ["heimdall_http_process_up"]


def test_siblings_answer_over_their_sockets_and_a_stopped_one_counts_as_down(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[bytes, bytes]:
        peers = [
            PeerExposition(single(_registry(n + 1, 0.05)), tmp_path, n, 3, deadline_s=1.0)
            for n in range(3)
        ]
        for peer in peers:
            await peer.start()
        everyone = await peers[0].scrape()
        await peers[2].stop()
        without = await peers[1].scrape()
        for peer in peers[:2]:
            await peer.stop()
        return everyone, without

    everyone, without = asyncio.run(scenario())
    totals = {
        dict(labels)["http_process"]: value
        for (name, labels), value in _samples(everyone).items()
        if name == "probe_requests_total"
    }
    assert totals == {"0": 1, "1": 2, "2": 3}
    up = _samples(without)
    assert up[("heimdall_http_process_up", (("http_process", "2"),))] == 0
    assert up[("heimdall_http_process_up", (("http_process", "0"),))] == 1
    assert not list(tmp_path.iterdir())  # abstract sockets: nothing on disk
