"""Reading a container's CPU quota and memory limit from cgroup files, v1 and v2, laid out in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from forkserver.master.containers import Limits, read_limits, workers_for_cpus, workers_that_fit

MIB = 1048576


def tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def membership(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return str(path)


def test_v2_quota_and_memory_of_our_own_cgroup(tmp_path):
    root = tree(tmp_path / "fs", {"cgroup.controllers": "cpu memory", "cpu.max": "max 100000",
                                  "app.slice/cpu.max": "150000 100000", "app.slice/memory.max": str(512 * MIB)})
    limits = read_limits(membership(tmp_path, "0::/app.slice\n"), str(root))
    assert limits == Limits(1.5, 512 * MIB)


def test_v2_an_ancestors_tighter_limit_applies(tmp_path):
    root = tree(tmp_path / "fs", {"cgroup.controllers": "cpu memory",
                                  "outer/cpu.max": "50000 100000", "outer/memory.max": str(256 * MIB),
                                  "outer/inner/cpu.max": "max 100000", "outer/inner/memory.max": "max"})
    assert read_limits(membership(tmp_path, "0::/outer/inner\n"), str(root)) == Limits(0.5, 256 * MIB)


def test_v2_no_limits_anywhere(tmp_path):
    root = tree(tmp_path / "fs", {"cgroup.controllers": "cpu memory", "svc/cpu.max": "max 100000",
                                  "svc/memory.max": "max"})
    assert read_limits(membership(tmp_path, "0::/svc\n"), str(root)) == Limits(None, None)


def test_v2_a_container_sees_its_own_cgroup_at_the_mount_root(tmp_path):
    # Without a cgroup namespace /proc/self/cgroup names the host's path,
    # which does not exist under the container's mount.
    root = tree(tmp_path / "fs", {"cgroup.controllers": "cpu memory", "cpu.max": "200000 100000",
                                  "memory.max": str(1024 * MIB)})
    limits = read_limits(membership(tmp_path, "0::/kubepods/burstable/pod1/abc\n"), str(root))
    assert limits == Limits(2.0, 1024 * MIB)


def test_v1_quota_and_memory_per_controller(tmp_path):
    root = tree(tmp_path / "fs", {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
                                  "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
                                  "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000",
                                  "memory/docker/abc/memory.limit_in_bytes": str(300 * MIB),
                                  "memory/memory.limit_in_bytes": "9223372036854771712"})
    text = "12:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    assert read_limits(membership(tmp_path, text), str(root)) == Limits(2.5, 300 * MIB)


def test_v1_no_quota_and_the_huge_number_mean_no_limit(tmp_path):
    root = tree(tmp_path / "fs", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
                                  "memory/memory.limit_in_bytes": "9223372036854771712"})
    assert read_limits(membership(tmp_path, "4:memory:/\n1:cpu:/\n"), str(root)) == Limits(None, None)


def test_unreadable_or_garbled_files_mean_no_limit(tmp_path):
    root = tree(tmp_path / "fs", {"cgroup.controllers": "", "svc/cpu.max": "lots 0", "svc/memory.max": "-5"})
    assert read_limits(membership(tmp_path, "garbage\n0::/svc\n"), str(root)) == Limits(None, None)
    assert read_limits(str(tmp_path / "missing"), str(tmp_path / "nothing")) == Limits(None, None)


@pytest.mark.parametrize(("quota", "cpus", "expected"), [
    (None, 8, 8), (1.5, 8, 2), (0.25, 8, 1), (16.0, 4, 4), (2.0, 2, 2),
])
def test_workers_follow_the_quota_within_the_cpus_available(quota, cpus, expected):
    assert workers_for_cpus(Limits(quota, None), cpus) == expected


def test_workers_that_fit_leave_a_fifth_of_the_limit_free():
    assert workers_that_fit(1000 * MIB, 100 * MIB, 100 * MIB) == 7  # 800 - 100 = 700 MiB: 7 workers
    assert workers_that_fit(100 * MIB, 90 * MIB, 50 * MIB) == 1  # never fewer than one
