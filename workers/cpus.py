"""CPUs this process may use: its affinity mask capped by the cgroup CPU quota."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path | None = None) -> float | None:
    """CPUs the cgroup CPU quota allows this process, or None when there is no quota.

    A container limited to 2 CPUs on a 64-core node sees 64 CPUs in ``os.cpu_count()`` and
    its affinity mask; only the quota tells. Reads cgroup v2 ``cpu.max`` (``"200000 100000"``
    or ``"max 100000"``), in this process's own cgroup (from ``/proc/self/cgroup``) and then at
    the root (a container's cgroup namespace), else cgroup v1 ``cpu.cfs_quota_us`` /
    ``cpu.cfs_period_us`` (quota -1: unlimited).

    Args:
        root: where the cgroup file system is mounted.
        proc_cgroup: the ``/proc/self/cgroup`` file (tests point it elsewhere).
    """
    candidates = []
    own = _own_cgroup_v2(proc_cgroup or Path("/proc/self/cgroup"))
    if own:
        candidates.append(root / own.lstrip("/"))
    candidates.append(root)
    for directory in candidates:
        text = _read(directory / "cpu.max")
        if text is not None:
            quota, _, period = text.partition(" ")
            if quota == "max" or not period:
                return None
            return _ratio(quota, period)
    for directory in (root / "cpu", root / "cpu,cpuacct", root):
        quota_text = _read(directory / "cpu.cfs_quota_us")
        period_text = _read(directory / "cpu.cfs_period_us")
        if quota_text is not None and period_text is not None:
            return _ratio(quota_text, period_text)
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _own_cgroup_v2(proc_cgroup: Path) -> str | None:
    for line in (_read(proc_cgroup) or "").splitlines():
        if line.startswith("0::"):
            return line[3:] if line[3:] not in ("", "/") else None
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path | None = None) -> int:
    """CPUs this process may use, at least 1: its affinity mask capped by the cgroup quota.

    A quota of 1.5 CPUs counts as 2 (rounded up): the half CPU is still worth a worker.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
