"""Hostile clients: random and mutated bytes, and clients that stall.

Whatever arrives, the answer is a well-formed HTTP response or a clean close,
no worker dies, and nothing lands in the error log as a traceback.
"""

from __future__ import annotations

import re
import socket

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import ServerProcess, poll, read_all

STATUS_LINE = re.compile(rb"HTTP/1\.1 [1-5][0-9][0-9] [^\r\n]*\r\n")
SEEDS = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"POST /echo?x=1 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    b"GET http://h/p HTTP/1.0\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n",
    b"PUT /u HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
]


@pytest.fixture(scope="module")
def echo_server(tmp_path_factory):
    """One echo server for the whole fuzz run, stopped even if the run fails."""
    proc = ServerProcess(["basic:echo", "-w", "2", "--header-timeout", "2", "--body-timeout", "2"],
                         tmp_path_factory.mktemp("fuzz"), wait=False)
    try:
        proc.wait_ready(workers=2)
        yield proc
    finally:
        proc.stop()


@st.composite
def mutated_requests(draw):
    """A valid request with bytes flipped, inserted, deleted or cut off; or pure noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(min_size=1, max_size=300))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "cut", "dup"]))
        if action == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.sampled_from(
                [b"\r", b"\n", b"\x00", b" ", b"\t", b":", b"\r\n", b"\r\n ", b"Content-Length: 3\r\n",
                 b"Transfer-Encoding: chunked\r\n", b"%", b"\xff", b"?", b"HTTP/1.1"]))
        elif action == "delete" and position < len(data):
            del data[position:position + draw(st.integers(1, 4))]
        elif action == "cut":
            del data[position:]
        elif action == "dup":
            data += data[position:]
    return bytes(data)


def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, half-close, and read whatever the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server already refused and closed; what it sent is still readable
        return read_all(conn)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated_requests())
def test_fuzzed_requests_get_an_http_answer_or_a_clean_close(echo_server, data):
    answer = exchange(echo_server.port, data)
    if answer:
        assert STATUS_LINE.match(answer), f"not an HTTP response to {data!r}: {answer[:200]!r}"
        assert b"\r\n\r\n" in answer, f"unterminated head in answer to {data!r}"


def test_fuzzing_left_every_worker_alive_and_no_traceback(echo_server):
    # Runs after the fuzz test (file order): the same two workers, still serving.
    pids = echo_server.worker_pids()
    assert len(pids) == 2
    assert requests.get(echo_server.url + "/", timeout=5).status_code == 200
    assert echo_server.worker_pids() == pids
    assert "Traceback" not in echo_server.log()
    assert "worker died" not in echo_server.log()


def test_slow_clients_never_own_a_worker(server):
    srv = server("basic:hello", "-w", "2", workers=2)
    stalled = []
    try:
        for _ in range(100):
            conn = socket.create_connection(("127.0.0.1", srv.port))
            conn.sendall(b"GET /half-a-requ")  # half a request line, then nothing
            stalled.append(conn)
        for _ in range(20):  # each must be answered well inside its deadline
            assert requests.get(srv.url, timeout=2).text == "hello, world\n"
    finally:
        for conn in stalled:
            conn.close()


def test_stalled_head_is_closed_after_the_header_timeout(server):
    srv = server("basic:hello", "-w", "1", "--header-timeout", "1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost")
        assert conn.recv(100) == b""  # closed by the server, not by our timeout
    poll(lambda: "header timeout" in srv.log(), what="the info line")


def test_trickling_body_is_closed_after_the_body_timeout(server):
    srv = server("basic:echo", "-w", "1", "--body-timeout", "1")
    pids = srv.worker_pids()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nonly ten b")
        assert read_all(conn) == b""
    poll(lambda: "body timeout" in srv.log(), what="the info line")
    assert srv.worker_pids() == pids and requests.get(srv.url).status_code == 200


def test_an_endless_chunk_extension_gets_400_and_the_worker_serves_on(server):
    # Extension bytes are framing, not data: without a limit a client could
    # stream them forever and never send a byte of body.
    srv = server("basic:echo", "-w", "1")
    pids = srv.worker_pids()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n5;name=")
        answer = b""
        try:
            for _ in range(64):  # 256 KiB at most, well past the 8 KiB limit
                conn.sendall(b"v" * 4096)
        except OSError:
            pass  # refused and closed while we were still sending
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    poll(lambda: "chunk extension or trailer longer than" in srv.log(), what="the refusal logged")
    assert srv.worker_pids() == pids
    assert requests.post(srv.url, data=iter([b"hello", b" world"])).json()["body"] == "hello world"
