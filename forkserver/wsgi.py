"""The PEP 3333 adapter: environ, wsgi.input, start_response, and response framing.

This module speaks WSGI on one side and calls two plain callables on the
other: ``send(bytes)`` and ``sendfile(fd, offset, count)``.  It never touches a
socket; ``forkserver.connection`` owns those.  It decides the response framing
(Content-Length, chunked, or close-delimited) because only it sees the app's
headers.  App bugs surface as ``AppError`` (a PEP 3333 violation, logged as one
line) or as the app's own exception (logged with its traceback).
"""

from __future__ import annotations

import io
import os
import re
import stat
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from .http.events import Request
from .http.response import (
    LAST_CHUNK,
    assemble_head,
    frame_chunk,
    header_line,
    status_line,
)

# RFC 9110 §7.6.1 plus the ones PEP 3333 names: an app must not set these.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade"}
)
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 §5.6.2 tchar
FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
STATUS = re.compile(r"[1-9][0-9]{2} [^\x00-\x1f\x7f]*\Z")

Send = Callable[[bytes], None]
SendFile = Callable[[int, int, int], int]


class AppError(Exception):
    """The app broke PEP 3333; the message names the violation."""


class ClientGone(Exception):
    """The client disconnected while the request or response was in transit."""


class Stalled(ClientGone):
    """The client stopped sending the body, or reading the response, for too long."""


class FileWrapper:
    """``wsgi.file_wrapper``: lets the server send a file with ``os.sendfile``.

    Iterating it reads blocks, for servers (and middleware) that cannot use the
    descriptor directly.
    """

    def __init__(self, filelike: Any, blksize: int = 8192) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterable[bytes]:
        read = self.filelike.read
        while True:
            block = read(self.blksize)
            if not block:
                return
            yield block


class BodySource(Protocol):
    """Where ``Input`` gets the request body: the connection it arrives on."""

    def pull_body(self) -> bytes | bytearray: ...

    def body_into(self, buffer: Any) -> int: ...


class Input(io.RawIOBase):
    """The raw stream under ``wsgi.input``: reads body bytes until the body ends.

    The source either reads body bytes straight into the caller's buffer
    (``body_into``), or, when the parser already holds some (or the body is
    chunked), hands over pieces (``pull_body``; ``b""`` once the body is
    complete), so reads can never run into the next pipelined request.  The
    buffered reader on top supplies read/readline/readlines/iteration.
    """

    def __init__(self, source: BodySource) -> None:
        self._source = source
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            direct = self._source.body_into(buffer)
            if direct >= 0:
                return direct
            self._pending = memoryview(self._source.pull_body())
            if not self._pending:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def base_environ(server_name: str, server_port: str, multithread: bool) -> dict[str, Any]:
    """Return the environ keys that are the same for every request on a listener."""
    return {
        "SCRIPT_NAME": "",
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "wsgi.file_wrapper": FileWrapper,
    }


# Header name as sent -> its environ key ("" for a name we drop).  Clients
# send the same few names on every request; bounded like the response caches.
_ENVIRON_KEYS: dict[bytes, str] = {}
ENVIRON_KEY_CACHE_SIZE = 1024
_UNPREFIXED = frozenset({"CONTENT_TYPE", "CONTENT_LENGTH"})
_PROTOCOLS = {"1.0": "HTTP/1.0", "1.1": "HTTP/1.1"}


def header_key(name: str) -> str:
    """The environ key of a header field: ``HTTP_X_FOO``, or ``CONTENT_TYPE``/``CONTENT_LENGTH``."""
    key = name.upper().replace("-", "_")
    return key if key in _UNPREFIXED else "HTTP_" + key


def _environ_key(name: bytes) -> str:
    """Map a header name as sent to its environ key; "" for a name that must be dropped."""
    if b"_" in name:
        # A client could send "X_Forwarded_For" to pose as a proxy's
        # "X-Forwarded-For" after the dash-to-underscore mapping; drop it.
        key = ""
    else:
        key = header_key(name.decode("latin-1"))
    if len(_ENVIRON_KEYS) < ENVIRON_KEY_CACHE_SIZE:
        _ENVIRON_KEYS[name] = key
    return key


