"""HTTP/1.1 and WSGI behaviour of a real server, over real sockets.

Every test here runs twice: once with the fixture apps as they are, and once
with them wrapped in ``wsgiref.validate.validator`` (FS_TEST_VALIDATE),
so the server is also checked against PEP 3333's own referee.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import psutil
import pytest
import requests

from harness import poll, raw_request, read_all


@pytest.fixture(params=["plain", "validated"])
def start(request, server):
    """Start a server whose fixture apps are (or are not) wrapped in the validator."""
    env = {"FS_TEST_VALIDATE": "1" if request.param == "validated" else "0"}

    def launch(*args, **kwargs):
        return server(*args, env={**env, **kwargs.pop("env", {})}, **kwargs)
    launch.validated = request.param == "validated"
    return launch


def read_response(conn: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """Read exactly one Content-Length or chunked response from a keep-alive socket.

    The socket's buffered reader is kept on the socket object, so bytes of a
    pipelined next response stay there for the next call.
    """
    stream = _reader(conn)
    status = stream.readline().rstrip(b"\r\n")
    assert status, "connection closed before a response"
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.rstrip(b"\r\n").partition(b": ")
        headers[name.decode().lower()] = value.decode()
    if "content-length" in headers:
        return status, headers, stream.read(int(headers["content-length"]))
    assert headers.get("transfer-encoding") == "chunked", headers
    body = b""
    while True:
        size = int(stream.readline().split(b";")[0], 16)
        body += stream.read(size + 2)[:size]
        if size == 0:
            stream.readline()
            return status, headers, body


_readers: dict[int, object] = {}


def _reader(conn: socket.socket):
    if id(conn) not in _readers:
        _readers[id(conn)] = conn.makefile("rb")
    return _readers[id(conn)]


def test_keep_alive_reuses_one_connection(start):
    srv = start("basic:pid", "-w", "1")
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        for _ in range(5):
            conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            status, headers, body = read_response(conn)
            assert status == b"HTTP/1.1 200 OK"
            assert "connection" not in headers
            assert headers["server"] == "forkserver"
            assert headers["date"].endswith(" GMT")


def test_pipelined_requests_are_answered_in_order(start):
    srv = start("basic:echo", "-w", "1")
    batch = b"".join(
        f"GET /p{i}?n={i} HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\n{i}".encode() for i in range(10)
    )
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        conn.sendall(batch)
        for i in range(10):
            _, _, body = read_response(conn)
            data = json.loads(body)
            assert (data["PATH_INFO"], data["QUERY_STRING"], data["body"]) == (f"/p{i}", f"n={i}", str(i))


def test_http10_closes_and_http11_close_is_honoured(start):
    srv = start("basic:hello", "-w", "1")
    answer = raw_request(srv.port, b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nConnection: close\r\n" in answer
    answer = raw_request(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"\r\nConnection: close\r\n" in answer and answer.endswith(b"hello, world\n")


def test_http10_keep_alive_is_honoured(start):
    srv = start("basic:hello", "-w", "1")
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        for _ in range(2):
            conn.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = read_response(conn)
            assert body == b"hello, world\n"


def test_chunked_request_body_is_decoded(start):
    srv = start("basic:echo", "-w", "1")
    answer = raw_request(srv.port, b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: 1\r\n\r\n")
    data = json.loads(answer.partition(b"\r\n\r\n")[2])
    assert data["body"] == "hello, world"
    # De-chunked before the app runs, so apps that trust CONTENT_LENGTH work.
    assert data["CONTENT_LENGTH"] == "12" and "HTTP_TRANSFER_ENCODING" not in data
    assert data["wsgi.input_terminated"] is True


def test_streamed_upload_with_requests(start):
    srv = start("basic:echo", "-w", "1")
    payload = [b"a" * 1000, b"b" * 70000, b"c"]
    data = requests.post(srv.url + "/", data=iter(payload)).json()
    assert data["body"] == "a" * 1000 + "b" * 70000 + "c"


def test_readline_never_reads_past_the_body(start):
    srv = start("basic:lines", "-w", "1")
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        body = b"one\ntwo\nthree"
        conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                     + b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nfour")
        assert json.loads(read_response(conn)[2])["lines"] == ["one\n", "two\n", "three"]
        assert json.loads(read_response(conn)[2])["lines"] == ["four"]


def test_body_read_past_the_parser_ends_exactly_where_the_next_request_starts(start):
    """A Content-Length body that is still arriving is read straight off the socket, past
    the parser; the bytes after it, sent in the same segment, are the next request."""
    srv = start("basic:echo", "-w", "1")
    body = bytes(range(256)) * 1200  # 300 KiB, every byte value
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:1000])
        time.sleep(0.2)  # the head and the first bytes are parsed before the rest arrives
        conn.sendall(body[1000:] + b"POST /next HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nfour")
        first = json.loads(read_response(conn)[2])
        second = json.loads(read_response(conn)[2])
    assert first["PATH_INFO"] == "/big" and first["body"].encode("latin-1") == body
    assert second["PATH_INFO"] == "/next" and second["body"] == "four"


def test_unread_body_past_the_parser_is_drained_before_the_next_request(start):
    srv = start("basic:hello", "-w", "1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 200000\r\n\r\n" + b"x" * 100)
        time.sleep(0.2)
        conn.sendall(b"y" * 199900 + b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        for _ in range(2):
            status, headers, answer = read_response(conn)
            assert status == b"HTTP/1.1 200 OK" and answer == b"hello, world\n"
            assert "connection" not in headers


def test_expect_100_continue_is_sent_when_the_app_reads(start):
    srv = start("basic:echo", "-w", "1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        interim = conn.recv(1024)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        conn.sendall(b"hello")
        status, _, body = read_response(conn)
        assert status == b"HTTP/1.1 200 OK" and json.loads(body)["body"] == "hello"


def test_expect_100_without_reading_gets_final_answer_and_close(start):
    srv = start("basic:hello", "-w", "1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as conn:
        conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"100 Continue" not in answer
    assert b"Connection: close" in answer


def test_head_has_headers_but_no_body(start):
    srv = start("basic:hello", "-w", "1")
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        conn.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\nGET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        answer = read_all(conn)
    first, second = answer.split(b"HTTP/1.1 200 OK")[1:]
    assert b"Content-Length: 13" in first and first.endswith(b"\r\n\r\n")
    assert second.endswith(b"hello, world\n")


def test_stream_without_length_is_chunked_on_11_and_closes_on_10(start):
    srv = start("basic:stream", "-w", "1")
    answer = raw_request(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in answer
    assert answer.endswith(b"7\r\npart 4\n\r\n0\r\n\r\n")
    answer = raw_request(srv.port, b"GET / HTTP/1.0\r\n\r\n")
    assert b"Transfer-Encoding" not in answer and b"Connection: close" in answer
    assert answer.endswith(b"part 3\npart 4\n")
    assert requests.get(srv.url).text == "".join(f"part {i}\n" for i in range(5))


def test_write_callable(server):
    srv = server("basic:write_callable", "-w", "1")
    assert requests.get(srv.url).text == "written returned\n"


def test_file_wrapper_sends_the_file(start, tmp_path):
    blob = bytes(range(256)) * 4096  # 1 MiB
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    srv = start("basic:file_wrapper", "-w", "1")
    response = requests.get(f"{srv.url}/?{path}")
    assert response.status_code == 200
    assert response.content == blob
    if not start.validated:
        # The validator hides the wrapper behind its own iterator; unwrapped,
        # the server sees the file and sends it whole with a known length.
        assert response.headers["Content-Length"] == str(len(blob))


def test_a_response_larger_than_the_socket_buffers_reaches_a_slow_reader_whole(start):
    """The first sendmsg takes part of head and body; the rest goes out as the client reads."""
    srv = start("basic:echo", "-w", "1")
    payload = b"a" * (8 << 20)
    with socket.socket() as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, set before connecting
        conn.settimeout(10)
        conn.connect(("127.0.0.1", srv.port))
        conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload)
        time.sleep(0.3)  # the worker fills both socket buffers and waits for us to read
        status, headers, body = read_response(conn)
        assert status == b"HTTP/1.1 200 OK"
        assert len(body) == int(headers["content-length"]) and json.loads(body)["body"] == payload.decode()
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # and the connection still serves
        assert read_response(conn)[0] == b"HTTP/1.1 200 OK"


def test_duplicate_response_headers_and_status(start):
    srv = start("basic:headers_app", "-w", "1")
    answer = raw_request(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 201 Created\r\n")
    assert b"Set-Cookie: a=1\r\n" in answer and b"Set-Cookie: b=2\r\n" in answer


def test_exc_info_replaces_an_unsent_response(server):
    srv = server("basic:exc_info_app", "-w", "1")
    response = requests.get(srv.url)
    assert response.status_code == 503 and response.text == "unavailable\n"


def test_app_exception_gives_500_and_the_worker_lives_on(server):
    srv = server("basic:crash", "-w", "1", "--log-level", "info")
    pids = srv.worker_pids()
    for _ in range(3):
        assert requests.get(srv.url).status_code == 500
    assert srv.worker_pids() == pids
    log = poll(lambda: srv.log() if "boom from the crash app" in srv.log() else "", what="traceback in log")
    assert "Traceback" in log and "RuntimeError: boom from the crash app" in log


def test_app_exception_after_headers_aborts_the_connection(server):
    srv = server("basic:crash_after_headers", "-w", "1")
    pids = srv.worker_pids()
    for _ in range(2):  # the worker survives and serves the next one the same way
        answer = raw_request(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 OK")
        assert b"first part" in answer and not answer.endswith(b"0\r\n\r\n")
    assert srv.worker_pids() == pids


@pytest.mark.parametrize("app, words", [
    ("basic:returns_str", "not bytes"),
    ("basic:bad_status", "is not 'NNN Reason'"),
    ("basic:hop_by_hop", "hop-by-hop header 'Connection'"),
    ("basic:two_lengths", "two different Content-Length headers: 1 and 2"),
    ("basic:informational", "'101 Switching Protocols' is informational"),
])
def test_pep3333_violations_get_500_and_one_log_line(server, app, words):
    srv = server(app, "-w", "1")

    def violations():
        return [ln for ln in srv.log().splitlines() if "broke PEP 3333" in ln]
    before = len(poll(violations, what="the readiness probe's violation line"))
    assert requests.get(srv.url).status_code == 500
    lines = poll(lambda: violations() if len(violations()) > before else None, what="violation line")
    assert len(lines) == before + 1 and words in lines[-1]
    assert "Traceback" not in srv.log()


def test_every_informational_status_from_the_app_is_a_500_and_the_worker_goes_on(server):
    srv = server("basic:informational", "-w", "1")
    for status in ("100%20Continue", "103%20Early%20Hints", "199%20Whatever"):
        answer = raw_request(srv.port, f"GET /?{status} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 500 ") and answer.count(b"HTTP/1.1") == 1, answer
    lines = poll(lambda: [ln for ln in srv.log().splitlines() if "is informational (1xx)" in ln], what="log lines")
    assert any("103 Early Hints" in line for line in lines) and "Traceback" not in srv.log()


@pytest.mark.parametrize("mode", ["fail", "big"])
def test_close_is_called_on_error_and_on_disconnect(server, tmp_path, mode):
    marker = tmp_path / f"closed-{mode}"
    srv = server("basic:closing", "-w", "1")
    with socket.create_connection(("127.0.0.1", srv.port)) as conn:
        conn.sendall(f"GET /?{marker}&{mode} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        conn.recv(100)  # the head has gone out; now hang up mid-body (or the app fails)
    poll(lambda: marker.exists() and marker.read_text() == "closed\n", what="close() to be called")
    assert requests.get(srv.url + "/?" + str(tmp_path / "again")).status_code == 200


def test_two_hundred_keep_alive_clients_are_all_served(server):
    srv = server("basic:hello", "-w", "2")
    conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(200)]
    try:
        for _ in range(2):  # every connection stays open and is served twice
            for conn in conns:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            for conn in conns:
                status, _, body = read_response(conn)
                assert status == b"HTTP/1.1 200 OK" and body == b"hello, world\n"
    finally:
        for conn in conns:
            conn.close()


def test_a_connection_closed_while_a_forked_child_holds_it_does_not_make_the_worker_spin(server):
    """An app's forked child keeps the socket alive after the worker closes it.

    epoll watches the socket itself, not the worker's descriptor, so a socket
    the worker forgot to unregister before closing would stay in its epoll
    set: at end of file it is ready on every wait, and the loop would go
    round at full CPU until the child exits.
    """
    srv = server("basic:forks", "-w", "1")
    worker = psutil.Process(srv.worker_pids()[0])
    child = 0
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
            conn.sendall(b"GET /fork?30 HTTP/1.1\r\nHost: t\r\n\r\n")
            answer = b""
            while not answer.endswith(b"}"):  # raw reads: a buffered reader would keep the socket open
                chunk = conn.recv(65536)
                assert chunk, f"closed before the answer: {answer!r}"
                answer += chunk
            child = json.loads(answer.partition(b"\r\n\r\n")[2])["child"]
        # The worker has seen the close once a new request is answered after it.
        assert requests.get(srv.url, timeout=5).status_code == 200
        before = sum(worker.cpu_times()[:2])
        time.sleep(1.0)
        busy = sum(worker.cpu_times()[:2]) - before
        assert busy < 0.3, f"the worker used {busy:.2f} s of CPU in 1 s while idle"
    finally:
        if child:
            os.kill(child, signal.SIGKILL)


def test_a_burst_of_keep_alive_connections_spreads_over_the_workers(server):
    """gunicorn users see a few workers take most connections; here none holds 1.5x its share."""
    srv = server("basic:pid", "-w", "4")
    poll(lambda: srv.log().count("worker ready") == 4, what="all four workers to be ready")
    conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(40)]
    try:
        holders: dict[int, int] = {}
        for conn in conns:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        for conn in conns:
            pid = json.loads(read_response(conn)[2])["pid"]
            holders[pid] = holders.get(pid, 0) + 1
    finally:
        for conn in conns:
            conn.close()
    assert len(holders) == 4 and max(holders.values()) <= 15, holders


def test_idle_connections_do_not_pin_a_single_worker(server):
    srv = server("basic:hello", "-w", "1")
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(50)]
    try:
        for conn in idle[:25]:
            conn.sendall(b"GET / HTT")  # half a request line, then nothing
        assert requests.get(srv.url, timeout=5).text == "hello, world\n"
    finally:
        for conn in idle:
            conn.close()


def test_threads_run_requests_concurrently(server):
    srv = server("basic:barrier", "-w", "1", "--threads", "4")
    results = []

    def call():
        results.append(requests.get(srv.url + "/?4", timeout=30).json())
    clients = [threading.Thread(target=call) for _ in range(4)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    # The barrier only opens when all four requests are inside the app at
    # once, which one worker can manage only with four threads.
    assert [r["met"] for r in results] == [True] * 4
    assert {r["pid"] for r in results} == set(srv.worker_pids())


def test_keepalive_idle_timeout_closes(server):
    srv = server("basic:hello", "-w", "1", "--keepalive", "0.5")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        read_response(conn)
        assert conn.recv(10) == b""  # the server closed the idle connection
    poll(lambda: "keep-alive timeout remote=127.0.0.1" in srv.log(), what="the info line")


def test_keepalive_zero_closes_after_each_response(server):
    srv = server("basic:hello", "-w", "1", "--keepalive", "0")
    answer = raw_request(srv.port, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b"Connection: close" in answer
