"""A busy worker's idle keep-alive connections are served by another worker (forkserver.relay).

Real servers, real sockets: the clients below hold kept-alive connections
to one worker, keep it busy with a slow request, and send a quick request
on another connection; the answer must come from the other worker while the
slow one still runs.  Behind the real nginx (upstream keep-alive), a bounded
mix of slow and quick requests must lose and repeat nothing.  A worker that
sends the master garbage on its relay channel is ignored with one log line.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import socket
import threading
import time

import pytest
from harness import poll
from test_nginx import CLIENT_ADDR, DEADLINE, certificate, nginx, short_dir, unix_health  # noqa: F401 (fixtures)

APP = "relay_apps:app"
SLOW = 6.0  # seconds the slow request runs: far beyond any answer the test waits for
PROMPTLY = SLOW / 2  # a quick request answered within this did not wait for the slow one


class Client:
    """One kept-alive connection, spoken to by hand, so that which worker owns it stays known."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SLOW * 2)

    def send(self, target: str) -> None:
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())

    def answered(self) -> bool:
        """Has a response (or anything) arrived that we have not read?"""
        return bool(select.select([self.sock], [], [], 0)[0])

    def receive(self) -> dict:
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while len(body) < length:
            body += self._recv()
        return json.loads(body)

    def _recv(self) -> bytes:
        piece = self.sock.recv(65536)
        assert piece, "the server closed the connection"
        return piece

    def ask(self, target: str) -> dict:
        self.send(target)
        return self.receive()


def clients_of_one_worker(port: int, count: int) -> tuple[int, list[Client]]:
    """Open kept-alive connections until ``count`` of them belong to one worker; return it and them."""
    owned: dict[int, list[Client]] = {}
    for _ in range(count * 8):
        client = Client(port)
        owned.setdefault(client.ask("/")["pid"], []).append(client)
        for pid, clients in owned.items():
            if len(clients) == count:
                return pid, clients
    raise AssertionError(f"no worker came to hold {count} connections: {owned}")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_quick_request_on_a_busy_workers_idle_connection_is_answered_by_the_other_worker(server, threads):
    srv = server(APP, "-w", "2", "--threads", str(threads), "--keep-alive", "30", workers=2)
    busy, clients = clients_of_one_worker(srv.port, threads + 1)
    slow, quick = clients[:threads], clients[threads]
    started = time.monotonic()
    for client in slow:
        client.send(f"/slow/{SLOW}/")  # every thread of the worker busy
    time.sleep(0.3)  # well past the relay's threshold, and the slow requests are surely running
    quick.send("/quick")
    answer = poll(lambda: quick.answered() and quick.receive(), PROMPTLY, interval=0.01,
                  what="the quick request's answer while the slow one runs")
    assert answer["path"] == "/quick"
    assert answer["pid"] != busy, "answered by the busy worker, after its slow request"
    assert not any(client.answered() for client in slow), "the slow request ended first: the test proves nothing"
    assert time.monotonic() - started < PROMPTLY
    # The connection now lives in the other worker, for good.
    assert quick.ask("/again")["pid"] == answer["pid"]
    for client in slow:
        assert client.receive()["pid"] == busy


def test_with_threads_a_request_arriving_as_every_thread_turns_busy_is_not_queued_behind_them(server):
    """Sent right behind the slow ones, the quick request reaches the worker as its threads turn busy.

    Read then, it would wait in the worker's queue for a thread, out of the
    relay's reach; left unread in the kernel, its connection moves.  (Read
    before the threads fill, a thread of the same worker answers it: also
    prompt.)
    """
    srv = server(APP, "-w", "2", "--threads", "2", "--keep-alive", "30", workers=2)
    busy, clients = clients_of_one_worker(srv.port, 3)
    slow, quick = clients[:2], clients[2]
    for client in slow:
        client.send(f"/slow/{SLOW}/")
    quick.send("/quick")
    answer = poll(lambda: quick.answered() and quick.receive(), PROMPTLY, interval=0.01,
                  what="the quick request's answer while the slow ones run")
    assert answer["path"] == "/quick"
    assert not any(client.answered() for client in slow), "a slow request ended first: the test proves nothing"


