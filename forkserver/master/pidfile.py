"""The PID file: written once the master runs, removed when it exits.

A file left by a crashed server is replaced; one naming a live process that is
not us stops the start, so two masters never fight over one file.  The master
is usually root and the file's directory may be reachable by others, so the
file is read without following links and written through ``safefiles``.
"""

from __future__ import annotations

import errno
import os

from ..errors import ConfigError
from ..safefiles import read_nofollow, reason, replace_file


class Pidfile:
    """A PID file at ``path``, owned by the process that created it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = 0

    def create(self, pid: int) -> None:
        """Write ``pid``, refusing when another live process holds the file."""
        import psutil  # deferred: only a start with ``pid`` set pays for importing it

        try:
            old = _parse(read_nofollow(self.path))
        except OSError as exc:
            raise ConfigError(f"pid: cannot read '{self.path}': {reason(exc)}") from None
        if old and old != pid and psutil.pid_exists(old):
            raise ConfigError(f"pid: '{self.path}' names running process {old}; is forkserver already running?")
        try:
            replace_file(self.path, f"{pid}\n".encode())
        except OSError as exc:
            raise ConfigError(f"pid: cannot write '{self.path}': {reason(exc)}") from None
        self.pid = pid

    def names_us(self) -> bool:
        """True if the file at ``path`` is a plain file naming our PID (not a link, not another's)."""
        try:
            return self.pid != 0 and _parse(read_nofollow(self.path)) == self.pid
        except OSError:
            return False

    def move(self, new_path: str) -> None:
        """Rename our file to ``new_path`` (USR2 and back).

        Raises FileNotFoundError when the file is gone, and OSError when a
        link or another process's file took its place.  ``rename`` acts on
        the names themselves, so a link at ``new_path`` is replaced, never
        followed.
        """
        content = read_nofollow(self.path)
        if content is None:
            raise FileNotFoundError(errno.ENOENT, "it is gone", self.path)
        if _parse(content) != self.pid:
            raise OSError(f"'{self.path}' no longer names pid {self.pid}")
        os.replace(self.path, new_path)
        self.path = new_path

    def remove(self) -> None:
        """Delete the file if it still names us (an upgraded master may own it now)."""
        if self.names_us():
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _parse(content: bytes | None) -> int:
    """The PID a pid file holds; 0 for none, an empty file or garbage (a crash mid-write)."""
    try:
        return int((content or b"").strip() or 0)
    except ValueError:
        return 0
