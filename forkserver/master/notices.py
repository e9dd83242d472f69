"""The lines workers write to the master on the shared notice pipe, read with suspicion.

Workers say ``ready PID``, ``failed PID CODE reason`` and ``recycle PID why``,
each as one ``write`` of at most PIPE_BUF bytes (so lines from different
workers never mix).  The pipe is shared and the worker runs app code, so the
master trusts none of it: a read may end mid-line (the rest comes with the
next one), a line longer than any real notice is discarded up to its newline,
only ASCII digits make a number, and text meant for the log has its control
characters replaced.  Nothing here can raise on what a worker wrote.
"""

from __future__ import annotations

import logging
import os
import re
from typing import NamedTuple

log = logging.getLogger("forkserver")

# A worker cuts its notices to 1000 characters: up to 4001 bytes of UTF-8.
MAX_LINE_BYTES = 4096
READ_BYTES = 65536  # per turn of the master's loop: a flood waits for the next turn
KINDS = ("ready", "failed", "recycle")
_NOTICE = re.compile(rb"(ready|failed|recycle) ([0-9]{1,10})(?: (.*))?", re.DOTALL)
_FAILED = re.compile(r"([0-9]{1,3}) (.*)", re.DOTALL)
_CONTROL = {code: "?" for code in (*range(32), 127)}


class Notice(NamedTuple):
    kind: str  # one of KINDS
    pid: int
    reason: str  # printable text for the log
    code: int = 1  # a failed boot's exit code


def parse(line: bytes) -> Notice | None:
    """One line (without its newline) as a Notice, or None if it is not one."""
    match = _NOTICE.fullmatch(line)
    if match is None:
        return None
    kind, pid, rest = match.group(1).decode(), int(match.group(2)), match.group(3) or b""
    reason = rest.decode("utf-8", "replace").translate(_CONTROL)
    if kind != "failed":
        return Notice(kind, pid, reason)
    failed = _FAILED.fullmatch(reason)
    if failed is None:
        return Notice(kind, pid, reason)
    return Notice(kind, pid, failed.group(2), int(failed.group(1)))


class NoticeReader:
    """Reads the master's end of the notice pipe (non-blocking) into whole, checked notices."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.partial = bytearray()  # the start of a line whose newline has not arrived
        self.discarding = False  # inside an overlong line: drop bytes up to its newline
        self.malformed = 0  # lines dropped: overlong or not a notice
        self._complained = False

    def read(self) -> list[Notice]:
        """The notices that arrived since the last call; never waits."""
        try:
            data = os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return []
        found = []
        lines = data.split(b"\n")
        for index, piece in enumerate(lines):
            last = index == len(lines) - 1  # not ended by a newline (yet)
            if self.discarding:
                self.discarding = last
                continue
            if len(self.partial) + len(piece) > MAX_LINE_BYTES:
                self.partial.clear()
                self.discarding = last
                self._drop("a line longer than any notice")
                continue
            if last:
                self.partial += piece
                continue
            line = bytes(self.partial + piece)
            self.partial.clear()
            notice = parse(line)
            if notice is not None:
                found.append(notice)
            elif line:
                self._drop("not a notice")
        return found

    def _drop(self, why: str) -> None:
        self.malformed += 1
        if not self._complained:
            self._complained = True
            log.warning("ignoring a malformed worker notice (%s); later ones are dropped without a word", why)
