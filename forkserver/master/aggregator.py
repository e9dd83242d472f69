"""The master's sums of what workers' stats messages say, and the /stats document.

The ``Aggregator`` keeps the latest ``CountersFlushed`` per live worker and
folds a dead worker's last one into its slot's retired totals, so every
server-wide and per-slot counter only ever grows.  It reads nothing itself
(``collector.StatsCollector`` does) and serves nothing (``status.py`` does).

Saturation, for autoscalers, comes from two sources.  The master's reading
of each worker's scoreboard says how many threads it has and which run a
request right now (``requests_in_flight``, ``threads_busy_ratio``).  And
``thread_busy_seconds`` is a counter of thread time spent on requests: the
durations of finished requests, which workers report, plus how long each
request in flight has run so far, so that a long request shows while it
runs, not all at once when it ends.  Its ``rate()`` is the number of busy
threads averaged over the whole window, whatever moments the scrapes
happen to look at.  Queue times, which workers report as histograms
(``stats.kernel_wait``, ``proxy.proxy_queue_time``), say how long requests
waited for a worker: the latency that saturation costs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from ..stats import HISTOGRAM_BUCKETS, STATUS_CLASSES, CountersFlushed

WORKER_STATES = ("booting", "idle", "busy", "retiring", "mold")
EXIT_CAUSES = ("exited", "died", "killed_timeout", "recycled")
PERCENTILES = (0.5, 0.9, 0.99)
# Per-worker fields the master may supply to ``snapshot`` from psutil and
# shared memory; anything else in its dicts is ignored, so /stats keeps its schema.
EXTRA_FIELDS = ("state", "current_request", "memory_uss_bytes", "memory_pss_bytes", "memory_shared_bytes",
                "memory_merged_bytes", "cpu_seconds", "heartbeat_age_seconds", "threads", "requests_in_flight", "forked_by")
MASTER_FIELDS = ("memory_uss_bytes", "memory_pss_bytes", "memory_shared_bytes", "memory_merged_bytes",
                 "cpu_seconds")
# A worker's threads are capacity only while it takes connections; a
# retiring worker's busy threads still count, as their requests are served.
SERVING_STATES = ("idle", "busy")
SCHEMA_VERSION = 1


class Totals:
    """Mutable sums of CountersFlushed messages."""

    def __init__(self) -> None:
        self.requests = 0
        self.status = [0] * len(STATUS_CLASSES)
        self.bytes_in = 0
        self.bytes_out = 0
        self.histogram = [0] * len(HISTOGRAM_BUCKETS)
        self.duration_sum = 0.0
        self.cpu_seconds = 0.0
        self.queue = QueueTimes()
        self.proxy_queue = QueueTimes()

    def merge(self, other: CountersFlushed | Totals | None) -> None:
        """Add a worker's message, or another set of totals, into these."""
        if other is None:
            return
        self.requests += other.requests
        self.status = [a + b for a, b in zip(self.status, other.status)]
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram)]
        self.duration_sum += other.duration_sum
        self.cpu_seconds += other.cpu_seconds
        if isinstance(other, Totals):
            self.queue.add(other.queue.histogram, other.queue.sum)
            self.proxy_queue.add(other.proxy_queue.histogram, other.proxy_queue.sum)
        else:
            self.queue.add(other.queue_histogram, other.queue_sum)
            self.proxy_queue.add(other.proxy_queue_histogram, other.proxy_queue_sum)

    def copy(self) -> Totals:
        twin = Totals()
        twin.merge(self)
        return twin

    def as_json(self, *, histogram: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "requests": self.requests,
            "status": dict(zip(STATUS_CLASSES, self.status)),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "cpu_seconds": round(self.cpu_seconds, 6),
        }
        if histogram:
            doc["histogram"] = list(self.histogram)
            doc["duration_sum_seconds"] = round(self.duration_sum, 6)
            doc.update(percentiles(self.histogram))
            doc["queue_time"] = self.queue.as_json()
            doc["proxy_queue_time"] = self.proxy_queue.as_json()
        return doc


