"""Stats counting and shipping on real pipes, real forks and real sockets.

The promise under test: a worker's reporting costs the master nothing it has
to wait for, a worker killed at any moment (even mid-send) breaks nothing but
its own channel, server-wide counters only ever grow, and nothing a worker
writes is more than numbers to the master.
"""

from __future__ import annotations

import logging
import math
import multiprocessing.resource_tracker
import os
import pickle
import random
import select
import signal
import threading
import time

import psutil
import pytest

from forkserver.master.aggregator import Aggregator
from forkserver.master.collector import FRAME_HEADER, MAX_READ_BYTES, StatsCollector
from forkserver.stats import (
    HISTOGRAM_BUCKETS,
    STATUS_CLASSES,
    MAX_COUNT,
    WIRE,
    WIRE_VERSION,
    CountersFlushed,
    Reporter,
    decode,
    encode,
    new_channel,
)

DEADLINE = 10.0  # seconds a call that must not block is given before the test calls it stuck
PID = 4242  # the worker the test's channel belongs to, as far as the master knows


def finishes(function, *args, timeout=DEADLINE):
    """Run ``function`` in a thread; return its result, or fail if it is still running after ``timeout``."""
    result, error = [], []

    def target():
        try:
            result.append(function(*args))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{getattr(function, '__name__', function)} blocked for {timeout}s"
    if error:
        raise error[0]
    return result[0]


@pytest.fixture
def ends():
    """A stats channel with both ends here: (read end, write end)."""
    made = new_channel()
    yield made
    for end in made:
        end.close()


def reporter(ends, **kw) -> Reporter:
    return Reporter(ends[1], pid=os.getpid(), slot=kw.pop("slot", 0), generation=kw.pop("generation", 1), **kw)


