"""A worker renews the parser of a closed connection for the next one: nothing of the first may reach the second.

Each test leaves a connection in a state worth forgetting (a head or a body
cut off, a refused request, an upgrade, pipelined requests), waits until
the server has closed it, so that the worker holds its parser as the spare,
and then checks that a new connection's request is parsed and answered as
if it were the worker's first.  One worker, so the new connection lands
where the spare is.
"""

from __future__ import annotations

import json
import socket

import pytest

from harness import read_all

DEADLINE = 10.0


@pytest.fixture
def echo(server):
    """A one-worker echo server, and the pid of its worker (which must serve every test's requests)."""
    srv = server("basic:echo", "-w", "1")
    answer = closed_by_server(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", shut=False)
    srv.worker = json.loads(split_response(answer)[2])["pid"]
    return srv


def closed_by_server(port: int, data: bytes, *, shut: bool = True) -> bytes:
    """Send ``data`` on a new connection (then end our side), and read until the server has closed it."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as conn:
        conn.sendall(data)
        if shut:
            conn.shutdown(socket.SHUT_WR)
        return read_all(conn)


def split_response(raw: bytes) -> tuple[bytes, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    fields = {}
    for line in lines:
        name, _, value = line.partition(b": ")
        fields[name.decode().lower()] = value.decode()
    return status, fields, body


def echoed(conn: socket.socket, request: bytes) -> tuple[dict[str, str], dict]:
    """Send one request on a kept-alive connection; the response's fields and the environ it echoes."""
    conn.sendall(request)
    stream = conn.makefile("rb")
    status = stream.readline()
    assert status.startswith(b"HTTP/1.1 200 "), status
    fields = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.rstrip(b"\r\n").partition(b": ")
        fields[name.decode().lower()] = value.decode()
    return fields, json.loads(stream.read(int(fields["content-length"])))


def assert_served_afresh(srv) -> None:
    """A new connection's two requests are answered as sent, from its own address, by the same worker, kept alive."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=DEADLINE) as conn:
        fields, environ = echoed(conn, b"GET /fresh?n=1 HTTP/1.1\r\nHost: fresh\r\n\r\n")
        assert environ["pid"] == srv.worker  # (a worker that died on the spare would be replaced by a fresh one)
        assert (environ["PATH_INFO"], environ["QUERY_STRING"], environ["HTTP_HOST"]) == ("/fresh", "n=1", "fresh")
        assert environ["body"] == ""
        assert environ["REMOTE_PORT"] == str(conn.getsockname()[1])
        assert not [name for name in environ if name.startswith("HTTP_X_")], environ
        assert "connection" not in fields  # kept alive: no upgrade or error of before rules it out
        fields, environ = echoed(conn, b"POST /again HTTP/1.1\r\nHost: fresh\r\nContent-Length: 3\r\n\r\nabc")
        assert (environ["PATH_INFO"], environ["body"]) == ("/again", "abc")


def test_a_head_cut_off_leaves_nothing(echo):
    closed_by_server(echo.port, b"GET /first HTTP/1.1\r\nHost: t\r\nX-Half: ")
    assert_served_afresh(echo)


def test_a_body_cut_off_leaves_nothing(echo):
    closed_by_server(echo.port, b"POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    assert_served_afresh(echo)


def test_a_chunked_body_cut_off_leaves_nothing(echo):
    closed_by_server(echo.port, b"POST /first HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nxx")
    assert_served_afresh(echo)


def test_a_refused_request_leaves_nothing(echo):
    status, _, _ = split_response(closed_by_server(echo.port, b"GET /first HTTP/1.1\r\nHost: t\r\nBad Field\r\n\r\n"))
    assert status == b"HTTP/1.1 400 Bad Request"
    assert_served_afresh(echo)


def test_an_upgrade_leaves_nothing(echo):
    answer = closed_by_server(echo.port, b"GET /first HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\n"
                                         b"Upgrade: websocket\r\nX-Upgrade: 1\r\n\r\n", shut=False)
    status, fields, _ = split_response(answer)
    assert status == b"HTTP/1.1 200 OK" and fields["connection"] == "close"
    assert_served_afresh(echo)


def test_pipelined_requests_cut_off_leave_nothing(echo):
    first = b"GET /first HTTP/1.1\r\nHost: t\r\nX-First: 1\r\n\r\n"
    answer = closed_by_server(echo.port, first + first + b"POST /first HTTP/1.1\r\nHost: t\r\nContent-Len")
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert_served_afresh(echo)
