"""Turn request bytes into events, enforcing size limits and framing rules.

httptools (llhttp, in its strict default mode) does the tokenising.  This
wrapper only turns its callbacks into ``Request``/``BodyChunk``/``EndOfMessage``
events and adds the rules llhttp leaves to the server: limits, Host, target
form, HTTP version and the allowed transfer codings.  Every rule that decides
how a message is framed lives in this file, so request smuggling has one place
to be reviewed.  Errors are raised as ``ProtocolError`` subclasses carrying a
status; after one, the parser is dead and the connection must close.
"""

from __future__ import annotations

import re
from collections.abc import MutableSequence

import httptools

from .errors import (
    BadRequest,
    BodyTooLarge,
    HeaderTooLarge,
    MethodNotImplemented,
    NotImplementedCoding,
    ProtocolError,
    RequestLineTooLong,
    VersionNotSupported,
)
from .events import END_OF_MESSAGE, BodyChunk, Event, Request

SUPPORTED_VERSIONS = frozenset({"1.0", "1.1"})
# Where the parser is in the byte stream, held in ``RequestParser._phase``.
BETWEEN = "BETWEEN"  # between messages: the next byte begins a request
IN_HEAD = "IN_HEAD"  # inside a request head
IN_BODY = "IN_BODY"  # the head is out as a Request event; its body is being parsed
IN_SKIPPED_BODY = "IN_SKIPPED_BODY"  # an Upgrade request's body, which _SkippedBody decodes
IN_UNKNOWN_METHOD = "IN_UNKNOWN_METHOD"  # llhttp refused the method: its token is read to its end
UPGRADED = "UPGRADED"  # an Upgrade request is complete: what follows is not HTTP/1.1, and is dropped
FAILED = "FAILED"  # a ProtocolError was returned: nothing more is parsed
_LLHTTP_PHASES = frozenset({BETWEEN, IN_HEAD, IN_BODY})  # where llhttp parses the next bytes
# llhttp's reason for a method it knows only from RTSP or ICE.
_RTSP_METHOD_IN_HTTP = "Invalid method for HTTP/x.x request"
# RFC 9110 §5.6.2: the characters of a token, such as a method.
TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# An unknown method read this far without its end is answered as it stands.
METHOD_TOKEN_LIMIT = 64
# The most bytes kept of reads that began inside a message (see RequestParser._since).
SINCE_LIMIT_BYTES = 256 * 1024
# Chunk-size lines (with their extensions) and trailers are framing, not
# data.  llhttp parses them as a stream and keeps none of it, so no limit
# protects memory, but a client could send an endless extension and hold
# the connection forever without a byte of body.  More than this many bytes
# of a chunked body read without a chunk beginning or ending, a byte of data
# or a trailer field is refused with 400.  llhttp does not say where in a
# read a chunk line lies, so the count is of whole reads: a line a little
# over the limit that arrives in one read with data can pass, an endless one
# never does.
CHUNK_FRAMING_LIMIT_BYTES = 8192


class _Lost(bytes):
    """The type of LOST: an empty bytes that is told apart by identity."""


LOST = _Lost()  # _since when more than SINCE_LIMIT_BYTES would have been kept
# The lengths of the header names the parser acts on: Host, Expect,
# Content-Type, Content-Length, Transfer-Encoding.
_FRAMING_NAME_LENGTHS = frozenset({4, 6, 12, 14, 17})


class Limits:
    """Size limits, in bytes or counts; ``body_bytes`` 0 means unlimited.

    A plain class, not a dataclass: see ``forkserver.records``.
    """

    __slots__ = ("request_line_bytes", "header_fields", "header_field_bytes", "body_bytes")

    def __init__(self, request_line_bytes: int = 8190, header_fields: int = 100, header_field_bytes: int = 8190,
                 body_bytes: int = 0) -> None:
        self.request_line_bytes = request_line_bytes
        self.header_fields = header_fields
        self.header_field_bytes = header_field_bytes
        self.body_bytes = body_bytes

    @property
    def head_bytes(self) -> int:
        """The most bytes a whole request head may take, CRLFs included.

        The request line is the target plus at most 32 bytes: the method (the
        longest llhttp accepts, UNSUBSCRIBE, has 11), two spaces, the version
        and CRLF.  Each field line adds ": " and CRLF to its name and value.
        """
        return self.request_line_bytes + 32 + self.header_fields * (self.header_field_bytes + 4) + 2