def sent(ends) -> list[CountersFlushed]:
    """Decode every whole frame waiting in the read end, as a test's own reader."""
    data = b""
    while True:
        try:
            chunk = os.read(ends[0].fileno(), 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    found = []
    while data:
        (length,) = FRAME_HEADER.unpack_from(data)
        found.append(decode(data[FRAME_HEADER.size:FRAME_HEADER.size + length], PID))
        data = data[FRAME_HEADER.size + length:]
    return found


# -- the worker side --------------------------------------------------------------------------


def test_buckets_are_fixed_increasing_and_end_in_infinity():
    assert list(HISTOGRAM_BUCKETS) == sorted(set(HISTOGRAM_BUCKETS))
    assert HISTOGRAM_BUCKETS[-1] == math.inf
    assert all(bound > 0 for bound in HISTOGRAM_BUCKETS)


def test_record_counts_requests_classes_bytes_and_buckets(ends):
    r = reporter(ends)
    r.record(200, 10, 100, 0.001)    # on a bound: that bucket (le)
    r.record(404, 20, 200, 0.0011)   # just over: the next one
    r.record(503, 30, 300, 99.0)     # slower than the last bound: overflow bucket
    r.record(101, 0, 0, 0.0)
    r.record(302, 0, 0, 0.3)
    message = r.message()
    assert message.requests == 5
    assert dict(zip(STATUS_CLASSES, message.status)) == {"1xx": 1, "2xx": 1, "3xx": 1, "4xx": 1, "5xx": 1}
    assert (message.bytes_in, message.bytes_out) == (60, 600)
    assert message.histogram[0] == 2 and message.histogram[1] == 1 and message.histogram[-1] == 1
    assert message.histogram[HISTOGRAM_BUCKETS.index(0.5)] == 1
    assert sum(message.histogram) == 5
    assert message.duration_sum == pytest.approx(99.3021)


def test_status_outside_100_to_599_is_clamped_into_a_class(ends):
    r = reporter(ends)
    r.record(0, 0, 0, 0.0)
    r.record(999, 0, 0, 0.0)
    assert r.message().status == (1, 0, 0, 0, 1)


def _message(requests=3, **fields) -> CountersFlushed:
    values = dict(pid=PID, requests=requests, status=(0, requests, 0, 0, 0), bytes_in=10, bytes_out=20,
                  histogram=(requests,) + (0,) * (len(HISTOGRAM_BUCKETS) - 1), duration_sum=0.5,
                  cpu_seconds=0.25, dropped_flushes=1, dropped_log_lines=2)
    values.update(fields)
    return CountersFlushed(**values)


def test_a_message_is_fixed_bytes_that_fit_one_atomic_pipe_write_even_with_huge_counts():
    """PIPE_BUF is what makes a SIGKILL mid-send harmless; leave lots of room under it."""
    huge = MAX_COUNT
    message = CountersFlushed(PID, huge, (0, huge, 0, 0, 0), huge, huge, (0,) * 13 + (huge,), 1e12, 1e12, huge, huge)
    data = encode(message)
    assert len(data) == WIRE.size and FRAME_HEADER.size + WIRE.size <= select.PIPE_BUF // 4
    assert decode(data, PID) == message
    assert decode(encode(_message()), 77).pid == 77  # whose it is comes from the channel


# Where fields sit in the unpacked WIRE: the duration sum, CPU seconds, dropped log
# lines, the first queue-time bucket and its sum, the first proxy bucket and its sum.
DURATION_SUM, CPU_SECONDS, LOG_LINES = 24, 25, 27
QUEUE_FIRST, QUEUE_SUM = 28, 28 + len(HISTOGRAM_BUCKETS)
PROXY_FIRST, PROXY_SUM = QUEUE_SUM + 1, QUEUE_SUM + 1 + len(HISTOGRAM_BUCKETS)


def test_the_field_positions_the_tests_use_are_the_wire_layout():
    fields = WIRE.unpack(encode(_message(queue_sum=0.125, proxy_queue_sum=0.375)))
    assert (fields[DURATION_SUM], fields[CPU_SECONDS], fields[LOG_LINES]) == (0.5, 0.25, 2)
    assert (fields[QUEUE_SUM], fields[PROXY_SUM], len(fields)) == (0.125, 0.375, PROXY_SUM + 1)


@pytest.mark.parametrize("change, why", [
    (lambda f: f.__setitem__(0, 99), "version"),
    (lambda f: f.__setitem__(1, 9), "kind"),
    (lambda f: f.__setitem__(2, -1), "out of range"),  # requests
    (lambda f: f.__setitem__(4, 2**60), "out of range"),  # a status class
    (lambda f: f.__setitem__(LOG_LINES, -5), "out of range"),
    (lambda f: f.__setitem__(DURATION_SUM, math.nan), "not a number"),
    (lambda f: f.__setitem__(CPU_SECONDS, math.inf), "too large"),
    (lambda f: f.__setitem__(DURATION_SUM, -1.0), "negative"),
    (lambda f: f.__setitem__(4, 2), "add up"),  # 2xx no longer matches the requests
    (lambda f: f.__setitem__(10, 1), "add up"),  # nor the histogram
    (lambda f: f.__setitem__(QUEUE_FIRST, 4), "more queue times than requests"),  # of 3
    (lambda f: f.__setitem__(PROXY_FIRST + 3, 4), "more queue times than requests"),
    (lambda f: f.__setitem__(PROXY_FIRST, -1), "out of range"),
    (lambda f: f.__setitem__(QUEUE_SUM, math.nan), "not a number"),
    (lambda f: f.__setitem__(PROXY_SUM, -0.5), "negative"),
])
def test_decode_refuses_what_no_worker_would_send(change, why):
    fields = list(WIRE.unpack(encode(_message())))
    change(fields)
    with pytest.raises(ValueError, match=why):
        decode(WIRE.pack(*fields), PID)


@pytest.mark.parametrize("data", [b"", b"x" * (WIRE.size - 1), b"x" * (WIRE.size + 1)])
def test_decode_refuses_a_wrong_length(data):
    with pytest.raises(ValueError, match="bytes, not"):
        decode(data, PID)


def test_flush_sends_one_cumulative_message(ends):
    r = reporter(ends)
    for _ in range(3):
        r.record(200, 1, 2, 0.01)
    assert r.flush()
    r.record(500, 1, 2, 0.01)
    assert r.flush()
    messages = sent(ends)
    assert [m.requests for m in messages] == [3, 4]
    assert messages[-1].status == (0, 3, 0, 0, 1)


def test_flush_if_due_waits_for_the_interval_and_for_news(ends):
    r = reporter(ends, interval=1.0)
    r.flush_if_due(100.0)  # the first check always reports, so the master hears from every worker
    assert [m.requests for m in sent(ends)] == [0]
    r.record(200, 0, 0, 0.0)
    r.flush_if_due(100.5)  # not due
    assert sent(ends) == []
    r.flush_if_due(101.0)
    assert [m.requests for m in sent(ends)] == [1]
    r.flush_if_due(102.5)  # due, but no request since: stay quiet
    assert sent(ends) == []
    r.record(200, 0, 0, 0.0)
    r.flush_if_due(103.5)
    assert [m.requests for m in sent(ends)] == [2]
    assert r.flush()  # an explicit flush (on exit) always sends
    assert [m.requests for m in sent(ends)] == [2]


def test_the_message_carries_the_log_lines_the_process_lost(ends):
    lost = [0]
    r = reporter(ends, dropped_log_lines=lambda: lost[0])
    lost[0] = 7
    assert r.flush() and sent(ends)[-1].dropped_log_lines == 7


def test_a_full_pipe_drops_flushes_instead_of_blocking_the_worker(ends):
    """If the master stops reading, the worker goes on serving; the next flush carries everything."""
    r = reporter(ends)

    def flood():
        sent_count = 0
        for _ in range(20_000):
            r.record(200, 1, 1, 0.001)
            if r.flush():
                sent_count += 1
        return sent_count

    sent_count = finishes(flood)
    assert r.dropped_flushes > 0
    assert len(finishes(sent, ends)) == sent_count
    assert r.flush()
    last = sent(ends)[-1]
    assert last.requests == 20_000 and last.dropped_flushes == r.dropped_flushes


def test_threaded_reporter_counts_every_request(ends):
    r = reporter(ends, threaded=True)

    def work():
        for _ in range(5_000):
            r.record(200, 1, 1, 0.002)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        r.flush()  # flushing while threads record must see consistent totals (decode checks the sums)
        sent(ends)
    for thread in threads:
        thread.join()
    message = r.message()
    assert message.requests == 20_000 == sum(message.histogram) == message.status[1]
    assert message.bytes_in == 20_000


def test_new_channel_starts_no_helper_process():
    """Under the fork context the channel needs no resource tracker process."""
    made = new_channel()
    try:
        assert getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None) is None
        assert psutil.Process().children() == []
        assert not os.get_blocking(made[0].fileno()) and not os.get_blocking(made[1].fileno())
    finally:
        for end in made:
            end.close()