class QueueTimes:
    """A histogram of queue times (on ``HISTOGRAM_BUCKETS``) and their sum, added up over workers."""

    def __init__(self) -> None:
        self.histogram = [0] * len(HISTOGRAM_BUCKETS)
        self.sum = 0.0

    def add(self, histogram: Sequence[int], seconds: float) -> None:
        self.histogram = [a + b for a, b in zip(self.histogram, histogram)]
        self.sum += seconds

    def as_json(self) -> dict[str, Any]:
        return {"count": sum(self.histogram), "histogram": list(self.histogram),
                "sum_seconds": round(self.sum, 6), **percentiles(self.histogram)}


def estimate_quantile(q: float, counts: Sequence[int]) -> float | None:
    """Estimate the q-quantile of durations from bucket counts (None when empty).

    Interpolates linearly inside the bucket, as Prometheus' histogram_quantile
    does; anything in the overflow bucket is reported as the last finite bound.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            lower = HISTOGRAM_BUCKETS[index - 1] if index else 0.0
            upper = HISTOGRAM_BUCKETS[index]
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / count
        below += count
    return HISTOGRAM_BUCKETS[-2]


def percentiles(counts: Sequence[int]) -> dict[str, float | None]:
    """p50/p90/p99 in seconds, keyed ``p50_seconds`` etc."""
    found = {}
    for q in PERCENTILES:
        value = estimate_quantile(q, counts)
        found[f"p{round(q * 100)}_seconds"] = None if value is None else round(value, 6)
    return found


def _saturation(workers: Sequence[dict[str, Any]], busy_seconds: float) -> dict[str, Any]:
    """The server-wide saturation figures from the workers' entries of a snapshot.

    ``threads`` is what can serve now: every thread of the workers taking
    connections, plus the busy ones of workers that are retiring, so the
    ratio stays within 0..1 through a reload.  A worker not yet booted has none.
    """
    in_flight = threads = 0
    for worker in workers:
        running = worker["requests_in_flight"] or 0
        in_flight += running
        if worker["state"] in SERVING_STATES:
            threads += worker["threads"] or 0
        else:
            threads += running
    return {
        "threads": threads,
        "requests_in_flight": in_flight,
        "threads_busy_ratio": round(in_flight / threads, 6) if threads else 0.0,
        "thread_busy_seconds": round(busy_seconds, 6),
    }


def _never_less(new: CountersFlushed, old: CountersFlushed) -> bool:
    """Is every counter of ``new`` at least what it was in ``old``?"""
    return (new.requests >= old.requests and new.bytes_in >= old.bytes_in and new.bytes_out >= old.bytes_out
            and new.duration_sum >= old.duration_sum and new.cpu_seconds >= old.cpu_seconds
            and new.dropped_flushes >= old.dropped_flushes and new.dropped_log_lines >= old.dropped_log_lines
            and new.queue_sum >= old.queue_sum and new.proxy_queue_sum >= old.proxy_queue_sum
            and all(a >= b for a, b in zip(new.status, old.status))
            and all(a >= b for a, b in zip(new.histogram + new.queue_histogram + new.proxy_queue_histogram,
                                           old.histogram + old.queue_histogram + old.proxy_queue_histogram)))


class _Worker:
    """The Aggregator's record of one live worker."""

    def __init__(self, pid: int, slot: int, generation: int, started_at: float) -> None:
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.started_at = started_at
        self.state = "booting"
        self.last: CountersFlushed | None = None
        self.reported_at: float | None = None
        self.broken = ""
        self.rejected = 0  # messages on its channel that failed validation
        self.busy_seconds = 0.0  # thread_busy_seconds as last shown: never shown lower

    def update_busy(self, in_flight_seconds: float) -> float:
        """Thread-seconds on requests so far: the finished ones' durations plus the running ones' ages.

        The running requests' ages move into the durations only when the
        worker's next report arrives (up to a second after they end), so in
        between the sum can dip; what was shown once is kept instead, so the
        counter never goes down and the dip is made up by that report.
        (A finished request's duration is at least the age its scoreboard
        slot showed: it is timed from before the app is called.)
        """
        finished = self.last.duration_sum if self.last is not None else 0.0
        self.busy_seconds = max(self.busy_seconds, finished + in_flight_seconds)
        return self.busy_seconds


