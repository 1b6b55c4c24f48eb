"""Which HTTP process of its replica this one is (``HEIMDALL_HTTP_PROCESSES`` > 1).

``serve`` runs ``HEIMDALL_HTTP_PROCESSES`` Granian workers on one port. Before each loads the
app it sets :data:`INDEX_ENV` (0, 1, ...), and once for all :data:`PEERS_ENV`, a private folder
the processes share for the metrics union (telemetry/exposition.py) and for readiness: a
process is ready only once every sibling has been ready since it started (a marker file each),
so a load balancer never sends a starting replica's traffic to a process still loading its
model. Neither variable is a setting: an operator sets only the count.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

INDEX_ENV = "HEIMDALL_HTTP_PROCESS_INDEX"
PEERS_ENV = "HEIMDALL_HTTP_PEERS_DIR"


@dataclass(frozen=True)
class HttpProcess:
    """This process's place in the replica."""

    index: int
    count: int
    peers: Path | None

    @classmethod
    def from_env(cls, count: int) -> HttpProcess:
        """From what ``serve`` set; a lone process (or one started by a test) is index 0."""
        if count <= 1:
            return cls(0, 1, None)
        index = int(os.environ.get(INDEX_ENV, "0"))
        peers = os.environ.get(PEERS_ENV)
        if not 0 <= index < count or not peers:
            raise RuntimeError(
                f"HTTP process {index} of {count} started without its peers folder; "
                "start the replica with `heimdall-inference serve`"
            )
        return cls(index, count, Path(peers))

    @property
    def shared(self) -> bool:
        """Whether the replica has other HTTP processes."""
        return self.count > 1

    def pool_share(self, workers: int) -> int:
        """Pool workers of this process: ``workers`` split as evenly as possible, at least 1."""
        return max(1, workers // self.count + (1 if self.index < workers % self.count else 0))

    def _marker(self, index: int) -> Path:
        assert self.peers is not None
        return self.peers / f"ready-{index}"

    def mark_ready(self, ready: bool) -> None:
        """Tell the siblings this process has been ready (or, at start and stop, not yet)."""
        if self.peers is None:
            return
        if ready:
            self.peers.mkdir(parents=True, exist_ok=True)  # even the folder may be removed
            self._marker(self.index).touch()
        else:
            self._marker(self.index).unlink(missing_ok=True)

    def leave(self) -> None:
        """At stop: unmark, and remove the shared folder if this process was the last in it.

        The main process removes it as well, unless it was killed.
        """
        self.mark_ready(False)
        if self.peers is not None:
            with contextlib.suppress(OSError):
                self.peers.rmdir()

    def ready_processes(self) -> list[int]:
        """Indices of the replica's processes that have been ready since they started."""
        if self.peers is None:
            return [0]
        return [i for i in range(self.count) if self._marker(i).exists()]

    def name(self, replica: str) -> str:
        """This process's name in fleet status: ``replica/p<index>`` when it has siblings."""
        return f"{replica}/p{self.index}" if self.shared else replica


LONE = HttpProcess(0, 1, None)
"""The process of a one-process replica (the default)."""