# -- the master's side: StatsCollector ---------------------------------------------------


class Master:
    """A collector and aggregator as the master holds them, with one worker's channel attached.

    ``write`` is the worker's end, kept here (the master itself closes it after the fork).
    """

    def __init__(self, pid: int = PID) -> None:
        self.aggregator = Aggregator()
        self.poller = select.poll()
        self.collector = StatsCollector(self.aggregator, self.poller)
        self.aggregator.add_worker(pid, pid=pid, slot=0, generation=1)
        ends = self.collector.prepare()
        self.write_fd = os.dup(ends[1].fileno())
        self.collector.attach(pid, 0, ends)
        self.pid = pid

    def write(self, data: bytes) -> None:
        os.write(self.write_fd, data)

    def send(self, message: CountersFlushed) -> None:
        payload = encode(message)
        self.write(FRAME_HEADER.pack(len(payload)) + payload)

    def latest(self) -> CountersFlushed | None:
        worker = self.aggregator.workers.get(self.pid)
        return None if worker is None else worker.last

    @property
    def is_open(self) -> bool:
        return self.pid in self.collector.channels

    def close(self) -> None:
        self.collector.close()
        os.close(self.write_fd)


@pytest.fixture
def master():
    made = Master()
    yield made
    made.close()


def test_the_collector_takes_valid_messages_and_watches_the_channel(master):
    assert master.poller.poll(0) == []
    master.send(_message(3))
    assert master.poller.poll(0) != []
    finishes(master.collector.drain)
    assert master.latest() == _message(3)
    assert master.poller.poll(0) == []
    assert master.aggregator.snapshot()["counters"]["log_lines_dropped"] == 2


