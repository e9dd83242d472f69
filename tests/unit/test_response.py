"""Response serialisation: heads, chunk framing, the cached Date line, error responses.

Every head is also read back with llhttp's response parser (httptools), so
"well-formed" means what a strict client would accept, not what we expect.
"""

from __future__ import annotations

import re
import time
from email.utils import parsedate_to_datetime

import pytest

from forkserver.http.errors import (
    BadRequest,
    BodyTooLarge,
    HeaderTooLarge,
    NotImplementedCoding,
    RequestLineTooLong,
    VersionNotSupported,
)
from harness import ParsedResponse as Parsed

from forkserver.http.response import (
    CONTINUE_RESPONSE,
    LAST_CHUNK,
    SERVER_NAME,
    DateHeader,
    build_head,
    error_response,
    frame_chunk,
)

DATE = b"Date: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
IMF_FIXDATE = re.compile(rb"Date: (Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d\d (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                         rb"\d{4} \d\d:\d\d:\d\d GMT\r\n\Z")


# -- build_head -------------------------------------------------------------------------


def test_build_head_layout():
    head = build_head("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")], DATE,
                      chunked=False, close=False)
    assert head == (b"HTTP/1.1 200 OK\r\n"
                    b"Content-Type: text/plain\r\n"
                    b"Content-Length: 2\r\n"
                    + DATE
                    + b"Server: " + SERVER_NAME.encode() + b"\r\n"
                    b"\r\n")
    parsed = Parsed(head + b"ok")
    assert parsed.status == 200 and parsed.body == b"ok" and parsed.complete == 1
    assert parsed.keep_alive


def test_build_head_keeps_app_headers_in_order_with_duplicates():
    headers = [("Set-Cookie", "a=1"), ("X-B", "2"), ("Set-Cookie", "b=2")]
    parsed = Parsed(build_head("201 Created", headers + [("Content-Length", "0")], DATE,
                               chunked=False, close=False))
    assert parsed.status == 201
    assert parsed.headers[:3] == [(b"Set-Cookie", b"a=1"), (b"X-B", b"2"), (b"Set-Cookie", b"b=2")]


def test_build_head_chunked_adds_transfer_encoding():
    head = build_head("200 OK", [], DATE, chunked=True, close=False)
    assert head.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    parsed = Parsed(head + frame_chunk(b"hello ") + frame_chunk(b"world") + LAST_CHUNK)
    assert parsed.header(b"Transfer-Encoding") == [b"chunked"]
    assert parsed.body == b"hello world" and parsed.complete == 1
    assert b"Connection" not in head


def test_build_head_close_adds_connection_close():
    head = build_head("200 OK", [("Content-Length", "0")], DATE, chunked=False, close=True)
    assert head.endswith(b"Connection: close\r\n\r\n")
    parsed = Parsed(head)
    assert not parsed.keep_alive
    assert b"Transfer-Encoding" not in head


def test_build_head_chunked_and_close_together():
    head = build_head("200 OK", [], DATE, chunked=True, close=True)
    assert head.endswith(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    assert Parsed(head + LAST_CHUNK).complete == 1


def test_build_head_encodes_latin1():
    head = build_head("200 D\u00e9j\u00e0 vu", [("X-Name", "caf\u00e9")], DATE, chunked=False, close=False)
    assert head.startswith(b"HTTP/1.1 200 D\xe9j\xe0 vu\r\n")
    assert b"X-Name: caf\xe9\r\n" in head
    with pytest.raises(UnicodeEncodeError):
        build_head("200 OK", [("X-Name", "\u20ac")], DATE, chunked=False, close=False)


def test_build_head_for_status_without_body():
    parsed = Parsed(build_head("204 No Content", [], DATE, chunked=False, close=False))
    assert parsed.status == 204 and parsed.complete == 1


# -- frame_chunk ------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "framed"), [
    (b"hello", b"5\r\nhello\r\n"),
    (b"x" * 10, b"a\r\n" + b"x" * 10 + b"\r\n"),
    (b"x" * 255, b"ff\r\n" + b"x" * 255 + b"\r\n"),
    (b"x" * 4096, b"1000\r\n" + b"x" * 4096 + b"\r\n"),
    (b"\r\n0\r\n\r\n", b"7\r\n\r\n0\r\n\r\n\r\n"),
])
def test_frame_chunk(data, framed):
    assert frame_chunk(data) == framed