def test_a_quick_response_is_not_held_back_by_a_slow_request_read_in_the_same_turn(server):
    """A worker answering several ready connections in one turn sends the answers at the end of it.

    The quick request and the slow one arrive while the worker is busy, so it
    finds both ready at once and answers the quick one first, deferred; a
    single worker has nobody to move either connection to.  The deferred
    answer must go out once the slow request is seen to run long, not after it.
    """
    srv = server(APP, "-w", "1", "--keep-alive", "30", workers=1)
    first, quick, slow = Client(srv.port), Client(srv.port), Client(srv.port)
    for client in (first, quick, slow):
        client.ask("/")
    first.send("/slow/0.5/")
    time.sleep(0.2)  # the worker is in the app: what comes now is read in one turn after it
    quick.send("/quick")
    time.sleep(0.05)
    slow.send(f"/slow/{SLOW}/")
    answer = poll(lambda: quick.answered() and quick.receive(), PROMPTLY, interval=0.01,
                  what="the quick request's answer while the slow one runs")
    assert answer["path"] == "/quick"
    assert not slow.answered(), "the slow request ended first: the test proves nothing"
    assert first.receive()["path"] == "/slow/0.5/"


def test_nothing_is_lost_or_answered_twice_behind_nginx_with_upstream_keepalive(server, nginx, short_dir):
    sock_path = short_dir / "fs.sock"
    access_log = short_dir / "access.log"
    srv = server(APP, "-b", f"unix:{sock_path}", "--health-path", "/healthz", "-w", "3", "--log-level", "debug",
                 "--access-logfile", str(access_log), wait=False)
    poll(lambda: unix_health(sock_path), DEADLINE, what="forkserver on its UNIX socket")
    proxy = nginx(socket_path=str(sock_path))
    # Eight clients send quick requests as fast as they can, so nginx keeps
    # several connections to every worker; two keep up to two workers busy
    # with slow requests, so a third is always free to take over.
    results: dict[str, tuple[int, str]] = {}
    failures: list[str] = []
    lock = threading.Lock()
    slow_done = threading.Event()

    def client(index: int, slow: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.http_port, timeout=30, source_address=(CLIENT_ADDR, 0))
        try:
            for count in range(3 if slow else 1000):
                if not slow and slow_done.is_set():
                    break
                marker = f"c{index}n{count}x"
                target = f"/slow/1.5/{marker}" if slow else f"/quick/{marker}"
                try:
                    conn.request("GET", target)
                    response = conn.getresponse()
                    body = response.read()
                    got = json.loads(body)["path"] if response.status == 200 else body[:200].decode()
                    with lock:
                        results[marker] = (response.status, got)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    with lock:
                        failures.append(f"{marker}: {exc!r}")
                    conn.close()
        finally:
            conn.close()

    quick = [threading.Thread(target=client, args=(n, False), daemon=True) for n in range(2, 10)]
    slow = [threading.Thread(target=client, args=(n, True), daemon=True) for n in range(2)]
    for thread in quick:
        thread.start()
    time.sleep(0.3)
    for thread in slow:
        thread.start()
    for thread in slow:
        thread.join(60)
    slow_done.set()
    for thread in quick:
        thread.join(60)
    assert not any(thread.is_alive() for thread in quick + slow), "the load did not finish"
    assert not failures, failures
    expected = set(results)
    assert {f"c{n}n{c}x" for n in range(2) for c in range(3)} <= expected
    for marker, (status, path) in results.items():
        assert status == 200 and path.endswith("/" + marker), (marker, status, path)
    assert "relayed" in srv.log(), "no connection moved: the test exercised nothing\n" + srv.log()
    poll(lambda: access_log.exists() and access_log.read_text().count("x HTTP/1.1") >= len(expected), 10,
         what="the access log")
    served = re.findall(r"/(c\d+n\d+x) HTTP/1\.1", access_log.read_text())
    assert sorted(served) == sorted(expected), "a request was lost, or the app ran it twice"
    assert "Traceback" not in srv.log()


def test_a_workers_garbage_on_the_relay_channel_is_dropped_with_one_log_line(server):
    srv = server("relay_apps:hostile", "-w", "1", "--log-level", "debug", workers=1)
    fds_before = len(os.listdir(f"/proc/{srv.pid}/fd"))
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
            conn.sendall(b"GET /attack HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            data = b""
            while piece := conn.recv(65536):
                data += piece
            assert data.startswith(b"HTTP/1.1 200 "), data
            assert data.endswith(b"sent 7\n"), data
    pattern = r"dropped a malformed connection offer from worker pid=\d+"
    poll(lambda: re.search(pattern, srv.log()), 10, what="the master's complaint")
    time.sleep(0.5)  # anything the master would log about later messages would be there by now
    log = srv.log()
    assert len(re.findall(pattern, log)) == 1, log
    assert "master loop error" not in log and "Traceback" not in log, log
    assert srv.proc.poll() is None
    # Nothing the worker sent stays open in the master, and it serves on.
    poll(lambda: len(os.listdir(f"/proc/{srv.pid}/fd")) <= fds_before, 10, what="the master to close every descriptor")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
