"""Stopping what a profiling script started: its process by PID, then whatever of its tree is left.

Shared by the scripts that start a server: startup_profile, connection_syscalls,
loop_cost and soak.
A leftover worker is killed only if its PID still names the process seen
before (same start time): a PID the kernel has reused is left alone.
"""

from __future__ import annotations

import signal
import subprocess

import psutil


def tree(proc: subprocess.Popen[bytes]) -> dict[int, float]:
    """PID -> start time of ``proc``'s descendants now, to be stopped later."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return {}
    seen = {}
    for child in children:
        try:
            seen[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return seen


def stop(proc: subprocess.Popen[bytes], leftovers: dict[int, float] | None = None, grace: float = 10.0,
         signum: int = signal.SIGINT) -> int | None:
    """``signum`` to ``proc``, SIGKILL after ``grace`` seconds; then SIGKILL each of ``leftovers`` still alive.

    Returns ``proc``'s exit status.
    """
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)
    for pid, created in (leftovers or {}).items():
        try:
            child = psutil.Process(pid)
            if child.create_time() == created:
                child.kill()
        except psutil.Error:
            pass
    return proc.returncode
