"""StatsD export end to end: a real UDP receiver sees the counters a real server sends."""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import requests

from harness import poll
from test_saturation import send_requests

LINE = re.compile(r"^([^:|@\s]+):(-?[0-9.]+)\|(c|g|ms)(?:\|@([0-9.]+))?$")


class Receiver:
    """A StatsD server as far as the test needs one: a bound UDP socket and StatsD's sums."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.counters: Counter[str] = Counter()
        self.gauges: dict[str, float] = {}
        self.timings: Counter[str] = Counter()  # how many requests the timing lines stand for
        self.timing_values: dict[str, list[float]] = {}  # each line's milliseconds
        self.largest = 0

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % self.sock.getsockname()[1]

    def read(self) -> Receiver:
        """Take in every datagram waiting; every line must follow the StatsD protocol."""
        while True:
            try:
                datagram = self.sock.recv(65536)
            except BlockingIOError:
                return self
            self.largest = max(self.largest, len(datagram))
            for line in datagram.decode("ascii").split("\n"):
                match = LINE.match(line)
                assert match, f"not a StatsD line: {line!r}"
                name, value, kind, rate = match.groups()
                if kind == "c":
                    self.counters[name] += int(value)
                elif kind == "g":
                    self.gauges[name] = float(value)
                else:
                    self.timings[name] += 1 / float(rate or 1)
                    self.timing_values.setdefault(name, []).append(float(value))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    yield found
    found.close()


def test_counters_gauges_and_timings_arrive_with_the_right_values(server, receiver):
    srv = server("basic:status", "-w", "2", "--statsd-host", receiver.address, "--statsd-prefix", "shop",
                 workers=2)
    # The readiness probes were answered 200; how many of them is up to the harness.
    probes = poll(lambda: receiver.read().counters["shop.gunicorn.requests"], what="the readiness probes")
    session = requests.Session()
    for code, count in ((200, 5), (302, 2), (404, 3), (503, 1)):
        for _ in range(count):
            assert session.get(f"{srv.url}/?{code}", allow_redirects=False).status_code == code
    expected = probes + 11
    poll(lambda: receiver.read().counters["shop.gunicorn.requests"] >= expected, what=f"{expected} requests")
    time.sleep(1.5)  # a further send must not count anything twice
    counters = receiver.read().counters
    assert counters["shop.gunicorn.requests"] == expected
    assert counters["shop.gunicorn.request.status.2xx"] == probes + 5
    assert (counters["shop.gunicorn.request.status.3xx"], counters["shop.gunicorn.request.status.4xx"],
            counters["shop.gunicorn.request.status.5xx"]) == (2, 3, 1)
    assert counters["shop.forkserver.bytes_in"] > 0 and counters["shop.forkserver.bytes_out"] > 0
    assert round(receiver.timings["shop.gunicorn.request.duration"]) == expected
    assert receiver.gauges["shop.gunicorn.workers"] == 2
    assert receiver.gauges["shop.forkserver.workers.idle"] + receiver.gauges["shop.forkserver.workers.busy"] == 2
    assert 0 < receiver.largest <= 1432


def test_a_stop_sends_the_last_requests_and_a_respawn_is_counted(server, receiver):
    srv = server("basic:status", "-w", "1", "--statsd-host", receiver.address, workers=1)
    (worker,) = srv.worker_pids()
    os.kill(worker, signal.SIGKILL)
    poll(lambda: receiver.read().counters["forkserver.workers.respawned"] == 1, what="the respawn")
    poll(lambda: receiver.read().counters["forkserver.worker.exits.died"] == 1, what="the death")
    poll(lambda: receiver.read().counters["gunicorn.log.warning"] >= 1, what="the master's warning about it")
    srv.wait_ready(workers=1)
    for _ in range(3):
        assert requests.get(f"{srv.url}/?404", headers={"Connection": "close"}).status_code == 404
    srv.signal(signal.SIGTERM)  # at once: the worker's last report comes with its exit
    assert srv.wait_exit() == 0
    assert receiver.read().counters["gunicorn.request.status.4xx"] == 3


def test_saturation_gauges_show_a_busy_worker_and_its_queued_connections(server, receiver):
    srv = server("basic:slow", "-w", "1", "--statsd-host", receiver.address, ready_path="/?0", workers=1)
    listener = f"forkserver.listener.127_0_0_1_{srv.port}"
    poll(lambda: receiver.read().gauges.get("forkserver.threads") == 1, what="the serving thread")
    queued, slow = 3, 4.0
    holder = threading.Thread(target=requests.get, args=(f"{srv.url}/?{slow}",), kwargs={"timeout": 30},
                              daemon=True)
    held_from = time.monotonic()
    holder.start()
    waiting = []
    try:
        poll(lambda: receiver.read().gauges.get("forkserver.requests_in_flight") == 1, what="the busy worker")
        waiting += send_requests(srv.port, queued, 30)
        least_wait = held_from + slow - time.monotonic()  # each queued request waits at least this long
        poll(lambda: receiver.read().gauges.get(f"{listener}.accept_queue_peak") == queued, what="the queue's peak")
        gauges = receiver.gauges
        assert gauges["forkserver.threads_busy_ratio"] == 1.0
        assert gauges[f"{listener}.accept_queue_max"] > 0
    finally:
        holder.join(30)
        for conn in waiting:
            conn.close()
    poll(lambda: receiver.read().gauges.get("forkserver.threads_busy_ratio") == 0.0, what="the worker to be idle")
    poll(lambda: receiver.read().counters["forkserver.thread_busy_ms"] >= slow * 1000, what="the busy time")
    # Their queue times, as timings: each over a second (a bucket's middle stands for it).
    assert least_wait > 1.2, f"the machine took {slow - least_wait:.1f}s to queue {queued} requests"
    poll(lambda: len([ms for ms in receiver.read().timing_values.get("forkserver.request.queue", ())
                      if ms > 1000]) >= queued, what=f"{queued} queue times over a second")
