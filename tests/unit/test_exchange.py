"""The request exchange: every state and transition, driven by bytes as a connection would drive it.

The corpus cases go through the exchange fed whole, byte by byte, line by
line and in random cuts (as tests/test_corpus.py feeds the parser), with the
rest of a Content-Length body read "off the wire" past the parser the way
the connection does.  Responses the exchange frames are read back with
llhttp's response parser, so "well framed" means what a strict client accepts.
"""

from __future__ import annotations

from typing import Any

import pytest

from forkserver.http.errors import BadRequest, ProtocolError
from forkserver.http.exchange import (
    DONE,
    DRAIN_LIMIT_BYTES,
    ERROR,
    GATHER,
    IDLE,
    MUST_CLOSE,
    SEND_BODY,
    SEND_RESPONSE,
    SERVE,
    WAIT,
    WAIT_CONTINUE,
    Closing,
    Exchange,
    ExchangeError,
)
from forkserver.http.parser import Limits
from forkserver.http.response import CONTINUE_RESPONSE, LAST_CHUNK, DateHeader
from harness import ParsedResponse as Read
from test_corpus import INVALID, VALID, Case, expected_requests, splits

OK = b"HTTP/1.1 200 OK\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\n"
NOT_MODIFIED = b"HTTP/1.1 304 Not Modified\r\n"
GET = b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"


def exchange_for(data: bytes = b"", closing: Closing | None = None, limits: Limits = Limits()) -> Exchange:
    exchange = Exchange(limits, DateHeader(), closing or Closing())
    if data:
        exchange.receive(data)
    return exchange


def started(data: bytes, closing: Closing | None = None) -> Exchange:
    exchange = exchange_for(data, closing)
    exchange.start()
    return exchange


# -- bytes in ---------------------------------------------------------------------------


def test_a_new_exchange_is_idle_on_both_sides():
    exchange = exchange_for()
    assert (exchange.their_state, exchange.our_state) == (IDLE, IDLE)
    assert not exchange.next_is_request() and not exchange.mid_request()


def test_a_head_fed_byte_by_byte_is_a_request_only_at_its_last_byte():
    exchange = exchange_for()
    for i, byte in enumerate(GET):
        assert not exchange.next_is_request(), i
        exchange.receive(bytes([byte]))
        assert exchange.mid_request(), i
    assert exchange.next_is_request()
    assert (exchange.their_state, exchange.our_state) == (IDLE, IDLE)  # nothing acted on yet


POST_HEAD = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\n"


@pytest.mark.parametrize("data, body_limit, step", [
    (GET, 1 << 20, SERVE),
    (GET + b"GET", 1 << 20, SERVE),  # the first request is served; the next one's start waits its turn
    (POST_HEAD, 1 << 20, GATHER),  # its body is still to come: gather it before serving
    (POST_HEAD, 0, SERVE),  # no body gathering: the app reads it
    (POST_HEAD + b"abcd", 1 << 20, SERVE),  # all of it is here
    (b"GET / RTSP/1.0\r\n\r\n", 1 << 20, SERVE),  # a refused request is served too: start() raises its error
])
def test_next_step_tells_the_loop_what_to_do(data, body_limit, step):
    assert exchange_for(data).next_step(body_limit) == step


def test_next_step_waits_until_a_head_fed_byte_by_byte_is_complete():
    exchange = exchange_for()
    for byte in POST_HEAD[:-1]:
        exchange.receive(bytes([byte]))
        assert exchange.next_step(1 << 20) == WAIT
    exchange.receive(POST_HEAD[-1:])
    assert exchange.next_step(1 << 20) == GATHER
    assert exchange.raw_left == 4  # handed over: the caller reads the body off the wire (Connection.receive)
    for byte in b"abc":
        exchange.raw_body_gathered(bytes([byte]))
        assert exchange.next_step(1 << 20) == GATHER
    exchange.raw_body_gathered(b"d")
    assert exchange.next_step(1 << 20) == SERVE


def test_next_step_after_a_response_waits_for_the_next_request():
    exchange = started(GET)
    exchange.head(200, OK, b"", 0, 0, True)
    assert exchange.reuse() is True
    assert exchange.next_step(1 << 20) == WAIT


def test_start_takes_a_bodyless_request_whole():
    exchange = started(GET)
    assert (exchange.their_state, exchange.our_state) == (DONE, SEND_RESPONSE)
    assert exchange.keep_alive and not exchange.events and not exchange.mid_request()


def test_start_before_the_last_response_is_done_is_a_bug():
    exchange = started(GET + GET)
    with pytest.raises(ExchangeError):
        exchange.start()  # pipelining order: the second waits for the first's verdict


