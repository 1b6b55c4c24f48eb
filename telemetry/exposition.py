"""One ``/metrics`` for a replica of several HTTP processes.

Each HTTP process keeps its own OpenTelemetry instruments (no shared memory, no locks on the
request path). With more than one process, each also answers its own Prometheus text on a
Unix socket in Linux's abstract namespace, named after the folder the replica's processes
share and the process index (no file that a ``/tmp`` cleaner could remove, no path-length
limit from a long ``TMPDIR``, nothing stale after a crash); whichever process
receives a scrape reads its siblings' texts and answers the union, every sample labelled
``http_process="<index>"``, plus ``heimdall_http_process_up{http_process}`` (0 for a sibling
that did not answer within the deadline, so a partial scrape is visible, not silent).
Counters stay per process, as Prometheus expects: ``sum without (http_process)`` gives the
replica. Chosen over prometheus_client's multiprocess directory because the metrics are
OpenTelemetry's (views, exemplars, the in-memory reader behind ``/v1/models``), which that
mode cannot see.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

log = logging.getLogger("heimdall.telemetry")

LABEL = "http_process"


def merge(texts: dict[int, bytes | None]) -> bytes:
    """The Prometheus text of several processes as one, each sample labelled with its process.

    Args:
        texts: process index → its exposition, or None for one that did not answer.
    """
    families: dict[str, Metric] = {}
    for index, text in sorted(texts.items()):
        if text is None:
            continue
        for family in text_string_to_metric_families(text.decode()):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type, family.unit)
            )
            merged.samples.extend(
                Sample(s.name, {**s.labels, LABEL: str(index)}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            )
    up = GaugeMetricFamily(
        "heimdall_http_process_up",
        "1 when this HTTP process of the replica answered the scrape, else 0",
        labels=[LABEL],
    )
    for index, text in sorted(texts.items()):
        up.add_metric([str(index)], 0.0 if text is None else 1.0)

    class _Merged:
        def collect(self) -> Iterator[Metric]:
            yield from families.values()
            yield up

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)


class PeerExposition:
    """This process's exposition for its siblings, and the replica's union for a scrape."""

    def __init__(
        self,
        render: Callable[[], bytes],
        folder: Path,
        index: int,
        count: int,
        deadline_s: float = 2.0,
    ) -> None:
        """Prepare; :meth:`start` listens.

        Args:
            render: this process's own Prometheus text (``generate_latest(registry)``).
            folder: the folder the replica's processes share.
            index: this process's index, 0 to ``count - 1``.
            count: HTTP processes in the replica.
            deadline_s: longest wait for a sibling's text.
        """
        self.render, self.folder, self.index, self.count = render, folder, index, count
        self.deadline_s = deadline_s
        self._server: asyncio.AbstractServer | None = None

    def path(self, index: int) -> str:
        """The abstract Unix socket of process ``index`` (a leading NUL: no file)."""
        digest = hashlib.blake2b(str(self.folder.resolve()).encode(), digest_size=8).hexdigest()
        return f"\0heimdall-metrics-{digest}-{index}"

    async def start(self) -> None:
        """Answer siblings' reads on this process's socket."""
        self._server = await asyncio.start_unix_server(self._answer, path=self.path(self.index))

    async def stop(self) -> None:
        """Stop answering and remove the socket."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def _answer(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.render())
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the reader gave up (its deadline); it reports this process as down
        finally:
            writer.close()

    async def _read(self, index: int) -> bytes | None:
        try:
            async with asyncio.timeout(self.deadline_s):
                reader, writer = await asyncio.open_unix_connection(self.path(index))
                try:
                    return await reader.read()
                finally:
                    writer.close()
        except (OSError, TimeoutError) as exc:
            log.warning("HTTP process %d did not answer the metrics scrape: %r", index, exc)
            return None

    async def scrape(self) -> bytes:
        """Every process's metrics (this one's rendered here, the others' read at once)."""
        others = [i for i in range(self.count) if i != self.index]
        texts: dict[int, bytes | None] = dict(
            zip(others, await asyncio.gather(*(self._read(i) for i in others)), strict=True)
        )
        texts[self.index] = self.render()
        return merge(texts)


def single(registry: Any) -> Callable[[], bytes]:
    """This process's own exposition of ``registry``."""
    return lambda: generate_latest(registry)
