"""Error log and access log: opening, formatting, and reopening on SIGUSR1.

Both logs write whole lines with one ``os.write`` on an ``O_APPEND`` descriptor,
so lines from many workers never interleave and nothing sits in a userspace
buffer across ``fork``.  Reopening swaps the file under the same descriptor
number with ``dup2``, so no holder of the descriptor needs to be told.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

LOGGER_NAME = "forkserver"
ERROR_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
ERROR_LOG_DATEFMT = "%Y-%m-%d %H:%M:%S %z"


class LogFile:
    """An append-only log destination: a path, or ``-`` for a standard stream."""

    def __init__(self, path: str, setting: str, standard_fd: int) -> None:
        self.path = path
        if path == "-":
            self.fd = standard_fd
            return
        self.fd = self._open(setting)

    def _open(self, setting: str) -> int:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot open '{self.path}': {exc.strerror}") from None
        return fd

    def write(self, line: bytes) -> None:
        """Append one complete line; a full disk loses the line, never the server."""
        try:
            os.write(self.fd, line)
        except OSError:
            pass

    def reopen(self) -> None:
        """Point the descriptor at a fresh file at ``path`` (after logrotate moved it)."""
        if self.path == "-":
            return
        fresh = self._open("reopen")
        os.dup2(fresh, self.fd, inheritable=False)
        os.close(fresh)


class LineHandler(logging.Handler):
    """A logging handler that emits each record as one write to a LogFile."""

    def __init__(self, target: LogFile) -> None:
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.target.write((self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)


def setup_error_log(path: str, level: str) -> LogFile:
    """Send the ``forkserver`` logger (and stray warnings) to ``path`` at ``level``."""
    target = LogFile(path, "error_logfile", 2)
    handler = LineHandler(target)
    handler.setFormatter(logging.Formatter(ERROR_LOG_FORMAT, ERROR_LOG_DATEFMT))
    logger = logging.getLogger(LOGGER_NAME)
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return target


@dataclass
class AccessRecord:
    """What the access log needs to know about one finished request."""

    remote_addr: str
    method: str
    target: str
    path: str
    query: str
    protocol: str
    status: int
    response_bytes: int
    request_headers: Mapping[str, str]
    response_headers: Mapping[str, str]
    started_at: float
    duration: float
    environ: Mapping[str, Any]


class _Atoms(Mapping[str, str]):
    """gunicorn's access-log atoms, computed only when the format asks for them."""

    def __init__(self, record: AccessRecord) -> None:
        self.r = record

    def __getitem__(self, key: str) -> str:
        r = self.r
        if key.startswith("{") and len(key) > 3 and key[-2] == "}":
            name, source = key[1:-2].lower(), key[-1]
            table = {"i": r.request_headers, "o": r.response_headers, "e": r.environ}.get(source)
            if table is None:
                raise KeyError(key)
            if source == "e":
                return str(table.get(key[1:-2], "-"))
            return str(table.get(name, "-"))
        atom = _ATOMS.get(key)
        if atom is None:
            raise KeyError(key)
        return atom(r)

    def __iter__(self) -> Any:
        return iter(_ATOMS)

    def __len__(self) -> int:
        return len(_ATOMS)


def _clf_time(t: float) -> str:
    return _clf_second(int(t))


@functools.lru_cache(maxsize=4)
def _clf_second(second: int) -> str:
    """Format a second once, not once per request (a pure memo, safe across threads)."""
    return time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second))


class Headers(Mapping[str, str]):
    """A case-insensitive view of (name, value) pairs, searched only when a format asks.

    Building a dict of every header for every request cost more than the
    two or three lookups a log line makes.
    """

    def __init__(self, pairs: Sequence[tuple[Any, Any]]) -> None:
        self._pairs = pairs

    def __getitem__(self, key: str) -> str:
        wanted = key.lower()
        for name, value in self._pairs:
            if isinstance(name, bytes):
                name, value = name.decode("latin-1"), value.decode("latin-1")
            if name.lower() == wanted:
                return str(value)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        for name, _ in self._pairs:
            yield (name.decode("latin-1") if isinstance(name, bytes) else name).lower()

    def __len__(self) -> int:
        return len(self._pairs)


