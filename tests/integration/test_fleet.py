"""forkserver as one instance of many behind a load balancer: leaving rotation, and idle timeouts.

A TERM with ``shutdown_delay`` must first make the health path fail while
the instance still serves, so a health-checking proxy stops sending to it
before anything is refused; the HAProxy test runs that against the real
HAProxy with its HTTP health checks and no retries, so a single refused
connection or reset would reach the client as an error.  A trusted proxy's
idle connection must outlive the proxy's own idle timeout (checked here on
the socket; test_nginx.py runs the race itself through nginx).

Load loops are bounded in count and time and judged only by their failures.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import listening_socket, poll, read_all, stop_process_tree

DEADLINE = 20.0
APP = "lifecycle_app:app"


def get(port: int, target: str = "/", source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; the status, lower-cased header fields and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def kept_alive(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection that has had one request answered and stays open (as a proxy's idle upstream one)."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(65536)
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in head.lower(), head
    return conn


def closed_by_server(conn: socket.socket) -> bool:
    """True once the server has closed ``conn`` (end of file), False while it is open and silent."""
    if not select.select([conn], [], [], 0)[0]:
        return False
    try:
        data = conn.recv(65536)
    except ConnectionResetError:
        return True
    assert not data, f"unexpected bytes on an idle connection: {data[:100]!r}"
    return True


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# -- TERM with shutdown_delay, on one instance ----------------------------------------------


def test_term_with_shutdown_delay_leaves_rotation_serves_through_the_delay_then_drains(server):
    srv = server(APP, "-w", "2", "--health-path", "/healthz", "--shutdown-delay", "5", "--keepalive", "60",
                 workers=2)
    srv.sock.close()  # the server holds the only copy now: when it closes, connecting is refused
    idle, used = kept_alive(srv.port), kept_alive(srv.port)
    try:
        assert get(srv.port, "/healthz")[0] == 200
        srv.signal(signal.SIGTERM)
        poll(lambda: get(srv.port, "/healthz")[0] == 503, DEADLINE, what="the health path to answer 503")
        # Still in rotation for whoever has not noticed: new connections are
        # served, and every response tells the client to reconnect elsewhere.
        status, headers, _ = get(srv.port, "/")
        assert status == 200 and headers.get("connection") == "close", (status, headers)
        used.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_all(used)  # up to the close that follows the response
        assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in answer, answer[:300]
        assert not closed_by_server(idle), "an idle kept-alive connection was closed during the delay"
        # After the delay: the idle connection is closed between requests, and nothing more is accepted.
        poll(lambda: closed_by_server(idle), DEADLINE, what="the idle connection to be closed after the delay")
        poll(lambda: refused(srv.port), DEADLINE, what="the listener to close after the delay")
        assert srv.wait_exit(30) == 0
    finally:
        idle.close()
        used.close()
    assert "graceful stop after a shutdown delay of 5s" in srv.log(), srv.log()


def test_graceful_timeout_counts_from_the_end_of_the_shutdown_delay(server):
    # Counted from TERM, the master would kill the worker 1 s + 1 s later, in the middle of this request.
    srv = server(APP, "-w", "1", "--shutdown-delay", "2", "--graceful-timeout", "1", workers=1)
    (worker,) = [psutil.Process(pid) for pid in srv.worker_pids()]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as conn:
        conn.sendall(b"GET /slow?2.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        poll(lambda: "busy GET /slow" in " ".join(worker.cmdline()), DEADLINE, what="the slow request to start")
        srv.signal(signal.SIGTERM)
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert srv.wait_exit(30) == 0
    assert "did not stop in time" not in srv.log() and "graceful timeout" not in srv.log(), srv.log()


def test_a_worker_draining_after_the_delay_waits_for_its_request_instead_of_spinning(server):
    srv = server(APP, "-w", "1", "--threads", "2", "--shutdown-delay", "0.5", workers=1)
    srv.sock.close()  # so the drain's closed listener refuses
    (worker,) = [psutil.Process(pid) for pid in srv.worker_pids()]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as conn:
        conn.sendall(b"GET /slow?4 HTTP/1.1\r\nHost: t\r\n\r\n")
        poll(lambda: "busy GET /slow" in " ".join(worker.cmdline()), DEADLINE, what="the slow request to start")
        srv.signal(signal.SIGTERM)
        poll(lambda: refused(srv.port), DEADLINE, what="the drain to begin")
        # The loop now waits on the serving thread: it has nothing to do but poll.
        before = worker.cpu_times()
        time.sleep(1.0)
        after = worker.cpu_times()
        answer = read_all(conn)
    used = after.user + after.system - before.user - before.system
    assert used < 0.2, f"the draining worker's loop used {used:.2f} s of CPU in 1 s while waiting"
    assert answer.startswith(b"HTTP/1.1 200 ") and b"\r\nConnection: close\r\n" in answer, answer[:300]
    assert srv.wait_exit(30) == 0


def test_a_worker_lost_in_the_shutdown_delay_is_replaced_and_drains_with_the_others(server):
    # The master kills whatever still runs 6 + 1.5 + 1 s after the TERM.  The
    # replacement starts 2.5 s into the delay: had it counted the delay from
    # its own start, it would still be serving then, and be killed.
    srv = server(APP, "-w", "2", "--health-path", "/healthz", "--shutdown-delay", "6", "--graceful-timeout", "1.5",
                 workers=2)
    srv.sock.close()
    first = srv.worker_pids()
    srv.signal(signal.SIGTERM)
    termed = time.monotonic()
    poll(lambda: get(srv.port, "/healthz")[0] == 503, DEADLINE, what="the health path to answer 503")

    def served(pids: set[int]) -> bool:
        status, headers, body = get(srv.port, "/")
        assert status == 200 and headers.get("connection") == "close", (status, headers)
        return json.loads(body)["pid"] in pids

    while time.monotonic() < termed + 2.5:  # the pool serves through the delay (bounded by the delay itself)
        served(set(first))
    os.kill(first[0], signal.SIGKILL)
    replacement = poll(lambda: set(srv.worker_pids()) - set(first), DEADLINE, what="a replacement worker")
    # Requests keep succeeding, the replacement's too, and it tells clients to go as the others do.
    poll(lambda: served(replacement), DEADLINE, what="the replacement to serve")
    assert srv.wait_exit(30) == 0
    log = srv.log()
    # (Either slot: PIDs are sorted, and a PID counter that wraps between the
    # two forks gives slot 1 the lower one.)
    assert re.search(rf"worker died slot=[01] pid={first[0]} gen=1 killed by SIGKILL; replacing", log), log
    assert "did not stop in time" not in log and "graceful timeout" not in log, log


def test_a_worker_hung_in_the_drain_is_timed_out_instead_of_waited_for_until_the_grace(server):
    srv = server(APP, "-w", "1", "--timeout", "4", "--graceful-timeout", "120", workers=1)
    (worker,) = [psutil.Process(pid) for pid in srv.worker_pids()]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as conn:
        conn.sendall(b"GET /hang?300 HTTP/1.1\r\nHost: t\r\n\r\n")
        poll(lambda: "busy GET /hang" in " ".join(worker.cmdline()), DEADLINE, what="the request to hang")
        srv.signal(signal.SIGTERM)
        assert read_all(conn) == b""  # the master killed the worker mid-request
    assert srv.wait_exit(60) == 0  # the timeout ended the stop, not the 120 s grace
    log = srv.log()
    assert 0 <= log.find("graceful stop") < log.find("worker timeout slot=0"), log
    assert "in flight: GET /hang" in log, log



def test_a_trusted_proxys_idle_connection_outlives_the_default_keepalive(server):
    # 127.0.0.1 is in the default forwarded_allow_ips; 127.0.0.2 is a client like any other.
    srv = server(APP, "-w", "1", workers=1)
    proxy, client = kept_alive(srv.port, "127.0.0.1"), kept_alive(srv.port, "127.0.0.2")
    try:
        poll(lambda: closed_by_server(client), DEADLINE, what="the default keepalive (5 s) to close the client's")
        assert not closed_by_server(proxy), "the proxy's idle connection was closed at the default keepalive"
        proxy.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert read_all(proxy).startswith(b"HTTP/1.1 200 ")
    finally:
        proxy.close()
        client.close()


# -- behind the real HAProxy -------------------------------------------------------------------


def require_haproxy() -> str:
    path = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
    if path is None:
        pytest.fail("haproxy is not installed; this test runs the real one (apt-get install -y haproxy, "
                    "as .ci/run does)")
    return path


CHECK_INTER_MS, CHECK_FALL = 200, 2  # HAProxy leaves a server out after fall failed checks, inter apart


class HAProxy:
    """The real HAProxy in front of ``backends``, checking their health path, retrying nothing."""

    def __init__(self, directory: Path, backends: list[int]) -> None:
        binary = require_haproxy()
        directory.mkdir(parents=True, exist_ok=True)
        self.front = listening_socket()
        self.port = self.front.getsockname()[1]
        servers = "".join(f"    server s{i} 127.0.0.1:{port} check\n" for i, port in enumerate(backends))
        # retries 0 and no redispatch: a refused connection or a reset from a
        # backend becomes the client's error instead of being hidden by a retry.
        (directory / "haproxy.cfg").write_text(
            "global\n    maxconn 512\n"
            "defaults\n    mode http\n    retries 0\n    timeout connect 5s\n"
            # A check may take 5 s to answer: on a loaded machine the default
            # (inter) would mark the instance that stays down too.
            "    timeout client 30s\n    timeout server 30s\n    timeout check 5s\n"
            f"frontend web\n    bind fd@{self.front.fileno()}\n    default_backend app\n"
            "backend app\n    balance roundrobin\n"
            "    option httpchk\n    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host check\n"
            f"    default-server inter {CHECK_INTER_MS}ms fall {CHECK_FALL} rise 1\n{servers}")
        self.log_path = directory / "haproxy.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(directory / "haproxy.cfg")], stdout=out,
                                         stderr=out, pass_fds=(self.front.fileno(),))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process_tree(self.proc, signal.SIGTERM)
        self.front.close()


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator:
    started: list[HAProxy] = []

    def start(backends: list[int]) -> HAProxy:
        proxy = HAProxy(tmp_path / f"haproxy{len(started)}", backends)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


class Load:
    """A few client threads requesting through the proxy, each on fresh connections, until stopped or capped."""

    def __init__(self, port: int, threads: int = 3, cap: int = 20000) -> None:
        self.port, self.cap = port, cap
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.pids: list[str] = []  # the serving worker's pid, per successful request, in order
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and self.ok + len(self.errors) < self.cap:
            try:
                status, _, body = get(self.port, "/")
                result = None if status == 200 else f"status {status}: {body[:80]!r}"
            except OSError as exc:
                status, body, result = 0, b"", f"{type(exc).__name__}: {exc}"
            self.stop.wait(0.002)  # a steady load, not the most a core can send
            with self.lock:
                if result is None:
                    self.ok += 1
                    self.pids.append(body.split(b'"pid": ')[1].split(b",")[0].decode())
                else:
                    self.errors.append(result)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(DEADLINE)


def test_term_with_shutdown_delay_behind_haproxy_loses_no_request_and_refuses_no_connection(server, haproxy):
    delay = 3.0  # well above inter x fall (0.4 s): HAProxy sees the 503 and stops sending long before
    leaving = server(APP, "-w", "1", "--health-path", "/healthz", "--shutdown-delay", str(delay), workers=1)
    staying = server(APP, "-w", "1", "--health-path", "/healthz", workers=1)
    for instance in (leaving, staying):
        instance.sock.close()  # so that a closed listener really refuses
    proxy = haproxy([leaving.port, staying.port])
    leaving_pids = {str(pid) for pid in leaving.worker_pids()}
    load = Load(proxy.port)
    try:
        poll(lambda: leaving_pids & set(load.pids) and len(set(load.pids)) >= 2, DEADLINE,
             what="HAProxy to send requests to both instances")
        leaving.signal(signal.SIGTERM)
        assert leaving.wait_exit(30) == 0
        served_before = len(load.pids)
        poll(lambda: len(load.pids) > served_before + 20 or load.errors, DEADLINE,
             what="more requests after the instance left")
    finally:
        load.finish()
    assert not load.errors, f"{len(load.errors)} failed of {load.ok + len(load.errors)}: {load.errors[:5]}\n" \
                            f"{proxy.log()}"
    assert not leaving_pids & set(load.pids[served_before:]), "the stopped instance served after it exited"
    assert "graceful stop after a shutdown delay" in leaving.log()


def test_a_worker_booted_under_frequent_health_checks_says_idle_not_booting(server):
    """A new worker's title leaves "booting" once it is ready, however often the health checker calls.

    It used to change only at the first wait without events, which health
    checks every few hundred milliseconds never let come.
    """
    srv = server(APP, "-w", "1", "--health-path", "/healthz", workers=1)
    first = srv.worker_pids()
    checking = threading.Event()
    checking.set()

    def check_health() -> None:
        end = time.monotonic() + 2 * DEADLINE
        while checking.is_set() and time.monotonic() < end:
            get(srv.port, "/healthz")
            time.sleep(0.05)

    checker = threading.Thread(target=check_health, daemon=True)
    checker.start()
    try:
        srv.signal(signal.SIGHUP)  # its replacement boots while the checks keep coming
        poll(lambda: (pids := srv.worker_pids()) and set(pids).isdisjoint(first), DEADLINE, what="a new worker")

        def says_idle() -> bool:
            for pid in set(srv.worker_pids()) - set(first):
                try:
                    if " idle, " in " ".join(psutil.Process(pid).cmdline()):
                        return True
                except psutil.NoSuchProcess:
                    pass
            return False

        poll(says_idle, DEADLINE, what="the new worker's title to say idle")
    finally:
        checking.clear()
        checker.join(DEADLINE)