def header_environ(headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    """Map request header fields to their environ entries (``HTTP_*``, ``CONTENT_*``).

    Repeated fields are joined with "," (cookies with "; ", RFC 9113 §8.2.3);
    names containing "_" are dropped.
    """
    fields: dict[str, str] = {}
    keys = _ENVIRON_KEYS
    for name, value in headers:
        key = keys.get(name)
        if key is None:
            key = _environ_key(name)
        if not key:
            continue
        text = value.decode("latin-1").strip(" \t")
        if key not in fields or key in _UNPREFIXED:
            fields[key] = text
        else:
            fields[key] += ("; " if key == "HTTP_COOKIE" else ",") + text
    return fields


def build_environ(request: Request, base: dict[str, Any], remote: tuple[str, str]) -> dict[str, Any]:
    """Build the environ of a request (PEP 3333 §"environ Variables"), all but ``wsgi.input``.

    ``remote`` is the socket's peer; what a trusted proxy says about the
    client is applied afterwards (``forkserver.proxy.apply_origin``).
    """
    environ = base.copy()
    environ.update(header_environ(request.headers))
    raw = target = request.target
    if target[:1] != b"/" and target != b"*":
        # absolute-form (RFC 9112 §3.2.2): the path is what follows the
        # authority, and the authority wins over any Host header.
        scheme_end = target.find(b"://") + 3
        end = len(target)
        for delimiter in b"/?#":
            found = target.find(bytes((delimiter,)), scheme_end)
            if found >= 0:
                end = min(end, found)
        environ["HTTP_HOST"] = target[scheme_end:end].decode("latin-1")
        target = target[end:] if target[end:end + 1] == b"/" else b"/" + target[end:]
    path, _, query = target.partition(b"?")
    if b"#" in path:
        path = path.partition(b"#")[0]
    environ["REQUEST_METHOD"] = request.method
    environ["PATH_INFO"] = unquote_to_bytes(path).decode("latin-1") if b"%" in path else path.decode("latin-1")
    environ["QUERY_STRING"] = query.partition(b"#")[0].decode("latin-1") if query else ""
    environ["RAW_URI"] = raw.decode("latin-1")
    environ["SERVER_PROTOCOL"] = _PROTOCOLS[request.version]
    environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = remote
    if request.chunked:
        environ.pop("CONTENT_LENGTH", None)
    return environ


# Encoded status and field lines for what apps have already sent, keyed by
# what start_response received.  Apps send the same few statuses and mostly
# the same headers on every request, so after the first request a status or
# a field costs one dict lookup instead of checking and encoding it again.
# Bounded: names and values that change per request (cookies, lengths, ids)
# stop being remembered once the table is full, and are simply checked.
_STATUS_LINES: dict[str, tuple[int, bytes]] = {}
_FIELD_LINES: dict[tuple[str, str], tuple[bytes, int | None]] = {}
# The last header list encoded, its encoding and its Content-Length: many
# apps answer with an equal list every time, and comparing lists is cheaper
# than looking up each field.
_last_headers: tuple[list[tuple[str, str]], bytes, int | None] = ([], b"", None)
STATUS_CACHE_SIZE = 256
FIELD_CACHE_SIZE = 2048
DIGITS = re.compile(r"[0-9]+\Z")


def encode_status(status: Any) -> tuple[int, bytes]:
    """Return ``(code, status line)`` for a valid status; raise AppError otherwise."""
    if status.__class__ is str:
        known = _STATUS_LINES.get(status)
        if known is not None:
            return known
    if not isinstance(status, str):
        raise AppError(f"status must be str, got {type(status).__name__}")
    if not STATUS.match(status):
        raise AppError(f"status {status!r} is not 'NNN Reason'")
    known = int(status[:3]), status_line(status)
    if len(_STATUS_LINES) < STATUS_CACHE_SIZE:
        _STATUS_LINES[status] = known
    return known


def encode_headers(headers: Any) -> tuple[bytes, int | None]:
    """Return the encoded field lines and the declared Content-Length (None if absent).

    Raises AppError unless ``headers`` is a list of (str, str) tuples with
    token names, no control characters and no hop-by-hop fields.
    """
    last = _last_headers
    if headers == last[0] and headers.__class__ is list:
        return last[1], last[2]  # the same fields as the response before (compared item by item)
    if not isinstance(headers, list):
        raise AppError(f"response headers must be a list, got {type(headers).__name__}")
    lines = []
    length = None
    for item in headers:
        known = _FIELD_LINES.get(item) if item.__class__ is tuple else None
        if known is None:
            known = _encode_field(item)
        lines.append(known[0])
        if known[1] is not None:
            length = known[1]
    encoded = b"".join(lines)
    _remember_headers(headers, encoded, length)
    return encoded, length


def _remember_headers(headers: list[tuple[str, str]], encoded: bytes, length: int | None) -> None:
    global _last_headers
    # A copy: the app may change its list later.  One tuple, replaced whole,
    # so threads never see a half-updated entry.
    _last_headers = (list(headers), encoded, length)


def _encode_field(item: Any) -> tuple[bytes, int | None]:
    if not (isinstance(item, tuple) and len(item) == 2):
        raise AppError(f"response header {item!r} is not a (name, value) tuple")
    name, value = item
    if not isinstance(name, str) or not isinstance(value, str):
        raise AppError(f"response header {item!r} must be a pair of str")
    if not TOKEN.match(name):
        raise AppError(f"response header name {name!r} is not a token")
    if FIELD_VALUE_BAD.search(value):
        raise AppError(f"response header {name} has a control character in its value")
    lowered = name.lower()
    if lowered in HOP_BY_HOP:
        raise AppError(f"hop-by-hop header {name!r} is the server's to set (PEP 3333)")
    length = None
    if lowered == "content-length":
        if not DIGITS.match(value.strip(" \t")):
            raise AppError(f"Content-Length {value!r} is not a number")
        length = int(value)
    try:
        known = header_line(name, value), length
    except UnicodeEncodeError:
        raise AppError(f"response header {name} is not latin-1 (PEP 3333)") from None
    if len(_FIELD_LINES) < FIELD_CACHE_SIZE:
        _FIELD_LINES[(name, value)] = known
    return known


class Sink(Protocol):
    """Where a Response sends its bytes: the connection it answers on."""

    def send(self, data: bytes) -> None: ...

    def send_pair(self, head: bytes, body: bytes, last: bool = False) -> None: ...

    def sendfile(self, in_fd: int, offset: int, count: int) -> int: ...

    def must_close(self) -> bool: ...


class Response:
    """One response under construction: start_response, write(), framing, close.

    ``keep_alive`` goes False whenever the framing or an error means the
    connection cannot carry another request afterwards; the sink's
    ``must_close`` is asked as the head goes out, for what only becomes known
    while the app runs (the worker began to stop, the body was never asked for).
    """

    # Class-level defaults: a response is made per request, and most of
    # these keep their starting value, so __init__ need not store them.
    status: str | None = None
    code = 0  # the numeric status; 0 while the app has not started a response
    headers: list[tuple[str, str]] = []  # replaced, never mutated
    head_sent = False
    chunked = False
    content_length: int | None = None
    body_bytes = 0
    # Set by start_response: the status forbids a body (1xx, 204, 304; RFC 9110 §6.4.1),
    # and no body goes out (that, or a HEAD request).
    status_without_body = False
    bodyless = False

    def __init__(self, sink: Sink, date_line: Callable[[], bytes],
                 head_only: bool, http10: bool, keep_alive: bool) -> None:
        self._sink = sink
        self._date_line = date_line
        self.head_only = head_only
        self.http10 = http10
        self.keep_alive = keep_alive

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Send:
        """PEP 3333 ``start_response``: check and encode status and headers, send nothing yet."""
        if exc_info:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the traceback reference cycle (PEP 3333)
        elif self.status is not None:
            raise AppError("start_response called a second time without exc_info")
        self.code, self._status_line = encode_status(status)
        self._fields, self._declared_length = encode_headers(headers)
        code = self.code
        self.status_without_body = code < 200 or code == 204 or code == 304
        self.bodyless = self.head_only or self.status_without_body
        self.status, self.headers = status, headers
        return self.write

    def _head(self, known_length: int | None) -> bytes:
        """Pick the framing and return the encoded head; ``known_length`` if all body is known."""
        if self.status is None:
            raise AppError("app returned without calling start_response")
        fields = self._fields
        length = self._declared_length
        if length is None and known_length is not None and not self.status_without_body:
            self.headers = self.headers + [("Content-Length", str(known_length))]  # as the access log sees it
            fields += b"Content-Length: %d\r\n" % known_length
            length = known_length
        self.content_length = length
        if self.keep_alive and self._sink.must_close():
            self.keep_alive = False
        if length is None and not self.bodyless:
            if self.http10:
                self.keep_alive = False  # the body ends when the connection does
            else:
                self.chunked = True
        self.head_sent = True
        return assemble_head(self._status_line, fields, self._date_line(), self.chunked, not self.keep_alive)

    def _frame(self, data: bytes) -> bytes:
        """Apply length accounting and chunked framing to one piece of body."""
        if self.bodyless:
            return b""
        if self.content_length is not None:
            room = self.content_length - self.body_bytes
            if len(data) > room:
                data = data[:room]  # never send more than the app promised
        self.body_bytes += len(data)
        if self.chunked and data:
            return frame_chunk(data)
        return data

    def write(self, data: bytes) -> None:
        """Send body bytes now, with the head first if it has not gone out yet."""
        if not isinstance(data, bytes):
            raise AppError(f"app wrote {type(data).__name__}, not bytes")
        if not data:
            return
        if self.head_sent:
            data = self._frame(data)
            if data:
                self._sink.send(data)
        else:
            head = self._head(None)
            data = self._frame(data)
            # A first write that is the whole declared body ends the response.
            self._sink.send_pair(head, data, self.keep_alive and self.body_bytes == self.content_length)

    def send_whole(self, body: bytes) -> None:
        """Send head and a fully known body together, in one call."""
        size = len(body)
        head = self._head(size)
        if self.content_length == size and not self.bodyless:
            self.body_bytes = size  # the common case, framed: nothing to cut, no chunks
            self._sink.send_pair(head, body, self.keep_alive)
            return
        self._sink.send_pair(head, self._frame(body))
        self.finish()

    def send_file(self, fd: int) -> bool:
        """Send a regular file from its current offset with sendfile; False if not a regular file."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        remaining = max(0, info.st_size - offset)
        self._sink.send(self._head(remaining))
        if self.content_length is not None:
            remaining = min(remaining, self.content_length)
        if not self.bodyless:
            while remaining:
                sent = self._sink.sendfile(fd, offset, remaining)
                if sent == 0:
                    break  # the file shrank under us; the length check below closes
                offset += sent
                remaining -= sent
                self.body_bytes += sent
        self.finish()
        return True

    def finish(self) -> None:
        """End the body: head if still unsent, last chunk, and the length check."""
        if not self.head_sent:
            self._sink.send(self._head(0))
        if self.chunked:
            self._sink.send(LAST_CHUNK)
        elif (self.content_length is not None and not self.bodyless
              and self.body_bytes < self.content_length):
            # The client still waits for the bytes the app promised; only
            # closing the connection tells it they are not coming.
            self.keep_alive = False


def run_app(app: Callable[..., Any], environ: dict[str, Any], response: Response) -> None:
    """Call the app and send what it returns; always call the iterable's close().

    Raises whatever the app raised, ``AppError`` for PEP 3333 violations, and
    ``ClientGone``/``OSError`` from sending.
    """
    result = app(environ, response.start_response)
    if result.__class__ is list and len(result) == 1 and result[0].__class__ is bytes and not response.head_sent:
        response.send_whole(result[0])  # the usual answer: one bytes in a list, which has no close()
        return
    try:
        if isinstance(result, (list, tuple)) and not response.head_sent:
            for piece in result:
                if not isinstance(piece, bytes):
                    raise AppError(f"app returned {type(piece).__name__}, not bytes")
            response.send_whole(result[0] if len(result) == 1 else b"".join(result))
            return
        if isinstance(result, FileWrapper) and hasattr(result.filelike, "fileno") and not response.head_sent:
            try:
                fd = result.filelike.fileno()
            except (OSError, io.UnsupportedOperation):
                fd = -1
            if fd >= 0 and response.send_file(fd):
                return
        if isinstance(result, (str, bytes)):
            raise AppError(f"app returned a bare {type(result).__name__}; it must return an iterable of bytes")
        for piece in result:
            response.write(piece)
        response.finish()
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
