"""Error log and access log: opening, formatting, and reopening on SIGUSR1.

Both logs write whole lines with one ``os.write`` on an ``O_APPEND`` descriptor,
so lines from many workers never interleave and nothing sits in a userspace
buffer across ``fork``.  Reopening swaps the file under the same descriptor
number with ``dup2``, so no holder of the descriptor needs to be told.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .errors import ConfigError
from .cgi import header_key

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


class Finished(Protocol):
    """What the access log reads of a finished response (``forkserver.wsgi.Response``)."""

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


def open_access_log(path: str, fmt: str, batched: bool = False) -> AccessLog | None:
    """Open the access log named by the settings, or return None when it is off."""
    if not path:
        return None
    return AccessLog(LogFile(path, "access_logfile", 1), fmt, batched)
