"""``workers = "auto"`` in a real cgroup: the test makes one, limits it, and starts the server inside.

Runs as root (the suite does): the cgroup is created under the machine's
own cgroup mount, v1 (a directory per controller) or v2 (one tree), the
server is moved into it before it execs, and the cgroup is removed after
the server is gone.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from harness import poll

MOUNT = Path("/sys/fs/cgroup")
V2 = (MOUNT / "cgroup.controllers").exists()
MIB = 1048576


class Cgroup:
    """One fresh cgroup (per controller on v1) that a child process joins before exec."""

    def __init__(self, controllers: tuple[str, ...]) -> None:
        name = f"forkserver-test-{uuid.uuid4().hex[:8]}"
        if V2:
            for controller in controllers:
                (MOUNT / "cgroup.subtree_control").write_text(f"+{controller}")
            self.dirs = {c: MOUNT / name for c in controllers}
        else:
            self.dirs = {c: MOUNT / c / name for c in controllers}
        for directory in set(self.dirs.values()):
            directory.mkdir()

    def limit_cpu(self, quota: int, period: int) -> None:
        if V2:
            (self.dirs["cpu"] / "cpu.max").write_text(f"{quota} {period}")
        else:
            (self.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(period))
            (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))

    def limit_memory(self, limit: int) -> None:
        (self.dirs["memory"] / ("memory.max" if V2 else "memory.limit_in_bytes")).write_text(str(limit))

    def join(self) -> Callable[[], None]:
        """A preexec_fn that moves the new process into every directory of this cgroup."""
        targets = [d / "cgroup.procs" for d in set(self.dirs.values())]

        def enter() -> None:
            for target in targets:
                target.write_text(str(os.getpid()))
        return enter

    def remove(self) -> None:
        for directory in set(self.dirs.values()):
            poll(lambda: not (directory / "cgroup.procs").read_text().split(), what=f"{directory} to empty")
            directory.rmdir()


@pytest.fixture
def cgroup() -> Iterator[Callable[..., Cgroup]]:
    made: list[Cgroup] = []

    def make(*controllers: str) -> Cgroup:
        group = Cgroup(controllers)
        made.append(group)
        return group
    yield make
    for group in made:
        group.remove()


# The app keeps 60 MiB of its own from import on, so each worker's unique
# memory at boot is known to be at least that.
HEAVY_APP = (
    "KEPT = bytearray(b'\\x01' * (60 * 1024 * 1024))\n"
    "def app(environ, start_response):\n"
    "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
    "    return [b'ok']\n"
)


def test_auto_takes_the_cpu_quota_not_the_machines_cpus(cgroup, server):
    group = cgroup("cpu")
    group.limit_cpu(50_000, 100_000)  # half a CPU
    srv = server("basic:hello", "-w", "auto", popen={"preexec_fn": group.join()}, workers=1)
    assert requests.get(srv.url).status_code == 200
    poll(lambda: "workers auto: 1 from" in srv.log(), what="the sizing line")
    assert "cgroup cpu quota=0.5" in srv.log()
    assert len(srv.worker_pids()) == 1


def test_auto_without_limits_runs_one_worker_per_cpu(server):
    srv = server("basic:hello", workers=len(os.sched_getaffinity(0)))
    poll(lambda: "workers auto:" in srv.log(), what="the sizing line")
    assert f"workers auto: {len(os.sched_getaffinity(0))} from" in srv.log()


def test_auto_keeps_the_pool_inside_the_memory_limit(cgroup, server, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "heavy.py").write_text(HEAVY_APP)
    group = cgroup("cpu", "memory")
    group.limit_cpu(400_000, 100_000)  # four CPUs' worth: the quota alone would allow every CPU here
    group.limit_memory(160 * MIB)  # 128 MiB usable: the master and one 60+ MiB worker, not two
    srv = server("heavy:app", "--pythonpath", str(app_dir), popen={"preexec_fn": group.join()}, workers=1)
    poll(lambda: "holds 1 workers" in srv.log(), what="the memory sizing line")
    assert requests.get(srv.url).status_code == 200
    assert len(srv.worker_pids()) == 1
    assert "killed" not in srv.log().lower()
