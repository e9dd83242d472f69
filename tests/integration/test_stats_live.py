"""Stats end to end: workers report over their queues, the master serves /stats and /metrics."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import poll, read_all


def fetch(path: str, what: str = "/stats") -> bytes:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(path)
        conn.sendall(f"GET {what} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        return read_all(conn).partition(b"\r\n\r\n")[2]


def stats(path: str) -> dict:
    return json.loads(fetch(path))


def start_with_stats(server, tmp_path, *args, workers, app="basic:status", ready_path="/"):
    sock = tmp_path / "stats.sock"
    srv = server(app, *args, "--stats-bind", f"unix:{sock}", workers=workers, ready_path=ready_path)
    return srv, str(sock)


def settled_total(sock: str, expected: int) -> dict:
    return poll(lambda: (doc := stats(sock))["totals"]["requests"] == expected and doc, what=f"{expected} requests")


def test_counts_are_exact_after_a_flush(server, tmp_path):
    srv, sock = start_with_stats(server, tmp_path, "-w", "2", workers=2)
    base = poll(lambda: stats(sock)["totals"]["requests"] >= 1 and stats(sock), what="the readiness probe")
    session = requests.Session()
    for code, count in ((200, 7), (201, 2), (302, 3), (404, 4), (503, 1)):
        for _ in range(count):
            assert session.get(f"{srv.url}/?{code}", allow_redirects=False).status_code == code
    doc = settled_total(sock, base["totals"]["requests"] + 17)
    classes = doc["totals"]["status"]
    assert (classes["2xx"] - base["totals"]["status"]["2xx"], classes["3xx"], classes["4xx"], classes["5xx"]) == \
        (9, 3, 4, 1)
    assert doc["counters"]["workers_alive"] == 2 and doc["master_pid"] == srv.pid
    assert {w["pid"] for w in doc["workers"]} == set(srv.worker_pids())
    assert all(w["memory_uss_bytes"] > 0 and w["state"] in ("idle", "busy") for w in doc["workers"])
    assert doc["totals"]["bytes_out"] > 0 and doc["totals"]["bytes_in"] > 0
    assert doc["totals"]["p50_seconds"] is not None


def read_one_response(conn: socket.socket) -> bytes:
    """Read exactly one Content-Length response, head and body."""
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < content_length(answer):
        chunk = conn.recv(65536)
        assert chunk, "connection closed"
        answer += chunk
    return answer


def content_length(answer: bytes) -> int:
    return int(re.search(rb"\r\nContent-Length: (\d+)\r\n", answer.partition(b"\r\n\r\n")[0]).group(1))


def test_bytes_are_counted_exactly_when_responses_wait_for_the_end_of_a_batch(server, tmp_path):
    """Requests that arrive while the worker is busy are served as one batch, their responses
    held to its end: each byte is counted once."""
    srv, sock = start_with_stats(server, tmp_path, "-w", "1", workers=1, app="basic:slow", ready_path="/?0")
    base = poll(lambda: stats(sock)["totals"]["requests"] >= 1 and stats(sock), what="the readiness probe")
    blocker, *conns = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(5)]
    sent = received = 0
    try:
        for _ in range(5):
            # The worker sleeps in the app for 0.1 s; the four requests sent meanwhile are
            # all ready at its next poll.
            for conn, query in [(blocker, "0.1")] + [(conn, "0") for conn in conns]:
                request = f"GET /?{query} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
                conn.sendall(request)
                sent += len(request)
            for conn in [blocker, *conns]:
                received += len(read_one_response(conn))
    finally:
        for conn in [blocker, *conns]:
            conn.close()
    doc = settled_total(sock, base["totals"]["requests"] + 25)
    assert doc["totals"]["bytes_in"] - base["totals"]["bytes_in"] == sent
    assert doc["totals"]["bytes_out"] - base["totals"]["bytes_out"] == received


def test_counters_survive_a_killed_worker(server, tmp_path):
    srv, sock = start_with_stats(server, tmp_path, "-w", "1", workers=1)
    for _ in range(10):
        requests.get(srv.url + "/?200")
    doc = settled_total(sock, 11)
    (victim,) = srv.worker_pids()
    os.kill(victim, signal.SIGKILL)
    poll(lambda: srv.worker_pids() and victim not in srv.worker_pids(), what="a replacement")
    doc = poll(lambda: (d := stats(sock))["counters"]["worker_exits"]["died"] == 1 and d, what="the death counted")
    assert doc["totals"]["requests"] == 11  # the dead worker's flushed numbers are kept
    assert doc["counters"]["workers_respawned"] == 1
    requests.get(srv.url + "/?200")
    settled_total(sock, 12)


def test_prometheus_output_parses_and_is_monotonic(server, tmp_path):
    srv, sock = start_with_stats(server, tmp_path, "-w", "1", workers=1)
    for _ in range(5):
        requests.get(srv.url + "/?404")
    settled_total(sock, 6)
    families = {f.name: f for f in text_string_to_metric_families(fetch(sock, "/metrics").decode())}
    assert "forkserver_requests" in families  # the parser strips _total from counter names
    samples = {(s.labels.get("status_class")): s.value for s in families["forkserver_requests"].samples
               if s.name == "forkserver_requests_total"}
    assert samples["4xx"] == 5 and samples["2xx"] == 1
    assert families["forkserver_request_duration_seconds"].type == "histogram"


def test_killing_workers_mid_flush_never_stalls_the_master(server, tmp_path):
    srv, sock = start_with_stats(server, tmp_path, "-w", "2", workers=2)
    stop = threading.Event()
    errors = []

    def load():
        session = requests.Session()
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                session.get(srv.url + "/?200", timeout=5)
            except requests.RequestException as exc:
                errors.append(exc)  # the killed worker's in-flight requests may fail
                session = requests.Session()
    clients = [threading.Thread(target=load) for _ in range(3)]
    for client in clients:
        client.start()
    try:
        rng = random.Random(7)
        last_total = 0
        for _ in range(12):
            time.sleep(rng.uniform(0.05, 0.6))
            pids = srv.worker_pids()
            if pids:
                os.kill(rng.choice(pids), signal.SIGKILL)
            doc = stats(sock)  # answers within its socket timeout: the master is not wedged
            assert doc["totals"]["requests"] >= last_total
            last_total = doc["totals"]["requests"]
    finally:
        stop.set()
        for client in clients:
            client.join()
    poll(lambda: len(srv.worker_pids()) == 2, what="a full pool again")
    assert requests.get(srv.url + "/?200").status_code == 200
    assert stats(sock)["counters"]["worker_exits"]["died"] >= 10


def test_stats_and_top_commands(server, tmp_path):
    srv, sock = start_with_stats(server, tmp_path, "-w", "2", workers=2)
    out = subprocess.run([sys.executable, "-m", "forkserver", "stats", f"unix:{sock}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "SLOT" in out.stdout
    assert all(str(pid) in out.stdout for pid in srv.worker_pids())

    pid, fd = pty.fork()
    if pid == 0:
        os.environ["TERM"] = "xterm"
        os.execv(sys.executable, [sys.executable, "-m", "forkserver", "top", "--interval", "0.3", f"unix:{sock}"])
    screen = b""
    try:
        def refreshed():
            nonlocal screen
            while select.select([fd], [], [], 0.1)[0]:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break
            return screen.count(b"SLOT") >= 3  # several refreshes drawn
        poll(refreshed, what="top to refresh a few times")
        assert all(str(worker).encode() in screen for worker in srv.worker_pids())
        os.write(fd, b"q")
        _, status = poll(lambda: (r := os.waitpid(pid, os.WNOHANG))[0] and r, what="top to quit")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
