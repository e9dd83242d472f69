"""A connection's I/O over a real socketpair: reads into the exchange, sends, deadlines, the body stream."""

from __future__ import annotations

import io
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from forkserver.worker.connection import (
    DEFER_MAX_BYTES,
    BodyClock,
    BodyRules,
    BodyStream,
    ClientGone,
    Connection,
    Stalled,
)
from forkserver.worker import connection as connection_module
from forkserver.http.errors import BadRequest, BodyTooLarge, RequestTimeout
from forkserver.http.exchange import DONE, SEND_BODY, SERVE, Closing
from forkserver.http.parser import Limits
from forkserver.http.response import CONTINUE_RESPONSE, DateHeader
from forkserver.scoreboard import Scoreboard
from forkserver.worker.serving import Service
from forkserver.worker.wsgi import base_environ

TIMEOUT = 10.0


def app(environ, start_response):  # never called here: the connection does not run apps
    raise AssertionError("no app runs in these tests")


@pytest.fixture
def pair() -> Iterator[tuple[Connection, socket.socket]]:
    """A Connection on one end of a socketpair, and the client's end."""
    server, client = socket.socketpair()
    server.setblocking(False)
    client.settimeout(TIMEOUT)
    service = Service(app=app, limits=Limits(), date=DateHeader(), access_log=None, io_timeout=2.0,
                      closing=Closing(), board=Scoreboard(1), stats=None, show=lambda method, path: None)
    connection = Connection(server, ("", ""), base_environ("localhost", "80", False), service)
    try:
        yield connection, client
    finally:
        connection.close()
        client.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        assert piece, f"closed after {len(data)} of {size} bytes"
        data += piece
    return data


def test_receive_feeds_the_exchange_until_the_peer_closes(pair):
    connection, client = pair
    assert connection.receive()  # nothing there yet: still open
    client.sendall(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    assert connection.receive() and connection.next_is_request()
    assert connection.bytes_in == 27
    client.shutdown(socket.SHUT_WR)
    connection.exchange.start()
    assert not connection.receive()


def test_a_last_response_waits_in_the_outbox_until_flushed(pair):
    connection, client = pair
    outbox: list[Connection] = []
    connection.outbox = outbox
    connection.send_pair(b"HEAD\r\n", b"body", last=True)
    connection.send_pair(b"HEAD2\r\n", b"body2", last=True)
    assert outbox == [connection]  # listed once, however many responses wait
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)
    assert connection.bytes_out == 22  # counted as deferred
    connection.flush()
    client.settimeout(TIMEOUT)
    assert recv_exactly(client, 22) == b"HEAD\r\nbodyHEAD2\r\nbody2"
    assert connection.bytes_out == 22 and not connection.unsent


def test_a_large_or_unfinished_response_goes_out_at_once(pair):
    connection, client = pair
    connection.outbox = []
    big = b"x" * (DEFER_MAX_BYTES + 1)
    sender = threading.Thread(target=connection.send_pair, args=(b"H\r\n", big, True))
    sender.start()
    assert recv_exactly(client, len(big) + 3) == b"H\r\n" + big
    sender.join(TIMEOUT)
    connection.send_pair(b"H2\r\n", b"part")  # not last: never deferred
    assert recv_exactly(client, 8) == b"H2\r\npart" and connection.outbox == []


def test_a_send_larger_than_the_socket_buffer_waits_for_the_reader(pair):
    connection, client = pair
    data = bytes(range(256)) * 8192  # 2 MiB: many times the socketpair's buffer
    received = bytearray()

    def read() -> None:
        while len(received) < len(data):
            time.sleep(0.001)
            received.extend(client.recv(65536))

    reader = threading.Thread(target=read)
    reader.start()
    connection.send(data)
    reader.join(TIMEOUT)
    assert bytes(received) == data and connection.bytes_out == len(data)


def test_a_reader_that_stops_reading_stalls_the_send(pair):
    connection, client = pair
    connection.service.io_timeout = 0.2
    started = time.monotonic()
    with pytest.raises(Stalled, match="send timeout"):
        connection.send(b"x" * (8 << 20))
    assert time.monotonic() - started < TIMEOUT


