"""Stats counting and shipping on real queues, real forks and real sockets.

The promise under test: a worker's reporting costs the master nothing it has
to wait for, a worker killed at any moment (even mid-put) breaks nothing but
its own queue, and server-wide counters only ever grow.
"""

from __future__ import annotations

import json
import math
import multiprocessing.resource_tracker
import os
import pickle
import random
import select
import signal
import socket
import struct
import threading
import time
from multiprocessing.reduction import ForkingPickler

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkserver.sockets import bind, parse_address
from forkserver.stats import (
    EXTRA_FIELDS,
    HISTOGRAM_BUCKETS,
    STATUS_CLASSES,
    Aggregator,
    CountersFlushed,
    ProcessSampler,
    Reporter,
    accept_queue_depth,
    drain,
    estimate_quantile,
    listener_stats,
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


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def queue():
    made = new_queue()
    yield made
    made.close()


def reporter(queue, **kw) -> Reporter:
    return Reporter(queue, pid=os.getpid(), slot=kw.pop("slot", 0), generation=kw.pop("generation", 1), **kw)


def counters(pid=1, requests=0, status=(0, 0, 0, 0, 0), bytes_in=0, bytes_out=0, histogram=None,
             duration_sum=0.0, cpu_seconds=0.0) -> CountersFlushed:
    histogram = histogram or tuple([requests] + [0] * (len(HISTOGRAM_BUCKETS) - 1))
    return CountersFlushed(pid, requests, tuple(status), bytes_in, bytes_out, tuple(histogram), duration_sum,
                           cpu_seconds, 0)


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


# -- the master side ------------------------------------------------------------------------------


def test_estimate_quantile_interpolates_within_buckets():
    counts = [0] * len(HISTOGRAM_BUCKETS)
    assert estimate_quantile(0.5, counts) is None
    counts[HISTOGRAM_BUCKETS.index(0.1)] = 10  # ten requests between 50ms and 100ms
    assert estimate_quantile(0.5, counts) == pytest.approx(0.075)
    assert estimate_quantile(1.0, counts) == pytest.approx(0.1)
    overflow = [0] * len(HISTOGRAM_BUCKETS)
    overflow[-1] = 3
    assert estimate_quantile(0.99, overflow) == HISTOGRAM_BUCKETS[-2]


def test_counters_stay_monotonic_across_worker_restarts():
    agg = Aggregator()
    agg.add_worker("a", pid=10, slot=0, generation=1)
    agg.ingest("a", counters(pid=10, requests=7, status=(0, 7, 0, 0, 0), bytes_in=70, cpu_seconds=1.5))
    before = agg.snapshot()
    agg.worker_exited("a", "died")
    agg.note_respawn()
    agg.add_worker("b", pid=11, slot=0, generation=1)
    after_restart = agg.snapshot()
    agg.ingest("b", counters(pid=11, requests=2, status=(0, 1, 0, 0, 1), bytes_in=5))
    later = agg.snapshot()
    for doc in (before, after_restart, later):
        assert doc["slots"][0]["slot"] == 0
    assert [d["totals"]["requests"] for d in (before, after_restart, later)] == [7, 7, 9]
    assert [d["slots"][0]["requests"] for d in (before, after_restart, later)] == [7, 7, 9]
    assert later["slots"][0]["status"] == {"1xx": 0, "2xx": 8, "3xx": 0, "4xx": 0, "5xx": 1}
    assert later["slots"][0]["cpu_seconds"] == 1.5
    assert later["totals"]["bytes_in"] == 75
    assert later["counters"]["workers_respawned"] == 1
    assert later["counters"]["worker_exits"]["died"] == 1
    assert [w["pid"] for w in later["workers"]] == [11]


def test_ingest_ignores_strangers_junk_and_regressions():
    agg = Aggregator()
    agg.add_worker(1, pid=1, slot=0, generation=1)
    agg.ingest(1, counters(requests=5))
    agg.ingest(1, counters(requests=3))  # cannot happen on one pipe; must not undo counts if it does
    agg.ingest(1, ("not", "a", "message"))
    agg.ingest(2, counters(requests=100))  # unknown worker (already gone)
    assert agg.snapshot()["totals"]["requests"] == 5


def test_states_exits_reloads_and_bad_names():
    agg = Aggregator()
    for key in range(4):
        agg.add_worker(key, pid=100 + key, slot=key, generation=1)
    agg.set_state(0, "idle")
    agg.set_state(1, "busy")
    agg.set_state(2, "retiring")
    agg.note_reload()
    agg.worker_exited(3, "recycled")
    agg.worker_exited(3, "recycled")  # twice: the second is a no-op
    counters_doc = agg.snapshot()["counters"]
    assert counters_doc["workers_alive"] == 3
    assert counters_doc["workers_by_state"] == {"booting": 0, "idle": 1, "busy": 1, "retiring": 1}
    assert counters_doc["worker_exits"] == {"exited": 0, "died": 0, "killed_timeout": 0, "recycled": 1}
    assert counters_doc["reloads"] == 1
    with pytest.raises(ValueError):
        agg.set_state(0, "sleeping")
    with pytest.raises(ValueError):
        agg.worker_exited(0, "vanished")


def test_snapshot_is_strict_json_with_extras_and_ages():
    clock = Clock()
    agg = Aggregator(clock=clock)
    agg.add_worker("w", pid=42, slot=1, generation=3)
    clock.now += 2.0
    agg.ingest("w", counters(pid=42, requests=4, status=(0, 4, 0, 0, 0), duration_sum=0.2))
    clock.now += 0.5
    agg.mark_broken("w", "EOFError: ")
    extra = {"w": {"memory_uss_bytes": 1 << 20, "memory_pss_bytes": 2 << 20, "cpu_seconds": 0.25,
                   "heartbeat_age_seconds": 0.1, "state": "busy", "surprise": "ignored",
                   "current_request": {"method": "GET", "path": "/slow", "elapsed_seconds": 1.5}}}
    doc = agg.snapshot(extra, [{"address": "http://127.0.0.1:8000", "accept_queue": 3}])
    json.dumps(doc, allow_nan=False)  # no NaN/inf anywhere
    assert doc["uptime_seconds"] == 2.5
    assert len(doc["histogram_bounds_seconds"]) == len(HISTOGRAM_BUCKETS) - 1
    (worker,) = doc["workers"]
    assert (worker["pid"], worker["slot"], worker["generation"], worker["state"]) == (42, 1, 3, "busy")
    assert worker["age_seconds"] == 2.5 and worker["report_age_seconds"] == 0.5
    assert worker["current_request"]["path"] == "/slow"
    assert worker["memory_pss_bytes"] == 2 << 20 and worker["cpu_seconds"] == 0.25
    assert worker["stats_error"] == "EOFError: "
    assert "surprise" not in worker
    assert set(EXTRA_FIELDS) <= set(worker)
    assert worker["p50_seconds"] == pytest.approx(0.0005)
    assert doc["listeners"] == [{"address": "http://127.0.0.1:8000", "accept_queue": 3}]


def test_percentiles_combine_across_workers():
    agg = Aggregator()
    fast = [0] * len(HISTOGRAM_BUCKETS)
    slow = [0] * len(HISTOGRAM_BUCKETS)
    fast[0] = 90
    slow[HISTOGRAM_BUCKETS.index(1.0)] = 10
    agg.add_worker(1, pid=1, slot=0, generation=1)
    agg.add_worker(2, pid=2, slot=1, generation=1)
    agg.ingest(1, counters(requests=90, histogram=fast))
    agg.ingest(2, counters(requests=10, histogram=slow))
    totals = agg.snapshot()["totals"]
    assert totals["histogram"] == [a + b for a, b in zip(fast, slow)]
    assert totals["p50_seconds"] < 0.001
    assert 0.5 < totals["p99_seconds"] <= 1.0


def test_prometheus_text_parses_and_follows_the_conventions():
    agg = Aggregator()
    agg.add_worker(1, pid=1, slot=0, generation=1)
    histogram = [1] * len(HISTOGRAM_BUCKETS)
    agg.ingest(1, counters(requests=len(histogram), status=(0, len(histogram), 0, 0, 0), histogram=histogram,
                           duration_sum=3.5))
    listeners = [{"address": 'unix:/tmp/we"ird\\path', "accept_queue": 2}, {"address": "unix:/x", "accept_queue": None}]
    text = agg.prometheus(agg.snapshot({1: {"memory_uss_bytes": 5}}, listeners))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(name.startswith("forkserver_") for name in families)
    assert all(f.documentation for f in families.values())
    requests = families["forkserver_requests"]
    assert requests.type == "counter"
    assert {(s.labels["worker"], s.labels["status_class"]) for s in requests.samples} == \
        {("0", c) for c in STATUS_CLASSES}
    duration = families["forkserver_request_duration_seconds"]
    buckets = [s for s in duration.samples if s.name.endswith("_bucket")]
    assert [s.value for s in buckets] == list(range(1, len(HISTOGRAM_BUCKETS) + 1))
    assert buckets[-1].labels["le"] == "+Inf"
    count = next(s for s in duration.samples if s.name.endswith("_count"))
    assert count.value == buckets[-1].value
    (queue_sample,) = families["forkserver_listener_accept_queue"].samples
    assert queue_sample.labels["listener"] == 'unix:/tmp/we"ird\\path' and queue_sample.value == 2
    (uss,) = families["forkserver_worker_memory_uss_bytes"].samples
    assert uss.labels == {"worker": "0", "pid": "1"}
    assert families["forkserver_worker_memory_pss_bytes"].samples == []  # unknown: no sample, not a zero


# -- readings from the kernel -------------------------------------------------------------------------


def _connect_many(address, family, count):
    clients = []
    for _ in range(count):
        client = socket.socket(family, socket.SOCK_STREAM)
        client.settimeout(DEADLINE)
        client.connect(address)
        clients.append(client)
    return clients


def _wait_for_depth(sock, expected):
    deadline = time.monotonic() + DEADLINE
    while accept_queue_depth(sock) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return accept_queue_depth(sock)


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_accept_queue_depth_counts_unaccepted_connections(family, host):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = socket.socket(family, socket.SOCK_STREAM)
    try:
        try:
            server.bind((host, 0))
        except OSError:
            pytest.skip(f"cannot bind {host}")
        server.listen(16)
        assert accept_queue_depth(server) == 0
        clients = _connect_many(server.getsockname()[:2], family, 5)
        assert _wait_for_depth(server, 5) == 5
        for _ in range(2):
            server.accept()[0].close()
        assert accept_queue_depth(server) == 3
        for client in clients:
            client.close()
    finally:
        server.close()


def test_accept_queue_depth_under_reuse_port_sums_the_workers_sockets():
    """The master's placeholder is bound but not listening; the workers' own sockets hold the queues."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    workers = []
    try:
        for _ in range(2):
            own = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            own.bind(holder.getsockname())
            own.listen(16)
            workers.append(own)
        assert accept_queue_depth(holder) == 0
        clients = _connect_many(holder.getsockname(), socket.AF_INET, 6)
        assert _wait_for_depth(holder, 6) == 6
        assert sum(accept_queue_depth(w) for w in workers) == 6
        for client in clients:
            client.close()
    finally:
        for sock in [holder, *workers]:
            sock.close()


def test_accept_queue_depth_is_none_where_the_kernel_does_not_tell(tmp_path):
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unbound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        unix.bind(str(tmp_path / "s.sock"))
        unix.listen(4)
        assert accept_queue_depth(unix) is None
        assert accept_queue_depth(udp) is None
        assert accept_queue_depth(unbound) is None
    finally:
        for sock in (unix, udp, unbound):
            sock.close()


def test_listener_stats_describes_real_listeners(tmp_path):
    listeners = [bind(parse_address(text), backlog=8, reuse_port=False, unix_mode=0o600)
                 for text in ("127.0.0.1:0", f"unix:{tmp_path / 'app.sock'}")]
    try:
        clients = _connect_many(listeners[0].sock.getsockname(), socket.AF_INET, 2)
        _wait_for_depth(listeners[0].sock, 2)
        tcp, unix = listener_stats(listeners)
        assert tcp["address"].startswith("http://127.0.0.1:") and tcp["accept_queue"] == 2
        assert unix == {"address": f"unix:{tmp_path / 'app.sock'}", "accept_queue": None}
        for client in clients:
            client.close()
    finally:
        for listener in listeners:
            listener.close()


def test_process_sampler_reads_a_live_child_and_caches_it():
    clock = Clock()
    sampler = ProcessSampler(max_age=1.0, clock=clock)
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(DEADLINE)
        finally:
            os._exit(0)
    try:
        reading = sampler.read(pid)
        assert reading["memory_uss_bytes"] > 0 and reading["memory_pss_bytes"] > 0
        assert reading["cpu_seconds"] >= 0
        assert sampler.read(pid) is reading  # cached
        clock.now += 1.0
        assert sampler.read(pid) is not reading
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    sampler.forget(pid)
    assert sampler.read(pid) == {}  # reaped: gone
