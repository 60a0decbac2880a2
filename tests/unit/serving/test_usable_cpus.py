"""Readers default to the CPUs the process may use: affinity, cut by a cgroup quota."""

from __future__ import annotations

import os

from tgnstream.runtime.sysinfo import usable_cpus


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[int, int] | None = None):
    tmp_path.mkdir(exist_ok=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir(exist_ok=True)
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return str(tmp_path)


def test_without_a_quota_it_is_the_affinity_mask(tmp_path):
    assert usable_cpus(_cgroup(tmp_path)) == len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path, v2="max 100000")) == len(os.sched_getaffinity(0))


def test_a_v2_quota_caps_it_rounded_up(tmp_path):
    # --cpus=0.5 on a machine of any size: one reader, not one per host core.
    assert usable_cpus(_cgroup(tmp_path, v2="50000 100000")) == 1
    mask = len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path, v2="150000 100000")) == min(mask, 2)


def test_a_v1_quota_caps_it(tmp_path):
    assert usable_cpus(_cgroup(tmp_path / "a", v1=(100000, 100000))) == 1
    assert usable_cpus(_cgroup(tmp_path / "b", v1=(-1, 100000))) == len(os.sched_getaffinity(0))


def test_an_affinity_mask_narrower_than_the_host(tmp_path):
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        assert usable_cpus(_cgroup(tmp_path)) == 1
    finally:
        os.sched_setaffinity(0, before)