def test_frame_chunk_round_trips_through_llhttp():
    pieces = [b"a", b"\r\n", b"0\r\n\r\n", bytes(range(256)), b"z" * 70000]
    head = build_head("200 OK", [], DATE, chunked=True, close=False)
    parsed = Parsed(head + b"".join(frame_chunk(p) for p in pieces) + LAST_CHUNK)
    assert parsed.body == b"".join(pieces) and parsed.complete == 1


def test_constants():
    assert LAST_CHUNK == b"0\r\n\r\n"
    assert CONTINUE_RESPONSE == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert Parsed(CONTINUE_RESPONSE).status == 100


# -- DateHeader -------------------------------------------------------------------------


def test_date_line_is_an_imf_fixdate_of_now():
    before = int(time.time())
    line = DateHeader().line()
    after = time.time()
    assert IMF_FIXDATE.match(line), line
    stamp = parsedate_to_datetime(line[6:-2].decode()).timestamp()
    assert before <= stamp <= after


def _same_second(date: DateHeader, attempts: int = 50) -> tuple[bytes, bytes]:
    """Two line() calls known to fall in one wall-clock second (retried if a second ticked between)."""
    for _ in range(attempts):
        start = int(time.time())
        first, second = date.line(), date.line()
        if int(time.time()) == start:
            return first, second
    raise AssertionError("never managed two calls within one second")


def test_date_line_is_cached_within_a_second():
    date = DateHeader()
    first, second = _same_second(date)
    assert second is first  # the very same object: formatted once


def test_date_line_changes_when_the_second_does():
    date = DateHeader()
    first = date.line()
    start = parsedate_to_datetime(first[6:-2].decode()).timestamp()
    later = first
    for _ in range(400):  # at most ~4 s of polling
        time.sleep(0.01)
        later = date.line()
        if later != first:
            break
    assert later != first, "Date line never moved on"
    assert IMF_FIXDATE.match(later)
    assert parsedate_to_datetime(later[6:-2].decode()).timestamp() > start


def test_date_headers_are_independent():
    a, b = DateHeader(), DateHeader()
    assert IMF_FIXDATE.match(a.line()) and IMF_FIXDATE.match(b.line())


# -- error_response -----------------------------------------------------------------------


@pytest.mark.parametrize("error", [BadRequest, RequestLineTooLong, HeaderTooLarge, BodyTooLarge,
                                   VersionNotSupported, NotImplementedCoding])
def test_error_response_for_each_protocol_error(error):
    data = error_response(error.status, error.reason, DATE)
    assert data.startswith(f"HTTP/1.1 {error.status} {error.reason}\r\n".encode())
    parsed = Parsed(data)
    assert parsed.status == error.status and parsed.complete == 1
    assert parsed.body == f"{error.status} {error.reason}\n".encode()
    assert parsed.header(b"Content-Length") == [str(len(parsed.body)).encode()]
    assert parsed.header(b"Content-Type") == [b"text/plain; charset=utf-8"]
    assert parsed.header(b"Connection") == [b"close"]
    assert parsed.header(b"Date") == [DATE[6:-2]]
    assert parsed.header(b"Server") == [SERVER_NAME.encode()]
    assert not parsed.keep_alive
    assert parsed.header(b"Transfer-Encoding") == []


def test_error_response_is_one_whole_response():
    data = error_response(500, "Internal Server Error", DATE)
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b"500 Internal Server Error\n"
    assert head.count(b"\r\n") == 5  # status line + 5 fields, the last CRLF is in the separator
