"""The master's table of workers: who runs in which slot and generation, and how they ended.

A slot is a stable index 0..N-1 that a replacement worker takes over, so logs
read ``slot=3`` across restarts.  A generation is bumped by each reload; old
and new generations share slot numbers while they overlap.  Nothing here
forks or signals: the master does, with what this module tells it.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from ..scoreboard import Scoreboard


@dataclass(eq=False)
class WorkerHandle:
    """The master's view of one worker process."""

    slot: int
    pid: int
    generation: int
    board: Scoreboard
    started_at: float
    ready: bool = False
    retiring: bool = False
    aborted_at: float = 0.0  # when a hung (or too slowly booting) worker was sent SIGABRT; 0 if never
    killed: bool = False
    recycled: bool = False  # retired for max_requests or memory, not by an operator
    over_memory: int = 0  # consecutive memory samples over max_worker_memory
    # Refork (forkserver.refork): the mold that forked it (0: the master), the
    # mold lineage it comes from, the highest request count it reported, the
    # worker it replaces in a rollover, and whether its own replacement is asked for.
    mold: int = 0
    lineage: int = 0
    warm: int = 0
    replaces: int = 0
    rolling: bool = False
    is_mold: bool = False


def plan(occupied: set[int], desired: int) -> tuple[list[int], list[int]]:
    """Return (slots to spawn, slots to retire) to go from ``occupied`` to ``desired`` workers."""
    spawn = [slot for slot in range(desired) if slot not in occupied]
    retire = sorted((slot for slot in occupied if slot >= desired), reverse=True)
    return spawn, retire


def describe_exit(status: int) -> str:
    """Say how a process ended, from its ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        return f"killed by {signal.Signals(signum).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


@dataclass(eq=False, repr=False)
class Pool:
    """Live workers by PID, plus helpers to select them."""

    workers: dict[int, WorkerHandle] = field(default_factory=dict)

    def add(self, handle: WorkerHandle) -> None:
        """Record a freshly forked worker."""
        self.workers[handle.pid] = handle

    def of_generation(self, generation: int) -> list[WorkerHandle]:
        """Workers of one generation that are not on their way out."""
        return [h for h in self.workers.values() if h.generation == generation and not h.retiring]

    def reap(self) -> list[tuple[int, int, WorkerHandle | None]]:
        """Collect every exited child without blocking: (pid, wait status, handle or None).

        A child that is not a worker (an upgraded master) comes back with None.
        """
        ended = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return ended
            if pid == 0:
                return ended
            ended.append((pid, status, self.workers.pop(pid, None)))
