"""Stats counting and shipping on real queues, real forks and real sockets.

The promise under test: a worker's reporting costs the master nothing it has
to wait for, a worker killed at any moment (even mid-put) breaks nothing but
its own queue, and server-wide counters only ever grow.
"""

from __future__ import annotations

import math
import multiprocessing.resource_tracker
import os
import pickle
import random
import select
import signal
import struct
import threading
import time
from multiprocessing.reduction import ForkingPickler

import psutil
import pytest

from forkserver.aggregator import Aggregator
from forkserver.stats import (
    HISTOGRAM_BUCKETS,
    STATUS_CLASSES,
    CountersFlushed,
    Reporter,
    drain,
    new_queue,
    queue_fd,
)

DEADLINE = 10.0  # seconds a call that must not block is given before the test calls it stuck


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
def queue():
    made = new_queue()
    yield made
    made.close()


def reporter(queue, **kw) -> Reporter:
    return Reporter(queue, pid=os.getpid(), slot=kw.pop("slot", 0), generation=kw.pop("generation", 1), **kw)


# -- the worker side --------------------------------------------------------------------------


def test_buckets_are_fixed_increasing_and_end_in_infinity():
    assert list(HISTOGRAM_BUCKETS) == sorted(set(HISTOGRAM_BUCKETS))
    assert HISTOGRAM_BUCKETS[-1] == math.inf
    assert all(bound > 0 for bound in HISTOGRAM_BUCKETS)


def test_record_counts_requests_classes_bytes_and_buckets(queue):
    r = reporter(queue)
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


def test_status_outside_100_to_599_is_clamped_into_a_class(queue):
    r = reporter(queue)
    r.record(0, 0, 0, 0.0)
    r.record(999, 0, 0, 0.0)
    assert r.message().status == (1, 0, 0, 0, 1)


def test_a_message_fits_one_atomic_pipe_write_even_with_huge_counts(queue):
    """PIPE_BUF is what makes a SIGKILL mid-put harmless; leave lots of room under it."""
    huge = 2**63 - 1
    message = CountersFlushed(2**22, huge, (huge,) * 5, huge, huge, (huge,) * len(HISTOGRAM_BUCKETS),
                              1e300, 1e300, huge)
    payload = bytes(ForkingPickler.dumps(message))
    assert len(payload) + 4 <= select.PIPE_BUF // 4  # 4: the length header sent in the same write
    assert pickle.loads(payload) == message


def test_flush_puts_one_cumulative_message(queue):
    r = reporter(queue)
    for _ in range(3):
        r.record(200, 1, 2, 0.01)
    assert r.flush()
    r.record(500, 1, 2, 0.01)
    assert r.flush()
    messages = drain(queue)
    assert not messages.broken
    assert [m.requests for m in messages] == [3, 4]
    assert messages[-1].status == (0, 3, 0, 0, 1)
    assert messages[-1].pid == os.getpid()


def test_flush_if_due_waits_for_the_interval_and_for_news(queue):
    r = reporter(queue, interval=1.0)
    r.flush_if_due(100.0)  # the first check always reports, so the master hears from every worker
    assert [m.requests for m in drain(queue)] == [0]
    r.record(200, 0, 0, 0.0)
    r.flush_if_due(100.5)  # not due
    assert drain(queue) == []
    r.flush_if_due(101.0)
    assert [m.requests for m in drain(queue)] == [1]
    r.flush_if_due(102.5)  # due, but no request since: stay quiet
    assert drain(queue) == []
    r.record(200, 0, 0, 0.0)
    r.flush_if_due(103.5)
    assert [m.requests for m in drain(queue)] == [2]
    assert r.flush()  # an explicit flush (on exit) always sends
    assert [m.requests for m in drain(queue)] == [2]


def test_a_full_pipe_drops_flushes_instead_of_blocking_the_worker(queue):
    """If the master stops reading, the worker goes on serving; the next flush carries everything."""
    r = reporter(queue)

    def flood():
        sent = 0
        for _ in range(20_000):
            r.record(200, 1, 1, 0.001)
            if r.flush():
                sent += 1
        return sent

    sent = finishes(flood)
    assert r.dropped_flushes > 0
    messages = finishes(drain, queue, 100_000)
    assert not messages.broken and len(messages) == sent
    assert r.flush()
    last = drain(queue)[-1]
    assert last.requests == 20_000 and last.dropped_flushes == r.dropped_flushes


