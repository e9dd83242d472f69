"""The PEP 3333 adapter: environ, start_response, the app's iterable and its close().

This module speaks WSGI to the app and nothing else.  How the response is
framed, and whether the connection stays open, is the exchange's to decide
(``forkserver.http.exchange``): a Response asks it, and hands the bytes it
gets back to an output, which moves them (``forkserver.worker.connection``).
``wsgi.input`` arrives ready-made in the environ the caller builds.  App
bugs surface as ``AppError`` (a PEP 3333 violation, logged as one line) or as
the app's own exception (logged with its traceback).
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

from ..cgi import UNPREFIXED, header_key
from ..http.events import Request
from ..http.exchange import DONE, SEND_RESPONSE, Exchange
from ..http.response import header_line, status_line

# RFC 9110 §7.6.1 plus the ones PEP 3333 names: an app must not set these.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
     "trailers", "transfer-encoding", "upgrade"}
)
TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 §5.6.2 tchar
FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
STATUS = re.compile(r"[1-9][0-9]{2} [^\x00-\x1f\x7f]*\Z")

Send = Callable[[bytes], None]


class AppError(Exception):
    """The app broke PEP 3333; the message names the violation."""


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


_PROTOCOLS = {"1.0": "HTTP/1.0", "1.1": "HTTP/1.1"}
# Bounds on what a Codec remembers: names and values that change per request
# (cookies, lengths, ids) stop being remembered once a table is full, and
# are simply checked and encoded each time.
ENVIRON_KEY_CACHE_SIZE = 1024
STATUS_CACHE_SIZE = 256
FIELD_CACHE_SIZE = 2048
DIGITS = re.compile(r"[0-9]+\Z")


def build_environ(request: Request, base: dict[str, Any], codec: Codec) -> dict[str, Any]:
    """Build the environ of a request (PEP 3333 §"environ Variables"), all but ``wsgi.input`` and the peer.

    The caller adds ``REMOTE_ADDR`` and ``REMOTE_PORT``, the socket's peer;
    what a trusted proxy says about the client is applied after that
    (``forkserver.proxy.apply_origin``).
    """
    environ = base.copy()
    environ.update(codec.header_environ(request.headers))
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
    if request.chunked:
        environ.pop("CONTENT_LENGTH", None)
    return environ


class Codec:
    """What clients and apps repeat, checked and encoded once per worker.

    Clients send the same few header names on every request, and apps send
    the same few statuses and mostly the same headers: after the first
    request a name, a status or a field costs one dict lookup instead of
    being checked and encoded again.  Every table is bounded (see the
    *_CACHE_SIZE constants).  One Codec serves every thread of a worker:
    entries are only ever added whole, and ``_last_headers`` is one tuple
    replaced whole, so a thread never sees a half-made entry.
    """

    def __init__(self) -> None:
        self._environ_keys: dict[bytes, str] = {}  # header name as sent -> environ key ("" to drop it)
        self._status_lines: dict[str, tuple[int, bytes]] = {}
        self._field_lines: dict[tuple[str, str], tuple[bytes, int | None]] = {}
        # The last header list encoded, and what ``headers`` made of it: many
        # apps answer with an equal list every time, and comparing lists is
        # cheaper than looking up each field.
        self._last_headers: tuple[list[tuple[str, str]], tuple[bytes, int | None]] = ([], (b"", None))
        # The last environ built for a new connection's request (see ``environ``):
        # its request line and fields, the base it was built on, and the environ.
        self._last_environ: tuple[tuple[Any, ...], dict[str, Any] | None, dict[str, Any]] = ((), None, {})

    # -- request header fields to environ entries ------------------------------------

    def environ(self, key: tuple[Any, ...], request: Request, base: dict[str, Any]) -> dict[str, Any]:
        """``build_environ(request, base)``, shared: the caller copies it and never changes it.

        ``key`` is the request's method, target, version and header fields,
        all the environ is made of besides ``base``.  A new connection often
        sends what the one before it sent (a health checker, a proxy, the
        same client again); the last environ built is kept for it, so such a
        connection's first request pays for a copy instead of a build.
        """
        last_key, last_base, environ = self._last_environ
        if last_base is not base or last_key != key:
            environ = build_environ(request, base, self)
            self._last_environ = (key, base, environ)
        return environ

    def header_environ(self, headers: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
        """Map request header fields to their environ entries (``HTTP_*``, ``CONTENT_*``).

        Repeated fields are joined with "," (cookies with "; ", RFC 9113 §8.2.3);
        names containing "_" are dropped.
        """
        fields: dict[str, str] = {}
        keys = self._environ_keys
        for name, value in headers:
            key = keys.get(name)
            if key is None:
                key = self._environ_key(name)
            if not key:
                continue
            text = value.decode("latin-1").strip(" \t")
            if key not in fields or key in UNPREFIXED:
                fields[key] = text
            else:
                fields[key] += ("; " if key == "HTTP_COOKIE" else ",") + text
        return fields

    def _environ_key(self, name: bytes) -> str:
        """Map a header name as sent to its environ key; "" for a name that must be dropped."""
        if b"_" in name:
            # A client could send "X_Forwarded_For" to pose as a proxy's
            # "X-Forwarded-For" after the dash-to-underscore mapping; drop it.
            key = ""
        else:
            key = header_key(name.decode("latin-1"))
        if len(self._environ_keys) < ENVIRON_KEY_CACHE_SIZE:
            self._environ_keys[name] = key
        return key

    # -- the app's status and headers to bytes ---------------------------------------

    def status(self, status: Any) -> tuple[int, bytes]:
        """Return ``(code, status line)`` for a valid final status; raise AppError otherwise."""
        try:
            known = self._status_lines.get(status)  # only valid str statuses are ever stored
        except TypeError:  # unhashable: not a str either
            known = None
        if known is not None:
            return known
        if not isinstance(status, str):
            raise AppError(f"status must be str, got {type(status).__name__}")
        if not STATUS.match(status):
            raise AppError(f"status {status!r} is not 'NNN Reason'")
        if status[0] == "1":
            # Interim responses (100 Continue, 101 Switching Protocols, 103)
            # are the server's to send; a WSGI response is the final one.
            raise AppError(f"status {status!r} is informational (1xx); a WSGI response needs a final status")
        known = int(status[:3]), status_line(status)
        if len(self._status_lines) < STATUS_CACHE_SIZE:
            self._status_lines[status] = known
        return known

    def headers(self, headers: Any) -> tuple[bytes, int | None]:
        """Return the encoded field lines and the declared Content-Length (None if absent).

        Raises AppError unless ``headers`` is a list of (str, str) tuples with
        token names, no control characters, no hop-by-hop fields and no two
        different Content-Length values.
        """
        last = self._last_headers
        if headers == last[0] and headers.__class__ is list:
            return last[1]  # the same fields as the response before (compared item by item)
        if not isinstance(headers, list):
            raise AppError(f"response headers must be a list, got {type(headers).__name__}")
        lines = []
        length = None
        fields = self._field_lines
        for item in headers:
            known = fields.get(item) if item.__class__ is tuple else None
            if known is None:
                known = self._encode_field(item)
            lines.append(known[0])
            if known[1] is not None:
                if length is not None and known[1] != length:
                    # Which one frames the body?  A client and a proxy may
                    # each pick a different one (RFC 9110 §8.6).
                    raise AppError(f"two different Content-Length headers: {length} and {known[1]}")
                length = known[1]
        encoded = b"".join(lines), length
        # A copy: the app may change its list later.
        self._last_headers = (list(headers), encoded)
        return encoded

    def _encode_field(self, item: Any) -> tuple[bytes, int | None]:
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
        if len(self._field_lines) < FIELD_CACHE_SIZE:
            self._field_lines[(name, value)] = known
        return known


class Output(Protocol):
    """Where a Response's bytes go: the connection, which only moves them."""

    def send(self, data: bytes) -> None: ...

    def send_pair(self, head: bytes, body: bytes, last: bool = False) -> None: ...

    def sendfile(self, in_fd: int, offset: int, count: int) -> int: ...