# -- the response -----------------------------------------------------------------------


def test_a_whole_body_matching_its_length_completes_the_response_with_the_head():
    exchange = started(GET)
    head = exchange.head(200, OK, b"Content-Length: 2\r\n", 2, 2, whole=True)
    assert exchange.our_state is DONE and exchange.sent == 2
    read = Read(head + b"ok")
    assert (read.status, read.body, read.complete, read.keep_alive) == (200, b"ok", 1, True)
    assert exchange.reuse() is True
    assert (exchange.their_state, exchange.our_state) == (IDLE, IDLE)


def test_a_length_the_app_did_not_declare_is_added_for_a_whole_body():
    exchange = started(GET)
    head = exchange.head(200, OK, b"", None, 5, whole=True)
    assert exchange.length_added == 5 and exchange.our_state is DONE
    assert Read(head + b"hello").body == b"hello"


def test_an_unknown_length_is_chunked_in_http11():
    exchange = started(GET)
    head = exchange.head(200, OK, b"", None)
    assert exchange.our_state is SEND_BODY and exchange.chunked
    wire = head + exchange.frame(b"hello ") + exchange.frame(b"world")
    assert exchange.end() == LAST_CHUNK and exchange.our_state is DONE
    read = Read(wire + LAST_CHUNK)
    assert (read.body, read.complete, read.keep_alive) == (b"hello world", 1, True)
    assert read.header(b"transfer-encoding") == [b"chunked"]
    assert exchange.sent == 11 and exchange.reuse() is True


