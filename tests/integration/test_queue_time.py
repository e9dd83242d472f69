"""Request queue time end to end: measured by real workers, summed by the master, read on /stats and /metrics.

Two figures: how long a request waited between its last bytes reaching the
kernel and a worker starting it, and how long since a trusted proxy stamped
it (``X-Request-Start``/``X-Queue-Start``), which the app also gets as
``environ["forkserver.queue_time"]``.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from harness import poll, read_all
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


def test_queue_time_rises_while_the_only_worker_is_busy_and_falls_back(server, tmp_path):
    sock = str(tmp_path / "stats.sock")
    srv = server("basic:slow", "-w", "1", "--stats-bind", f"unix:{sock}", ready_path="/?0", workers=1)
    before = poll(lambda: (times := queue_times(sock))["count"] and times, DEADLINE, what="the readiness probe")

    queued = 3
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
    during = grown(sock, before, 1 + queued)
    assert sum(during[SLOW_BUCKETS:]) >= queued, during
    assert queue_times(sock)["sum_seconds"] >= before["sum_seconds"] + queued * least_wait

    settled = queue_times(sock)
    scraped = metrics(sock)
    assert dict((s[0]["le"], s[1]) for s in scraped["forkserver_request_queue_seconds"]
                if "le" in s[0])["+Inf"] == settled["count"]

    # Idle again: requests are started as they come.
    for _ in range(5):
        (conn,) = send_requests(srv.port, 1, DEADLINE)
        with conn:
            assert read_all(conn).startswith(b"HTTP/1.1 200 ")
    after = grown(sock, settled, 5)
    assert sum(after[:FAST_BUCKETS]) == 5, after


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