def test_a_content_length_body_is_read_past_the_parser_into_the_callers_buffer(pair):
    connection, client = pair
    client.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n0123")
    connection.receive()
    connection.exchange.start()
    stream = io.BufferedReader(BodyStream(connection))
    assert stream.read(4) == b"0123"  # the part the parser already had
    client.sendall(b"456789GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
    assert stream.read() == b"456789"  # and no further: the next request is not the body
    assert connection.exchange.their_state is DONE
    connection.receive()
    assert connection.next_is_request()


def test_the_loop_gathers_a_body_up_to_the_limit_and_no_further_then_the_app_reads_the_rest(pair):
    """As the worker's loop does: receive while the exchange says GATHER, then serve."""
    connection, client = pair
    limit = 300_000  # body_buffer_size
    body = bytes(range(256)) * 4096  # 1 MiB
    request = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    sender = threading.Thread(target=client.sendall, args=(request,), daemon=True)
    sender.start()
    poller = select.poll()
    poller.register(connection.fd, select.POLLIN)
    while True:
        assert poller.poll(TIMEOUT * 1000), "nothing came"
        assert connection.receive()
        if connection.exchange.next_step(limit) == SERVE:
            break
    assert connection.exchange.gathered() == limit
    connection.exchange.start()
    assert io.BufferedReader(BodyStream(connection)).read() == body
    sender.join(TIMEOUT)


def test_100_continue_goes_out_when_the_body_is_first_read(pair):
    connection, client = pair
    client.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    connection.receive()
    connection.exchange.start()
    client.setblocking(False)
    with pytest.raises(BlockingIOError):
        client.recv(100)  # nothing asked for yet
    client.settimeout(TIMEOUT)
    client.sendall(b"abc")  # a client may send it anyway
    assert connection.pull_body() == b"abc"
    assert recv_exactly(client, len(CONTINUE_RESPONSE)) == CONTINUE_RESPONSE
    assert connection.pull_body() == b""


def test_a_chunked_body_is_spooled_whole(pair):
    connection, client = pair
    client.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
    connection.receive()
    connection.exchange.start()
    threading.Timer(0.05, client.sendall, args=(b"2\r\nde\r\n0\r\n\r\n",)).start()
    spool, size = connection.spool_body()
    assert (spool.read(), size) == (b"abcde", 5)


def test_a_bad_chunk_is_raised_from_the_body(pair):
    connection, client = pair
    client.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    connection.receive()
    connection.exchange.start()
    with pytest.raises(BadRequest):
        connection.spool_body()


def test_a_peer_that_leaves_mid_body_is_gone(pair):
    connection, client = pair
    client.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nab")
    connection.receive()
    connection.exchange.start()
    assert connection.pull_body() == b"ab"
    client.shutdown(socket.SHUT_WR)
    with pytest.raises(ClientGone):
        connection.pull_body()
    assert connection.exchange.their_state is SEND_BODY


def test_a_body_that_stops_arriving_stalls(pair):
    connection, client = pair
    connection.service.io_timeout = 0.2
    client.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\n")
    connection.receive()
    connection.exchange.start()
    with pytest.raises(Stalled, match="body timeout"):
        connection.pull_body()


def test_reject_and_close_send_what_was_deferred_first(pair):
    connection, client = pair
    connection.outbox = []
    connection.send_pair(b"A", b"", last=True)
    connection.reject(b"B")
    assert recv_exactly(client, 2) == b"AB"
    connection.send_pair(b"C", b"", last=True)
    connection.close()
    assert recv_exactly(client, 1) == b"C" and client.recv(1) == b""


def test_a_chunked_body_over_the_spool_limit_is_too_large(pair, monkeypatch):
    connection, client = pair
    monkeypatch.setattr(connection_module, "SPOOL_LIMIT_BYTES", 4)  # the default is 1 GiB: too big to send here
    client.sendall(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    connection.receive()
    connection.exchange.start()
    with pytest.raises(BodyTooLarge) as raised:
        connection.spool_body()
    assert raised.value.status == 413


def test_linger_lets_the_client_read_the_answer_and_ends_when_it_closes(pair):
    connection, client = pair
    client.sendall(b"x" * 1000)  # a body we will never read
    connection.reject(b"HTTP/1.1 413 Content Too Large\r\n\r\n")
    closer = threading.Timer(0.1, client.close)
    started = time.monotonic()
    answer = recv_exactly(client, 34)
    closer.start()
    connection.linger()
    assert answer.startswith(b"HTTP/1.1 413 ") and time.monotonic() - started < 0.9


# -- the body rules' clock ----------------------------------------------------------


def test_the_body_clock_counts_only_time_spent_waiting_and_needs_the_rate_per_window():
    clock = BodyClock(BodyRules(min_rate=100, window=2.0, deadline=0), now=0.0, received=0)
    assert clock.check(0.0, 0) == 2.0
    clock.wait_from(10.0)  # eight seconds the app spent elsewhere are not counted
    clock.waited_until(11.0)
    assert clock.check(11.0, 150) == 12.0
    clock.waited_until(12.0)
    assert clock.check(12.0, 250) == 14.0  # 250 bytes in 2 s: a new window begins
    clock.waited_until(14.0)
    with pytest.raises(RequestTimeout, match="body too slow: 50 bytes in 2.0s"):
        clock.check(14.0, 300)


def test_the_body_deadline_counts_from_the_start_whatever_happens():
    clock = BodyClock(BodyRules(min_rate=0, window=2.0, deadline=5.0), now=1.0, received=0)
    assert clock.check(3.0, 0) == 6.0
    with pytest.raises(RequestTimeout, match="body deadline"):
        clock.check(6.0, 10 ** 9)