def test_threaded_reporter_counts_every_request(queue):
    r = reporter(queue, threaded=True)

    def work():
        for _ in range(5_000):
            r.record(200, 1, 1, 0.002)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        r.flush()  # flushing while threads record must see consistent totals
        drained = drain(queue)
        assert all(sum(m.status) == m.requests == sum(m.histogram) for m in drained)
    for thread in threads:
        thread.join()
    message = r.message()
    assert message.requests == 20_000 == sum(message.histogram) == message.status[1]
    assert message.bytes_in == 20_000


# -- queues -------------------------------------------------------------------------------


def test_queue_fd_is_the_non_blocking_read_end(queue):
    fd = queue_fd(queue)
    assert fd == queue._reader.fileno()
    assert os.get_blocking(fd) is False
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    assert poller.poll(0) == []
    reporter(queue).flush()
    assert poller.poll(0) == [(fd, select.POLLIN)]
    drain(queue)
    assert poller.poll(0) == []


def test_new_queue_starts_no_helper_process():
    """Under the fork context the queue's locks need no resource tracker process."""
    made = new_queue()
    try:
        assert getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None) is None
        assert psutil.Process().children() == []
    finally:
        made.close()


def test_drain_reports_a_torn_message_without_waiting(queue):
    """A header promising more bytes than arrived must fail fast, not wait for the rest."""
    os.write(queue._writer.fileno(), struct.pack("!i", 500) + b"x" * 10)
    found = finishes(drain, queue)
    assert found == [] and "BlockingIOError" in found.broken


def test_drain_reports_garbage_as_broken(queue):
    junk = b"not a pickle"
    os.write(queue._writer.fileno(), struct.pack("!i", len(junk)) + junk)
    found = finishes(drain, queue)
    assert found == [] and found.broken


def test_drain_reports_eof_as_broken(queue):
    reporter(queue).flush()
    queue._writer.close()  # every write end gone, as after the worker died and the master let go
    found = finishes(drain, queue)
    assert len(found) == 1 and "EOFError" in found.broken


def test_drain_stops_at_its_limit(queue):
    r = reporter(queue)
    for _ in range(7):
        r.record(200, 0, 0, 0.0)
        r.flush()
    assert len(drain(queue, limit=5)) == 5
    assert len(drain(queue, limit=5)) == 2


def _child_reports_until_killed(queue, slot: int) -> None:
    """In a forked child: count and flush as fast as possible, until SIGKILL arrives."""
    code = 1
    try:
        r = Reporter(queue, pid=os.getpid(), slot=slot, generation=1)
        for _ in range(10_000_000):
            r.record(200, 10, 20, 0.003)
            r.flush()
        code = 0
    finally:
        os._exit(code)


def test_sigkill_mid_put_never_stalls_the_reader():
    """50 workers SIGKILLed at random moments: every drain returns at once with whole messages."""
    aggregator = Aggregator()
    rng = random.Random(1234)
    last_total = 0
    for attempt in range(50):
        queue = new_queue()
        pid = os.fork()
        if pid == 0:
            _child_reports_until_killed(queue, slot=attempt % 4)
        aggregator.add_worker(pid, pid=pid, slot=attempt % 4, generation=1)
        kill_at = time.monotonic() + rng.uniform(0.0, 0.02)
        seen = []
        while time.monotonic() < kill_at:  # read while it writes, as the master's ticks would
            batch = finishes(drain, queue)
            assert not batch.broken
            seen += batch
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        batch = finishes(drain, queue, 100_000)
        assert not batch.broken, batch.broken
        seen += batch
        assert all(isinstance(m, CountersFlushed) and m.pid == pid for m in seen)
        assert [m.requests for m in seen] == sorted(m.requests for m in seen)
        for message in seen:
            aggregator.ingest(pid, message)
        aggregator.worker_exited(pid, "killed_timeout")
        total = aggregator.snapshot()["totals"]["requests"]
        assert total >= last_total
        last_total = total
        queue.close()
    assert aggregator.snapshot()["counters"]["worker_exits"]["killed_timeout"] == 50

    # The next worker's fresh queue works as if nothing had happened.
    queue = new_queue()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            r = Reporter(queue, pid=os.getpid(), slot=0, generation=2)
            for _ in range(10):
                r.record(200, 1, 1, 0.001)
            code = 0 if r.flush() else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    batch = finishes(drain, queue)
    assert not batch.broken and [m.requests for m in batch] == [10]
    queue.close()
