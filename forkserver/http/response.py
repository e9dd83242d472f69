"""Serialise response heads and chunked framing to bytes.

Callers hand over already-validated status and header strings (see
``forkserver.wsgi``); this module only encodes them, with the few headers the
server owns (Date, Server, Connection, Transfer-Encoding).
"""

from __future__ import annotations

import time
from email.utils import formatdate

SERVER_NAME = "forkserver"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"


class DateHeader:
    """The ``Date`` header line, formatted at most once a second (RFC 9110 §6.6.1)."""

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        """Return ``b"Date: ...\\r\\n"`` for the current second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._line = b"Date: " + formatdate(second, usegmt=True).encode("ascii") + b"\r\n"
        return self._line


def build_head(
    status: str,
    headers: list[tuple[str, str]],
    date_line: bytes,
    *,
    chunked: bool,
    close: bool,
) -> bytes:
    """Encode an HTTP/1.1 response head: status line, app headers, server headers.

    ``chunked`` adds ``Transfer-Encoding: chunked``; ``close`` adds
    ``Connection: close``.  Values are latin-1, as PEP 3333 requires of them.
    """
    parts = [b"HTTP/1.1 ", status.encode("latin-1"), b"\r\n"]
    for name, value in headers:
        parts += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
    parts.append(date_line)
    parts.append(b"Server: " + SERVER_NAME.encode() + b"\r\n")
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def frame_chunk(data: bytes) -> bytes:
    """Wrap ``data`` in one chunk of the chunked transfer coding (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(status: int, reason: str, date_line: bytes) -> bytes:
    """Return a whole plain-text error response that closes the connection."""
    body = f"{status} {reason}\n".encode("ascii")
    head = build_head(
        f"{status} {reason}",
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
        date_line,
        chunked=False,
        close=True,
    )
    return head + body
