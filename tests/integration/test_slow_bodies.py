"""Slow request bodies cost a descriptor, not a worker: the loop reads them, under a rate and a deadline.

Tricklers send a body a few bytes at a time; stallers send most of one and
stop.  Neither may keep other clients waiting, nor grow a worker's memory
past ``body_buffer_total``, and a trickler is answered 408 once it breaks
``body_min_rate`` or ``body_deadline``.
"""

from __future__ import annotations

import hashlib
import select
import socket
import threading
import time

import psutil
import pytest
import requests

from harness import poll, read_all

# A rule the tricklers below break (they send about 10 to 60 bytes a second),
# checked over windows long enough for the test's normal client to be served
# while they are all still sending (it is, within a second, even loaded): each
# trickler test waits out one window.
RATE_ARGS = ("--body-min-rate", "1000", "--body-rate-window", "4")
TRICKLE_SECONDS = 20.0  # a trickler gives up after this (bounds the test)


class Trickler(threading.Thread):
    """A client sending a body one small piece every 0.1 s, reading whatever the server answers."""

    def __init__(self, port: int, chunked: bool, path: str = "/") -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 100000"
        self.head = b"POST %s HTTP/1.1\r\nHost: t\r\n%s\r\n\r\n" % (path.encode(), framing)
        self.piece = b"1\r\nx\r\n" if chunked else b"x"
        self.answer = b""
        self.started = threading.Event()

    def run(self) -> None:
        try:
            self.sock.sendall(self.head)
            self.started.set()
            deadline = time.monotonic() + TRICKLE_SECONDS
            while time.monotonic() < deadline:
                readable, _, _ = select.select([self.sock], [], [], 0.1)
                if readable:
                    self.answer += read_all(self.sock)
                    return
                self.sock.sendall(self.piece)
        except OSError:
            pass  # the server closed: what it answered is in self.answer
        finally:
            self.started.set()
            self.sock.close()


def trickle(port: int, head: bytes, piece: bytes) -> bytes:
    """Send ``head``, then ``piece`` every 0.1 s until the server answers (or TRICKLE_SECONDS); return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
        conn.sendall(head)
        for _ in range(int(TRICKLE_SECONDS * 10)):
            readable, _, _ = select.select([conn], [], [], 0.1)
            if readable:
                return read_all(conn)
            conn.sendall(piece)
    return b""


def start_tricklers(port: int, count: int, chunked: bool, path: str = "/") -> list[Trickler]:
    tricklers = [Trickler(port, chunked, path) for _ in range(count)]
    for trickler in tricklers:
        trickler.start()
    for trickler in tricklers:
        trickler.started.wait(10)
    return tricklers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("workers, count", [(("-w", "2"), 4), (("-w", "2", "--threads", "4"), 10)],
                         ids=["w2", "w2-threads4"])
def test_trickling_bodies_do_not_hold_workers_and_get_408(server, workers, count, chunked):
    srv = server("basic:echo", *workers, *RATE_ARGS, "--body-timeout", "30", workers=2)
    tricklers = start_tricklers(srv.port, count, chunked)
    try:
        time.sleep(0.3)  # their heads are in: with the bodies in the app, every worker would be taken
        answer = requests.get(srv.url, timeout=15)
        assert answer.status_code == 200
        # Served while every trickler was still sending: none of them held a worker meanwhile.
        assert all(trickler.is_alive() and not trickler.answer for trickler in tricklers)
        for trickler in tricklers:
            trickler.join(TRICKLE_SECONDS + 5)
        assert [t.answer.split(b"\r\n", 1)[0] for t in tricklers] == [b"HTTP/1.1 408 Request Timeout"] * count
        poll(lambda: srv.log().count("body too slow") == count, what="one log line per trickler")
    finally:
        for trickler in tricklers:
            trickler.sock.close()


def test_a_body_past_the_buffer_streams_to_the_app_under_the_rate_rule(server):
    """Past body_buffer_size the app reads the body itself; a trickle there still ends in a 408."""
    srv = server("basic:echo", "-w", "1", "--body-buffer-size", "1024", *RATE_ARGS)
    body = b"x" * 1500  # the first 1024 bytes gathered, the rest trickled to the app
    answer = trickle(srv.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n" + body, b"x")
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    poll(lambda: "status=408: body too slow" in srv.log(), what="the log line of the serving side")


def test_the_body_deadline_ends_a_body_that_keeps_coming(server):
    srv = server("basic:echo", "-w", "1", "--body-deadline", "2", "--body-min-rate", "0")
    answer = trickle(srv.port, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n", b"x" * 10)
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    poll(lambda: "body deadline: not complete after 2s" in srv.log(), what="the log line")


def test_a_large_body_streams_whole_to_the_app(server):
    srv = server("basic:echo", "-w", "1")
    body = bytes(range(256)) * (5 * 4096)  # 5 MiB: past the 1 MiB read before the app runs
    answer = requests.post(srv.url, data=body, timeout=30)
    assert answer.status_code == 200
    echoed = answer.json()["body"].encode("latin-1")
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(body).digest()
    chunked = requests.post(srv.url, data=iter([body[:3000000], body[3000000:]]), timeout=30)
    assert chunked.json()["body"].encode("latin-1") == body


def worker_memory(pid: int) -> int:
    return psutil.Process(pid).memory_full_info().uss


def test_stalled_bodies_stay_within_the_memory_budget_and_reading_resumes(server):
    """40 clients each send 900 KiB of a 1 MiB body and stall: the worker keeps at most its budget."""
    srv = server("basic:echo", "-w", "1", "--body-buffer-total", str(4 << 20), "--body-min-rate", "0",
                 workers=1)
    worker = srv.worker_pids()[0]
    requests.post(srv.url, data=b"y" * (1 << 20), timeout=10)  # the heap's usual size for such a body
    before = worker_memory(worker)
    stallers: list[socket.socket] = []
    try:
        for _ in range(40):
            conn = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
            conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\n")
            conn.setblocking(False)
            stallers.append(conn)
        piece = b"z" * 65536
        for _ in range(15):  # 960 KiB offered by each, as far as the socket buffers take it
            for conn in stallers:
                try:
                    conn.send(piece)
                except BlockingIOError:
                    pass
            time.sleep(0.02)
        time.sleep(1.5)  # what the worker would read, it reads now
        grown = worker_memory(worker) - before
        # 40 x 960 KiB = 37.5 MiB held unbounded; 4 MiB budget, plus a read or so per client over it.
        assert grown < 16 << 20, f"worker grew by {grown >> 20} MiB"
        assert "reading them paused" in srv.log()
    finally:
        for conn in stallers:
            conn.close()
    poll(lambda: "reading resumed" in srv.log(), what="reading to resume")
    answer = requests.post(srv.url, data=b"w" * 300000, timeout=10)
    assert answer.status_code == 200 and len(answer.json()["body"]) == 300000


def test_a_body_pipelined_behind_a_request_is_read_by_the_loop_too(server):
    srv = server("basic:echo", "-w", "1", *RATE_ARGS)
    head = (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
    result: list[bytes] = []
    pipelined = threading.Thread(target=lambda: result.append(trickle(srv.port, head, b"x")), daemon=True)
    pipelined.start()
    time.sleep(0.5)  # the GET is answered, and the POST's head is in
    assert requests.get(srv.url, timeout=15).status_code == 200
    assert pipelined.is_alive()  # served while the pipelined body was still awaited
    pipelined.join(TRICKLE_SECONDS + 5)
    assert result and result[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"HTTP/1.1 408 Request Timeout\r\n" in result[0]
