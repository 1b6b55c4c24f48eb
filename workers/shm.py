"""Shared-memory arenas: IQ samples travel from the parent to a worker without the pipe.

Each worker gets one arena — a file in ``/dev/shm`` mapped by the parent (read-write) and by
the worker (read-only) — split into one slot per in-flight message. The parent copies a
message's IQ into a free slot and sends only offsets over the pipe; the slot is released when
the reply arrives (or the worker dies). The file is unlinked as soon as the worker has mapped
it, so nothing is left behind even if the parent is killed.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import uuid


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # noqa: S108


class Arena:
    """Parent side: ``slots`` slots of ``slot_bytes`` each."""

    def __init__(self, slots: int, slot_bytes: int) -> None:
        """Create and map the backing file."""
        self.slot_bytes = slot_bytes
        self.path = os.path.join(_shm_dir(), f"heimdall-{os.getpid()}-{uuid.uuid4().hex}")
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, slots * slot_bytes)
            self._map = mmap.mmap(fd, slots * slot_bytes)
        finally:
            os.close(fd)
        self._free = list(range(slots))

    def unlink(self) -> None:
        """Remove the file name (mappings stay valid)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def write(self, chunks: list[bytes]) -> tuple[int, list[int]] | None:
        """Copy ``chunks`` into a free slot: ``(slot, offsets)``, or None (no slot, too big)."""
        if not self._free or sum(len(c) for c in chunks) > self.slot_bytes:
            return None
        slot = self._free.pop()
        offset = slot * self.slot_bytes
        offsets = []
        for chunk in chunks:
            self._map[offset : offset + len(chunk)] = chunk
            offsets.append(offset)
            offset += len(chunk)
        return slot, offsets

    def release(self, slot: int) -> None:
        """Give a slot back once its message was answered."""
        self._free.append(slot)

    def close(self) -> None:
        """Unmap and unlink."""
        self.unlink()
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()


def open_view(path: str) -> mmap.mmap:
    """Worker side: map an arena read-only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
