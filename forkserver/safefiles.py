"""Files the master creates or opens as root, handled so that a planted link cannot redirect them.

The master usually runs as root and writes where others may reach: the pid
file, the logs, UNIX socket files.  Whoever can add an entry where root is
about to write could put a symbolic link there and have root overwrite,
truncate or chmod any file on the system.  So here:

* an existing file is opened with ``O_NOFOLLOW``: a link at the path is
  refused, never written through;
* a file written whole (the pid file) is made under a fresh name by
  ``mkstemp`` (``O_CREAT | O_EXCL``, which never follows a link) in the
  same directory and renamed over the path; a rename replaces a link
  instead of writing through it;
* a directory anybody may write to and that lacks the sticky bit (a 0777
  one) is refused for these files: anybody could rename or replace them
  there.  ``/tmp`` (1777) is fine.

These guard the last path component and the directories above it; a link
the operator made higher up (``/var/run`` -> ``/run``) is followed as usual.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterable


LINK_REFUSED = "it is a symbolic link, and forkserver never follows one where it writes as root"


FIFO_REFUSED = "it is a FIFO that nobody reads"


def reason(exc: OSError) -> str:
    """What to tell the operator about a failed open here (ELOOP from O_NOFOLLOW means a link)."""
    if exc.errno == errno.ELOOP:
        return LINK_REFUSED
    if exc.errno == errno.ENXIO:
        return FIFO_REFUSED
    return exc.strerror or str(exc)


def open_nofollow(path: str, flags: int, mode: int = 0o644, *, blocking: bool = True) -> int:
    """``os.open`` that fails with ELOOP when ``path`` itself is a symbolic link.

    It opens with O_NONBLOCK, so a FIFO put at the path cannot hang the
    master in ``open`` (a write-only open of a FIFO nobody reads fails with
    ENXIO instead); with ``blocking`` the descriptor then does blocking I/O,
    as a log that is a pipe to a reader wants.
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    if blocking:
        os.set_blocking(fd, True)
    return fd


def read_nofollow(path: str, limit: int = 4096) -> bytes | None:
    """The first ``limit`` bytes of the file at ``path``, or None when there is none.

    Raises OSError (ELOOP for a link at ``path``).  Reading without
    blocking keeps a FIFO put there from hanging the master: it reads as
    empty or fails.
    """
    try:
        fd = open_nofollow(path, os.O_RDONLY, blocking=False)
    except FileNotFoundError:
        return None
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Put a file holding ``data`` at ``path`` in one step, whatever was there before.

    Written under a name nobody can predict, created exclusively in the same
    directory, then renamed over ``path``: readers see the old file or the
    whole new one, and a link planted at either name is never followed.
    The file gets ``mode`` less the umask, as a plain ``open`` would give it
    (``mkstemp`` itself makes 0600).
    """
    directory, name = os.path.split(os.path.abspath(path))
    umask = os.umask(0o077)  # reading the umask means setting it; the master is single-threaded
    os.umask(umask)
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        try:
            os.fchmod(fd, mode & ~umask)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise


def is_socket_file(path: str) -> bool | None:
    """True if ``path`` itself (not what a link there names) is a socket; None when nothing is there."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def unsafe_directory(path: str) -> str | None:
    """The directory holding ``path``, or one above it, that anybody may plant a link in; else None.

    Ancestors count too: whoever may rename a directory may swap all that
    is under it.  A directory that does not exist yet is left for the open
    or bind that needs it to report.
    """
    directory = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    while True:
        try:
            mode = os.stat(directory).st_mode
        except OSError:
            mode = 0
        if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
            return directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return None
        directory = parent


def location_problems(places: Iterable[tuple[str, str]]) -> list[str]:
    """One line for each (setting, path) that sits where a link could be planted, or is one.

    Checked before the master has created any file, and all at once, so the
    operator fixes every problem in one go.
    """
    problems = []
    for setting, path in places:
        directory = unsafe_directory(path)
        if directory is not None:
            problems.append(f"{setting}: '{path}' is in '{directory}', which anybody may write to and is not "
                            "sticky, so anybody could plant a link there; use a directory others cannot write "
                            "(or one with the sticky bit, like /tmp)")
        elif os.path.islink(path):
            problems.append(f"{setting}: '{path}': {LINK_REFUSED}; name the file itself")
    return problems
