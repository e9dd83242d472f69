"""The PEP 3333 adapter alone: apps run against an exchange fed with request bytes, output recorded.

The output stands in for the connection (whose own tests use real sockets);
what it records is read back with llhttp's response parser.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest

from harness import ParsedResponse as Parsed

from forkserver.http.exchange import DONE, MUST_CLOSE, SEND_RESPONSE, Closing, Exchange
from forkserver.http.parser import Limits
from forkserver.http.response import DateHeader
from forkserver.worker.wsgi import (
    FIELD_CACHE_SIZE,
    AppError,
    Codec,
    Response,
    base_environ,
    build_environ,
    run_app,
)

GET = b"GET /p?q=1 HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 1.2.3.4\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"


class Recorded:
    """An output that keeps what the response sent, and how (send, send_pair, sendfile)."""

    def __init__(self) -> None:
        self.wire = b""
        self.calls: list[tuple[str, Any]] = []

    def send(self, data: bytes) -> None:
        self.calls.append(("send", len(data)))
        self.wire += data

    def send_pair(self, head: bytes, body: bytes, last: bool = False) -> None:
        self.calls.append(("send_pair", last))
        self.wire += head + body

    def sendfile(self, in_fd: int, offset: int, count: int) -> int:
        data = os.pread(in_fd, min(count, 3), offset)  # a few bytes at a time, as a slow socket takes them
        self.calls.append(("sendfile", len(data)))
        self.wire += data
        return len(data)


def serve(app: Any, request: bytes = GET, codec: Codec | None = None) -> tuple[Response, Recorded, Exchange]:
    """Run ``app`` for ``request`` as serving.serve does, minus the socket."""
    codec = codec or Codec()
    exchange = Exchange(Limits(), DateHeader(), Closing())
    exchange.receive(request)
    parsed = exchange.start()
    environ = build_environ(parsed, base_environ("localhost", "80", False), codec)
    environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = "127.0.0.1", "5"
    output = Recorded()
    response = Response(exchange, output, codec)
    run_app(app, environ, response)
    return response, output, exchange


def app_returning(body: list[bytes] | Any, headers: list[tuple[str, str]] | None = None, status: str = "200 OK"):
    def app(environ, start_response):
        start_response(status, headers if headers is not None else [("Content-Type", "text/plain")])
        return body
    return app


# -- environ ------------------------------------------------------------------------------


def test_environ_maps_the_request():
    codec = Codec()
    exchange = Exchange(Limits(), DateHeader(), Closing())
    exchange.receive(GET)
    environ = build_environ(exchange.start(), base_environ("localhost", "80", False), codec)
    assert environ["REQUEST_METHOD"] == "GET" and environ["PATH_INFO"] == "/p" and environ["QUERY_STRING"] == "q=1"
    assert environ["HTTP_COOKIE"] == "a=1; b=2" and environ["HTTP_X_FORWARDED_FOR"] == "1.2.3.4"
    assert environ["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert "REMOTE_ADDR" not in environ and "REMOTE_PORT" not in environ  # the connection's, added by its caller
    # A second build from the codec's remembered keys is the same.
    assert build_environ(exchange.request, base_environ("localhost", "80", False), codec) == environ


def test_the_codec_shares_the_last_environ_only_for_the_same_request_on_the_same_base():
    codec = Codec()
    first, second = base_environ("localhost", "80", False), base_environ("localhost", "80", False)
    requests = []
    for data in (GET, GET.replace(b"/p?q=1", b"/other")):
        exchange = Exchange(Limits(), DateHeader(), Closing())
        exchange.receive(data)
        request = exchange.start()
        requests.append(((request.method, request.target, request.version, request.headers), request))
    (key, request), (other_key, other) = requests
    environ = codec.environ(key, request, first)
    assert environ == build_environ(request, first, codec)
    assert codec.environ(key, request, first) is environ
    assert codec.environ(key, request, second) is not environ  # another listener's base: built anew
    assert codec.environ(other_key, other, second)["PATH_INFO"] == "/other"


def test_a_header_name_with_underscore_is_dropped():
    codec = Codec()
    assert codec.header_environ([(b"X_Forwarded_For", b"evil"), (b"X-Real", b"ok")]) == {"HTTP_X_REAL": "ok"}


# -- start_response and the iterable --------------------------------------------------------


def test_one_bytes_in_a_list_goes_out_with_its_head_in_one_call():
    response, output, exchange = serve(app_returning([b"hello"], [("Content-Length", "5")]))
    assert output.calls == [("send_pair", True)]  # complete, and the connection stays: it may be deferred
    parsed = Parsed(output.wire)
    assert (parsed.status, parsed.body, parsed.keep_alive) == (200, b"hello", True)
    assert response.code == 200 and response.body_bytes == 5 and exchange.our_state is DONE


def test_a_list_without_a_length_gets_one_and_the_access_log_sees_it():
    response, output, _ = serve(app_returning([b"ab", b"cd"]))
    assert Parsed(output.wire).header(b"content-length") == [b"4"]
    assert ("Content-Length", "4") in response.headers


def test_a_generator_is_chunked_and_closed():
    closed = []

    class Body:
        def __iter__(self):
            yield b"one "
            yield b""
            yield b"two"

        def close(self):
            closed.append(True)

    response, output, exchange = serve(app_returning(Body()))
    parsed = Parsed(output.wire)
    assert parsed.body == b"one two" and parsed.complete == 1 and parsed.header(b"transfer-encoding") == [b"chunked"]
    assert closed == [True] and exchange.reuse() is True


class Closable:
    """An iterable that is not a list, with a close(): what werkzeug's ClosingIterator is to a server."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces
        self.closed = False

    def __iter__(self):
        return iter(self.pieces)

    def close(self) -> None:
        self.closed = True


