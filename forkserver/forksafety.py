"""Before a fork: warn about what a forked worker must not inherit from app code.

``fork`` copies one thread and every descriptor.  A thread the app started
(a metrics exporter, a connection pool's reaper) is missing in the child,
and any lock it held stays locked there for good.  A socket the app opened
(a database or cache connection made at import time, or by a warm-up
request in a refork mold) is shared by every worker forked afterwards: their
queries and replies interleave on one connection, the classic corruption of
pre-fork servers.  So the process about to fork (the master with
``preload``, or the refork mold) looks first, and says once what it found.

Only descriptors the app may have opened are reported: the caller names the
ones the server itself hands to workers (listeners, its channels, its logs),
or the ones that were already open before the app's code ran.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable

log = logging.getLogger("forkserver")

EXITING_THREAD_WAIT = 0.5  # seconds; a joined thread is gone from /proc within microseconds


def open_descriptors() -> dict[int, tuple[int, int]]:
    """The descriptors this process has open now, each with its file's identity (device, inode).

    The identity tells a descriptor the app opened from a later one that
    got the same number after the app closed its own.  The listing's own
    descriptor, gone by the time it is looked at, is left out.
    """
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            status = os.fstat(int(name))
        except OSError:
            continue
        found[int(name)] = (status.st_dev, status.st_ino)
    return found


def still_open(opened: dict[int, tuple[int, int]]) -> list[int]:
    """Those of ``opened`` that are still open on the same file."""
    now = open_descriptors()
    return [fd for fd, identity in opened.items() if now.get(fd) == identity]


def describe(fd: int) -> str:
    """What a descriptor is, as /proc names it: ``socket:[1234]``, a path, ``pipe:[99]``."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "closed"


def other_threads() -> list[str]:
    """Names of the threads besides the calling one, those started outside Python included.

    A thread just joined has left Python but may still be listed by the
    kernel for a moment (it is still exiting): an unexplained extra thread
    is looked at again for up to ``EXITING_THREAD_WAIT`` before it counts.
    """
    names = [thread.name for thread in threading.enumerate() if thread is not threading.current_thread()]
    deadline = time.monotonic() + EXITING_THREAD_WAIT
    while True:
        try:
            native = len(os.listdir("/proc/self/task")) - 1
        except OSError:
            native = len(names)
        if native <= len(names) or time.monotonic() >= deadline:
            break
        time.sleep(0.01)
    names += ["(a thread not started from Python)"] * max(0, native - len(names))
    return names


class ForkSafety:
    """One process's check before each fork; each problem is logged once, not at every fork."""

    def __init__(self, who: str) -> None:
        self.who = who  # "master" or "mold", for the log line
        self.warned_threads = False
        self.warned_fds: set[tuple[int, str]] = set()

    def check(self, app_descriptors: Iterable[int]) -> None:
        """Warn about threads besides ours, and about ``app_descriptors`` that are still open."""
        threads = [] if self.warned_threads else other_threads()  # said once: not looked at again
        if threads:
            self.warned_threads = True
            log.warning("%s is about to fork with %d other thread(s) running: %s; the workers get none "
                        "of them, and a lock one of them holds stays locked in every worker; start threads "
                        "in post_fork instead", self.who, len(threads), ", ".join(threads))
        found = sorted((fd, describe(fd)) for fd in set(app_descriptors))
        new = [entry for entry in found if entry not in self.warned_fds and entry[1] != "closed"]
        if new:
            self.warned_fds.update(new)
            log.warning("%s is about to fork with descriptor(s) the app opened: %s; every worker shares "
                        "them (a database connection shared by workers mixes their queries): close them "
                        "before the fork (in %s) and reopen them in each worker", self.who,
                        ", ".join(f"{fd} ({what})" for fd, what in new),
                        "the on_mold hook" if self.who == "mold" else "the app's import, or in pre_fork")
