"""Development mode (``reload``): tell the master when the app's code changed on disk.

Which files?  The master never imports the app (``reload`` excludes
``preload``), and modules it did import would not be re-read by a forked
worker anyway.  So each worker, once its import of the app has finished
(or failed), writes the files of the modules that import added, plus the
files named in the import's traceback, into a report directory the master
made; the master watches those, the ``reload_extra_file`` paths, and new
``*.py`` files appearing beside them (a module an import is still missing).
This is what Django's runserver watches, and it covers code outside the
project directory (an editable install, a ``pythonpath`` entry) without
watching a whole tree.

How?  inotify through ctypes (no dependency) on the *directories* holding
those files, since editors save by renaming a new file over the old one;
without inotify, a comparison of mtimes about once a second.  Either way the
master sleeps in ``poll`` on ``fileno()`` and calls ``changed()``, which never
blocks longer than the debounce: an editor's save burst becomes one reload.
Never imports or runs app code.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import select
import shutil
import stat
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

from . import libc

log = logging.getLogger("forkserver")

SETTLE_INTERVAL = 0.15  # quiet time that ends a burst of saves
MAX_SETTLE = 1.0  # a burst longer than this reloads anyway
SCAN_INTERVAL = 1.0  # polling backend: seconds between mtime scans
REPORT_SUFFIX = ".json"
# A worker's report is data from app code, read by the master: bounded.  A
# big Django project imports ~3,000 files, about 300 KB of report.
MAX_REPORT_BYTES = 4 << 20
MAX_REPORT_FILES = 50_000
REPORTS_PER_CALL = 64  # the rest wait for the next call: a flood of files cannot hold the master

# <sys/inotify.h>
IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR = 0x4000, 0x8000, 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
# IN_MODIFY is left out on purpose: a save ends in CLOSE_WRITE (or a rename),
# and a database or log file written beside the code would wake us per write.
WATCH_MASK = (IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name


class Inotify:
    """The few inotify calls we need, through libc."""

    def __init__(self) -> None:
        init, self._add = libc.function("inotify_init1"), libc.function("inotify_add_watch")
        if init is None or self._add is None:
            raise OSError(errno.ENOSYS, "this C library has no inotify")
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._add.restype = ctypes.c_int
        fd = init(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        self.fd = fd

    def add(self, directory: str) -> int:
        """Watch a directory; return the watch descriptor (the same one if already watched)."""
        wd: int = self._add(self.fd, os.fsencode(directory), WATCH_MASK)
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), directory)
        return wd

    def read(self) -> list[tuple[int, int, str]]:
        """Every queued event as (wd, mask, name), without waiting."""
        events: list[tuple[int, int, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return events
            offset = 0
            while offset + EVENT.size <= len(data):
                wd, mask, _, length = EVENT.unpack_from(data, offset)
                name = data[offset + EVENT.size:offset + EVENT.size + length].rstrip(b"\0")
                events.append((wd, mask, os.fsdecode(name)))
                offset += EVENT.size + length

    def close(self) -> None:
        os.close(self.fd)


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


def _load_report(report_fd: int, name: str) -> dict[str, list[int]]:
    """Read and check one worker's report: ``{"files": {absolute path: [mtime_ns, size]}}``.

    Opened without following links and without waiting (a FIFO planted in
    the directory must not block the master), read only if it is a regular
    file, at most MAX_REPORT_BYTES, parsed as JSON (plain data, never code).
    Raises ValueError (or OSError) for anything else.
    """
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=report_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        data = os.read(fd, MAX_REPORT_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_REPORT_BYTES:
        raise ValueError(f"larger than {MAX_REPORT_BYTES} bytes")
    document = json.loads(data.decode("utf-8"))
    files = document.get("files") if isinstance(document, dict) else None
    if not isinstance(files, dict) or len(files) > MAX_REPORT_FILES:
        raise ValueError(f"not a report of at most {MAX_REPORT_FILES} files")
    for path, seen in files.items():
        if not (os.path.isabs(path) and "\0" not in path and isinstance(seen, list) and len(seen) == 2
                and all(type(number) is int for number in seen)):
            raise ValueError(f"not an absolute path and [mtime_ns, size]: {path[:200]!r}")
    return files


class Reloader:
    """Watches the app's files from the master; ``changed()`` says when to reload.

    Args:
        extra_files: ``reload_extra_file`` paths (relative ones from the cwd).
        owner: (uid, gid) the workers run as, so they can write their reports.
        use_inotify: False forces the polling backend (tests, odd platforms).
    """

    def __init__(self, extra_files: Sequence[str] = (), *, owner: tuple[int | None, int | None] = (None, None),
                 use_inotify: bool = True) -> None:
        self.report_dir = tempfile.mkdtemp(prefix="forkserver-reload-")
        if owner != (None, None):
            os.chown(self.report_dir, -1 if owner[0] is None else owner[0], -1 if owner[1] is None else owner[1])
        # Workers own the directory and could swap its path for a link to
        # anywhere; the master reads and deletes only through this descriptor.
        self.report_fd = os.open(self.report_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.names: dict[str, set[str]] = {}  # directory -> file names in it that matter
        self.whole_dirs: set[str] = set()  # reload_extra_file directories: any entry matters
        self.watches: dict[int, str] = {}  # inotify wd -> directory
        self.lost: set[str] = set()  # watched directories that vanished (a checkout may bring them back)
        self.polled: dict[str, dict[str, Any]] = {}  # directory -> its last snapshot
        self.next_scan = 0.0
        self.pending: str | None = None  # a change seen while held
        self.inotify: Inotify | None = None
        if use_inotify:
            try:
                self.inotify = Inotify()
            except (OSError, AttributeError) as exc:
                log.info("reload: inotify unavailable (%s); polling file times every %gs", exc, SCAN_INTERVAL)
        # With polling, the master still wants a descriptor to poll: one that never fires.
        self._idle_r, self._idle_w = (-1, -1) if self.inotify else os.pipe2(os.O_CLOEXEC)
        for path in extra_files:
            path = os.path.abspath(path)
            if os.path.isdir(path):
                self.whole_dirs.add(os.path.realpath(path))
                self.watch(os.path.realpath(path), None)
            else:
                self.watch(os.path.realpath(os.path.dirname(path)), os.path.basename(path))

    def fileno(self) -> int:
        """A descriptor that becomes readable when something may have changed."""
        return self.inotify.fd if self.inotify else self._idle_r

    def watch(self, directory: str, name: str | None) -> None:
        """Care about ``name`` in ``directory`` (every entry for None)."""
        names = self.names.setdefault(directory, set())
        if name is not None and name not in names:
            names.add(name)
            if directory in self.polled:
                # It now counts by signature, not by presence: record that
                # without taking the whole directory's snapshot again.
                signature = _signature(os.path.join(directory, name))
                if signature is not None:
                    self.polled[directory][name] = signature
        if directory in self.polled or directory in self.watches.values():
            return
        if self.inotify is not None:
            try:
                self.watches[self.inotify.add(directory)] = directory
                return
            except OSError as exc:
                if not os.path.isdir(directory):
                    log.warning("reload: cannot watch %s: no such directory", directory)
                    self.lost.add(directory)
                    return
                log.warning("reload: cannot watch %s with inotify (%s); polling it", directory, exc.strerror)
        self.polled[directory] = self._snapshot(directory)

    def changed(self, *, hold: bool = False) -> bool:
        """True once for each burst of changes to watched files; never blocks longer than MAX_SETTLE.

        Call it whenever ``fileno()`` is readable (and once a tick), since it
        also drains the events.  With ``hold`` (a reload is already under way)
        a change is remembered and reported by the first call without it.
        """
        reason = self._read_reports() or self._find_lost() or self._events() or self._scan()
        if reason and not hold:
            self._settle()
        self.pending = self.pending or reason
        if hold or not self.pending:
            return False
        log.info("reload: %s changed; starting new workers", self.pending)
        self.pending = None
        return True

    def close(self) -> None:
        """Stop watching and remove the report directory."""
        if self.inotify is not None:
            self.inotify.close()
        else:
            os.close(self._idle_r)
            os.close(self._idle_w)
        os.close(self.report_fd)
        shutil.rmtree(self.report_dir, ignore_errors=True)  # never follows a link (fd-based on Linux)

    # -- what the workers imported -----------------------------------------------------

    def _read_reports(self) -> str | None:
        """Watch the files workers reported; a file already edited since its import is a change."""
        reason = None
        try:
            with os.scandir(self.report_fd) as scan:
                names = [entry.name for entry in scan if entry.name.endswith(REPORT_SUFFIX)][:REPORTS_PER_CALL]
        except OSError:
            return None
        for report in names:
            try:
                files = _load_report(self.report_fd, report)
            except (OSError, ValueError) as exc:
                log.warning("reload: unreadable worker report %r: %s", report[:200], exc)
                continue
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(report, dir_fd=self.report_fd)
            for path, seen in files.items():
                directory, name = os.path.split(path)
                self.watch(os.path.realpath(directory), name)
                now = _signature(path)
                if now is not None and list(now[:2]) != seen:
                    reason = path  # edited between the worker's import and now
        return reason

    # -- inotify -------------------------------------------------------------------------------

    def _events(self) -> str | None:
        if self.inotify is None:
            return None
        reason = None
        for wd, mask, name in self.inotify.read():
            if mask & IN_Q_OVERFLOW:
                reason = reason or "(inotify queue overflowed) something"
                continue
            directory = self.watches.get(wd)
            if directory is None:
                continue
            if mask & GONE and not name:
                # The directory itself went away: its files are gone or moved.
                del self.watches[wd]
                self.lost.add(directory)
                reason = reason or directory
            elif self._matters(directory, name, created=bool(mask & (IN_CREATE | IN_MOVED_TO))):
                reason = reason or os.path.join(directory, name)
        return reason

    def _matters(self, directory: str, name: str, *, created: bool) -> bool:
        if directory in self.whole_dirs or name in self.names.get(directory, ()):
            return True
        # A new module beside the app's may be the one a failed import looked for.
        return created and name.endswith(".py")

    def _find_lost(self) -> str | None:
        """Watch again directories that came back (a branch switch removes and recreates them)."""
        for directory in list(self.lost):
            if os.path.isdir(directory):
                self.lost.discard(directory)
                self.watch(directory, None)
                return directory
        return None

    # -- polling -----------------------------------------------------------------------------------

    def _snapshot(self, directory: str) -> dict[str, Any]:
        """Signatures of the files that matter; other ``*.py`` files count by presence only."""
        wanted, whole = self.names.get(directory, set()), directory in self.whole_dirs
        snapshot: dict[str, Any] = {}
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return snapshot
        for entry in entries:
            if whole or entry.name in wanted:
                snapshot[entry.name] = _signature(entry.path)
            elif entry.name.endswith(".py"):
                snapshot[entry.name] = None
        return snapshot

    def _scan(self, force: bool = False) -> str | None:
        if not self.polled or (not force and time.monotonic() < self.next_scan):
            return None
        self.next_scan = time.monotonic() + SCAN_INTERVAL
        reason = None
        for directory, before in self.polled.items():
            after = self._snapshot(directory)
            if after != before:
                self.polled[directory] = after
                changed = [n for n in after.keys() | before.keys()
                           if n not in after or n not in before or after[n] != before[n]]
                reason = reason or os.path.join(directory, min(changed, default=""))
        return reason

    def _settle(self) -> None:
        """Wait until changes stop for SETTLE_INTERVAL (at most MAX_SETTLE), swallowing them."""
        deadline = time.monotonic() + MAX_SETTLE
        while (left := deadline - time.monotonic()) > 0:
            quiet = True
            if self.inotify is not None:
                poller = select.poll()
                poller.register(self.inotify.fd, select.POLLIN)
                if poller.poll(min(SETTLE_INTERVAL, left) * 1000):
                    self._events()
                    quiet = False
            else:
                time.sleep(min(SETTLE_INTERVAL, left))
            if self._scan(force=True):
                quiet = False
            if quiet:
                return


# -- the worker's side ------------------------------------------------------------------------


@contextlib.contextmanager
def reporting(report_dir: str) -> Iterator[None]:
    """Around the app's import in a worker: report the files it loaded to the master.

    Does nothing when ``report_dir`` is empty (reload off).  A failed import is
    reported too, with the files in its traceback, so fixing them is noticed.
    No ``.pyc`` is written: Python trusts one whose source has the same size and
    mtime in whole *seconds*, so a same-size edit within a second of an import
    would be served stale by the next worker.
    """
    if not report_dir:
        yield
        return
    sys.dont_write_bytecode = True
    before = set(sys.modules)
    try:
        yield
    except BaseException as exc:
        write_report(report_dir, before, exc)
        raise
    write_report(report_dir, before, None)


def _error_files(error: BaseException) -> set[str]:
    """Files named by an exception, its causes and contexts, and a SyntaxError's filename."""
    files: set[str] = set()
    seen: set[int] = set()
    pending = [error]
    while pending and len(seen) < 20:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, SyntaxError) and exc.filename:
            files.add(exc.filename)
        files.update(frame.filename for frame in traceback.extract_tb(exc.__traceback__))
        pending += [e for e in (exc.__cause__, exc.__context__) if e is not None]
    return files


def write_report(report_dir: str, before: set[str], error: BaseException | None) -> None:
    """Write ``{"files": {path: [mtime_ns, size]}}`` for the modules imported since ``before``."""
    modules = sys.modules.copy()
    inherited = {getattr(modules.get(name), "__file__", None) for name in before}
    candidates = {getattr(module, "__file__", None) for name, module in modules.items() if name not in before}
    if error is not None:
        candidates |= _error_files(error)
    files = {}
    for path in candidates:
        if not isinstance(path, str) or path in inherited:
            continue
        path = os.path.abspath(path)
        signature = _signature(path)
        if signature is not None:
            files[path] = signature[:2]
    final = os.path.join(report_dir, f"{os.getpid()}{REPORT_SUFFIX}")
    try:
        with open(final + ".tmp", "w", encoding="utf-8") as fh:
            json.dump({"files": files}, fh)
        os.replace(final + ".tmp", final)  # the master never reads half a report
    except OSError as exc:
        log.warning("reload: cannot write the import report %s: %s", final, exc.strerror)