class Aggregator:
    """The master's sums: latest counters per live worker plus everything retired.

    Counters are kept per slot as well as server-wide, so a series labelled
    ``worker="3"`` keeps growing across the restarts of slot 3.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started_at = clock()
        self.started_at_unix = time.time()
        self.workers: dict[Hashable, _Worker] = {}
        self.retired: dict[int, Totals] = {}  # slot -> counters of its dead workers
        self.retired_busy: dict[int, float] = {}  # slot -> thread_busy_seconds of its dead workers
        self.exits = dict.fromkeys(EXIT_CAUSES, 0)
        self.respawns = 0
        self.reloads = 0
        self.rejected = 0  # stats messages dropped as malformed, all workers ever
        self.retired_log_lines_dropped = 0  # log lines lost by workers that are gone

    def add_worker(self, key: Hashable, *, pid: int, slot: int, generation: int) -> None:
        """Start tracking a freshly forked worker, in state ``booting``."""
        self.workers[key] = _Worker(pid, slot, generation, self.clock())

    def ingest(self, key: Hashable, message: object) -> None:
        """Take a worker's latest totals; messages for unknown workers or of a wrong type are ignored.

        Raises ValueError for totals below the last ones: every counter only
        grows, and a worker's messages arrive in order, so that is a lie.
        """
        worker = self.workers.get(key)
        if worker is None or not isinstance(message, CountersFlushed):
            return
        if worker.last is not None and not _never_less(message, worker.last):
            raise ValueError("totals lower than the worker's previous ones")
        worker.last = message
        worker.reported_at = self.clock()

    def note_rejected(self, key: Hashable) -> None:
        """Count a message from a worker that was dropped as malformed."""
        self.rejected += 1
        worker = self.workers.get(key)
        if worker is not None:
            worker.rejected += 1

    def mark_broken(self, key: Hashable, reason: str) -> None:
        """Note that a worker's queue failed; its last good totals still count."""
        worker = self.workers.get(key)
        if worker is not None:
            worker.broken = reason

    def set_state(self, key: Hashable, state: str) -> None:
        """Record ``booting``, ``idle``, ``busy``, ``retiring`` or ``mold`` (forkserver.refork)."""
        if state not in WORKER_STATES:
            raise ValueError(f"unknown worker state {state!r}")
        worker = self.workers.get(key)
        if worker is not None:
            worker.state = state

    def worker_exited(self, key: Hashable, cause: str) -> None:
        """Forget a dead worker, keeping its last totals in its slot's retired counters."""
        if cause not in EXIT_CAUSES:
            raise ValueError(f"unknown exit cause {cause!r}")
        worker = self.workers.pop(key, None)
        if worker is None:
            return
        self.retired.setdefault(worker.slot, Totals()).merge(worker.last)
        self.retired_busy[worker.slot] = self.retired_busy.get(worker.slot, 0.0) + worker.update_busy(0.0)
        if worker.last is not None:
            self.retired_log_lines_dropped += worker.last.dropped_log_lines
        self.exits[cause] += 1

    def note_reload(self) -> None:
        """Count a reload (HUP) the master started."""
        self.reloads += 1

    def note_respawn(self) -> None:
        """Count a worker started to replace one that ended (not a first start, not a reload)."""
        self.respawns += 1

    def snapshot(self, extra_workers_info: dict[Hashable, dict[str, Any]] | None = None,
                 listeners: Sequence[dict[str, Any]] = (), master_log_lines_dropped: int = 0,
                 master: dict[str, Any] | None = None) -> dict[str, Any]:
        """Return the /stats document (schema: docs/stats.md); plain JSON types only.

        ``master_log_lines_dropped``: lines the master's own logs lost; the
        workers' come with their messages.  Besides ``EXTRA_FIELDS``, a
        worker's extras may carry ``in_flight_seconds``, the summed ages of
        its requests in flight, for ``thread_busy_seconds``.  ``master``: the
        master's own memory and CPU readings, for its row beside the workers'.
        """
        now = self.clock()
        extra_workers_info = extra_workers_info or {}
        slots = {slot: totals.copy() for slot, totals in self.retired.items()}
        slots_busy = dict(self.retired_busy)
        workers = []
        for key, worker in sorted(self.workers.items(), key=lambda kv: (kv[1].slot, kv[1].generation, kv[1].pid)):
            extra = extra_workers_info.get(key, {})
            slots.setdefault(worker.slot, Totals()).merge(worker.last)
            busy = worker.update_busy(extra.get("in_flight_seconds", 0.0))
            slots_busy[worker.slot] = slots_busy.get(worker.slot, 0.0) + busy
            workers.append(self._worker_json(worker, now, extra))
        everything = Totals()
        for totals in slots.values():
            everything.merge(totals)
        by_state = dict.fromkeys(WORKER_STATES, 0)
        for entry in workers:
            by_state[entry["state"]] = by_state.get(entry["state"], 0) + 1
        return {
            "schema": SCHEMA_VERSION,
            "master_pid": os.getpid(),
            "master": {"pid": os.getpid(), **{name: (master or {}).get(name) for name in MASTER_FIELDS}},
            "uptime_seconds": round(now - self.started_at, 3),
            "started_at_unix": round(self.started_at_unix, 3),
            "histogram_bounds_seconds": list(HISTOGRAM_BUCKETS[:-1]),
            "totals": everything.as_json(),
            "counters": {
                "workers_alive": len(workers),
                "workers_by_state": by_state,
                "workers_respawned": self.respawns,
                "worker_exits": dict(self.exits),
                "reloads": self.reloads,
                "stats_messages_rejected": self.rejected,
                "log_lines_dropped": master_log_lines_dropped + self.retired_log_lines_dropped + sum(
                    worker.last.dropped_log_lines for worker in self.workers.values() if worker.last is not None),
            },
            "slots": [{"slot": slot, **slots[slot].as_json(histogram=False),
                       "thread_busy_seconds": round(slots_busy.get(slot, 0.0), 6)} for slot in sorted(slots)],
            "workers": workers,
            "listeners": [dict(listener) for listener in listeners],
            "saturation": _saturation(workers, sum(slots_busy.values())),
        }

    def _worker_json(self, worker: _Worker, now: float, extra: dict[str, Any]) -> dict[str, Any]:
        totals = Totals()
        totals.merge(worker.last)
        entry: dict[str, Any] = {
            "pid": worker.pid,
            "slot": worker.slot,
            "generation": worker.generation,
            "state": worker.state,
            **totals.as_json(),
            "current_request": None,
            "memory_uss_bytes": None,
            "memory_pss_bytes": None,
            "memory_shared_bytes": None,
            "memory_merged_bytes": None,
            "forked_by": None,
            "age_seconds": round(now - worker.started_at, 3),
            "heartbeat_age_seconds": None,
            "report_age_seconds": None if worker.reported_at is None else round(now - worker.reported_at, 3),
            "dropped_reports": worker.last.dropped_flushes if worker.last else 0,
            "stats_error": worker.broken or None,
            "stats_messages_rejected": worker.rejected,
            "dropped_log_lines": worker.last.dropped_log_lines if worker.last else 0,
            "threads": None,
            "requests_in_flight": None,
            "thread_busy_seconds": round(worker.busy_seconds, 6),
        }
        entry.update((name, extra[name]) for name in EXTRA_FIELDS if name in extra)
        return entry

    def prometheus(self, snapshot: dict[str, Any]) -> str:
        """Render a snapshot in the Prometheus text format 0.0.4 (status.render_prometheus)."""
        from .status import render_prometheus

        return render_prometheus(snapshot)
