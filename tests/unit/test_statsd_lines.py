"""StatsD lines from aggregated snapshots, their packing, and a sender that never blocks."""

from __future__ import annotations

import logging
import socket

import pytest

from forkserver.master.aggregator import Aggregator
from forkserver.errors import ConfigError
from forkserver.sockets import parse_statsd_address
from forkserver.stats import HISTOGRAM_BUCKETS, CountersFlushed
from forkserver.master.statsd import (
    MAX_TIMINGS,
    StatsdExporter,
    datagrams,
    metric_lines,
    normal_prefix,
    timing_lines,
)


def report(requests: int, status: tuple[int, ...], histogram: list[int]) -> CountersFlushed:
    histogram = histogram + [0] * (len(HISTOGRAM_BUCKETS) - len(histogram))
    return CountersFlushed(7, requests, status, 10 * requests, 100 * requests, tuple(histogram), 0.01, 0.0, 0)


@pytest.mark.parametrize("text, expected", [
    ("localhost", (socket.AF_UNSPEC, ("localhost", 8125))),
    ("10.0.0.5:9125", (socket.AF_UNSPEC, ("10.0.0.5", 9125))),
    ("[::1]:8126", (socket.AF_INET6, ("::1", 8126))),
    ("[::1]", (socket.AF_INET6, ("::1", 8125))),
    ("unix:/run/statsd.sock", (socket.AF_UNIX, "/run/statsd.sock")),
    ("unix:///run/statsd.sock", (socket.AF_UNIX, "/run/statsd.sock")),
])
def test_addresses_in_gunicorn_forms(text, expected):
    assert parse_statsd_address(text) == expected


@pytest.mark.parametrize("text", ["host:port", "host:0", "host:70000", ":8125", "[::1", "unix:", "a:1:2"])
def test_bad_addresses_say_why(text):
    with pytest.raises(ValueError):
        parse_statsd_address(text)


def test_prefix_gets_one_dot():
    assert [normal_prefix(p) for p in ("", "app", "app.", "app..", "a.b")] == ["", "app.", "app.", "app.", "a.b."]


def test_counters_are_deltas_between_snapshots_and_gauges_are_levels():
    stats = Aggregator()
    stats.add_worker(7, pid=7, slot=0, generation=1)
    stats.set_state(7, "busy")
    stats.ingest(7, report(3, (0, 3, 0, 0, 0), [3]))
    first = stats.snapshot()
    stats.ingest(7, report(5, (0, 4, 0, 1, 0), [3, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]))
    stats.note_reload()
    second = stats.snapshot()
    lines = metric_lines(first, second, "app.")
    assert "app.gunicorn.requests:2|c" in lines
    assert "app.gunicorn.request.status.2xx:1|c" in lines and "app.gunicorn.request.status.4xx:1|c" in lines
    assert not any(".status.5xx" in line for line in lines), "a counter that did not move is not sent"
    assert {"app.forkserver.bytes_in:20|c", "app.forkserver.bytes_out:200|c", "app.forkserver.reloads:1|c",
            "app.gunicorn.workers:1|g", "app.forkserver.workers.busy:1|g"} <= set(lines)
    # Only the two new requests are timed: one in (1, 2.5] ms, one slower than the last bound.
    assert [line for line in lines if "|ms" in line] == ["app.gunicorn.request.duration:1.75|ms",
                                                         "app.gunicorn.request.duration:10000|ms"]
    assert "app.gunicorn.requests:3|c" in metric_lines(None, first, "app.")


def test_many_requests_are_timed_by_a_proportional_sample_with_its_rate():
    lines = timing_lines("d", [3000, 1000])
    assert len(lines) == MAX_TIMINGS
    assert lines.count("d:0.5|ms|@0.025") == 75 and lines.count("d:1.75|ms|@0.025") == 25


def test_a_rare_slow_request_keeps_its_line_and_the_counts_add_up():
    histogram = [9990] + [0] * 12 + [3]  # three requests over 10 s among many fast ones
    lines = timing_lines("d", histogram)
    slow = [line for line in lines if line.startswith("d:10000|ms")]
    assert slow == ["d:10000|ms|@0.3333"]
    represented = sum(1 / float(line.partition("|@")[2] or 1) for line in lines)
    assert round(represented) == sum(histogram)