_ATOMS: dict[str, Callable[[AccessRecord], str]] = {
    "h": lambda r: r.remote_addr or "-",
    "l": lambda r: "-",
    "u": lambda r: r.environ.get("REMOTE_USER") or "-",
    "t": lambda r: _clf_time(r.started_at),
    "r": lambda r: f"{r.method} {r.target} {r.protocol}",
    "m": lambda r: r.method,
    "U": lambda r: r.path,
    "q": lambda r: r.query,
    "H": lambda r: r.protocol,
    "s": lambda r: str(r.status),
    "B": lambda r: str(r.response_bytes),
    "b": lambda r: str(r.response_bytes) if r.response_bytes else "-",
    "f": lambda r: r.request_headers.get("referer", "-"),
    "a": lambda r: r.request_headers.get("user-agent", "-"),
    "T": lambda r: str(int(r.duration)),
    "M": lambda r: str(int(r.duration * 1000)),
    "D": lambda r: str(int(r.duration * 1_000_000)),
    "L": lambda r: f"{r.duration:.6f}",
    "p": lambda r: f"<{os.getpid()}>",
}


def validate_access_format(fmt: str) -> str | None:
    """Return None if every ``%(atom)s`` in ``fmt`` is known, else what was expected."""
    sample = AccessRecord("127.0.0.1", "GET", "/", "/", "", "HTTP/1.1", 200, 0, {}, {}, 0.0, 0.0, {})
    try:
        fmt % _Atoms(sample)
    except KeyError as exc:
        return f"a format of known atoms (h l u t r m U q H s B b f a T M D L p {{name}}i {{name}}o {{key}}e); '{exc.args[0]}' is not one"
    except (ValueError, TypeError) as exc:
        return f"a valid %-format ({exc})"
    return None


def _json_line(record: AccessRecord) -> str:
    # json.dumps escapes quotes, control characters and non-ASCII, so no header
    # value can close a string early and forge a field of its own.
    return json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.started_at)),
            "remote_addr": record.remote_addr,
            "method": record.method,
            "target": record.target,
            "path": record.path,
            "query": record.query,
            "protocol": record.protocol,
            "status": record.status,
            "bytes": record.response_bytes,
            "referer": record.request_headers.get("referer"),
            "user_agent": record.request_headers.get("user-agent"),
            "duration_us": int(record.duration * 1_000_000),
            "pid": os.getpid(),
        },
        separators=(",", ":"),
    )


# A batch of lines is written in one write(2) of at most PIPE_BUF bytes, which
# stays atomic even on a pipe (stdout), so workers' lines never interleave.
BATCH_BYTES = 4096


class AccessLog:
    """Formats finished requests into lines; constructed only when the log is on.

    With ``batched`` (a single-threaded worker) lines wait in a small buffer
    that the worker flushes whenever its loop goes idle, every tick, and
    before it exits or reopens the file: one system call per batch instead
    of one per request.  A SIGKILLed worker can lose its last unflushed lines.
    """

    def __init__(self, target: LogFile, fmt: str, batched: bool = False) -> None:
        self.target = target
        self.fmt = fmt
        self.batched = batched
        self._batch: list[bytes] = []
        self._batch_bytes = 0

    def format(self, record: AccessRecord) -> str:
        """Return the line for ``record`` without its newline."""
        if self.fmt == "json":
            return _json_line(record)
        return self.fmt % _Atoms(record)

    def log(self, record: AccessRecord) -> None:
        """Write (or batch) the line for ``record``."""
        line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        if not self.batched:
            self.target.write(line)
            return
        if self._batch_bytes + len(line) > BATCH_BYTES:
            self.flush()
        self._batch.append(line)
        self._batch_bytes += len(line)

    def flush(self) -> None:
        """Write out the batched lines."""
        if self._batch:
            self.target.write(b"".join(self._batch))
            self._batch.clear()
            self._batch_bytes = 0


def open_access_log(path: str, fmt: str, batched: bool = False) -> AccessLog | None:
    """Open the access log named by the settings, or return None when it is off."""
    if not path:
        return None
    return AccessLog(LogFile(path, "access_logfile", 1), fmt, batched)
