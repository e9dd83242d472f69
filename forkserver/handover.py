"""Fresh log descriptors from the master to its workers, for log rotation (USR1).

Workers may run as an unprivileged ``user`` that cannot open root's log
files, so they never open a log path at all: they inherit the master's
descriptors at fork, and on USR1 the master, which reopened its files, sends
the new descriptors down a per-worker UNIX socketpair (``SCM_RIGHTS``) before
signalling the worker.  The worker ``dup2``s each one onto the descriptor
number it already writes to, which swaps the file atomically for every
thread mid-write.  A worker that does not collect its message (hung, or
gone) keeps writing to the old file; nothing waits for it.

One datagram per USR1: the log descriptor numbers (int32 each) as data and
the descriptors themselves as ancillary data, in the same order.  The
master only ever sends: it shuts its end for reading, so a worker cannot
hand it anything back.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .logs import LogFile

log = logging.getLogger("forkserver")

MAX_LOGS = 8  # descriptors in one message; the server has two logs
_NUMBER = struct.Struct("<i")


class LogHandover:
    """The master's ends of the workers' log sockets."""

    def __init__(self) -> None:
        self.sockets: dict[int, socket.socket] = {}  # worker pid -> the master's end

    @staticmethod
    def prepare() -> tuple[socket.socket, socket.socket]:
        """Before a fork: a socketpair, (the master's end, the worker's end)."""
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def attach(self, pid: int, ends: tuple[socket.socket, socket.socket]) -> None:
        """After the fork, in the master: keep our end (send-only, never blocking), close the worker's."""
        ours, theirs = ends
        theirs.close()
        ours.setblocking(False)
        ours.shutdown(socket.SHUT_RD)
        self.sockets[pid] = ours

    @staticmethod
    def abandon(ends: tuple[socket.socket, socket.socket]) -> None:
        """The fork failed: close both ends made for it."""
        for end in ends:
            end.close()

    def close_inherited(self, own: tuple[socket.socket, socket.socket]) -> None:
        """In a new worker: close the master's ends we inherited, keep our own end."""
        for sock in self.sockets.values():
            sock.close()
        own[0].close()

    def forget(self, pid: int) -> None:
        """A worker was reaped."""
        sock = self.sockets.pop(pid, None)
        if sock is not None:
            sock.close()

    def close(self) -> None:
        for pid in list(self.sockets):
            self.forget(pid)

    def send(self, pid: int, log_files: Sequence[LogFile]) -> bool:
        """Send worker ``pid`` the current descriptors of ``log_files`` (files, not standard streams)."""
        sock = self.sockets.get(pid)
        fds = [target.fd for target in log_files if target.path != "-"][:MAX_LOGS]
        if sock is None or not fds:
            return False
        try:
            socket.send_fds(sock, [b"".join(_NUMBER.pack(fd) for fd in fds)], fds)
        except OSError as exc:  # its queue is full (it has not read the last ones) or it is gone
            log.warning("cannot hand the reopened logs to worker pid=%d (%s); it keeps its old files",
                        pid, exc.strerror)
            return False
        return True


def receive(sock: socket.socket, log_files: Sequence[LogFile]) -> int:
    """In a worker, on USR1: put every descriptor the master sent in place of our log; how many moved.

    Each goes onto the number it names only if that is one of our log files:
    a descriptor number we do not write logs to is never overwritten.
    """
    ours = {target.fd: target for target in log_files if target.path != "-"}
    moved = 0
    sock.setblocking(False)  # recv_fds drops its flags argument before Python 3.12: no MSG_DONTWAIT
    while True:
        try:
            data, fds, _flags, _address = socket.recv_fds(sock, _NUMBER.size * MAX_LOGS, MAX_LOGS)
        except (BlockingIOError, InterruptedError):
            return moved
        if not data and not fds:
            return moved  # the master's end is gone
        numbers = [number for (number,) in _NUMBER.iter_unpack(data[:len(data) - len(data) % _NUMBER.size])]
        for index, fd in enumerate(fds):
            if index < len(numbers) and numbers[index] in ours:
                ours[numbers[index]].take(fd)
                moved += 1
            os.close(fd)
