"""RequestParser: limits, connection semantics, Upgrade, and what happens after an error."""

from __future__ import annotations

import gc
import random
import weakref

import pytest

from forkserver.http.errors import (
    BadRequest,
    BodyTooLarge,
    HeaderTooLarge,
    NotImplementedCoding,
    ProtocolError,
    RequestLineTooLong,
    VersionNotSupported,
)
from forkserver.http.events import END_OF_MESSAGE, BodyChunk, EndOfMessage, Request
from forkserver.http.parser import Limits, RequestParser

GET = b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n"


def feed_all(data: bytes, limits: Limits = Limits(), step: int | None = None) -> tuple[list, RequestParser]:
    """Feed ``data`` whole, or ``step`` bytes at a time; return all events and the parser."""
    parser = RequestParser(limits)
    events: list = []
    if step is None:
        events += parser.feed(data)
    else:
        for i in range(0, len(data), step):
            events += parser.feed(data[i : i + step])
    return events, parser


def body_of(events: list) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, BodyChunk))


def only_request(events: list) -> Request:
    requests = [e for e in events if isinstance(e, Request)]
    assert len(requests) == 1, events
    return requests[0]


def request_with(headers: bytes = b"", version: bytes = b"1.1", body: bytes = b"", method: bytes = b"GET",
                 target: bytes = b"/") -> bytes:
    host = b"Host: example.com\r\n" if version == b"1.1" else b""
    return method + b" " + target + b" HTTP/" + version + b"\r\n" + host + headers + b"\r\n" + body


# -- the Request event ------------------------------------------------------------------


def test_request_event_carries_the_head_as_sent():
    events, _ = feed_all(b"POST /p?q=1 HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n\r\nabc")
    assert events == [
        Request(method="POST", target=b"/p?q=1", version="1.1",
                headers=((b"Host", b"h"), (b"X-A", b"1"), (b"x-a", b"2"), (b"Content-Length", b"3")),
                keep_alive=True, expect_continue=False, chunked=False, content_length=3),
        BodyChunk(b"abc"),
        END_OF_MESSAGE,
    ]


