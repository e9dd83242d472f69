"""Signal delivery as data: a self-pipe that ``signal.set_wakeup_fd`` fills.

The C-level handler writes each signal's number into the pipe as one byte, so
the Python handlers below do nothing at all; the event loop reads the pipe and
acts in ordinary code, where logging, forking and locking are safe.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


def _ignore(signum: int, frame: object) -> None:
    """Do nothing: the wakeup fd already carries the signal number."""


class Wakeup:
    """A non-blocking pipe whose read end becomes readable when a signal arrives."""

    def __init__(self, signums: Iterable[signal.Signals]) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for signum in signums:
            signal.signal(signum, _ignore)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)

    def fileno(self) -> int:
        """The descriptor to poll for readability."""
        return self.read_fd

    def drain(self) -> list[int]:
        """Return the signal numbers received since the last call, oldest first."""
        received: list[int] = []
        while True:
            try:
                data = os.read(self.read_fd, 512)
            except BlockingIOError:
                return received
            if not data:
                return received
            received.extend(data)

    def close(self) -> None:
        """Stop routing signals here and close the pipe."""
        signal.set_wakeup_fd(-1)
        os.close(self.read_fd)
        os.close(self.write_fd)
