"""The master's table of workers: who runs in which slot and generation, and how they ended.

A slot is a stable index 0..N-1 that a replacement worker takes over, so logs
read ``slot=3`` across restarts.  A generation is bumped by each reload; old
and new generations share slot numbers while they overlap.  Nothing here
forks or signals: the master does, with what this module tells it.
"""

from __future__ import annotations

import os
import signal

from ..scoreboard import Scoreboard


# Plain classes, not dataclasses: see forkserver.records.
class WorkerHandle:
    """The master's view of one worker process.

    ``aborted_at``: when a hung (or too slowly booting) worker was sent
    SIGABRT, 0 if never; ``recycled``: retired for max_requests or memory,
    not by an operator; ``over_memory``: consecutive memory samples over
    max_worker_memory.  Refork (forkserver.refork): ``mold`` forked it (0:
    the master), ``lineage`` is the mold lineage it comes from, ``warm`` the
    highest request count it reported, ``replaces`` the worker it replaces
    in a rollover, ``rolling`` whether its own replacement is asked for.
    """

    __slots__ = ("slot", "pid", "generation", "board", "started_at", "ready", "retiring", "aborted_at", "killed",
                 "recycled", "over_memory", "mold", "lineage", "warm", "replaces", "rolling", "is_mold")

    def __init__(self, slot: int, pid: int, generation: int, board: Scoreboard, started_at: float, *,
                 mold: int = 0, replaces: int = 0) -> None:
        self.slot = slot
        self.pid = pid
        self.generation = generation
        self.board = board
        self.started_at = started_at
        self.ready = False
        self.retiring = False
        self.aborted_at = 0.0
        self.killed = False
        self.recycled = False
        self.over_memory = 0
        self.mold = mold
        self.lineage = 0
        self.warm = 0
        self.replaces = replaces
        self.rolling = False
        self.is_mold = False


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


class Pool:
    """Live workers by PID, plus helpers to select them."""

    __slots__ = ("workers",)

    def __init__(self) -> None:
        self.workers: dict[int, WorkerHandle] = {}

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
