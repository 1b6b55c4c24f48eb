"""``HEIMDALL_POOL_WORKERS=0`` sizes the pool from the cgroup CPU quota, not the host's CPUs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers.pool import cgroup_cpu_limit, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _proc(tmp_path: Path, own: str = "/") -> Path:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"0::{own}\n")
    return proc


def test_cgroup_v2_quota_caps_the_pool(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("100000 100000\n")
    assert cgroup_cpu_limit(root, _proc(tmp_path)) == 1.0
    assert usable_cpus(root, _proc(tmp_path)) == 1


def test_cgroup_v2_fractional_quota_rounds_up(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(root, _proc(tmp_path)) == 1.5
    assert usable_cpus(root, _proc(tmp_path)) == min(AFFINITY, 2)


def test_cgroup_v2_own_cgroup_wins_over_the_root(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    (root / "kubepods" / "pod1").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "kubepods" / "pod1" / "cpu.max").write_text("50000 100000\n")
    assert cgroup_cpu_limit(root, _proc(tmp_path, "/kubepods/pod1")) == 0.5
    assert usable_cpus(root, _proc(tmp_path, "/kubepods/pod1")) == 1


def test_cgroup_v2_max_means_affinity(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, _proc(tmp_path)) is None
    assert usable_cpus(root, _proc(tmp_path)) == AFFINITY


@pytest.mark.parametrize(("quota", "expected"), [("200000", 2.0), ("-1", None)])
def test_cgroup_v1_cfs_quota(tmp_path: Path, quota: str, expected: float | None) -> None:
    cpu = tmp_path / "cgroup" / "cpu,cpuacct"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "cgroup", tmp_path / "missing") == expected


def test_no_cgroup_files_means_affinity(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None
    assert usable_cpus(tmp_path, tmp_path / "missing") == AFFINITY


def test_pool_settings_use_it() -> None:
    from workers.pool import PoolSettings

    assert PoolSettings(workers=0).worker_count() == usable_cpus()
    assert PoolSettings(workers=3).worker_count() == 3
