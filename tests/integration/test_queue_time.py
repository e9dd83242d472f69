"""Request queue time end to end: measured by real workers, summed by the master, read on /stats and /metrics.

Two figures: how long a request waited between its last bytes reaching the
kernel and a worker starting it, and how long since a trusted proxy stamped
it (``X-Request-Start``/``X-Queue-Start``), which the app also gets as
``environ["forkserver.queue_time"]``.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time

import pytest

from harness import Terminal, poll, read_all
from test_saturation import DEADLINE, hold, metrics, send_requests
from test_stats_live import stats

from forkserver.stats import HISTOGRAM_BUCKETS

SLOW = 3.0  # seconds the request holding the only worker sleeps
SLOW_BUCKETS = HISTOGRAM_BUCKETS.index(1.0) + 1  # the first bucket of waits over a second
FAST_BUCKETS = HISTOGRAM_BUCKETS.index(0.25) + 1  # buckets up to a quarter of a second


def queue_times(sock: str, key: str = "queue_time") -> dict:
    return stats(sock)["totals"][key]


def grown(sock: str, before: dict, by: int, key: str = "queue_time") -> list[int]:
    """Once ``by`` more requests were timed: how many fell into each bucket since ``before``."""
    after = poll(lambda: (times := queue_times(sock, key))["count"] >= before["count"] + by and times,
                 DEADLINE, what=f"{by} more queue times")
    return [now - then for now, then in zip(after["histogram"], before["histogram"])]


def queue_behind_the_only_worker(srv, sock: str, queued: int) -> float:
    """Hold the server's only worker for SLOW seconds, queue ``queued`` quick requests behind it and
    read their answers; return the least any of them waited (more than a second)."""
    held_from = time.monotonic()
    holder = hold(srv.url, 1, SLOW)
    waiting: list[socket.socket] = []
    try:
        poll(lambda: stats(sock)["saturation"]["requests_in_flight"] == 1, DEADLINE, what="the worker to be busy")
        waiting += send_requests(srv.port, queued, SLOW + DEADLINE)
        sent_at = time.monotonic()
        for conn in waiting:
            assert read_all(conn).startswith(b"HTTP/1.1 200 ")
    finally:
        holder[0].join(SLOW + DEADLINE)
        for conn in waiting:
            conn.close()
    # Each queued request waited at least until the holder's sleep ended.
    least_wait = held_from + SLOW - sent_at
    assert least_wait > 1.2, f"the machine took {SLOW - least_wait:.1f}s to queue {queued} requests"
    return least_wait


def shown_seconds(figure: str) -> float | None:
    """A queue time as ``forkserver top`` prints it ("1.7s", "25ms", "0.40ms"), or None for "-"."""
    if figure == "-":
        return None
    return float(figure[:-2]) / 1000 if figure.endswith("ms") else float(figure[:-1])


def top_figures(terminal: Terminal, pid: int, skip: int = 0) -> list[tuple[float | None, float | None]]:
    """From each screen ``top`` drew after the first ``skip``: worker ``pid``'s QUEUE and the all-workers mean.

    A screen without the table (the master did not answer in time) is left out.
    """
    found = []
    for frame in terminal.frames()[skip:]:
        header = next((line for line in frame if line.lstrip().startswith("SLOT")), None)
        row = next((line for line in frame if line.split()[1:2] == [str(pid)]), None)
        summary = next((line.split() for line in frame if line.startswith("queue time")), None)
        if header and row and summary:
            total = summary[summary.index("mean") + 1] if "mean" in summary else "-"
            found.append((shown_seconds(dict(zip(header.split(), row.split()))["QUEUE"]), shown_seconds(total)))
    return found


def test_queue_time_rises_while_the_only_worker_is_busy_and_falls_back(server, tmp_path):
    """On /stats and /metrics, and in a real ``forkserver top``, whose figures cover one frame each."""
    sock = str(tmp_path / "stats.sock")
    srv = server("basic:slow", "-w", "1", "--stats-bind", f"unix:{sock}", ready_path="/?0", workers=1)
    (worker,) = srv.worker_pids()
    before = poll(lambda: (times := queue_times(sock))["count"] and times, DEADLINE, what="the readiness probe")
    terminal = Terminal(f"unix:{sock}", "--interval", "0.5")
    try:
        terminal.read_until(lambda _: len(top_figures(terminal, worker)) >= 2)
        assert top_figures(terminal, worker)[-1] == (None, None), terminal.screen_text()[-2000:]

        queued = 3
        least_wait = queue_behind_the_only_worker(srv, sock, queued)
        during = grown(sock, before, 1 + queued)
        assert sum(during[SLOW_BUCKETS:]) >= queued, during
        assert queue_times(sock)["sum_seconds"] >= before["sum_seconds"] + queued * least_wait

        settled = queue_times(sock)
        scraped = metrics(sock)
        assert dict((s[0]["le"], s[1]) for s in scraped["forkserver_request_queue_seconds"]
                    if "le" in s[0])["+Inf"] == settled["count"]
        # top shows what they waited, for the worker and in all, in the frame that saw them start.
        terminal.read_until(lambda _: any(w and w >= 1.0 for w, _ in top_figures(terminal, worker)))
        waited = [(w, total) for w, total in top_figures(terminal, worker) if w and w >= 1.0]
        assert waited and waited[0][1] >= 1.0, top_figures(terminal, worker)
        seen = len(terminal.frames())

        # Idle again: requests are started as they come.
        for _ in range(5):
            (conn,) = send_requests(srv.port, 1, DEADLINE)
            with conn:
                assert read_all(conn).startswith(b"HTTP/1.1 200 ")
        after = grown(sock, settled, 5)
        assert sum(after[:FAST_BUCKETS]) == 5, after
        # ...and top's later frames cover intervals in which nothing waited.
        terminal.read_until(lambda _: (None, None) in top_figures(terminal, worker, seen))
        assert (None, None) in top_figures(terminal, worker, seen), top_figures(terminal, worker, seen)
        os.write(terminal.master, b"q")
        assert terminal.wait_exit() == 0
    finally:
        terminal.close()


def stamped_get(port: int, headers: dict[str, str], source: str = "127.0.0.1") -> object:
    """GET /?0 from ``source`` with ``headers``; the proxy queue time the app saw."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE, source_address=(source, 0))
    try:
        conn.request("GET", "/?0", headers=headers)
        answer = conn.getresponse()
        assert answer.status == 200
        return json.loads(answer.read())["queue_time"]
    finally:
        conn.close()