def test_an_iterable_of_one_piece_as_long_as_declared_goes_out_with_its_head_in_one_call():
    body = Closable(b"hello")  # a Flask or Django response, as a server sees it
    response, output, exchange = serve(app_returning(body, [("Content-Length", "5")]))
    assert output.calls == [("send_pair", True)]  # complete: it may wait for the end of the batch
    parsed = Parsed(output.wire)
    assert (parsed.status, parsed.body, parsed.keep_alive) == (200, b"hello", True)
    assert body.closed and response.body_bytes == 5 and exchange.our_state is DONE


@pytest.mark.parametrize(("pieces", "calls", "sent"), [
    ((b"ab", b"cde"), [("send_pair", False), ("send", 3)], b"abcde"),  # the first piece is short of the length
    ((b"abcdefg", b"h"), [("send_pair", True)], b"abcde"),  # past the length: cut, and the rest never sent
])
def test_an_iterable_is_framed_to_its_declared_length(pieces, calls, sent):
    body = Closable(*pieces)
    response, output, exchange = serve(app_returning(body, [("Content-Length", "5")]))
    assert output.calls == calls
    assert Parsed(output.wire).body == sent and response.body_bytes == 5
    assert body.closed and exchange.reuse() is True


def test_an_iterable_answering_head_sends_the_head_alone():
    body = Closable(b"hello")
    _, output, exchange = serve(app_returning(body, [("Content-Length", "5")]), b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert output.calls == [("send_pair", True)]
    assert b"Content-Length: 5\r\n" in output.wire and output.wire.endswith(b"\r\n\r\n")
    assert b"hello" not in output.wire
    assert body.closed and exchange.reuse() is True


def test_write_sends_at_once_and_the_iterable_follows():
    def app(environ, start_response):
        write = start_response("200 OK", [("Content-Length", "6")])
        write(b"abc")
        return [b"def"]

    _, output, exchange = serve(app)
    assert output.calls[0] == ("send_pair", False)
    assert Parsed(output.wire).body == b"abcdef" and exchange.our_state is DONE


def test_a_file_wrapper_goes_out_with_sendfile(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")

    def app(environ, start_response):
        start_response("200 OK", [])
        handle = open(path, "rb")
        handle.seek(2)
        return environ["wsgi.file_wrapper"](handle)

    _, output, exchange = serve(app)
    assert [c for c in output.calls if c[0] == "sendfile"] == [("sendfile", 3), ("sendfile", 3), ("sendfile", 2)]
    assert Parsed(output.wire).body == b"23456789" and exchange.reuse() is True


def test_head_request_gets_headers_only():
    _, output, _ = serve(app_returning([b"hello"]), b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert output.wire.endswith(b"\r\n\r\n") and b"Content-Length: 5\r\n" in output.wire


def test_exc_info_replaces_an_unsent_response_and_reraises_after_the_head():
    def app(environ, start_response):
        start_response("200 OK", [])
        try:
            raise ValueError("boom")
        except ValueError:
            start_response("500 Oops", [("Content-Length", "0")], sys.exc_info())
        return []

    response, output, _ = serve(app)
    assert Parsed(output.wire).status == 500 and response.code == 500

    def late(environ, start_response):
        write = start_response("200 OK", [])
        write(b"x")
        try:
            raise ValueError("late")
        except ValueError:
            start_response("500 Oops", [], sys.exc_info())
        return []

    with pytest.raises(ValueError, match="late"):
        serve(late)


# -- PEP 3333 violations ---------------------------------------------------------------------


@pytest.mark.parametrize(("app", "message"), [
    (app_returning([b"x"], status=200), "status must be str"),
    (app_returning([b"x"], status="200"), "is not 'NNN Reason'"),
    (app_returning([b"x"], headers=("X", "y")), "must be a list"),
    (app_returning([b"x"], headers=[("X", 1)]), "pair of str"),
    (app_returning([b"x"], headers=[("X Y", "1")]), "not a token"),
    (app_returning([b"x"], headers=[("X", "a\nb")]), "control character"),
    (app_returning([b"x"], headers=[("Connection", "close")]), "hop-by-hop"),
    (app_returning([b"x"], headers=[("Content-Length", "x")]), "not a number"),
    (app_returning([b"x"], headers=[("X", "\u20ac")]), "not latin-1"),
    (app_returning(["text"]), "not bytes"),
    (app_returning(b"bare"), "bare bytes"),
    (app_returning([b"x"], status="101 Switching Protocols"), "informational"),
    (app_returning([b"x"], status="103 Early Hints"), "informational"),
    (app_returning([b"x"], headers=[("Content-Length", "1"), ("Content-Length", "2")]), "two different Content-Length"),
    (lambda environ, start_response: [b"x"], "without calling start_response"),
])
def test_violations_are_app_errors_and_nothing_is_sent(app, message):
    with pytest.raises(AppError, match=message):
        serve(app)


def test_the_same_content_length_twice_is_sent_as_given():
    _, output, _ = serve(app_returning([b"x"], headers=[("Content-Length", "1"), ("Content-Length", "1")]))
    assert output.wire.count(b"Content-Length: 1\r\n") == 2


def test_start_response_twice_without_exc_info_is_an_app_error():
    def app(environ, start_response):
        start_response("200 OK", [])
        start_response("200 OK", [])
        return []

    with pytest.raises(AppError, match="second time"):
        serve(app)


# -- the codec ---------------------------------------------------------------------------------


def test_the_codec_re_encodes_a_list_the_app_changed_since():
    codec = Codec()
    headers = [("X-A", "1"), ("Content-Length", "2")]
    assert codec.headers(headers) == (b"X-A: 1\r\nContent-Length: 2\r\n", 2)
    headers[0] = ("X-A", "2")  # the app mutates the list it passed before
    assert codec.headers(headers) == (b"X-A: 2\r\nContent-Length: 2\r\n", 2)


def test_the_codec_stops_remembering_fields_when_full():
    codec = Codec()
    for i in range(FIELD_CACHE_SIZE + 10):
        assert codec.headers([("X-Id", str(i))]) == (b"X-Id: %d\r\n" % i, None)
    assert len(codec._field_lines) == FIELD_CACHE_SIZE


def test_two_codecs_share_nothing():
    one, two = Codec(), Codec()
    one.status("200 OK")
    assert two._status_lines == {} and one._status_lines


def test_response_state_comes_from_the_exchange():
    exchange = Exchange(Limits(), DateHeader(), Closing())
    exchange.receive(b"GET / HTTP/1.0\r\n\r\n")
    exchange.start()
    response = Response(exchange, Recorded(), Codec())
    assert not response.head_sent and exchange.our_state is SEND_RESPONSE
    response.start_response("200 OK", [])
    response.send_with_head(b"x")
    assert response.head_sent and exchange.reuse() is False and exchange.our_state is MUST_CLOSE