def test_chunked_request_has_no_content_length_and_decoded_body():
    events, _ = feed_all(request_with(b"Transfer-Encoding: chunked\r\n", method=b"POST",
                                      body=b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"))
    request = only_request(events)
    assert request.chunked and request.content_length is None
    assert body_of(events) == b"abcde"
    assert events[-1] is END_OF_MESSAGE


def test_pipelined_requests_come_out_in_order_from_one_feed():
    data = b"".join(request_with(target=b"/%d" % i) for i in range(5))
    events, parser = feed_all(data)
    assert [e.target for e in events] == [b"/0", b"/1", b"/2", b"/3", b"/4"]  # each complete with its head
    assert not parser.mid_message()


@pytest.mark.parametrize("framing", [b"", b"Content-Length: 0\r\n"])
def test_a_request_without_a_body_is_complete_with_its_request_event(framing):
    # No EndOfMessage follows: the Request says there is no body (neither
    # chunked nor a Content-Length above 0), which is its end.
    for step in (None, 1):
        events, parser = feed_all(request_with(framing) + b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx",
                                  step=step)
        assert [type(e) for e in events] == [Request, Request, BodyChunk, EndOfMessage]
        assert not events[0].chunked and not events[0].content_length
        assert not parser.mid_message()


def test_mid_message_tracks_head_and_body():
    parser = RequestParser(Limits())
    assert not parser.mid_message()
    assert parser.feed(b"POST / HTTP/1.1\r\nHo") == []
    assert parser.mid_message()
    events = parser.feed(b"st: h\r\nContent-Length: 4\r\n\r\nab")
    assert [type(e) for e in events] == [Request, BodyChunk]
    assert parser.mid_message()
    assert parser.feed(b"cd") == [BodyChunk(b"cd"), END_OF_MESSAGE]
    assert not parser.mid_message()


def test_http10_without_host_is_accepted():
    request = only_request(feed_all(b"GET / HTTP/1.0\r\n\r\n")[0])
    assert request.version == "1.0" and request.headers == ()


# -- limits -----------------------------------------------------------------------------


@pytest.mark.parametrize("step", [None, 1, 100])
def test_request_target_limit(step):
    limits = Limits()
    at_limit = request_with(target=b"/" + b"a" * (limits.request_line_bytes - 1))
    events, _ = feed_all(at_limit, limits, step)
    assert len(only_request(events).target) == limits.request_line_bytes
    events, _ = feed_all(request_with(target=b"/" + b"a" * limits.request_line_bytes), limits, step)
    assert isinstance(events[-1], RequestLineTooLong) and events[-1].status == 414
    assert len(events) == 1


def test_request_target_limit_is_configurable():
    limits = Limits(request_line_bytes=10)
    assert only_request(feed_all(request_with(target=b"/123456789"), limits)[0])
    events, _ = feed_all(request_with(target=b"/1234567890"), limits)
    assert events[-1].status == 414


@pytest.mark.parametrize("step", [None, 7])
def test_header_field_count_limit(step):
    limits = Limits()
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(limits.header_fields - 1))  # plus Host
    request = only_request(feed_all(request_with(fields), limits, step)[0])
    assert len(request.headers) == limits.header_fields
    events, _ = feed_all(request_with(fields + b"X-One-More: v\r\n"), limits, step)
    assert events == [events[-1]] and isinstance(events[-1], HeaderTooLarge)
    assert events[-1].status == 431


def test_header_field_count_limit_is_configurable():
    limits = Limits(header_fields=2)
    assert only_request(feed_all(request_with(b"A: 1\r\n"), limits)[0])
    assert feed_all(request_with(b"A: 1\r\nB: 2\r\n"), limits)[0][-1].status == 431


@pytest.mark.parametrize("step", [None, 1000])
def test_header_field_size_limit_counts_name_and_value(step):
    limits = Limits()
    name = b"X-Long"
    value = b"v" * (limits.header_field_bytes - len(name))
    request = only_request(feed_all(request_with(name + b": " + value + b"\r\n"), limits, step)[0])
    assert request.headers[-1] == (name, value)
    events, _ = feed_all(request_with(name + b": " + value + b"v\r\n"), limits, step)
    assert isinstance(events[-1], HeaderTooLarge) and len(events) == 1


def test_unterminated_head_is_cut_off_at_head_bytes():
    limits = Limits(header_fields=4, header_field_bytes=100)
    parser = RequestParser(limits)
    events = parser.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Endless: ")
    fed = 0
    while not events and fed <= 10 * limits.head_bytes:
        events = parser.feed(b"v" * 64)
        fed += 64
    assert isinstance(events[-1], HeaderTooLarge)
    assert fed <= limits.head_bytes + 64


def test_body_limit_by_content_length_refuses_before_the_body():
    limits = Limits(body_bytes=10)
    ok, _ = feed_all(request_with(b"Content-Length: 10\r\n", method=b"POST", body=b"0123456789"), limits)
    assert body_of(ok) == b"0123456789" and ok[-1] is END_OF_MESSAGE
    parser = RequestParser(limits)
    events = parser.feed(request_with(b"Content-Length: 11\r\n", method=b"POST"))  # no body sent yet
    assert len(events) == 1 and isinstance(events[0], BodyTooLarge) and events[0].status == 413


@pytest.mark.parametrize("step", [None, 1, 5])
def test_body_limit_by_chunked_body(step):
    limits = Limits(body_bytes=10)
    head = request_with(b"Transfer-Encoding: chunked\r\n", method=b"POST")
    ok, _ = feed_all(head + b"5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n", limits, step)
    assert body_of(ok) == b"0123456789" and ok[-1] is END_OF_MESSAGE
    events, _ = feed_all(head + b"5\r\n01234\r\n6\r\n56789X\r\n0\r\n\r\n", limits, step)
    assert isinstance(events[-1], BodyTooLarge) and events[-1].status == 413
    assert len(body_of(events)) <= 10
    assert END_OF_MESSAGE not in events


def test_body_limit_zero_means_unlimited():
    body = b"x" * (1 << 20)
    events, _ = feed_all(request_with(b"Content-Length: %d\r\n" % len(body), method=b"POST", body=body))
    assert body_of(events) == body and events[-1] is END_OF_MESSAGE


def test_trailer_fields_are_discarded_but_limited():
    limits = Limits(header_fields=3, header_field_bytes=50)
    head = request_with(b"Transfer-Encoding: chunked\r\n", method=b"POST")
    events, _ = feed_all(head + b"1\r\na\r\n0\r\nT1: 1\r\nT2: 2\r\nT3: 3\r\n\r\n", limits)
    assert only_request(events).headers == ((b"Host", b"example.com"), (b"Transfer-Encoding", b"chunked"))
    assert events[-1] is END_OF_MESSAGE
    events, _ = feed_all(head + b"1\r\na\r\n0\r\nT1: 1\r\nT2: 2\r\nT3: 3\r\nT4: 4\r\n\r\n", limits)
    assert isinstance(events[-1], HeaderTooLarge)
    events, _ = feed_all(head + b"1\r\na\r\n0\r\nT: " + b"v" * 60 + b"\r\n\r\n", limits)
    assert isinstance(events[-1], HeaderTooLarge)


def test_head_bytes_covers_a_head_at_every_limit():
    # The longest method llhttp accepts, the longest target, the most fields, each the longest.
    limits = Limits(request_line_bytes=20, header_fields=3, header_field_bytes=30)
    target = b"/" + b"t" * 19
    fields = b"".join(b"H%d: " % i + b"v" * (30 - 2) + b"\r\n" for i in range(2))
    data = b"UNSUBSCRIBE " + target + b" HTTP/1.1\r\nHost: " + b"h" * 26 + b"\r\n" + fields + b"\r\n"
    for step in (None, 1, 10):
        request = only_request(feed_all(data, limits, step)[0])
        assert len(request.headers) == 3 and request.target == target


@pytest.mark.parametrize("tail", [b"GET /second HTTP/1.1\r\nHo", b"\r\nGET /second HTTP/1.1\r\nHo"],
                         ids=["head", "crlf-then-head"])
def test_head_limit_does_not_count_an_earlier_pipelined_body(tail):
    limits = Limits(request_line_bytes=100, header_fields=5, header_field_bytes=100)
    body = b"x" * (2 * limits.head_bytes)
    first = request_with(b"Content-Length: %d\r\n" % len(body), method=b"POST", body=body)
    parser = RequestParser(limits)
    events = parser.feed(first + tail)  # one recv: the body, then the start of the next head
    assert events[-1] is END_OF_MESSAGE and body_of(events) == body
    events = parser.feed(b"st: example.com\r\n\r\n")
    assert only_request(events).target == b"/second"


# -- keep-alive and Expect ---------------------------------------------------------------


@pytest.mark.parametrize(("version", "connection", "keep_alive"), [
    (b"1.1", None, True),
    (b"1.1", b"keep-alive", True),
    (b"1.1", b"close", False),
    (b"1.1", b"Close", False),
    (b"1.1", b"foo, close", False),
    (b"1.0", None, False),
    (b"1.0", b"keep-alive", True),
    (b"1.0", b"Keep-Alive", True),
    (b"1.0", b"close", False),
])
def test_keep_alive(version, connection, keep_alive):
    headers = b"Connection: " + connection + b"\r\n" if connection else b""
    assert only_request(feed_all(request_with(headers, version))[0]).keep_alive is keep_alive


def test_data_after_a_closing_request_is_an_error_after_that_request():
    events, _ = feed_all(request_with(b"Connection: close\r\n") + GET)
    assert len(events) == 2 and isinstance(events[0], Request) and isinstance(events[1], BadRequest)


@pytest.mark.parametrize(("version", "expect", "wanted"), [
    (b"1.1", b"100-continue", True),
    (b"1.1", b"100-Continue", True),
    (b"1.1", b" 100-continue ", True),
    (b"1.1", b"something-else", False),
    (b"1.1", None, False),
    (b"1.0", b"100-continue", False),  # RFC 9110 §10.1.1: a 1.0 client cannot expect a 100
])
def test_expect_continue(version, expect, wanted):
    headers = (b"Expect: " + expect + b"\r\n" if expect else b"") + b"Content-Length: 1\r\n"
    events, _ = feed_all(request_with(headers, version, b"x", b"POST"))
    assert only_request(events).expect_continue is wanted
    assert body_of(events) == b"x"


def test_expect_continue_request_waits_for_its_body():
    parser = RequestParser(Limits())
    events = parser.feed(request_with(b"Expect: 100-continue\r\nContent-Length: 2\r\n", method=b"POST"))
    assert len(events) == 1 and events[0].expect_continue
    assert parser.mid_message()
    assert parser.feed(b"ok") == [BodyChunk(b"ok"), END_OF_MESSAGE]


# -- framing refusals that are easy to get wrong -----------------------------------------------


@pytest.mark.parametrize(("value", "error"), [
    (b"chunked", None),
    (b"CHUNKED", None),
    (b"gzip", BadRequest),
    (b"gzip, chunked", NotImplementedCoding),
    (b"deflate,chunked", NotImplementedCoding),
    (b"chunked, gzip", BadRequest),
    (b"chunked, chunked", BadRequest),
    (b", chunked", BadRequest),
    (b"identity", BadRequest),
])
def test_transfer_encoding_values(value, error):
    events, _ = feed_all(request_with(b"Transfer-Encoding: " + value + b"\r\n", method=b"POST",
                                      body=b"0\r\n\r\n"))
    if error is None:
        assert only_request(events).chunked and events[-1] is END_OF_MESSAGE
    else:
        assert len(events) == 1 and type(events[0]) is error


def test_transfer_encoding_in_http10_is_refused():
    # RFC 9112 §6.1: faulty framing, even with keep-alive asked for.
    events, _ = feed_all(request_with(b"Connection: keep-alive\r\nTransfer-Encoding: chunked\r\n", b"1.0",
                                      b"0\r\n\r\n", b"POST"))
    assert len(events) == 1 and isinstance(events[0], BadRequest)


@pytest.mark.parametrize(("version", "error"), [
    (b"2.0", VersionNotSupported),
    (b"0.9", VersionNotSupported),
    (b"1.2", BadRequest),
    (b"3.0", BadRequest),
])
def test_versions(version, error):
    events, _ = feed_all(b"GET / HTTP/" + version + b"\r\nHost: h\r\n\r\n")
    assert len(events) == 1 and type(events[0]) is error


@pytest.mark.parametrize(("method", "target", "ok"), [
    (b"GET", b"/", True),
    (b"GET", b"http://example.com/x", True),
    (b"GET", b"HTTPS://example.com", True),
    (b"OPTIONS", b"*", True),
    (b"GET", b"*", False),
    (b"GET", b"ftp://example.com/x", False),
    (b"CONNECT", b"example.com:443", False),
])
def test_request_target_forms(method, target, ok):
    events, parser = feed_all(request_with(method=method, target=target))
    if ok:
        assert only_request(events).target == target
    else:
        assert len(events) == 1 and isinstance(events[0], BadRequest)
    assert not parser.upgraded


def test_host_rules():
    assert feed_all(b"GET / HTTP/1.1\r\n\r\n")[0][-1].status == 400
    assert feed_all(request_with(b"host: again\r\n"))[0][-1].status == 400
    assert only_request(feed_all(b"GET / HTTP/1.1\r\nHost:\r\n\r\n")[0]).headers == ((b"Host", b""),)


# -- Upgrade ----------------------------------------------------------------------------


UPGRADE = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"


@pytest.mark.parametrize("step", [None, 1])
def test_upgrade_request_is_still_a_request(step):
    events, parser = feed_all(request_with(UPGRADE) + b"\x81\x05hello websocket frame bytes", step=step)
    assert [type(e) for e in events] == [Request]
    assert parser.upgraded
    assert not parser.mid_message()
    assert parser.feed(GET) == []  # not HTTP/1.1 any more: never a second request


def test_upgrade_header_without_connection_token_is_ignored():
    events, parser = feed_all(request_with(b"Upgrade: websocket\r\n") + GET)
    assert [type(e) for e in events] == [Request, Request]
    assert not parser.upgraded


@pytest.mark.parametrize("step", [None, 1, 4])
def test_upgrade_request_body_reaches_the_app(step):
    # curl --http2 on an http:// URL sends this: the body must not be lost.
    data = request_with(b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AA\r\n"
                        b"Content-Length: 9\r\n", method=b"POST", body=b"a=1&b=xyz") + b"PRI * HTTP/2.0\r\n"
    events, parser = feed_all(data, step=step)
    assert isinstance(events[0], Request) and events[-1] is END_OF_MESSAGE
    assert body_of(events) == b"a=1&b=xyz"
    assert events.count(END_OF_MESSAGE) == 1 and parser.upgraded and not parser.mid_message()


@pytest.mark.parametrize("step", [None, 1])
def test_upgrade_request_chunked_body_reaches_the_app(step):
    data = request_with(UPGRADE + b"Transfer-Encoding: chunked\r\n", method=b"POST",
                        body=b"3\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n") + b"GET / HTTP/1.1\r\n"
    events, parser = feed_all(data, step=step)
    assert body_of(events) == b"abcde"
    assert events[-1] is END_OF_MESSAGE and events.count(END_OF_MESSAGE) == 1
    assert parser.upgraded


def test_upgrade_request_body_keeps_the_limits_and_strictness():
    head = request_with(UPGRADE + b"Transfer-Encoding: chunked\r\n", method=b"POST")
    events, parser = feed_all(head + b"zz\r\n", Limits())
    assert isinstance(events[-1], BadRequest) and parser.feed(b"0\r\n\r\n") == []
    events, _ = feed_all(head + b"6\r\nabcdef\r\n0\r\n\r\n", Limits(body_bytes=5))
    assert isinstance(events[-1], BodyTooLarge)
    events, _ = feed_all(head + b"1\r\na\r\n0\r\nA: 1\r\nB: 2\r\n\r\n", Limits(header_fields=3))
    assert isinstance(events[-1], HeaderTooLarge)


def test_upgrade_request_waits_for_its_body():
    parser = RequestParser(Limits())
    events = parser.feed(request_with(UPGRADE + b"Content-Length: 4\r\n", method=b"POST"))
    assert [type(e) for e in events] == [Request]
    assert parser.upgraded and parser.mid_message()
    assert parser.feed(b"ab") == [BodyChunk(b"ab")]
    assert parser.feed(b"cdGET / HTTP/1.1\r\n\r\n") == [BodyChunk(b"cd"), END_OF_MESSAGE]
    assert parser.feed(GET) == []


# -- after an error ----------------------------------------------------------------------


def test_nothing_comes_out_after_an_error():
    parser = RequestParser(Limits())
    events = parser.feed(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n" + GET)
    assert len(events) == 1 and isinstance(events[0], BadRequest)
    assert parser.feed(GET) == []
    assert parser.feed(GET * 3) == []


def test_requests_before_an_error_are_kept():
    events, parser = feed_all(GET + GET + b"GET / HTTP/9.9\r\n\r\n" + GET)
    assert [type(e) for e in events] == [Request, Request, BadRequest]
    assert parser.feed(GET) == []


def test_error_in_body_ends_the_events():
    head = request_with(b"Transfer-Encoding: chunked\r\n", method=b"POST")
    parser = RequestParser(Limits())
    events = parser.feed(head + b"3\r\nabc\r\n")
    assert [type(e) for e in events] == [Request, BodyChunk]
    events = parser.feed(b"x\r\n")
    assert len(events) == 1 and isinstance(events[0], BadRequest)
    assert parser.feed(b"0\r\n\r\n" + GET) == []


def test_error_classes_carry_their_status():
    assert [(cls.status, cls.reason) for cls in (BadRequest, RequestLineTooLong, HeaderTooLarge, BodyTooLarge,
                                                 VersionNotSupported, NotImplementedCoding)] == [
        (400, "Bad Request"), (414, "URI Too Long"), (431, "Request Header Fields Too Large"),
        (413, "Content Too Large"), (505, "HTTP Version Not Supported"), (501, "Not Implemented")]
    error = HeaderTooLarge("too many")
    assert isinstance(error, ProtocolError) and error.detail == "too many"


# -- robustness -------------------------------------------------------------------------


SEEDS = [
    b"POST /a?b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\nhello",
    b"GET http://x/y HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\nContent-Length: 3\r\n\r\nabc",
    b"POST / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3\r\nabc\r\n0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
]


def test_mutated_requests_never_raise_and_never_depend_on_how_they_are_cut():
    """Seeded mutations: feed() only returns events, at most one error and last, whatever the cuts."""
    rng = random.Random(20240611)
    alphabet = b"\r\n :\t\x00\x80\xff0aAzZ,;/?#%-Hc9"
    for _ in range(3000):
        data = bytearray(rng.choice(SEEDS) * rng.randint(1, 2))
        for _ in range(rng.randint(0, 3)):
            pos = rng.randrange(len(data))
            op = rng.random()
            if op < 0.4:
                data[pos] = rng.choice(alphabet)
            elif op < 0.7:
                data.insert(pos, rng.choice(alphabet))
            else:
                del data[pos]
        data = bytes(data)
        outcomes = []
        for cuts in ([len(data)], [rng.randint(1, 9) for _ in range(len(data))]):
            parser = RequestParser(Limits())
            events: list = []
            offset = 0
            for size in cuts:
                events += parser.feed(data[offset : offset + size])
                offset += size
                if offset >= len(data):
                    break
            errors = [e for e in events if isinstance(e, ProtocolError)]
            assert len(errors) <= 1 and (not errors or events[-1] is errors[0]), (data, events)
            merged: list = []
            for event in events:
                if isinstance(event, BodyChunk) and merged and isinstance(merged[-1], bytes):
                    merged[-1] += event.data
                else:
                    merged.append(event.data if isinstance(event, BodyChunk) else
                                  ("error", event.status) if isinstance(event, ProtocolError) else event)
            outcomes.append((merged, parser.upgraded))
        assert outcomes[0] == outcomes[1], data


@pytest.mark.parametrize("request_bytes", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    # An Upgrade request with a body: a second llhttp parser decodes it.
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: upgrade\r\nContent-Length: 4\r\n\r\nab",
])
def test_a_released_parser_is_freed_at_once_not_by_the_cycle_collector(request_bytes):
    """A closed connection's parser goes with its last reference: no garbage per connection."""
    def parsed() -> RequestParser:
        parser = RequestParser(Limits())
        assert isinstance(parser.feed(request_bytes)[0], Request)
        return parser

    gc.disable()
    try:
        held = parsed()
        kept = weakref.ref(held)
        del held
        assert kept() is not None, "unreleased, llhttp and our callbacks keep each other alive"
        released = parsed()
        freed = weakref.ref(released)
        released.release()
        del released
        assert freed() is None
    finally:
        gc.enable()
        gc.collect()


# -- the request line: protocol name and method (RFC 9112 §3, RFC 9110 §9.1) -----------------

CHUNKED = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
SIZED = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"


def last_status(events: list) -> int | None:
    return events[-1].status if events and isinstance(events[-1], ProtocolError) else None


@pytest.mark.parametrize("before", [b"", GET, CHUNKED, SIZED, GET + b"\r\n"], ids=["alone", "get", "chunked", "sized", "crlf"])
@pytest.mark.parametrize(("line", "status"), [
    (b"FROB / HTTP/1.1", 501),
    (b"get / HTTP/1.1", 501),
    (b"GE / HTTP/1.1", 501),  # a prefix of a method llhttp knows is still unknown
    (b"DESCRIBE / HTTP/1.1", 501),  # a method llhttp knows from RTSP alone
    (b"G@T / HTTP/1.1", 400),
    (b"GET / RTSP/1.0", 400),
    (b"SOURCE / ICE/1.0", 400),
    (b"GET /x HTTP/1.1", None),
])
@pytest.mark.parametrize("step", [None, 1, 3])
def test_the_request_line_is_judged_the_same_behind_any_request_and_however_cut(before, line, status, step):
    events, _ = feed_all(before + line + b"\r\nHost: a\r\n\r\n", step=step)
    assert last_status(events) == status, events
    served = [e for e in events if isinstance(e, Request)]
    assert len(served) == (1 if before else 0) + (status is None), events


def test_an_unknown_method_longer_than_the_limit_is_not_implemented():
    events, _ = feed_all(b"X" * 100, step=7)
    assert last_status(events) == 501


def test_an_http_line_elsewhere_does_not_hide_an_rtsp_request():
    body = b"GET /s RTSP/1.0\r\n"
    events, _ = feed_all(request_with(b"Content-Length: %d\r\n" % len(body), method=b"POST", body=body)
                         + b"GET /s RTSP/1.0\r\nHost: a\r\n\r\n")
    assert last_status(events) == 400 and "RTSP" in events[-1].detail


@pytest.mark.parametrize("step", [None, 1, 3])
def test_an_rtsp_request_pipelined_before_an_http_one_with_the_same_line_is_refused(step):
    events, _ = feed_all(b"GET / RTSP/1.0\r\nHost: a\r\n\r\n" + GET, step=step)
    assert last_status(events) == 400 and not any(isinstance(e, Request) for e in events)


def test_chunk_framing_that_runs_on_without_data_is_refused():
    parser = RequestParser(Limits())
    events = parser.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;name=")
    assert isinstance(events[0], Request)
    refused = []
    for _ in range(4):
        refused += parser.feed(b"v" * 4000)
    assert len(refused) == 1 and isinstance(refused[0], BadRequest)
    assert "chunk extension" in str(refused[0])


@pytest.mark.parametrize("step", [1, 7, 1 << 20])
def test_many_short_chunks_with_extensions_are_never_counted_as_framing(step):
    data = (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"3;ext=value\r\nabc\r\n" * 3000 + b"0\r\nX-Trailer: 1\r\n\r\n")
    parser = RequestParser(Limits())
    events = []
    for start in range(0, len(data), step):
        events += parser.feed(data[start:start + step])
    assert events[-1] is END_OF_MESSAGE
    assert b"".join(e.data for e in events if isinstance(e, BodyChunk)) == b"abc" * 3000