def test_a_trusted_proxys_request_start_stamp_reaches_the_app_and_the_stats(server, tmp_path):
    sock = str(tmp_path / "stats.sock")
    srv = server("basic:slow", "-w", "1", "--stats-bind", f"unix:{sock}", "--forwarded-allow-ips", "127.0.0.1",
                 ready_path="/?0", workers=1)
    before = queue_times(sock, "proxy_queue_time")

    waits = []
    for header, stamp in (("X-Request-Start", "t=%.3f" % (time.time() - 2.0)),  # nginx's t=${msec}
                          ("X-Queue-Start", "%d" % ((time.time() - 1.5) * 1000)),  # Heroku's milliseconds
                          ("X-Request-Start", "t=%d" % ((time.time() - 1.0) * 1e6))):  # microseconds
        waits.append(stamped_get(srv.port, {header: stamp}))
    assert 2.0 <= waits[0] < 2.0 + DEADLINE and 1.5 <= waits[1] < 1.5 + DEADLINE, waits
    assert 1.0 <= waits[2] < 1.0 + DEADLINE, waits
    # A proxy whose clock runs ahead: no wait, never a negative one.
    assert stamped_get(srv.port, {"X-Request-Start": "t=%.3f" % (time.time() + 60)}) == 0.0
    # Nothing usable: no figure, and the request is served as any other.
    for stamp in ("t=soon", "t=", "12", "t=1e9", "t=%d" % (time.time() * 1e3 * 1e6), "t=%d" % (time.time() - 7200)):
        assert stamped_get(srv.port, {"X-Request-Start": stamp}) is None, stamp
    # Not from a peer in forwarded_allow_ips: ignored.
    assert stamped_get(srv.port, {"X-Request-Start": "t=%.3f" % (time.time() - 2.0)}, source="127.0.0.2") is None

    during = grown(sock, before, 4, "proxy_queue_time")
    settled = queue_times(sock, "proxy_queue_time")
    assert settled["count"] == before["count"] + 4
    assert sum(during[SLOW_BUCKETS:]) == 3 and during[0] == 1, during  # the three stamps and the early one
    # What the app was told is what was counted (the future stamp adds 0).
    assert settled["sum_seconds"] == pytest.approx(before["sum_seconds"] + sum(waits), abs=1e-5)
    scraped = metrics(sock)["forkserver_request_proxy_queue_seconds"]
    assert [value for labels, value in scraped if labels.get("le") == "+Inf"] == [settled["count"]]

