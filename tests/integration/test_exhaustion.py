"""Out of descriptors: a worker and the stats endpoint back off instead of spinning, then recover.

The test lowers RLIMIT_NOFILE of one running server process (prlimit(2)
through psutil) to a few descriptors above what it holds, then opens more
connections than fit: the process accepts until its table is full, and the
rest wait in the kernel queue, keeping the listener readable.  A loop that
retried at once would burn a whole CPU and log tens of thousands of lines a
second; we measure the process's CPU time and its log instead.  When the
test closes its connections the process must serve again by itself.
"""

from __future__ import annotations

import math
import socket
import time

import psutil
from harness import poll, read_all

from forkserver.backoff import FIRST_PAUSE, MAX_PAUSE

SPARE = 4  # descriptors left to the process above what it holds at rest
QUEUED = 20  # connections left in the kernel queue once the process is full
WINDOW = 2.0  # seconds of exhaustion measured
MAX_CPU = 0.5  # CPU seconds allowed in WINDOW: a spin uses about WINDOW
MAX_LINES = 3  # "failed" lines allowed in WINDOW: a spin writes tens of thousands
# Once freed, the stats endpoint waits out the pause under way (at most
# MAX_PAUSE), then drains the queued connections, which gave up, SPARE per
# FIRST_PAUSE (each accept past SPARE fails and pauses again), then answers.
# LOAD_SLACK is for a loaded machine.  Pauses left to the master's one-second
# tick took a second each: over 5 s for the same drain.
LOAD_SLACK = 1.5
STATS_RECOVERY = MAX_PAUSE + math.ceil(QUEUED / SPARE) * FIRST_PAUSE + LOAD_SLACK


def starve(process: psutil.Process, connect, log, marker: str) -> None:
    """Run ``process`` out of descriptors for WINDOW, then give them back; check it did not spin.

    ``process`` is capped at a few descriptors above what it holds, and
    ``connect`` opens more connections than fit: it accepts until full and
    the rest wait in the kernel queue.  Over WINDOW from then on it must use
    little CPU and write few ``marker`` lines.
    """
    limit = process.num_fds() + SPARE
    process.rlimit(psutil.RLIMIT_NOFILE, (limit, limit))
    held = [connect() for _ in range(SPARE + QUEUED)]
    try:
        poll(lambda: process.num_fds() >= limit, what="the process to run out of descriptors")
        lines_before = log().count(marker)
        cpu_before = sum(process.cpu_times()[:2])
        time.sleep(WINDOW)
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        lines = log().count(marker) - lines_before
    finally:
        for conn in held:
            conn.close()
    assert cpu < MAX_CPU, f"pid {process.pid} used {cpu:.2f}s of CPU in {WINDOW}s while out of descriptors"
    assert lines <= MAX_LINES, f"{lines} {marker!r} lines in {WINDOW}s"
    assert f"{marker}: Too many open files (EMFILE); pausing accepts for 0.1s" in log()


def get(port: int, path: str = "/") -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            return read_all(conn)
    except OSError:
        return b""


def test_a_worker_out_of_descriptors_pauses_accepting_and_recovers(server):
    srv = server("basic:hello", "-w", "1", "--header-timeout", "60", workers=1)
    worker = psutil.Process(srv.worker_pids()[0])
    starve(worker, lambda: socket.create_connection(("127.0.0.1", srv.port)), srv.log, "accept failed")
    poll(lambda: get(srv.port).startswith(b"HTTP/1.1 200"), what="a 200 once descriptors are free")
    poll(lambda: "accept works again after" in srv.log(), what="the recovery line")


def test_the_stats_endpoint_out_of_descriptors_pauses_accepting_and_recovers(server, tmp_path):
    sock_path = str(tmp_path / "stats.sock")
    srv = server("basic:hello", "-w", "1", "--stats-bind", f"unix:{sock_path}", workers=1)
    master = psutil.Process(srv.pid)

    def connect() -> socket.socket:
        conn = socket.socket(socket.AF_UNIX)
        conn.connect(sock_path)
        return conn

    def stats_answer() -> bytes:
        try:
            with connect() as conn:
                conn.settimeout(2)
                conn.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return read_all(conn)
        except OSError:
            return b""

    poll(lambda: stats_answer().startswith(b"HTTP/1.1 200"), what="the stats endpoint")
    starve(master, connect, srv.log, "stats accept failed")
    freed = time.monotonic()
    poll(lambda: stats_answer().startswith(b"HTTP/1.1 200"), what="/stats once descriptors are free")
    took = time.monotonic() - freed
    assert took < STATS_RECOVERY, (
        f"/stats answered {took:.1f}s after descriptors were free; the backoff schedule "
        f"(pauses of {FIRST_PAUSE:g}s to {MAX_PAUSE:g}s) allows {STATS_RECOVERY:.1f}s")
    assert get(srv.port).startswith(b"HTTP/1.1 200")
