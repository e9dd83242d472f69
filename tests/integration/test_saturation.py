"""Saturation metrics end to end: busy threads and accept-queue high-water marks from a real server.

A slow app holds every thread; the counts must show it while it lasts and
fall back after, on /stats and on /metrics, parsed as Prometheus parses them.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from harness import poll, read_all
from test_stats_live import fetch, stats

# Seconds each holding request sleeps: room for the checks made meanwhile (the
# busy seconds grow by one first), and short enough to wait for.
SLOW = 4.0
DEADLINE = 20.0  # for a loaded 2-core machine


def metrics(path: str) -> dict[str, list]:
    """/metrics as the Prometheus parser reads it: family name -> [(labels, value)]."""
    text = fetch(path, "/metrics").decode()
    return {family.name: [(sample.labels, sample.value) for sample in family.samples]
            for family in text_string_to_metric_families(text)}


def hold(url: str, count: int, seconds: float) -> list[threading.Thread]:
    """Start ``count`` slow requests, one per thread; bounded by their own timeout."""
    def one() -> None:
        requests.get(f"{url}/?{seconds}", timeout=seconds + DEADLINE)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def send_requests(port: int, count: int, timeout: float) -> list[socket.socket]:
    """Open ``count`` connections and send a quick request on each; the caller reads and closes them."""
    sent = []
    for _ in range(count):
        conn = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sent.append(conn)
        conn.sendall(b"GET /?0 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return sent


@pytest.mark.parametrize("workers, threads", [(2, 1), (1, 3)])
def test_busy_threads_and_busy_seconds_rise_under_load_and_fall_back(server, tmp_path, workers, threads):
    sock = str(tmp_path / "stats.sock")
    srv = server("basic:slow", "-w", str(workers), "--threads", str(threads), "--stats-bind", f"unix:{sock}",
                 ready_path="/?0", workers=workers)
    capacity = workers * threads
    poll(lambda: stats(sock)["saturation"]["threads"] == capacity, DEADLINE, what=f"{capacity} serving threads")
    idle = stats(sock)["saturation"]
    assert (idle["requests_in_flight"], idle["threads_busy_ratio"]) == (0, 0.0)

    clients = hold(srv.url, capacity, SLOW)
    try:
        full = poll(lambda: (s := stats(sock)["saturation"])["requests_in_flight"] == capacity and s,
                    DEADLINE, what="every thread busy")
        assert full["threads_busy_ratio"] == 1.0
        # The counter grows while the requests still run, not only once they end.
        grown = poll(lambda: (s := stats(sock)["saturation"])["thread_busy_seconds"]
                     >= full["thread_busy_seconds"] + capacity * 1.0 and s, DEADLINE, what="busy seconds to grow")
        assert grown["requests_in_flight"] == capacity, "the requests ended before the counter showed them"
        scraped = metrics(sock)
        assert scraped["forkserver_threads"] == [({}, capacity)]
        assert scraped["forkserver_requests_in_flight"] == [({}, capacity)]
        assert scraped["forkserver_threads_busy_ratio"] == [({}, 1.0)]
        busy_total = sum(value for _, value in scraped["forkserver_thread_busy_seconds"])
        assert busy_total >= grown["thread_busy_seconds"]
    finally:
        for client in clients:
            client.join(SLOW + DEADLINE)

    after = poll(lambda: (s := stats(sock)["saturation"])["requests_in_flight"] == 0
                 and s["thread_busy_seconds"] >= capacity * SLOW and s, DEADLINE, what="the load to end")
    assert after["threads_busy_ratio"] == 0.0 and after["threads"] == capacity
    # Idle now: once the workers' last reports are in, the counter stays where the requests left it.
    settled = poll(lambda: unchanged_over_a_report(sock), DEADLINE, what="the counter to settle")
    assert capacity * SLOW <= settled < capacity * (SLOW + 2.0) + 2.0  # ours and the readiness probes


def unchanged_over_a_report(sock: str) -> float | None:
    """The busy-seconds counter if it did not move across a worker's report interval, else None."""
    before = stats(sock)["saturation"]["thread_busy_seconds"]
    time.sleep(1.5)
    after = stats(sock)["saturation"]["thread_busy_seconds"]
    return after if after == before else None


def test_queued_connections_and_their_high_water_mark_outlive_the_burst_until_read(server, tmp_path):
    """With the only worker busy, connections wait in the kernel; after they drain, the next
    /metrics still shows how many waited, once, and /stats reads in between do not take it away."""
    sock = str(tmp_path / "stats.sock")
    srv = server("basic:slow", "-w", "1", "--stats-bind", f"unix:{sock}", ready_path="/?0", workers=1)
    (listener,) = stats(sock)["listeners"]
    assert listener["accept_queue"] == 0 and listener["accept_queue_max"] > 0
    metrics(sock)  # takes the mark of the start, when the readiness probes waited for the booting worker
    assert metrics(sock)["forkserver_listener_accept_queue_peak"][0][1] == 0

    queued = 5
    holder = hold(srv.url, 1, SLOW)
    waiting: list[socket.socket] = []
    try:
        poll(lambda: stats(sock)["saturation"]["requests_in_flight"] == 1, DEADLINE, what="the worker to be busy")
        waiting += send_requests(srv.port, queued, SLOW + DEADLINE)
        during = poll(lambda: (entry := stats(sock)["listeners"][0])["accept_queue"] == queued and entry,
                      DEADLINE, what=f"{queued} queued connections")
        assert during["accept_queue_max"] == listener["accept_queue_max"]
        for conn in waiting:
            assert read_all(conn).startswith(b"HTTP/1.1 200 ")  # served once the worker is free
    finally:
        holder[0].join(SLOW + DEADLINE)
        for conn in waiting:
            conn.close()

    poll(lambda: stats(sock)["listeners"][0]["accept_queue"] == 0, DEADLINE, what="the queue to drain")
    scraped = metrics(sock)
    address = {"listener": listener["address"]}
    assert scraped["forkserver_listener_accept_queue"] == [(address, 0)]
    assert scraped["forkserver_listener_accept_queue_max"] == [(address, listener["accept_queue_max"])]
    assert scraped["forkserver_listener_accept_queue_peak"] == [(address, queued)]
    assert metrics(sock)["forkserver_listener_accept_queue_peak"] == [(address, 0)]  # taken by the scrape before
