"""What a container (or systemd unit) allows this process: its cgroup CPU quota and memory limit.

``workers = "auto"`` sizes the pool from these rather than from the host's
CPU count, which in a container limited to one CPU on a 64-core host would
start 64 workers that share one CPU's time and the container's memory.

Both cgroup layouts are read, as the kernel offers them:

* v2 (one unified tree): ``cpu.max`` ("QUOTA PERIOD", or "max PERIOD") and
  ``memory.max`` (bytes, or "max");
* v1 (a tree per controller): ``cpu.cfs_quota_us`` (-1 for none) with
  ``cpu.cfs_period_us``, and ``memory.limit_in_bytes`` (a huge number for
  none).

A limit set on any ancestor of our cgroup applies to us too, so the files
are read from our own cgroup up to the root and the tightest limit wins.
Inside a container the path named in ``/proc/self/cgroup`` may not exist
under the mount (no cgroup namespace): the mount's root is then the
container's own cgroup, and is read instead.  Nothing here raises: an
unreadable or missing file is simply no limit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

# v1 reports "no memory limit" as the largest page-aligned long, not as a word.
NO_LIMIT_V1 = 1 << 62


class Limits(NamedTuple):
    """The container's limits; None where there is none."""

    cpus: float | None  # CPU time per second of wall time, e.g. 1.5
    memory: int | None  # bytes

    def describe(self) -> str:
        cpus = "none" if self.cpus is None else f"{self.cpus:g}"
        memory = "none" if self.memory is None else f"{self.memory / 1048576:.0f}MiB"
        return f"cgroup cpu quota={cpus} memory limit={memory}"


def read_limits(cgroup_file: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Limits:
    """The CPU quota and memory limit of the cgroup ``cgroup_file`` names, under the mount at ``root``."""
    memberships = _memberships(cgroup_file)
    base = Path(root)
    if (base / "cgroup.controllers").exists():  # v2 mounted at root
        path = memberships.get("", "/")
        return Limits(_tightest(base, path, _cpu_v2), _tightest(base, path, _memory_v2))
    cpu_dir = next((base / name for name in ("cpu", "cpu,cpuacct") if (base / name).is_dir()), None)
    cpu = None if cpu_dir is None else _tightest(cpu_dir, memberships.get("cpu", "/"), _cpu_v1)
    memory_dir = base / "memory"
    memory = _tightest(memory_dir, memberships.get("memory", "/"), _memory_v1) if memory_dir.is_dir() else None
    return Limits(cpu, memory)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which cpusets narrow), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except OSError:
        return os.cpu_count() or 1


def _memberships(cgroup_file: str) -> dict[str, str]:
    """Map each controller (``""`` for the v2 tree) to our cgroup's path, from lines ``ID:CONTROLLERS:PATH``."""
    found: dict[str, str] = {}
    try:
        text = Path(cgroup_file).read_text()
    except OSError:
        return found
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        for controller in controllers.split(",") if controllers else [""]:
            found[controller] = path
    return found


def _tightest(mount: Path, path: str, read: Callable[[Path], float | None]) -> float | None:
    """The smallest limit ``read`` finds in ``path``'s directory and each ancestor's, under ``mount``."""
    leaf = mount / path.lstrip("/")
    if not leaf.is_dir():
        leaf = mount  # a container's own cgroup is mounted as the root
    limits = []
    directory = leaf
    while True:
        value = read(directory)
        if value is not None:
            limits.append(value)
        if directory == mount or mount not in directory.parents:
            break
        directory = directory.parent
    return min(limits) if limits else None


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _cpu_v2(directory: Path) -> float | None:
    quota, _, period = _read(directory / "cpu.max").partition(" ")
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None  # "max", missing or unreadable
    return int(quota) / int(period)


def _memory_v2(directory: Path) -> float | None:
    value = _read(directory / "memory.max")
    return int(value) if value.isdigit() else None


def _cpu_v1(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if not quota.isdigit() or not period.isdigit() or int(period) == 0:
        return None  # -1: no quota
    return int(quota) / int(period)


def _memory_v1(directory: Path) -> float | None:
    value = _read(directory / "memory.limit_in_bytes")
    return int(value) if value.isdigit() and int(value) < NO_LIMIT_V1 else None


# -- sizing the pool ----------------------------------------------------------------

# The share of the memory limit the pool may plan to fill at boot: workers
# grow as they serve, and the kernel kills inside the cgroup when it is full.
MEMORY_SHARE = 0.8


def workers_for_cpus(limits: Limits, cpus_available: int) -> int:
    """One worker per CPU the quota (or, without one, the affinity mask) grants; a part CPU counts whole."""
    cpus = float(cpus_available) if limits.cpus is None else min(limits.cpus, cpus_available)
    return max(1, math.ceil(cpus))


def workers_that_fit(memory_limit: int, master_bytes: int, worker_bytes: int) -> int:
    """How many workers of ``worker_bytes`` unique memory fit beside the master in MEMORY_SHARE of the limit."""
    room = memory_limit * MEMORY_SHARE - master_bytes
    return max(1, int(room // max(1, worker_bytes)))
