"""Backing off ``accept`` while the process or the system is out of descriptors or memory.

When ``accept`` fails with EMFILE, ENFILE, ENOBUFS or ENOMEM the connection
stays queued and the listener stays readable, so a loop that simply tries
again spins at full CPU and writes a log line per attempt (tens of thousands
a second).  ``AcceptPause`` turns that into a pause: the caller stops polling
its listeners until ``resume_at``, the pause doubles from ``FIRST_PAUSE`` to
``MAX_PAUSE`` while the shortage lasts, and the failures are logged once per
``REPORT_INTERVAL`` with their count.  The first accept that succeeds ends it.

No spare descriptor is kept to accept and refuse connections with a 503
while exhausted.  EMFILE is one process's shortage: with several workers on
a listener, another worker may well have room, and a paused worker stops
competing for the queue (it also tells the accept board it is unwilling).
A queued client waiting a second is better served than refused, the kernel
bounds the queue by the backlog, and a full queue makes new clients retry
their SYN, which is what a proxy in front expects of an overloaded upstream.

``CountedLog`` is the log-once-per-interval part on its own, for any event
a hostile or unlucky peer could repeat thousands of times a second.
"""

from __future__ import annotations

import errno
import logging
import math
import time
from collections.abc import Callable

log = logging.getLogger("forkserver")

# accept() errors that mean "no resources now", not "this connection is bad".
SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
FIRST_PAUSE = 0.1
MAX_PAUSE = 1.0
REPORT_INTERVAL = 5.0


class CountedLog:
    """Log the first of a run of events at once, then at most one line per interval, with a count."""

    def __init__(self, level: int, interval: float = REPORT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.level = level
        self.interval = interval
        self.clock = clock
        self.count = 0  # events since the last line
        self.logged_at = -math.inf

    def event(self, message: str, suffix: str = "") -> bool:
        """Count one event; log ``message`` (with the count so far, then ``suffix``) if a line is due.

        Returns whether a line was written.
        """
        self.count += 1
        now = self.clock()
        elapsed = now - self.logged_at
        if elapsed < self.interval:
            return False
        if self.count > 1 and math.isfinite(elapsed):
            message += f", {self.count} times in the last {elapsed:.0f}s"
        log.log(self.level, "%s%s", message, suffix)
        self.count, self.logged_at = 0, now
        return True


class AcceptPause:
    """The pause state of one process's accepting, and its log lines.

    The whole process pauses, not one listener: the shortage is the
    process's or the system's, so every listener would fail the same way.
    """

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what = what  # "accept" or "stats accept": how log lines start
        self.clock = clock
        self.resume_at = 0.0  # while paused, when to poll the listeners again; 0.0 when not paused
        self.length = 0.0  # the last pause; the next one is twice as long while failures go on
        self.streak = 0  # failures since the last "works again" line (or since the start)
        self.streak_began = 0.0
        self.reported = False  # a failure line was written since the last "works again" line
        self.report = CountedLog(logging.ERROR, clock=clock)

    def failed(self, exc: OSError) -> bool:
        """Record a failed accept: True, with a pause begun, if it was a shortage.

        A failure while already paused (another listener in the same wakeup)
        is counted but does not lengthen the pause.
        """
        if exc.errno not in SHORTAGE_ERRNOS:
            return False
        now = self.clock()
        if not self.streak:
            self.streak_began = now
        self.streak += 1
        if now >= self.resume_at:
            self.length = min(MAX_PAUSE, self.length * 2) if self.length else FIRST_PAUSE
            self.resume_at = now + self.length
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if self.report.event(f"{self.what} failed: {exc.strerror} ({name})",
                             f"; pausing accepts for {self.length:g}s"):
            self.reported = True
        return True

    def due(self) -> bool:
        """Is a pause over?  Then it is cleared, and the caller polls its listeners again."""
        if self.resume_at and self.clock() >= self.resume_at:
            self.resume_at = 0.0
            return True
        return False

    def succeeded(self) -> None:
        """An accept worked: the next pause starts short again, and a failure line gets its answer.

        Near the limit accepts can fail and succeed by turns; the "works
        again" line follows a failure line only, so such flapping still
        writes at most two lines per REPORT_INTERVAL.
        """
        self.length = 0.0
        if self.reported:
            log.info("%s works again after %d failure(s) over %.1fs", self.what, self.streak,
                     self.clock() - self.streak_began)
            self.streak, self.reported = 0, False