def test_datagrams_hold_whole_lines_under_the_limit():
    lines = [f"metric.{i}:{i}|c" for i in range(500)]
    packed = datagrams(lines, limit=200)
    assert all(len(datagram) <= 200 for datagram in packed)
    assert b"\n".join(packed).decode().split("\n") == lines


def test_a_refused_port_costs_one_log_line_and_never_blocks(caplog):
    gone = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % gone.getsockname()[1]
    gone.close()  # nothing listens there now: the kernel answers with ICMP port unreachable
    exporter = StatsdExporter(address, "")
    try:
        snapshot = Aggregator().snapshot()
        with caplog.at_level(logging.WARNING, logger="forkserver"):
            for _ in range(5):
                exporter.send(snapshot)
        assert exporter.failed >= 2
        assert len([r for r in caplog.records if "statsd" in r.getMessage()]) == 1
    finally:
        exporter.finish(snapshot)
    assert f"{exporter.failed} datagram(s) to {address} could not be sent" in caplog.records[-1].getMessage()


def test_an_unresolvable_host_is_a_config_error():
    with pytest.raises(ConfigError, match="statsd_host"):
        StatsdExporter("no-such-host.invalid:8125", "")


def test_the_masters_warnings_and_errors_are_counted_as_gunicorn_counts_them():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    exporter = StatsdExporter("127.0.0.1:%d" % receiver.getsockname()[1], "p")
    log = logging.getLogger("forkserver")
    try:
        log.warning("a worker died")
        log.critical("a worker timed out")
        try:
            raise OSError("boom")
        except OSError:
            log.exception("a hook failed")
        log.info("not counted")
        exporter.send(Aggregator().snapshot())
        lines = receiver.recv(65536).decode().split("\n")
        assert {"p.gunicorn.log.warning:1|c", "p.gunicorn.log.critical:1|c", "p.gunicorn.log.exception:1|c"} <= set(lines)
        log.warning("once more")
        exporter.send(Aggregator().snapshot())
        assert "p.gunicorn.log.warning:1|c" in receiver.recv(65536).decode().split("\n")
    finally:
        exporter.close()
        receiver.close()
    assert exporter.log_counts not in log.handlers


def test_a_unix_datagram_socket_receives_the_lines(tmp_path):
    path = str(tmp_path / "statsd.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(5)
    exporter = StatsdExporter(f"unix://{path}", "")
    try:
        exporter.send(Aggregator().snapshot())
        assert "gunicorn.workers:0|g" in receiver.recv(65536).decode().split("\n")
    finally:
        exporter.close()
        receiver.close()


def test_saturation_goes_as_gauges_and_busy_time_as_whole_milliseconds():
    agg = Aggregator()
    agg.add_worker(7, pid=7, slot=0, generation=1)
    agg.set_state(7, "busy")
    listeners = [{"address": "fd://3 (http://127.0.0.1:8000)", "accept_queue": 2, "accept_queue_max": 128,
                  "accept_queue_peak": 40},
                 {"address": "unix:/run/app.sock", "accept_queue": None, "accept_queue_max": None,
                  "accept_queue_peak": None}]
    first = agg.snapshot({7: {"threads": 4, "requests_in_flight": 3, "in_flight_seconds": 1.2345}}, listeners)
    lines = metric_lines(None, first, "app.")
    assert {"app.forkserver.threads:4|g", "app.forkserver.requests_in_flight:3|g",
            "app.forkserver.threads_busy_ratio:0.75|g", "app.forkserver.thread_busy_ms:1234|c",
            "app.forkserver.listener.127_0_0_1_8000.accept_queue:2|g",
            "app.forkserver.listener.127_0_0_1_8000.accept_queue_max:128|g",
            "app.forkserver.listener.127_0_0_1_8000.accept_queue_peak:40|g"} <= set(lines)
    assert not any("unix" in line for line in lines)  # the kernel tells nothing: no line, not a zero
    second = agg.snapshot({7: {"threads": 4, "requests_in_flight": 3, "in_flight_seconds": 2.0}}, listeners)
    assert "forkserver.thread_busy_ms:766|c" in metric_lines(first, second, "")  # 2000 - 1234: nothing lost
    assert not any("thread_busy_ms" in line for line in metric_lines(second, second, ""))