def test_a_malformed_message_is_dropped_counted_and_logged_once(master, caplog):
    bad = WIRE.pack(*([WIRE_VERSION, 1, -1] + list(WIRE.unpack(encode(_message())))[3:]))
    caplog.set_level(logging.WARNING, logger="forkserver")
    for _ in range(3):
        master.write(FRAME_HEADER.pack(len(bad)) + bad)
    master.send(_message(5))
    finishes(master.collector.drain)
    assert master.latest().requests == 5  # the good message after the bad ones still counts
    assert master.is_open
    doc = master.aggregator.snapshot()
    assert doc["counters"]["stats_messages_rejected"] == 3 == doc["workers"][0]["stats_messages_rejected"]
    assert [r.getMessage() for r in caplog.records].count(
        "stats channel slot=0 pid=4242: dropped a malformed message (a count out of range); "
        "more are counted in stats_messages_rejected, not logged") == 1


def test_a_pickle_is_never_unpickled(master, tmp_path):
    marker = tmp_path / "marker"

    class CreatesMarker:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = pickle.dumps(CreatesMarker())
    for payload in (evil.ljust(WIRE.size, b"\0"), evil):  # the right length, then its own
        master.write(FRAME_HEADER.pack(len(payload)) + payload)
    finishes(master.collector.drain)
    assert not marker.exists()
    assert master.aggregator.rejected == 2 and not master.is_open


def test_a_frame_of_the_wrong_length_closes_only_that_channel(master, caplog):
    master.send(_message(4))
    master.write(FRAME_HEADER.pack(1 << 30) + b"xx")
    other = Master(pid=5151)
    try:
        other.send(_message(9, pid=5151))
        finishes(master.collector.drain)
        finishes(other.collector.drain)
        assert not master.is_open and other.is_open
        assert master.latest().requests == 4  # the last good totals still count
        assert master.aggregator.workers[PID].broken == "a frame of 1073741824 bytes where every message is " \
            f"{WIRE.size}"
        assert other.latest().requests == 9
    finally:
        other.close()


def test_a_negative_length_closes_the_channel(master):
    master.write(FRAME_HEADER.pack(-1) + b"\0" * 8)
    finishes(master.collector.drain)
    assert not master.is_open


def test_a_frame_split_across_reads_waits_for_its_rest(master):
    frame = FRAME_HEADER.pack(WIRE.size) + encode(_message(6))
    master.write(frame[:3])
    finishes(master.collector.drain)
    master.write(frame[3:50])
    finishes(master.collector.drain)
    assert master.latest() is None and master.is_open
    master.write(frame[50:])
    finishes(master.collector.drain)
    assert master.latest().requests == 6