def _raised_by_callback(error: httptools.HttpParserCallbackError) -> BaseException:
    """What one of our callbacks raised, which httptools wrapped in ``error``.

    A ProtocolError goes on as the error it is, and anything else (a bug) as
    its own exception, never as an HTTP parse error.
    """
    return error.__context__ or RuntimeError(str(error))


def _feed(parser: httptools.HttpRequestParser, data: bytes) -> None:
    """Feed llhttp, surfacing what our callbacks raised as itself."""
    try:
        parser.feed_data(data)
    except httptools.HttpParserCallbackError as exc:
        raise _raised_by_callback(exc) from None


class RequestParser:
    """Incremental request parser for one connection.

    Call ``feed(data)`` with whatever arrived; it returns the events completed
    by that data, possibly several requests' worth (pipelining).  Something we
    refuse to serve ends the list with a ``ProtocolError`` instance (errors are
    data, so the requests before it are still answered in order); the parser
    then ignores all further input.  Any exception raised is a bug.  The
    ``on_*`` methods are httptools' callbacks, not an API.

    A caller that keeps its own queue of events (the exchange) passes it as
    ``events`` and calls ``pump(data)`` instead, which appends to that queue:
    one call and no list per read.
    """

    def __init__(self, limits: Limits, events: MutableSequence[Event | ProtocolError] | None = None) -> None:
        self.limits = limits
        # Read on every header field, so kept as plain attributes.
        self._field_bytes = limits.header_field_bytes
        self._max_fields = limits.header_fields
        self._body_limit = limits.body_bytes
        self._line_limit = limits.request_line_bytes
        # The start of the last request line that began a read and said
        # HTTP (b"GET / HTTP/"): a read beginning with it again begins with
        # a line saying HTTP, found with no bytes formatted, which a
        # kept-alive client sending the same line each time spares about 550
        # instructions a request (scripts/instruction_cost.py).  At first a
        # space, which no request begins with.  ``renew`` keeps it: it is a
        # fact about bytes, not about whoever sent them, and a new connection
        # sending the usual line spares the same (17 bytecodes).
        self._http_line = b" "
        self.renew([] if events is None else events)

    def renew(self, events: MutableSequence[Event | ProtocolError]) -> None:
        """Forget every byte parsed so far, and append to ``events`` from now on: the parser is as new.

        Called by ``__init__``, and for the next connection on a parser
        ``release`` let go of (see ``Exchange.give_up_parser``).  Only
        the limits and ``_http_line`` stay; llhttp's own state (a message
        half parsed, an upgrade, an error) goes with a new llhttp parser,
        since httptools has no reset.  The facts of a message are set as it
        begins (see ``on_message_begin``), and so are ``_codings`` and
        ``_method_token`` before they are read: nothing here reads them
        between messages.  Not setting them here spares every new connection
        about 40 bytecodes of its 2,080 (scripts/loop_cost.py --connection close).
        """
        self._events = events
        self._parser = httptools.HttpRequestParser(self)
        # Set once an Upgrade/CONNECT head stopped llhttp: after that message
        # the bytes are not HTTP/1.1, and the connection must close.
        self.upgraded = False
        self._skipped_body: _SkippedBody | None = None
        self._messages_begun = 0
        # The message (by its number in _messages_begun) that last had a
        # Content-Type: a second one in the same message is refused.
        self._content_type_in = -1
        # The bytes of every read since the last one that began between
        # messages (LOST past SINCE_LIMIT_BYTES): where the request line
        # and an unknown method are looked for, since llhttp does not say
        # where in a read a message begins.
        self._since: bytes | bytearray = b""
        self._since_first = 1  # the number (in _messages_begun) of the first message begun in _since
        # Where in which _since the last request line checked there ended;
        # and which _since (by its length, as it grows), method and target
        # were found to have only HTTP lines.
        self._line_found: tuple[bytes | bytearray, int] = (b"", 0)
        self._all_http: tuple[bytes | bytearray, int, bytes, bytes] = (b"", -1, b"", b"")
        self._phase = BETWEEN

    def on_message_begin(self) -> None:
        """httptools' callback: a message begins; forget the facts of the one before."""
        self._messages_begun += 1
        self._phase = IN_HEAD
        self._head_bytes = 0
        self._target = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._content_length: int | None = None
        self._chunked = False
        self._host_seen = False
        self._expect_continue = False
        self._body_bytes = 0
        self._trailer_fields = 0

    def feed(self, data: bytes) -> list[Event | ProtocolError]:
        """Parse ``data`` and return the events it completed (then the ProtocolError that ends them, if any)."""
        events: list[Event | ProtocolError] = []
        self._events = events
        self.pump(data)
        return events

    def pump(self, data: bytes) -> None:
        """Parse ``data`` and append the events it completed to the queue given at construction."""
        phase = self._phase
        if phase is BETWEEN:  # the usual read: asked first, it pays for no other test
            self._since = data
            self._since_first = self._messages_begun + 1
        elif phase in _LLHTTP_PHASES:
            self._keep_since(data)
            # Only a read that began inside a chunked body can be all framing (and the
            # usual read begins between messages: it pays nothing for this).
            progress = self._body_bytes + self._chunk_marks + self._trailer_fields if self._chunked else -1
        else:
            self._pump_elsewhere(phase, data)
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # llhttp stops at the end of an Upgrade (or CONNECT) head.  We do
            # not switch protocols: answer this request as plain HTTP, then close.
            self.upgraded = True
            if self._phase is IN_SKIPPED_BODY:
                self._skipped_body = _SkippedBody(self, self._chunked, self._content_length, data[upgrade.args[0]:])
            else:
                self._phase = UPGRADED  # (a request without a body: its Request was its end)
        except httptools.HttpParserCallbackError as exc:
            self._fail(_raised_by_callback(exc))
            return
        except httptools.HttpParserInvalidMethodError as exc:
            self._unknown_method(str(exc))
            return
        except httptools.HttpParserError as exc:
            detail = str(exc)
            if detail == _RTSP_METHOD_IN_HTTP:  # DESCRIBE, SETUP, ...: a method, just not an HTTP one
                self._fail(MethodNotImplemented(f"method {self._parser.get_method().decode('latin-1')!r} "
                                                "is not implemented"))
            else:
                self._fail(BadRequest(detail))
            return
        if self._phase is not BETWEEN:
            self._read_ended_inside(data)
            if phase is not BETWEEN and progress >= 0 and self._chunked:
                self._count_framing(len(data), progress)

    def _count_framing(self, read: int, progress_before: int) -> None:
        """A read inside a chunked body ended: refuse framing that runs on with no progress."""
        if self._body_bytes + self._chunk_marks + self._trailer_fields != progress_before:
            self._framing_bytes = 0
            return
        self._framing_bytes += read
        if self._framing_bytes > CHUNK_FRAMING_LIMIT_BYTES:
            self._fail(BadRequest(f"chunk extension or trailer longer than {CHUNK_FRAMING_LIMIT_BYTES} bytes"))

    def on_chunk_header(self) -> None:
        """httptools' callback: a chunk-size line (and its extensions) ended."""
        self._chunk_marks += 1

    def on_chunk_complete(self) -> None:
        """httptools' callback: a chunk's data and its CRLF ended."""
        self._chunk_marks += 1

    def _read_ended_inside(self, data: bytes) -> None:
        """``data`` ended inside a message: count an unfinished head, or start an Upgrade body."""
        phase = self._phase
        if phase is IN_HEAD:
            self._head_continues(data)
        elif phase is IN_SKIPPED_BODY:
            # httptools made llhttp skip the body, but it is the app's.  (Fed
            # here, outside pump's except block, which would overwrite the
            # callback error's __context__.)
            self._pump_elsewhere(IN_SKIPPED_BODY, self._skipped_body.first)  # type: ignore[union-attr]

    def _keep_since(self, data: bytes) -> None:
        """Add a read that began inside a message to ``_since``, up to its limit."""
        since = self._since
        if since is LOST:
            return
        if len(since) + len(data) > SINCE_LIMIT_BYTES:
            self._since = LOST
        elif since.__class__ is bytearray:
            since += data  # type: ignore[operator]
        else:
            self._since = bytearray(since) + data

    def _pump_elsewhere(self, phase: str, data: bytes) -> None:
        """Bytes llhttp does not parse now: an Upgrade body, an unknown method's token, or nothing."""
        if phase is IN_SKIPPED_BODY and not self._skipped_body.done:  # type: ignore[union-attr]
            try:
                self._skipped_body.feed(data)  # type: ignore[union-attr]
            except ProtocolError as error:
                self._fail(error)
        elif phase is IN_UNKNOWN_METHOD:
            self._read_method(self._method_token + data)
        # After an Upgrade request the bytes are not HTTP/1.1, and after an
        # error we cannot know where a message starts: drop them.

    def _fail(self, error: BaseException) -> None:
        """End parsing with ``error``: a ProtocolError is the last event; anything else is a bug, raised."""
        if not isinstance(error, ProtocolError):
            raise error
        self._phase = FAILED
        self._events.append(error)

    def _head_continues(self, data: bytes) -> None:
        """A head is unfinished at the end of ``data``: count it against the limit."""
        if self._head_bytes:  # it began in an earlier read
            self._head_bytes += len(data)
        else:
            # The head began inside ``data``, after an unknown number of
            # bytes of earlier messages: count only what is surely its own.
            self._head_bytes = len(self._target) + sum(len(n) + len(v) for n, v in self._headers) or 1
        if self._head_bytes > self.limits.head_bytes:
            self._fail(HeaderTooLarge(f"request head exceeds {self.limits.head_bytes} bytes"))

    def _unknown_method(self, detail: str) -> None:
        """llhttp refused the method: read the token to its end, to answer 501 or 400.

        RFC 9110 §9.1: a method we do not know, but well formed, is "not
        implemented" (501); anything else is a bad request.  llhttp does not
        say where the refused message began, so the reads since the last
        message boundary are parsed again, by a parser that only counts,
        for the shortest prefix in which the refused message has begun.
        """
        since = self._since
        if since is LOST:
            self._fail(BadRequest(detail))  # more than SINCE_LIMIT_BYTES back: not worth finding
            return
        since = bytes(since)
        messages = _count_messages(since)
        low, high = 1, len(since)
        while low < high:  # the shortest prefix in which all those messages have begun
            middle = (low + high) // 2
            if _count_messages(since[:middle]) < messages:
                low = middle + 1
            else:
                high = middle
        self._phase = IN_UNKNOWN_METHOD
        self._read_method(since[low - 1:])

    def _read_method(self, start: bytes) -> None:
        """Judge the method token at the start of ``start`` once its end (or the limit) is in sight."""
        for length, byte in enumerate(start[:METHOD_TOKEN_LIMIT]):
            if byte not in TCHAR:
                token = start[:length].decode("latin-1")
                if byte == 0x20 and token:  # SP: a whole, well-formed token
                    self._fail(MethodNotImplemented(f"method {token!r} is not implemented"))
                else:
                    self._fail(BadRequest(f"invalid method {start[:length + 1].decode('latin-1')!r}"))
                return
        if len(start) >= METHOD_TOKEN_LIMIT:
            self._fail(MethodNotImplemented(f"method {start[:METHOD_TOKEN_LIMIT].decode('latin-1')!r}... "
                                            "is not implemented"))
            return
        self._method_token = bytes(start)  # an unknown method's token so far: it goes on in the next read

    def mid_message(self) -> bool:
        """True between the first byte of a request and the end of its body."""
        phase = self._phase
        return phase is IN_HEAD or phase is IN_BODY or phase is IN_SKIPPED_BODY

    def release(self) -> None:
        """Let go of llhttp, once the connection is closed: nothing may be fed after.

        llhttp's parser holds our bound ``on_*`` methods and we hold the
        parser: a reference cycle, which without this every closed connection
        would leave (a dozen objects) for the cyclic garbage collector.
        """
        self._parser = None
        skipped, self._skipped_body = self._skipped_body, None  # it points back at us too
        if skipped is not None:
            skipped.release()

    def hand_over_body(self) -> int:
        """Let the caller read the rest of the current Content-Length body off the wire itself.

        Returns how many body bytes are still to come; 0 when there is
        nothing to hand over (no body left, a chunked or Upgrade body, no
        message in its body).  After a non-zero answer the caller reads
        exactly that many bytes, emits the end of the message itself, and
        feeds the parser only what follows: the parser then expects the next
        message.  Nothing is lost by skipping llhttp here, since llhttp does
        not look inside a Content-Length body, while every byte of it is
        spared a callback and a copy.
        """
        length = self._content_length
        if self._phase is not IN_BODY or self._chunked or length is None or self.upgraded:
            return 0
        left = length - self._body_bytes
        if left <= 0:
            return 0
        self._parser = httptools.HttpRequestParser(self)  # the old one sits mid-body
        self._phase = BETWEEN
        return left

    # -- httptools callbacks ------------------------------------------------

    def on_url(self, piece: bytes) -> None:
        target = self._target + piece
        self._target = target
        if len(target) > self._line_limit:
            raise RequestLineTooLong(f"request target longer than {self.limits.request_line_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(name) + len(value) > self._field_bytes or len(headers) >= self._max_fields or \
                self._phase is not IN_HEAD:
            self._unusual_header(name, value)
            return
        headers.append((name, value))
        if len(name) in _FRAMING_NAME_LENGTHS:
            # Only these few names change how we frame or answer the message;
            # the length test keeps the lowering off most fields.
            lowered = name.lower()
            if lowered == b"host":  # first: every request has one
                if self._host_seen:
                    raise BadRequest("more than one Host header")  # RFC 9112 §3.2
                self._host_seen = True
            elif lowered == b"content-length":
                # llhttp already rejects signs, junk, overflow and duplicates.
                self._content_length = int(value)
            elif lowered == b"transfer-encoding":
                # Its lines form one list (RFC 9110 §5.3), judged once the head is complete.
                if not self._chunked:
                    self._chunked = True  # for now: "has a Transfer-Encoding"
                    self._chunk_marks = 0  # chunks begun and ended: progress that is not data
                    self._framing_bytes = 0  # body bytes read since the last progress (CHUNK_FRAMING_LIMIT_BYTES)
                    self._codings: list[bytes] = []  # the message's Transfer-Encoding codings
                self._codings += [c.strip().lower() for c in value.split(b",")]
            elif lowered == b"expect":
                self._expect_continue = value.strip().lower() == b"100-continue"
            elif lowered == b"content-type":
                # Which of two media types applies is anyone's guess, and a
                # proxy may guess otherwise: refuse, as for Host.
                if self._content_type_in == self._messages_begun:
                    raise BadRequest("more than one Content-Type header")
                self._content_type_in = self._messages_begun

    def _unusual_header(self, name: bytes, value: bytes) -> None:
        """A field over a limit, or a trailer field after a chunked body."""
        if len(name) + len(value) > self._field_bytes:
            raise HeaderTooLarge(f"header field longer than {self._field_bytes} bytes")
        if self._phase is not IN_HEAD:
            # A trailer field (RFC 9112 §7.1.2): we may discard it, and do,
            # but count it so trailers cannot stream in without end.
            self._trailer_fields += 1
            if self._trailer_fields > self._max_fields:
                raise HeaderTooLarge(f"more than {self._max_fields} trailer fields")
            return
        raise HeaderTooLarge(f"more than {self._max_fields} header fields")

    def _check_transfer_coding(self, version: str) -> None:
        """Judge the message's Transfer-Encoding, all its lines together: chunked alone, or refuse.

        The same list gets the same status whether it came on one line or
        several (RFC 9110 §5.3).
        """
        if version == "1.0":
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
            raise BadRequest("Transfer-Encoding in an HTTP/1.0 request")
        codings = self._codings
        if codings == [b"chunked"]:
            return
        shown = b", ".join(codings).decode("latin-1")
        # RFC 9112 §6.1: chunked must be the final coding, applied once.  We
        # decode no other coding: a well-formed list that ends in chunked is
        # merely one we cannot serve.
        if codings[-1] == b"chunked" and codings.count(b"chunked") == 1 and all(codings):
            raise NotImplementedCoding(f"transfer coding {shown!r} is not supported")
        raise BadRequest(f"invalid Transfer-Encoding {shown!r}")

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version not in SUPPORTED_VERSIONS:
            raise VersionNotSupported(f"HTTP/{version} is not supported")
        target = self._target
        raw_method = parser.get_method()
        if self._messages_begun != self._since_first:
            self._check_request_line(raw_method, target)  # a line after the first in the read
        elif not self._since.startswith(self._http_line):
            http_line = b"%b %b HTTP/" % (raw_method, target)
            if self._since.startswith(http_line):
                self._http_line = http_line
            else:
                self._check_request_line(raw_method, target)
        method = raw_method.decode("ascii")
        if target[:1] != b"/":
            self._check_target(method, target)
        if not self._host_seen and version == "1.1":
            raise BadRequest("HTTP/1.1 request without Host header")  # RFC 9112 §3.2
        if self._chunked:
            self._check_transfer_coding(version)
        length = self._content_length
        if self._body_limit and length is not None and length > self._body_limit:
            raise BodyTooLarge(f"Content-Length {length} exceeds {self._body_limit}")
        if self._chunked or length:
            # httptools makes llhttp skip the body of an Upgrade request; we read it.
            self._phase = IN_SKIPPED_BODY if parser.should_upgrade() else IN_BODY
        else:
            self._phase = BETWEEN  # no body: the message ends with its head (see events.Request)
        self._events.append(
            Request(method, target, version, tuple(self._headers), parser.should_keep_alive(),
                    self._expect_continue and version == "1.1", self._chunked, length)
        )

    def _check_request_line(self, method: bytes, target: bytes) -> None:
        """Refuse a request line whose protocol is not HTTP (RFC 9112 §2.3, §3).

        llhttp also parses RTSP/1.0 and ICE/1.0 requests, and reports
        their version alone.  The line is looked for in the bytes it came
        in (its usual place, the start of the read, was checked already).
        If every line there with this method and target says HTTP, so does
        this one.  Otherwise the first message's is read at the start, and
        a later one's looked for from where the last line found ended, up
        to the first occurrence that says HTTP.  The request's own line is always among them, so a
        valid request is never refused; another occurrence saying HTTP
        before it (a body quoting a request line) lets one through, which
        llhttp framed like any HTTP request anyway.
        """
        buffer = self._since
        if buffer is LOST:
            return  # more than SINCE_LIMIT_BYTES back: llhttp's own check of the line stands
        checked = (buffer, len(buffer), method, target)
        if checked == self._all_http:
            return
        line = re.compile(re.escape(method) + rb" +" + re.escape(target) + rb" +([^ /\r\n]*)/")
        if set(line.findall(buffer)) == {b"HTTP"}:
            # Every line with this method and target in these bytes says
            # HTTP, this request's among them: pipelined requests alike
            # (the usual kind) are settled by one scan for all of them.
            self._all_http = checked
            return
        if self._messages_begun == self._since_first:
            # The first message in these bytes starts them, after any empty lines.
            start = 0
            while buffer.startswith(b"\r\n", start):
                start += 2
            first = line.match(buffer, start)
            if first is not None:
                self._line_found = (buffer, first.end())
                if first.group(1) != b"HTTP":
                    raise BadRequest(f"protocol {first.group(1).decode('latin-1')!r} is not HTTP")
                return
        mark, start = self._line_found
        if mark is not buffer:
            start = 1  # the first message's line, which starts these bytes, was checked at 0
        # Usually (pipelined requests) the next occurrence is this request's
        # own line, saying HTTP with single spaces: two finds tell.
        http_line = b"%b %b HTTP/" % (method, target)
        found = buffer.find(http_line, start)
        if found >= 0 and found == buffer.find(http_line[:-5], start):
            self._line_found = (buffer, found + len(http_line))
            return
        other = b""
        for found_line in line.finditer(buffer, start):
            protocol = found_line.group(1)
            if protocol == b"HTTP":
                self._line_found = (buffer, found_line.end())  # the next request's line comes after it
                return
            other = other or protocol
        if other:
            raise BadRequest(f"protocol {other.decode('latin-1')!r} is not HTTP")

    @staticmethod
    def _check_target(method: str, target: bytes) -> None:
        # RFC 9112 §3.2: origin-form (checked by the caller), absolute-form,
        # or "*" for OPTIONS.  We serve no CONNECT (authority-form) and no
        # scheme but http(s).
        if not target:
            raise BadRequest("empty request target")
        if target == b"*" and method == "OPTIONS":
            return
        lowered = target[:8].lower()
        if lowered.startswith(b"http://") or lowered.startswith(b"https://"):
            authority = target.split(b"://", 1)[1].split(b"/", 1)[0].split(b"?", 1)[0]
            if b"@" in authority:
                raise BadRequest("userinfo in the request target")  # RFC 9110 §4.2.4
            return
        raise BadRequest(f"unsupported request target {target[:64]!r}")

    def on_body(self, data: bytes) -> None:
        self._body_bytes += len(data)
        limit = self._body_limit
        if limit and self._body_bytes > limit:
            raise BodyTooLarge(f"request body exceeds {limit} bytes")
        self._events.append(BodyChunk(data))

    def on_message_complete(self) -> None:
        # Only a body ends here: a message without one ended with its head
        # (BETWEEN already), and llhttp skipped an Upgrade request's, which
        # _SkippedBody ends.
        if self._phase is IN_BODY:
            self._events.append(END_OF_MESSAGE)
            self._phase = BETWEEN

    def _end_skipped_body(self) -> None:
        self._phase = UPGRADED
        self._events.append(END_OF_MESSAGE)


class _MessageCounter:
    """httptools' protocol for a parser that only counts the messages begun (see _count_messages)."""

    __slots__ = ("begun",)

    def __init__(self) -> None:
        self.begun = 0

    def on_message_begin(self) -> None:
        self.begun += 1


def _count_messages(data: bytes) -> int:
    """How many messages begin in ``data`` parsed from a message boundary, up to any error."""
    counter = _MessageCounter()
    try:
        httptools.HttpRequestParser(counter).feed_data(data)
    except httptools.HttpParserError:
        pass
    return counter.begun


class _SkippedBody:
    """Decode the body of an Upgrade request, which httptools makes llhttp skip.

    A second llhttp parser, primed with a head that has the same framing,
    decodes the body under the same strict rules; its body and trailer
    callbacks go to the owning ``RequestParser``.  Bytes after the body are
    dropped: the connection closes after an Upgrade request.
    """

    def __init__(self, owner: RequestParser, chunked: bool, content_length: int | None, first: bytes) -> None:
        self._owner = owner
        self.first = first  # the body's bytes in the read that ended the head
        self._in_body = False
        self.done = False
        self._parser = httptools.HttpRequestParser(self)
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % (content_length or 0)
        self._parser.feed_data(b"POST / HTTP/1.1\r\nHost: body\r\nConnection: close\r\n" + framing + b"\r\n\r\n")

    def release(self) -> None:
        self._parser = None  # the same cycle as RequestParser.release breaks

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        try:
            _feed(self._parser, data)
        except httptools.HttpParserError as exc:
            if not self.done:  # after the body llhttp objects to any byte; we ignore them
                raise BadRequest(str(exc)) from None

    def on_headers_complete(self) -> None:
        self._in_body = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_body:
            self._owner.on_header(name, value)  # a trailer field

    def on_body(self, data: bytes) -> None:
        self._owner.on_body(data)

    def on_message_complete(self) -> None:
        self.done = True
        self._owner._end_skipped_body()


__all__ = ["Limits", "ProtocolError", "RequestParser"]
