"""The PID file: written once the master runs, removed when it exits.

A file left by a crashed server is replaced; one naming a live process that is
not us stops the start, so two masters never fight over one file.
"""

from __future__ import annotations

import os

from .errors import ConfigError


class Pidfile:
    """A PID file at ``path``, owned by the process that created it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = 0

    def create(self, pid: int) -> None:
        """Write ``pid``, refusing when another live process holds the file."""
        import psutil  # deferred: only a start with ``pid`` set pays for importing it

        try:
            with open(self.path) as fh:
                old = int(fh.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            old = 0
        except OSError as exc:
            raise ConfigError(f"pid: cannot read {self.path!r}: {exc.strerror}") from None
        if old and old != pid and psutil.pid_exists(old):
            raise ConfigError(f"pid: {self.path!r} names running process {old}; is forkserver already running?")
        temp = f"{self.path}.{pid}.tmp"
        try:
            with open(temp, "w") as fh:
                fh.write(f"{pid}\n")
            os.replace(temp, self.path)
        except OSError as exc:
            raise ConfigError(f"pid: cannot write {self.path!r}: {exc.strerror}") from None
        self.pid = pid

    def remove(self) -> None:
        """Delete the file if it still names us (an upgraded master may own it now)."""
        try:
            with open(self.path) as fh:
                if int(fh.read().strip() or 0) != self.pid:
                    return
            os.unlink(self.path)
        except (OSError, ValueError):
            pass