class Response:
    """``start_response``, ``write`` and the app's iterable, for one request.

    This class checks and encodes what the app gives (through the Codec),
    asks the exchange for every framing decision, and hands the bytes the
    exchange returns to the output.  It keeps no framing state of its own.
    """

    # Class-level defaults: a response is made per request, and most of
    # these keep their starting value, so __init__ need not store them.
    status: str | None = None
    code = 0  # the numeric status; 0 while the app has not started a response
    headers: list[tuple[str, str]] = []  # replaced, never mutated

    def __init__(self, exchange: Exchange, output: Output, codec: Codec) -> None:
        self._exchange = exchange
        self._output = output
        self._codec = codec

    @property
    def head_sent(self) -> bool:
        return self._exchange.our_state is not SEND_RESPONSE

    @property
    def body_bytes(self) -> int:
        """Body bytes sent, as the access log counts them."""
        return self._exchange.sent

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Send:
        """PEP 3333 ``start_response``: check and encode status and headers, send nothing yet."""
        if exc_info:
            try:
                if self._exchange.our_state is not SEND_RESPONSE:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # break the traceback reference cycle (PEP 3333)
        elif self.status is not None:
            raise AppError("start_response called a second time without exc_info")
        self.code, self._status_line = self._codec.status(status)
        self._fields, self._declared_length = self._codec.headers(headers)
        self.status, self.headers = status, headers
        return self.write

    def _head(self, known_length: int = -1, whole: bool = False) -> bytes:
        """The encoded head, framed by the exchange (see ``Exchange.head``)."""
        if self.status is None:
            raise AppError("app returned without calling start_response")
        exchange = self._exchange
        head = exchange.head(self.code, self._status_line, self._fields, self._declared_length, known_length, whole)
        if self._declared_length is None and exchange.length_added >= 0:
            self._show_added_length(exchange.length_added)
        return head

    def _show_added_length(self, length: int) -> None:
        """Show the access log the Content-Length the exchange added to the app's headers."""
        self.headers = self.headers + [("Content-Length", str(length))]

    def write(self, data: bytes) -> None:
        """Send body bytes now, with the head first if it has not gone out yet."""
        if not isinstance(data, bytes):
            raise AppError(f"app wrote {type(data).__name__}, not bytes")
        if not data:
            return
        exchange = self._exchange
        if exchange.our_state is SEND_RESPONSE:
            self.send_with_head(data, False)
        else:
            data = exchange.frame(data)
            if data:
                self._output.send(data)

    def send_with_head(self, body: bytes, whole: bool = True) -> None:
        """Send the head and ``body`` in one call: all of the body (``whole``) or its first piece.

        When the app declared a Content-Length, a first piece is framed by
        the call that makes the head, as a whole body is: one that completes
        the length completes the response there.  So an app returning an
        iterable of one piece (a Flask or Django response) pays about what
        one returning a list does (scripts/profile_request.py --path /json
        --bytecodes: 4,548 bytecodes a request when the piece was framed
        apart, 4,520 then).
        """
        if self.status is None:
            raise AppError("app returned without calling start_response")
        exchange = self._exchange
        declared = self._declared_length
        if declared is None:
            head = exchange.head(self.code, self._status_line, self._fields, None, len(body) if whole else -1, whole)
            if exchange.length_added >= 0:
                self._show_added_length(exchange.length_added)
        else:
            head = exchange.head(self.code, self._status_line, self._fields, declared, len(body), True)
        if exchange.our_state is DONE:
            # The common case: the body is as the head announced it (or
            # there is none to send: HEAD, 204, 304), and the response is complete.
            self._output.send_pair(head, body[:exchange.sent], exchange.keep_alive)
            return
        body = exchange.frame(body)
        # A piece that is the rest of the declared body ends the response.
        self._output.send_pair(head, body, exchange.keep_alive and exchange.our_state is DONE)
        if whole:
            self.finish()

    def send_file(self, fd: int) -> bool:
        """Send a regular file from its current offset with sendfile; False if not a regular file."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return False
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        exchange = self._exchange
        output = self._output
        size = max(0, info.st_size - offset)
        output.send(self._head(size))
        remaining = exchange.file_span(size)
        while remaining:
            sent = output.sendfile(fd, offset, remaining)
            if sent == 0:
                break  # the file shrank under us; the exchange's length check closes
            exchange.count(sent)
            offset += sent
            remaining -= sent
        self.finish()
        return True

    def finish(self) -> None:
        """The app is done: the head if still unsent, then whatever ends the body."""
        exchange = self._exchange
        if exchange.our_state is DONE:
            return  # the body already came to the length the head promised
        if exchange.our_state is SEND_RESPONSE:
            self._output.send(self._head(0))
        tail = exchange.end()
        if tail:
            self._output.send(tail)


# What an app may return that is not sent piece by piece as it comes (or, for
# str and bytes, is refused): see _send_at_once.
SENT_AT_ONCE = (list, tuple, FileWrapper, str, bytes)


def run_app(app: Callable[..., Any], environ: dict[str, Any], response: Response) -> None:
    """Call the app and send what it returns; always call the iterable's close().

    Raises whatever the app raised, ``AppError`` for PEP 3333 violations, and
    whatever the output raises when the client is gone.
    """
    result = app(environ, response.start_response)
    if result.__class__ is list and len(result) == 1 and result[0].__class__ is bytes and \
            response._exchange.our_state is SEND_RESPONSE:
        response.send_with_head(result[0])  # the usual answer: one bytes in a list, which has no close()
        return
    try:
        # One look tells the usual iterable (a generator, a framework's
        # wrapper such as werkzeug's ClosingIterator) from the kinds that are
        # sent otherwise (15 bytecodes a request fewer than one look for each).
        if isinstance(result, SENT_AT_ONCE) and _send_at_once(result, response):
            return
        for piece in result:
            response.write(piece)
        response.finish()
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def _send_at_once(result: Any, response: Response) -> bool:
    """Send a list or tuple joined, a file with sendfile; True if sent, False to iterate it instead.

    Raises AppError for a bare str or bytes, or a list holding anything but bytes.
    """
    if isinstance(result, (list, tuple)) and not response.head_sent:
        for piece in result:
            if not isinstance(piece, bytes):
                raise AppError(f"app returned {type(piece).__name__}, not bytes")
        response.send_with_head(result[0] if len(result) == 1 else b"".join(result))
        return True
    if isinstance(result, FileWrapper) and hasattr(result.filelike, "fileno") and not response.head_sent:
        try:
            fd = result.filelike.fileno()
        except (OSError, io.UnsupportedOperation):
            fd = -1
        if fd >= 0 and response.send_file(fd):
            return True
    if isinstance(result, (str, bytes)):
        raise AppError(f"app returned a bare {type(result).__name__}; it must return an iterable of bytes")
    return False