def test_a_torn_message_at_the_end_is_reported(master):
    master.send(_message(2))
    master.write((FRAME_HEADER.pack(WIRE.size) + encode(_message(3)))[:40])
    os.close(master.write_fd)
    master.write_fd = os.open(os.devnull, os.O_WRONLY)  # for close()
    finishes(master.collector.drain)  # the whole message and the torn start
    finishes(master.collector.drain)  # end of file
    assert not master.is_open and "torn" in master.aggregator.workers[PID].broken
    assert master.latest().requests == 2


def test_a_worker_that_ends_cleanly_closes_its_channel_quietly(master):
    master.send(_message(2))
    os.close(master.write_fd)
    master.write_fd = os.open(os.devnull, os.O_WRONLY)
    master.collector.forget(PID)
    assert not master.is_open and master.latest().requests == 2
    assert master.aggregator.workers[PID].broken == ""


def test_a_flood_is_read_a_bounded_amount_per_turn(master):
    """A worker that writes as fast as it can never keeps the master in one read."""
    frame = FRAME_HEADER.pack(WIRE.size) + encode(_message(1))
    os.set_blocking(master.write_fd, False)
    written = 0
    try:
        while True:
            written += os.write(master.write_fd, frame)
    except BlockingIOError:
        pass
    assert written > MAX_READ_BYTES
    finishes(master.collector.drain)
    left = 0
    try:
        while True:
            chunk = os.read(master.collector.channels[PID].fd, 65536)
            left += len(chunk)
    except BlockingIOError:
        pass
    assert left > 0  # the first turn took its share and left the rest for later turns


def _child_reports_until_killed(writer, slot: int) -> None:
    """In a forked child: count and flush as fast as possible, until SIGKILL arrives."""
    code = 1
    try:
        r = Reporter(writer, pid=os.getpid(), slot=slot, generation=1)
        for _ in range(10_000_000):
            r.record(200, 10, 20, 0.003)
            r.flush()
        code = 0
    finally:
        os._exit(code)


def test_sigkill_mid_send_never_stalls_the_reader():
    """50 workers SIGKILLed at random moments: every read returns at once, totals only grow."""
    aggregator = Aggregator()
    collector = StatsCollector(aggregator, select.poll())
    rng = random.Random(1234)
    last_total = 0
    for attempt in range(50):
        ends = collector.prepare()
        pid = os.fork()
        if pid == 0:
            _child_reports_until_killed(ends[1], slot=attempt % 4)
        aggregator.add_worker(pid, pid=pid, slot=attempt % 4, generation=1)
        collector.attach(pid, attempt % 4, ends)
        kill_at = time.monotonic() + rng.uniform(0.0, 0.02)
        while time.monotonic() < kill_at:  # read while it writes, as the master's ticks would
            finishes(collector.drain)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while pid in collector.channels:
            finishes(collector.forget, pid)
        assert aggregator.workers[pid].broken == "" and aggregator.rejected == 0
        aggregator.worker_exited(pid, "killed_timeout")
        total = aggregator.snapshot()["totals"]["requests"]
        assert total >= last_total
        last_total = total
    assert aggregator.snapshot()["counters"]["worker_exits"]["killed_timeout"] == 50
    assert last_total > 0


def test_a_reaped_workers_whole_backlog_is_read_so_its_last_flush_counts(master):
    """More than one turn's worth waits in the pipe when the worker ends: the last message still counts."""
    last = 2 * MAX_READ_BYTES // (FRAME_HEADER.size + WIRE.size) + 1  # two turns' worth and a bit
    for requests in range(1, last + 1):
        master.send(_message(requests))
    os.close(master.write_fd)
    master.write_fd = os.open(os.devnull, os.O_WRONLY)
    finishes(master.collector.forget, PID)
    assert master.latest().requests == last and not master.is_open


def test_totals_that_go_backwards_are_rejected(master):
    master.send(_message(8))
    master.send(_message(2))  # a worker's own messages arrive in order: lower totals are a lie
    finishes(master.collector.drain)
    assert master.latest().requests == 8 and master.aggregator.rejected == 1 and master.is_open
