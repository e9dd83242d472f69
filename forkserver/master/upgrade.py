"""USR2 binary upgrade: start a new master on the same listening sockets.

The old master forks a child that moves the listeners to descriptors 3.. and
executes a fresh interpreter with the same command line, announcing them the
way systemd's socket activation does (LISTEN_FDS / LISTEN_PID /
LISTEN_FDNAMES).  Both masters serve until the operator stops the old one.
The PID file moves to ``PIDFILE.oldbin`` meanwhile, as with nginx and
gunicorn, and moves back if the new master dies first.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from collections.abc import Mapping, Sequence

from ..sockets import Listener
from .systemd import FIRST_INHERITED_FD, pass_fds_env

EXEC_FAILED = 127


def start_new_master(listeners: Sequence[Listener], argv: Sequence[str], environ: Mapping[str, str],
                     signal_mask: set[signal.Signals], *, drop_memory_merge: bool = False) -> int:
    """Fork and exec a new master that inherits ``listeners``; return its PID.

    The caller forks with its signals blocked; the new program gets
    ``signal_mask`` back, since exec keeps the mask but not the handlers.
    ``drop_memory_merge``: clear the same-page merging flag the old master
    set for itself, which Linux 6.7 and later keep across exec, so that the
    new master merges only if its own config says so.
    """
    pid = os.fork()
    if pid:
        return pid
    try:
        signal.set_wakeup_fd(-1)
        for signum in range(1, signal.NSIG):
            if signum not in (signal.SIGKILL, signal.SIGSTOP):
                try:
                    signal.signal(signum, signal.SIG_DFL)
                except (OSError, ValueError):
                    pass
        signal.pthread_sigmask(signal.SIG_SETMASK, signal_mask)
        if drop_memory_merge:
            from ..memorymerge import opt_out

            opt_out()  # a refusal leaves the new master merging, as the old one did
        # Park each listener above the range first, so moving one to 3+i
        # never overwrites another that already sits there.
        parked = [fcntl.fcntl(listener.sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 256) for listener in listeners]
        for index, fd in enumerate(parked):
            os.dup2(fd, FIRST_INHERITED_FD + index, inheritable=True)
        env = dict(environ)
        env.update(pass_fds_env(parked, [listener.address.text for listener in listeners], os.getpid()))
        if "WATCHDOG_USEC" in env:
            env["WATCHDOG_PID"] = str(os.getpid())  # the new master becomes the one systemd watches
        os.execve(sys.executable, [sys.executable, "-m", "forkserver", *argv], env)
    finally:
        os._exit(EXEC_FAILED)  # only reached if exec failed


def oldbin_path(pidfile_path: str) -> str:
    """Where the old master's PID file goes during an upgrade."""
    return pidfile_path + ".oldbin"
