"""Serialise response heads and chunked framing to bytes.

Callers hand over already-validated status and header strings (see
``forkserver.worker.wsgi``); this module only encodes them, with the few headers the
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
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._line = b"Date: " + formatdate(second, usegmt=True).encode("ascii") + b"\r\n"
        return self._line


SERVER_LINE = b"Server: " + SERVER_NAME.encode("ascii") + b"\r\n"
CHUNKED_LINE = b"Transfer-Encoding: chunked\r\n"
CLOSE_LINE = b"Connection: close\r\n"


def status_line(status: str) -> bytes:
    """Encode ``"200 OK"`` as the status line ``b"HTTP/1.1 200 OK\\r\\n"``."""
    return b"HTTP/1.1 " + status.encode("latin-1") + b"\r\n"


def header_line(name: str, value: str) -> bytes:
    """Encode one field line; values are latin-1, as PEP 3333 requires of them."""
    return name.encode("latin-1") + b": " + value.encode("latin-1") + b"\r\n"


def assemble_head(status: bytes, fields: bytes, date_line: bytes, chunked: bool, close: bool) -> bytes:
    """Join an encoded status line and field lines with the headers the server owns.

    ``chunked`` adds ``Transfer-Encoding: chunked``; ``close`` adds
    ``Connection: close``.  Callers that send many responses keep the
    encoded pieces and pay only for this join.
    """
    return b"".join((status, fields, date_line, SERVER_LINE,
                     CHUNKED_LINE if chunked else b"", CLOSE_LINE if close else b"", b"\r\n"))


def build_head(
    status: str,
    headers: list[tuple[str, str]],
    date_line: bytes,
    *,
    chunked: bool,
    close: bool,
) -> bytes:
    """Encode an HTTP/1.1 response head: status line, app headers, server headers."""
    fields = b"".join(header_line(name, value) for name, value in headers)
    return assemble_head(status_line(status), fields, date_line, chunked, close)


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
