"""Queue time piece by piece: the kernel's reading, proxy stamps, a worker's counts, the master's sums and exports."""

from __future__ import annotations

import os
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkserver.master.aggregator import Aggregator
from forkserver.proxy import proxy_queue_time, request_start
from forkserver.stats import HISTOGRAM_BUCKETS, CountersFlushed, Reporter, decode, encode, kernel_wait, new_channel
from forkserver.master.statsd import metric_lines

NOW = 1_764_600_000.25  # a Unix time in the right decade


# -- what the kernel says ----------------------------------------------------------------


def test_kernel_wait_is_the_time_since_the_requests_bytes_arrived_even_in_the_listen_backlog():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            sent = time.monotonic()
            time.sleep(0.3)  # the wait being measured: the connection sits unaccepted
            accepted, _ = listener.accept()
            with accepted:
                waited, elapsed = kernel_wait(accepted), time.monotonic() - sent
                tick = 0.011  # the kernel counts in clock ticks: at worst 10 ms (HZ=100)
                assert elapsed - tick <= waited <= elapsed + tick
                accepted.recv(100)
                assert kernel_wait(accepted) >= waited  # reading does not reset it: only new bytes do


def test_kernel_wait_is_none_where_the_kernel_keeps_no_arrival_time():
    left, right = socket.socketpair()
    with left, right:
        assert kernel_wait(left) is None


# -- what a proxy says -------------------------------------------------------------------------


@pytest.mark.parametrize("value, start", [
    ("t=1764600000.250", NOW),  # nginx's t=${msec}
    ("1764600000250", NOW),  # Heroku: milliseconds
    ("t=1764600000250000", NOW),  # microseconds
    (" t=1764600000 ", NOW - 0.25),
    ("t=1764600000.250, t=1764600001.000", NOW),  # the farthest proxy's
])
def test_request_start_stamps_in_every_unit(value, start):
    assert request_start(value) == pytest.approx(start, abs=1e-6)


@pytest.mark.parametrize("value", ["", "t=", "soon", "t=-5", "t=1e9", "12", "t=17646000000",  # between units
                                   "t=1764600000250000000", "1764600000.2.5", "t=0x10", "t=1764600000;d=3",
                                   "9" * 400])
def test_request_start_ignores_what_is_no_clock_reading(value):
    assert request_start(value) is None


def test_proxy_queue_time_is_set_for_the_app_and_a_stamp_from_the_future_counts_as_no_wait():
    environ = {"HTTP_X_REQUEST_START": "t=1764600000.000"}
    assert proxy_queue_time(environ, lambda: NOW) == pytest.approx(0.25)
    assert environ["forkserver.queue_time"] == pytest.approx(0.25)
    ahead = {"HTTP_X_QUEUE_START": "t=1764600009.000"}
    assert proxy_queue_time(ahead, lambda: NOW) == 0.0 == ahead["forkserver.queue_time"]
    both = {"HTTP_X_REQUEST_START": "garbage", "HTTP_X_QUEUE_START": "1764600000000"}
    assert proxy_queue_time(both, lambda: NOW) == pytest.approx(0.25)  # the usable one
    stale = {"HTTP_X_REQUEST_START": "t=1764596399.000"}  # an hour and a second before NOW
    assert proxy_queue_time(stale, lambda: NOW) is None and "forkserver.queue_time" not in stale
    for unusable in ({}, {"HTTP_X_REQUEST_START": "garbage"}):
        assert proxy_queue_time(unusable, lambda: NOW) is None and "forkserver.queue_time" not in unusable


# -- a worker's counts and the master's sums ----------------------------------------------------


def test_a_worker_counts_queue_times_of_the_requests_that_have_them_and_ships_them_whole():
    reader, writer = new_channel()
    with reader, writer:
        reporter = Reporter(writer, pid=os.getpid(), slot=0, generation=1)
        reporter.record(200, 1, 1, 0.01, 0.001, None)  # on a bound: that bucket
        reporter.record(200, 1, 1, 0.01, 3.0, 2.0)
        reporter.record(200, 1, 1, 0.01)  # a health check or a UNIX socket: not timed
        message = reporter.message()
    queue = list(message.queue_histogram)
    assert (queue[0], queue[HISTOGRAM_BUCKETS.index(5.0)], sum(queue)) == (1, 1, 2)
    assert message.queue_sum == pytest.approx(3.001)
    assert message.proxy_queue_histogram[HISTOGRAM_BUCKETS.index(2.5)] == 1 == sum(message.proxy_queue_histogram)
    assert decode(encode(message), message.pid) == message


def report(pid: int, requests: int, queue: list[int], queue_sum: float) -> CountersFlushed:
    none = (0,) * len(HISTOGRAM_BUCKETS)
    return CountersFlushed(pid, requests, (0, requests, 0, 0, 0), 0, 0, (requests,) + none[1:], 0.0, 0.0, 0, 0,
                           tuple(queue) + none[len(queue):], queue_sum, none, 0.0)


def test_the_master_sums_queue_times_over_workers_and_their_restarts():
    stats = Aggregator()
    for pid in (1, 2):
        stats.add_worker(pid, pid=pid, slot=pid, generation=1)
    stats.ingest(1, report(1, 4, [4], 0.002))
    stats.ingest(2, report(2, 2, [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1], 2.5))
    stats.worker_exited(2, "recycled")
    stats.add_worker(3, pid=3, slot=2, generation=2)
    stats.ingest(3, report(3, 1, [1], 0.0005))
    first = stats.snapshot()
    queue = first["totals"]["queue_time"]
    assert (queue["count"], queue["histogram"][:3], queue["sum_seconds"]) == (7, [5, 0, 0], 2.5025)
    assert queue["p50_seconds"] < 0.001 < 0.5 < queue["p99_seconds"] <= 2.5
    assert first["totals"]["proxy_queue_time"]["count"] == 0

    with pytest.raises(ValueError, match="lower"):  # queue counts only grow, as every counter
        stats.ingest(1, report(1, 5, [3, 2], 0.01))

    families = {f.name: f for f in text_string_to_metric_families(stats.prometheus(first))}
    queue_family = families["forkserver_request_queue_seconds"]
    assert queue_family.type == "histogram"
    samples = {(s.name, s.labels.get("le")): s.value for s in queue_family.samples}
    assert samples[("forkserver_request_queue_seconds_bucket", "0.001")] == 5
    assert samples[("forkserver_request_queue_seconds_bucket", "+Inf")] == 7
    assert samples[("forkserver_request_queue_seconds_count", None)] == 7
    assert samples[("forkserver_request_queue_seconds_sum", None)] == 2.5025
    assert families["forkserver_request_proxy_queue_seconds"].type == "histogram"

    stats.ingest(3, report(3, 3, [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 20.0))
    lines = metric_lines(first, stats.snapshot(), "app.")
    assert [line for line in lines if ".queue" in line] == ["app.forkserver.request.queue:7500|ms"] * 2
    assert len([line for line in metric_lines(None, first, "") if line.startswith("forkserver.request.queue:")]) == 7