def test_an_unknown_length_ends_with_the_connection_in_http10():
    exchange = started(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head = exchange.head(200, OK, b"", None)
    assert not exchange.chunked and not exchange.keep_alive
    assert b"Connection: close\r\n" in head and b"Transfer-Encoding" not in head
    assert exchange.frame(b"abc") == b"abc"
    assert exchange.end() == b""
    assert exchange.reuse() is False and exchange.our_state is MUST_CLOSE


def test_a_body_longer_than_its_length_is_cut_and_more_is_dropped():
    exchange = started(GET)
    exchange.head(200, OK, b"Content-Length: 3\r\n", 3)
    assert exchange.frame(b"ab") == b"ab" and exchange.our_state is SEND_BODY
    assert exchange.frame(b"cdef") == b"c" and exchange.our_state is DONE
    assert exchange.frame(b"more") == b""
    assert exchange.end() == b"" and exchange.sent == 3 and exchange.reuse() is True


def test_a_body_shorter_than_its_length_closes_the_connection():
    exchange = started(GET)
    exchange.head(200, OK, b"Content-Length: 10\r\n", 10, 4, whole=True)
    assert exchange.our_state is SEND_BODY  # the whole body does not match the framing
    assert exchange.frame(b"abcd") == b"abcd"
    assert exchange.end() == b""
    assert not exchange.keep_alive and exchange.reuse() is False


@pytest.mark.parametrize("status_line", [NO_CONTENT, NOT_MODIFIED], ids=["204", "304"])
def test_no_content_statuses_send_no_body_and_no_added_length(status_line):
    exchange = started(GET)
    code = int(status_line.split()[1])
    head = exchange.head(code, status_line, b"", None, 5, whole=True)
    assert b"Content-Length" not in head and b"Transfer-Encoding" not in head
    assert exchange.our_state is DONE and exchange.sent == 0 and exchange.length_added == -1
    assert exchange.reuse() is True


def test_a_head_request_gets_the_length_but_not_the_body():
    exchange = started(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    head = exchange.head(200, OK, b"", None, 5, whole=True)
    assert b"Content-Length: 5\r\n" in head and exchange.sent == 0 and exchange.our_state is DONE
    exchange = started(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\n")
    head = exchange.head(200, OK, b"", None)  # a streamed answer: nothing is sent, nothing chunked
    assert b"Transfer-Encoding" not in head and exchange.frame(b"abc") == b""
    assert exchange.end() == b"" and exchange.reuse() is True


def test_file_span_and_count_follow_the_length():
    exchange = started(GET)
    exchange.head(200, OK, b"Content-Length: 4\r\n", 4, 10)
    assert exchange.file_span(10) == 4
    exchange.count(3)
    assert exchange.file_span(10) == 1 and exchange.sent == 3
    assert exchange.end() == b"" and not exchange.keep_alive  # one promised byte never went


def test_head_twice_or_framing_before_the_head_are_bugs():
    exchange = started(GET)
    with pytest.raises(ExchangeError):
        exchange.frame(b"x")
    with pytest.raises(ExchangeError):
        exchange.end()
    exchange.head(200, OK, b"", None)
    with pytest.raises(ExchangeError):
        exchange.head(200, OK, b"", None)


# -- the keep-alive verdict -------------------------------------------------------------


@pytest.mark.parametrize(("request_bytes", "keep_alive"), [
    (GET, True),
    (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\n\r\n", False),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", False),
])
def test_the_clients_wish_under_its_version(request_bytes, keep_alive):
    exchange = started(request_bytes)
    head = exchange.head(200, OK, b"Content-Length: 0\r\n", 0, 0, whole=True)
    assert (b"Connection: close\r\n" in head) is not keep_alive
    assert exchange.reuse() is keep_alive
    assert exchange.our_state is (IDLE if keep_alive else MUST_CLOSE)


def test_the_server_closing_is_read_when_the_head_goes_out():
    closing = Closing()
    exchange = started(GET + GET, closing)
    exchange.head(200, OK, b"Content-Length: 0\r\n", 0, 0, whole=True)
    assert exchange.reuse() is True
    exchange.start()
    closing.active = True  # the worker began to stop while the app ran
    head = exchange.head(200, OK, b"Content-Length: 0\r\n", 0, 0, whole=True)
    assert b"Connection: close\r\n" in head and exchange.reuse() is False


def test_a_body_left_unread_is_drained_up_to_a_limit():
    exchange = started(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab")
    exchange.head(200, OK, b"Content-Length: 0\r\n", 0, 0, whole=True)
    assert exchange.reuse() is None  # read the rest first
    assert exchange.reuse(DRAIN_LIMIT_BYTES + 1) is False and exchange.our_state is MUST_CLOSE
    exchange = started(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab")
    exchange.head(200, OK, b"Content-Length: 0\r\n", 0, 0, whole=True)
    assert exchange.next_body_piece() == b"ab"
    assert exchange.reuse(2) is None
    assert exchange.raw_body_left() == 2  # the rest is read past the parser
    exchange.raw_body_received(2)
    assert exchange.their_state is DONE and exchange.reuse(4) is True


def test_refusal_answers_with_the_errors_status_and_closes():
    exchange = exchange_for(b"GET / HTTP/1.1\r\n\r\n")  # no Host
    with pytest.raises(BadRequest):
        exchange.start()
    assert exchange.their_state is ERROR
    read = Read(exchange.refusal(BadRequest("no Host")))
    assert read.status == 400 and not read.keep_alive and read.body == b"400 Bad Request\n"
    assert exchange.our_state is MUST_CLOSE and exchange.reuse() is False


def test_failure_is_a_500_only_before_the_head():
    exchange = started(GET)
    read = Read(exchange.failure())
    assert read.status == 500 and not read.keep_alive and exchange.our_state is MUST_CLOSE
    exchange = started(GET)
    exchange.head(200, OK, b"", None)
    assert exchange.failure() == b"" and exchange.reuse() is False


def test_abandon_closes():
    exchange = started(GET)
    exchange.abandon()
    assert exchange.our_state is MUST_CLOSE and exchange.sent == 0 and exchange.reuse() is False


# -- the request body -------------------------------------------------------------------

CHUNKED_POST = b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
EXPECTING = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"


def test_a_chunked_body_fed_byte_by_byte_comes_out_whole():
    exchange = exchange_for()
    pieces = [CHUNKED_POST[i:i + 1] for i in range(len(CHUNKED_POST))]
    while not exchange.next_is_request():
        exchange.receive(pieces.pop(0))
    exchange.start()
    assert exchange.their_state is SEND_BODY
    body = b""
    while (piece := exchange.next_body_piece()) != b"":
        if piece is None:
            assert exchange.raw_body_left() == 0  # chunked: never handed over
            exchange.receive(pieces.pop(0))
        else:
            body += piece
    assert body == b"abcde" and exchange.their_state is DONE and not pieces


def test_a_bad_chunk_raises_once_and_ends_the_body():
    exchange = started(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    with pytest.raises(ProtocolError):
        while exchange.next_body_piece() is not None:
            pass
    assert exchange.their_state is ERROR and not exchange.keep_alive
    assert exchange.next_body_piece() == b""
    exchange.head(200, OK, b"Content-Length: 0\r\n", 0, 0, whole=True)
    assert exchange.reuse() is False


def test_100_continue_is_asked_for_once_before_the_body():
    exchange = started(EXPECTING)
    assert exchange.their_state is WAIT_CONTINUE
    assert exchange.ask_for_body() == CONTINUE_RESPONSE
    assert exchange.their_state is SEND_BODY and exchange.ask_for_body() == b""
    assert exchange.raw_body_left() == 2
    exchange.raw_body_received(2)
    exchange.head(200, OK, b"Content-Length: 0\r\n", 0, 0, whole=True)
    assert exchange.reuse() is True


def test_a_body_never_asked_for_closes_the_connection():
    exchange = started(EXPECTING)
    head = exchange.head(200, OK, b"Content-Length: 0\r\n", 0, 0, whole=True)
    assert b"Connection: close\r\n" in head
    assert exchange.ask_for_body() == b""  # too late: a final response went out
    assert exchange.reuse() is False


def test_a_body_asked_for_after_the_head_gets_no_100_continue():
    exchange = started(EXPECTING)
    exchange.head(200, OK, b"", None)
    assert exchange.ask_for_body() == b"" and exchange.their_state is SEND_BODY


# -- the corpus, as a connection drives it ------------------------------------------------


class Wire:
    """The client's bytes in the pieces they arrive in; the raw body is read from the same stream."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = [p for p in pieces if p]

    def recv(self) -> bytes | None:
        return self.pieces.pop(0) if self.pieces else None

    def recv_raw(self, most: int) -> bytes:
        piece = self.pieces.pop(0)
        if len(piece) > most:
            self.pieces.insert(0, piece[most:])
        return piece[:most]


def read_body(exchange: Exchange, wire: Wire) -> bytes:
    """Read a request body the way the connection's pull_body does."""
    if exchange.ask_for_body():
        assert exchange.our_state is SEND_RESPONSE
    body = b""
    while True:
        piece = exchange.next_body_piece()
        if piece == b"":
            assert exchange.their_state is DONE
            return body
        if piece is not None:
            body += piece
            continue
        left = exchange.raw_body_left()
        if left:
            data = wire.recv_raw(left)
            exchange.raw_body_received(len(data))
            body += data
            continue
        data = wire.recv()
        assert data is not None, "the body never ended"
        exchange.receive(data)


def serve_all(pieces: list[bytes]) -> list[tuple[Any, bytes, bool]]:
    """Serve every request in ``pieces``; return each request, its body and the verdict."""
    exchange = exchange_for()
    wire = Wire(pieces)
    served = []
    while True:
        while not exchange.next_is_request():
            data = wire.recv()
            if data is None:
                return served
            exchange.receive(data)
        request = exchange.start()
        assert exchange.our_state is SEND_RESPONSE
        body = read_body(exchange, wire)
        head = exchange.head(200, OK, b"", None, 2, whole=True)
        assert exchange.our_state is DONE
        read = Read(head + b"ok", head_request=request.method == "HEAD")
        verdict = exchange.reuse()
        assert verdict is read.keep_alive
        served.append((request, body, verdict))
        if not verdict:
            assert exchange.our_state is MUST_CLOSE
            return served
        assert (exchange.their_state, exchange.our_state) == (IDLE, IDLE)


@pytest.mark.parametrize("case", VALID, ids=str)
def test_valid_case_is_served_the_same_however_it_is_fed(case: Case):
    expected = expected_requests(case)
    for how, pieces in splits(case, case.raw):
        served = serve_all(pieces)
        assert len(served) == len(expected), how
        for (request, body, verdict), want in zip(served, expected):
            assert request.method == want["method"], how
            assert body.decode("latin-1") == want["body"], how
            assert verdict is (want["keep_alive"] and not want.get("upgraded", False)), how


@pytest.mark.parametrize("case", INVALID, ids=str)
def test_invalid_case_is_refused_with_its_status_however_it_is_fed(case: Case):
    status = case.expected["status"]
    for how, pieces in splits(case, case.raw):
        exchange = exchange_for()
        wire = Wire(pieces)
        error = None
        while error is None:
            while not exchange.next_is_request():
                data = wire.recv()
                assert data is not None, f"{how}: never refused"
                exchange.receive(data)
            try:
                exchange.start()
                read_body(exchange, wire)
            except ProtocolError as exc:
                error = exc
            else:
                exchange.head(200, OK, b"", None, 0, whole=True)
                assert exchange.reuse(), f"{how}: a request before the refused one closed"
        assert error.status == status, how
        assert Read(exchange.refusal(error)).status == status
        assert exchange.our_state is MUST_CLOSE


# -- a body gathered before its request starts (the worker's loop reads it) ---------


def body_of(exchange: Exchange) -> bytes:
    """Start the waiting request and read its whole body from the exchange alone."""
    exchange.start()
    body = b""
    while piece := exchange.next_body_piece():
        body += piece
    return body


def test_a_chunked_body_trickled_byte_by_byte_is_gathered_into_one_buffer():
    exchange = exchange_for(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(100):
        exchange.receive(b"1\r\nx\r\n")
        assert exchange.gather_body(1 << 20)
    assert exchange.gathered() == 100 and len(exchange.events) == 1
    assert len(exchange.early) == 1  # joined: no object per byte kept
    exchange.receive(b"0\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert not exchange.gather_body(1 << 20)
    assert body_of(exchange) == b"x" * 100
    assert exchange.their_state is DONE and exchange.next_is_request()  # the pipelined GET is intact


def test_the_rest_of_a_content_length_body_is_gathered_off_the_wire():
    exchange = exchange_for(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
    assert exchange.gather_body(1 << 20)
    assert exchange.raw_left == 8  # handed over: the parser expects the next request
    exchange.raw_body_gathered(bytearray(b"cdef"))
    assert exchange.gather_body(1 << 20) and exchange.gather_left(1 << 20) == 4
    assert exchange.raw_left == 4  # what the caller may still read off the wire
    exchange.raw_body_gathered(bytearray(b"ghij"))
    assert not exchange.gather_body(1 << 20)
    assert body_of(exchange) == b"abcdefghij" and exchange.their_state is DONE


def test_a_body_past_the_limit_starts_with_what_is_gathered_and_streams_the_rest():
    exchange = exchange_for(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nabcd")
    assert not exchange.gather_body(4)
    exchange.start()
    assert exchange.raw_body_left() == 0  # the gathered bytes come first
    assert exchange.next_body_piece() == b"abcd"
    assert exchange.raw_body_left() == 6


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n",
])
def test_no_body_or_one_held_for_100_continue_is_not_waited_for(head):
    assert not exchange_for(head).gather_body(1 << 20)


def test_an_error_in_a_gathered_body_is_raised_when_the_app_reads_it():
    exchange = exchange_for(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\n")
    assert not exchange.gather_body(1 << 20)
    exchange.start()
    assert exchange.next_body_piece() == b"ab"
    with pytest.raises(ProtocolError):
        exchange.next_body_piece()


# What a connection may leave in its parser when it closes: the next exchange must get none of it.
LEFT_BEHIND = {
    "a head cut off": b"GET /old HTTP/1.1\r\nHost: old\r\nX-Half: ",
    "a body cut off": b"POST /old HTTP/1.1\r\nHost: old\r\nContent-Length: 100\r\n\r\nxxxx",
    "a chunk cut off": b"POST /old HTTP/1.1\r\nHost: old\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nxx",
    "a refused request": b"GET /old HTTP/1.1\r\nBad Field\r\n\r\n",
    "an unknown method cut off": b"FROB",
    "an upgrade": b"GET /old HTTP/1.1\r\nHost: old\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    "an upgrade with a body": b"POST /old HTTP/1.1\r\nHost: old\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                              b"Content-Length: 4\r\n\r\nab",
    "pipelined requests": GET + GET + b"GET /old HTTP/1.1\r\nHo",
    "a body handed over": b"POST /old HTTP/1.1\r\nHost: old\r\nContent-Length: 100000\r\n\r\n",
}


@pytest.mark.parametrize("left", LEFT_BEHIND.values(), ids=list(LEFT_BEHIND))
def test_a_parser_given_up_keeps_nothing_of_its_last_connection(left):
    old = exchange_for(left)
    if old.next_step(0) == SERVE:
        try:
            old.start()
            old.raw_body_left()  # a Content-Length body's rest is handed over
        except ProtocolError as error:
            old.refusal(error)
    old.release()
    renewed = Exchange(Limits(), DateHeader(), Closing(), old.give_up_parser())
    assert old.parser is None and old.receive is None  # a stale write or wsgi.input cannot reach it
    fresh = exchange_for()
    request = b"POST /new HTTP/1.1\r\nHost: new\r\nContent-Length: 3\r\n\r\nabc" + GET
    for renewed_or_fresh in (renewed, fresh):
        renewed_or_fresh.receive(request)
        assert renewed_or_fresh.next_step(0) == SERVE
    assert [renewed.start(), renewed.next_body_piece(), renewed.next_body_piece()] == \
        [fresh.start(), fresh.next_body_piece(), fresh.next_body_piece()]
    assert renewed.keep_alive and (renewed.their_state, renewed.our_state) == (DONE, SEND_RESPONSE)
    assert list(renewed.events) == list(fresh.events)
    assert not list(old.events) or old.events[0] is not renewed.events[0]
