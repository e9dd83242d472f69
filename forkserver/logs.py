"""Error log and access log: opening, formatting, reopening on SIGUSR1, counting lost lines.

Both logs write whole lines with one ``os.write`` on an ``O_APPEND`` descriptor,
so lines from many workers never interleave and nothing sits in a userspace
buffer across ``fork``.  Only the master opens log files (workers may run as
a user who could not); workers inherit its descriptors.  Reopening swaps the
file under the same descriptor number with ``dup2``, in the master by path
and in a worker with the descriptor the master hands it (forkserver.handover).
A line that cannot be written (a full disk) is counted, and the count is
logged at most once per LOSS_REPORT_INTERVAL.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .errors import ConfigError
from .cgi import header_key
from .safefiles import open_nofollow, reason

LOGGER_NAME = "forkserver"
# Outside the "forkserver" tree, so its records propagate to the root logger
# (as gunicorn.access's do), not into the error log; see forkserver.logconfig.
ACCESS_LOGGER_NAME = "forkserver_access"
LOSS_REPORT_INTERVAL = 60.0  # seconds between two reports of lost log lines
ERROR_LOG_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
ERROR_LOG_DATEFMT = "%Y-%m-%d %H:%M:%S %z"


class LogFile:
    """An append-only log destination: a path, or ``-`` for a standard stream."""

    def __init__(self, path: str, setting: str, standard_fd: int) -> None:
        self.path = path
        self.captured: tuple[int, ...] = ()  # standard descriptors pointed here too (capture_stdio)
        self.forget_losses()
        if path == "-":
            self.fd = standard_fd
            return
        self.fd = self._open(setting)

    def _open(self, setting: str) -> int:
        """Open ``path`` for appending; a link there is refused, since root may be the one writing."""
        try:
            fd = open_nofollow(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as exc:
            raise ConfigError(f"{setting}: cannot open '{self.path}': {reason(exc)}") from None
        return fd

    def write(self, line: bytes) -> None:
        """Append one complete line; a full disk loses the line (counted), never the server."""
        try:
            os.write(self.fd, line)
        except OSError as exc:
            self.dropped += line.count(b"\n") or 1  # a batch of access lines is one write
            self.last_error = exc.strerror or str(exc)

    def close(self) -> None:
        """Close the file (a standard stream stays open)."""
        if self.path != "-":
            os.close(self.fd)

    def forget_losses(self) -> None:
        """Start counting lost lines from zero (a new worker: the master's count is the master's)."""
        self.dropped = 0
        self.reported = 0  # ``dropped`` when the last report was made
        self.last_error = ""
        self.next_report = 0.0

    def report_losses(self, now: float) -> None:
        """Log how many lines were lost since the last report, at most once per LOSS_REPORT_INTERVAL.

        The report may itself be lost (the same full disk); it is then
        counted, and the next report says so.
        """
        if self.dropped == self.reported or now < self.next_report:
            return
        lost, self.reported, self.next_report = self.dropped - self.reported, self.dropped, now + LOSS_REPORT_INTERVAL
        logging.getLogger(LOGGER_NAME).error("%d log line(s) could not be written to %s (%s); %d lost in all",
                                             lost, self.path, self.last_error, self.dropped)

    def reopen(self) -> bool:
        """Point the descriptor at a fresh file at ``path`` (after logrotate moved it); False if it failed.

        On failure (the directory is gone, read-only, ...) the old file stays
        in place and one error says why: rotation must never stop the server.
        """
        if self.path == "-":
            return True
        try:
            fresh = self._open("reopen")
        except (ConfigError, OSError) as exc:  # _open words its failures as ConfigError; anything else too
            logging.getLogger(LOGGER_NAME).error("%s; still writing to the file it had open", exc)
            return False
        self.take(fresh)
        os.close(fresh)
        return True

    def take(self, fd: int) -> None:
        """Point our descriptor, and the standard ones captured with it, at the open file ``fd``.

        ``dup2`` swaps the file under the number atomically, so a thread
        writing a line at that moment writes it whole to one file or the other.
        """
        os.dup2(fd, self.fd, inheritable=False)
        for captured in self.captured:
            os.dup2(self.fd, captured)


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


def capture_stdio(target: LogFile) -> None:
    """capture_output: point descriptors 1 and 2 at the error log file, as gunicorn does.

    Everything the app prints, and anything writing to those descriptors
    (C extensions, subprocesses), lands in the error log; the workers
    inherit it at fork, and ``reopen`` moves them along to the new file.
    With the error log on stderr ('-') nothing changes, as in gunicorn.
    Python's streams are made line-buffered: a worker leaves with
    ``os._exit``, which would drop a block-buffered stdout's last lines.
    """
    if target.path == "-":
        return
    streams = [stream for stream in (sys.stdout, sys.stderr) if isinstance(stream, io.TextIOWrapper)]
    for stream in streams:
        stream.flush()  # what was printed before goes where it was meant to
    for fd in (1, 2):
        os.dup2(target.fd, fd)
    target.captured = (1, 2)
    for stream in streams:
        stream.reconfigure(line_buffering=True)


class Finished(Protocol):
    """What the access log reads of a finished response (``forkserver.worker.wsgi.Response``)."""

    code: int
    body_bytes: int
    headers: list[tuple[str, str]]


_clf_last = (-1, "")  # the last second formatted, and its text: one tuple, replaced whole


def _clf_time(t: float) -> str:
    """Format a timestamp as ``[21/Nov/2026:09:21:57 +0000]``, once per second, not once per request."""
    global _clf_last
    second = int(t)
    if second != _clf_last[0]:
        _clf_last = (second, time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(second)))
    return _clf_last[1]


def _response_header(response: Finished, wanted: str) -> str:
    return next((value for name, value in response.headers if name.lower() == wanted), "-")


# Each atom is a Python expression over the finished request: ``e`` the
# environ (decoded for the app, and what the app and a trusted proxy made
# of it), ``r`` the response, ``s`` when it started (wall clock), ``d`` how
# long it took (seconds).
_ATOMS = {
    "h": 'e["REMOTE_ADDR"] or "-"',
    "l": '"-"',
    "u": 'e.get("REMOTE_USER") or "-"',
    "t": "_clf_time(s)",
    "r": 'e["REQUEST_METHOD"] + " " + e["RAW_URI"] + " " + e["SERVER_PROTOCOL"]',
    "m": 'e["REQUEST_METHOD"]',
    "U": 'e["PATH_INFO"]',
    "q": 'e["QUERY_STRING"]',
    "H": 'e["SERVER_PROTOCOL"]',
    "s": "r.code",
    "B": "r.body_bytes",
    "b": 'r.body_bytes or "-"',
    "f": 'e.get("HTTP_REFERER", "-")',
    "a": 'e.get("HTTP_USER_AGENT", "-")',
    "T": "int(d)",
    "M": "int(d * 1000)",
    "D": "int(d * 1000000)",
    "L": 'f"{d:.6f}"',
}
_FIELD = re.compile(r"%%|%\(([^)]*)\)")


def _atom(key: str, pid: int) -> str:
    """The expression for ``%(key)s``; KeyError if there is none."""
    if key == "p":
        return repr(f"<{pid}>")
    if key.startswith("{") and len(key) > 3 and key[-2] == "}":
        name, source = key[1:-2], key[-1]
        if source == "i":
            return f'e.get({header_key(name)!r}, "-")'
        if source == "o":
            return f"_response_header(r, {name.lower()!r})"
        if source == "e":
            return f'str(e.get({name!r}, "-"))'
    return _ATOMS[key]


LineFormat = Callable[[Mapping[str, Any], Finished, float, float], str]


def compile_access_format(fmt: str, pid: int = 0) -> LineFormat:
    """Turn a gunicorn-style format into one function of a finished request: its line, newline included.

    Every ``%(x)s`` becomes a positional ``%s`` and its atom an expression
    in the tuple fed to it, compiled once (as dataclasses and namedtuple
    build their methods), so a line costs one call and one %-format, and an
    atom the format does not use costs nothing.  Text from the format enters
    the code only as ``repr()`` literals.  Raises KeyError for an unknown
    atom and ValueError/TypeError for a format % cannot apply.
    """
    if fmt == "json":
        return _json_line
    expressions: list[str] = []

    def positional(match: re.Match[str]) -> str:
        if match.group(1) is None:
            return "%%"
        expressions.append(_atom(match.group(1), pid))
        return "%"
    template = _FIELD.sub(positional, fmt) + "\n"
    namespace = {"template": template, "_clf_time": _clf_time, "_response_header": _response_header}
    exec(f"def line(e, r, s, d):\n    return template % ({''.join(x + ', ' for x in expressions)})\n", namespace)
    return namespace["line"]


def validate_access_format(fmt: str) -> str | None:
    """Return None if every ``%(atom)s`` in ``fmt`` is known, else what was expected."""
    sample = {"REMOTE_ADDR": "127.0.0.1", "REQUEST_METHOD": "GET", "RAW_URI": "/", "PATH_INFO": "/",
              "QUERY_STRING": "", "SERVER_PROTOCOL": "HTTP/1.1"}

    class Sample:
        code, body_bytes, headers = 200, 0, []
    try:
        compile_access_format(fmt)(sample, Sample(), 0.0, 0.0)
    except KeyError as exc:
        return f"a format of known atoms (h l u t r m U q H s B b f a T M D L p {{name}}i {{name}}o {{key}}e); '{exc.args[0]}' is not one"
    except (ValueError, TypeError) as exc:
        return f"a valid %-format ({exc})"
    return None


def _json_line(environ: Mapping[str, Any], response: Finished, started: float, duration: float) -> str:
    # json.dumps escapes quotes, control characters and non-ASCII, so no header
    # value can close a string early and forge a field of its own.
    return json.dumps(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "remote_addr": environ["REMOTE_ADDR"],
            "method": environ["REQUEST_METHOD"],
            "target": environ["RAW_URI"],
            "path": environ["PATH_INFO"],
            "query": environ["QUERY_STRING"],
            "protocol": environ["SERVER_PROTOCOL"],
            "status": response.code,
            "bytes": response.body_bytes,
            "referer": environ.get("HTTP_REFERER"),
            "user_agent": environ.get("HTTP_USER_AGENT"),
            "duration_us": int(duration * 1_000_000),
            "pid": os.getpid(),
        },
        separators=(",", ":"),
    ) + "\n"


# A batch of lines is written in write(2)s of at most PIPE_BUF bytes, which
# stay atomic even on a pipe (stdout), so workers' lines never interleave.
BATCH_BYTES = 4096
BATCH_REQUESTS = 64  # finished requests held before their lines are written


class AccessLog:
    """Formats finished requests into lines; constructed only when the log is on.

    With ``batched`` (a single-threaded worker) finished requests wait in a
    small list that the worker flushes whenever its loop goes idle, every
    tick, and before it exits or reopens the file: their lines are then
    formatted in one go (the format's code stays hot in the CPU's caches,
    which made a line cost half) and written with one system call per
    PIPE_BUF bytes instead of one per request.  A SIGKILLed worker can lose
    its last unflushed lines.
    """

    def __init__(self, target: LogFile, fmt: str, batched: bool = False) -> None:
        self.target = target
        self.format = compile_access_format(fmt, os.getpid())
        self.batched = batched
        self._pending: list[tuple[Mapping[str, Any], Finished, float, float]] = []

    def log(self, environ: Mapping[str, Any], response: Finished, started: float, duration: float) -> None:
        """Write (or batch) the line for a finished request; ``started`` is wall-clock time."""
        if not self.batched:
            self.target.write(self.format(environ, response, started, duration).encode("utf-8", "backslashreplace"))
            return
        self._pending.append((environ, response, started, duration))
        if len(self._pending) >= BATCH_REQUESTS:
            self.flush()

    def flush(self) -> None:
        """Format and write out the batched requests' lines."""
        if not self._pending:
            return
        line = self.format
        text = "".join([line(*finished) for finished in self._pending])
        self._pending.clear()
        data = text.encode("utf-8", "backslashreplace")
        while len(data) > BATCH_BYTES:
            cut = data.rfind(b"\n", 0, BATCH_BYTES) + 1 or BATCH_BYTES  # whole lines, if any fit
            self.target.write(data[:cut])
            data = data[cut:]
        self.target.write(data)


class LoggerLines:
    """An access log destination that hands each line to a logger, as one INFO record.

    Used when a logconfig gave gunicorn.access (our ACCESS_LOGGER_NAME)
    handlers; their files are reopened by ``logconfig.FileHandlers``.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def write(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            self.logger.info(line)


def open_access_logfile(path: str) -> LogFile | None:
    """Open the access log file named by the settings (the master does), or return None when it is off."""
    if not path:
        return None
    return LogFile(path, "access_logfile", 1)


def make_access_log(target: LogFile | None, fmt: str, batched: bool = False) -> AccessLog | None:
    """The access log writing to ``target`` (opened by the master), or None when it is off.

    A logging configuration that gave the access logger handlers takes the
    lines instead, each logged as its request ends (so not batched).
    """
    configured = logging.getLogger(ACCESS_LOGGER_NAME)
    if configured.handlers:
        return AccessLog(LoggerLines(configured), fmt)  # type: ignore[arg-type]
    return None if target is None else AccessLog(target, fmt, batched)


def open_access_log(path: str, fmt: str, batched: bool = False) -> AccessLog | None:
    """Open the access log named by the settings, or return None when it is off (one process, no fork)."""
    return make_access_log(open_access_logfile(path), fmt, batched)
