"""The master's sums: monotonic across restarts, percentiles across workers, strict JSON and Prometheus text."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkserver.master.aggregator import EXTRA_FIELDS, Aggregator, estimate_quantile
from forkserver.stats import HISTOGRAM_BUCKETS, STATUS_CLASSES, CountersFlushed


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def counters(pid=1, requests=0, status=(0, 0, 0, 0, 0), bytes_in=0, bytes_out=0, histogram=None,
             duration_sum=0.0, cpu_seconds=0.0) -> CountersFlushed:
    histogram = histogram or tuple([requests] + [0] * (len(HISTOGRAM_BUCKETS) - 1))
    return CountersFlushed(pid, requests, tuple(status), bytes_in, bytes_out, tuple(histogram), duration_sum,
                           cpu_seconds, 0)


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


def test_ingest_ignores_strangers_and_junk_and_refuses_regressions():
    agg = Aggregator()
    agg.add_worker(1, pid=1, slot=0, generation=1)
    agg.ingest(1, counters(requests=5, bytes_out=50))
    # Cannot happen on one pipe (a lie, then): must not undo counts, and is refused loudly.
    with pytest.raises(ValueError, match="lower"):
        agg.ingest(1, counters(requests=3))
    with pytest.raises(ValueError, match="lower"):
        agg.ingest(1, counters(requests=6, bytes_out=10))  # more requests, fewer bytes
    agg.ingest(1, ("not", "a", "message"))
    agg.ingest(2, counters(requests=100))  # unknown worker (already gone)
    doc = agg.snapshot()
    assert doc["totals"]["requests"] == 5 and doc["totals"]["bytes_out"] == 50


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
    assert counters_doc["workers_by_state"] == {"booting": 0, "idle": 1, "busy": 1, "retiring": 1, "mold": 0}
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


def test_lost_log_lines_and_rejected_messages_only_ever_grow():
    """Workers' lost log lines stay counted after they exit; the master's own are added; so are rejects."""
    agg = Aggregator()
    agg.add_worker(1, pid=1, slot=0, generation=1)
    agg.add_worker(2, pid=2, slot=1, generation=1)
    agg.ingest(1, counters(1)._replace(dropped_log_lines=5))
    agg.ingest(2, counters(2)._replace(dropped_log_lines=1))
    agg.note_rejected(2)
    agg.note_rejected(99)  # a worker already forgotten still counts server-wide
    doc = agg.snapshot(master_log_lines_dropped=3)
    assert doc["counters"]["log_lines_dropped"] == 9 and doc["counters"]["stats_messages_rejected"] == 2
    assert [(w["dropped_log_lines"], w["stats_messages_rejected"]) for w in doc["workers"]] == [(5, 0), (1, 1)]
    agg.worker_exited(1, "died")
    assert agg.snapshot(master_log_lines_dropped=3)["counters"]["log_lines_dropped"] == 9
    text = agg.prometheus(agg.snapshot(master_log_lines_dropped=3))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["forkserver_log_lines_dropped"].samples[0].value == 9
    assert families["forkserver_stats_messages_rejected"].samples[0].value == 2


def test_busy_thread_seconds_count_requests_in_flight_and_never_go_down():
    """A long request shows while it runs; the gap before the worker reports its end is not a dip."""
    agg = Aggregator()
    agg.add_worker(1, pid=1, slot=0, generation=1)
    agg.set_state(1, "busy")
    agg.ingest(1, counters(requests=2, duration_sum=1.0))

    def busy(in_flight_seconds: float) -> tuple[float, float, float]:
        doc = agg.snapshot({1: {"threads": 4, "requests_in_flight": 1 if in_flight_seconds else 0,
                                "in_flight_seconds": in_flight_seconds}})
        return (doc["saturation"]["thread_busy_seconds"], doc["slots"][0]["thread_busy_seconds"],
                doc["workers"][0]["thread_busy_seconds"])

    assert busy(2.5) == (3.5, 3.5, 3.5)  # 1 s finished + 2.5 s so far on the one in flight
    assert busy(0.0) == (3.5, 3.5, 3.5)  # it ended, its duration not reported yet: held, not dropped
    agg.ingest(1, counters(requests=3, duration_sum=3.6))  # the report: its whole 2.6 s
    assert busy(0.0) == (3.6, 3.6, 3.6)
    agg.worker_exited(1, "died")
    agg.add_worker(2, pid=2, slot=0, generation=1)
    agg.ingest(2, counters(pid=2, requests=1, duration_sum=0.5))
    doc = agg.snapshot()
    assert doc["slots"][0]["thread_busy_seconds"] == pytest.approx(4.1)  # the slot's series keeps growing
    assert doc["saturation"]["thread_busy_seconds"] == pytest.approx(4.1)


def test_saturation_counts_serving_threads_and_the_busy_ones_of_retiring_workers():
    agg = Aggregator()
    for pid, state in ((1, "busy"), (2, "idle"), (3, "retiring"), (4, "booting")):
        agg.add_worker(pid, pid=pid, slot=pid, generation=1)
        agg.set_state(pid, state)
    extra = {1: {"threads": 4, "requests_in_flight": 4, "in_flight_seconds": 1.0},
             2: {"threads": 4, "requests_in_flight": 0},
             3: {"threads": 4, "requests_in_flight": 2, "in_flight_seconds": 9.0},
             4: {"threads": 4, "requests_in_flight": 0}}
    saturation = agg.snapshot(extra)["saturation"]
    assert saturation == {"threads": 10, "requests_in_flight": 6, "threads_busy_ratio": 0.6,
                          "thread_busy_seconds": 10.0}
    assert Aggregator().snapshot()["saturation"] == {"threads": 0, "requests_in_flight": 0,
                                                      "threads_busy_ratio": 0.0, "thread_busy_seconds": 0.0}


def test_prometheus_saturation_families():
    agg = Aggregator()
    agg.add_worker(1, pid=1, slot=0, generation=1)
    agg.set_state(1, "busy")
    listeners = [{"address": "http://127.0.0.1:8000", "accept_queue": 1, "accept_queue_max": 128,
                  "accept_queue_peak": 9},
                 {"address": "unix:/x", "accept_queue": None, "accept_queue_max": None, "accept_queue_peak": None}]
    text = agg.prometheus(agg.snapshot({1: {"threads": 2, "requests_in_flight": 1, "in_flight_seconds": 0.25}},
                                       listeners))
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {name: [(s.labels, s.value) for s in families[name].samples] for name in families}
    assert value["forkserver_threads"] == [({}, 2)]
    assert value["forkserver_requests_in_flight"] == [({}, 1)]
    assert value["forkserver_threads_busy_ratio"] == [({}, 0.5)]
    assert families["forkserver_thread_busy_seconds"].type == "counter"
    assert value["forkserver_thread_busy_seconds"] == [({"worker": "0"}, 0.25)]
    assert value["forkserver_listener_accept_queue_max"] == [({"listener": "http://127.0.0.1:8000"}, 128)]
    assert value["forkserver_listener_accept_queue_peak"] == [({"listener": "http://127.0.0.1:8000"}, 9)]
