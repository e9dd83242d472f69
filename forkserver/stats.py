"""Request statistics: counted in workers, shipped in batches, summed in the master.

A worker's ``Reporter`` counts each request in plain integers and now and then
puts one small cumulative message on its own ``SimpleQueue``; the master's
``Aggregator`` keeps the latest message per worker and folds a dead worker's
last one into retired totals, so every server-wide counter only ever grows.
This module never blocks the master: it reads queues without waiting, and
never puts on one from the master side.  It does not serve the numbers;
``status.py`` does.
"""

from __future__ import annotations

import bisect
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from multiprocessing.queues import SimpleQueue

# multiprocessing, psutil and the status module are imported where they are
# used, not here: workers import this module for ``Reporter`` and the master
# imports it at start, but all three are needed only with stats on
# (``stats_bind``).  Imported unused, they cost every start over 10 ms and
# the master about a MiB (psutil also pulls in subprocess).

# Upper bounds, in seconds, of the request-time histogram; a last bucket
# catches everything slower.  Fixed, so workers' histograms add up and
# percentiles can be estimated over any set of workers.
HISTOGRAM_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                        2.5, 5.0, 10.0, math.inf)
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# A Reporter keeps one counter per (status class, histogram bucket), a row
# per class.  This is where the row of every status code a response can have
# starts (0 for none yet counts as 1xx): one table lookup, where
# min(max(...)) cost 0.5 µs, and one increment per request for both tallies.
_ROW_START = tuple((min(max(code // 100, 1), 5) - 1) * len(HISTOGRAM_BUCKETS) for code in range(1000))
WORKER_STATES = ("booting", "idle", "busy", "retiring")
EXIT_CAUSES = ("exited", "died", "killed_timeout", "recycled")
PERCENTILES = (0.5, 0.9, 0.99)
# Per-worker fields the master may supply to ``snapshot`` from psutil and
# shared memory; anything else in its dicts is ignored, so /stats keeps its schema.
EXTRA_FIELDS = ("state", "current_request", "memory_uss_bytes", "memory_pss_bytes", "cpu_seconds",
                "heartbeat_age_seconds")
MAX_DRAIN = 1000  # messages per queue per call: a flood cannot hold the master's loop
SCHEMA_VERSION = 1


class CountersFlushed(NamedTuple):
    """A worker's counters since it started; each message supersedes the one before."""

    pid: int
    requests: int
    status: tuple[int, ...]  # one count per STATUS_CLASSES entry
    bytes_in: int
    bytes_out: int
    histogram: tuple[int, ...]  # one count per HISTOGRAM_BUCKETS entry, not cumulative
    duration_sum: float
    cpu_seconds: float
    dropped_flushes: int  # earlier flushes that found the pipe full


# -- queues -------------------------------------------------------------------------


def new_queue() -> SimpleQueue[Any]:
    """Make a worker's stats queue; the master calls this before forking that worker.

    The fork context is explicit: under "spawn" its locks would start a
    resource-tracker process from the master.  The read end is made
    non-blocking so that even a torn message makes ``drain`` fail, not wait.
    """
    import multiprocessing

    queue: SimpleQueue[Any] = multiprocessing.get_context("fork").SimpleQueue()
    os.set_blocking(queue_fd(queue), False)
    os.set_blocking(_writer_fd(queue), False)  # see Reporter: a full pipe drops a flush, never waits
    return queue


def queue_fd(queue: SimpleQueue[Any]) -> int:
    """Return the descriptor the master reads ``queue`` from.

    SimpleQueue has no public way to get it, so this relies on the private
    ``_reader`` connection (stable since Python 3.3); a test pins it down.
    """
    reader = queue._reader  # type: ignore[attr-defined]
    return int(reader.fileno())


def _writer_fd(queue: SimpleQueue[Any]) -> int:
    return int(queue._writer.fileno())  # type: ignore[attr-defined]  # see queue_fd


class Drained(list[Any]):
    """Messages read from one queue; ``broken`` names the failure that ended the read, if any."""

    broken: str = ""


def drain(queue: SimpleQueue[Any], limit: int = MAX_DRAIN) -> Drained:
    """Read what ``queue`` holds right now, without ever waiting.

    Never raises: an unreadable queue (EOF, a torn or unpicklable message)
    comes back as ``broken``, and the master should stop reading it.
    """
    found = Drained()
    try:
        while len(found) < limit and not queue.empty():
            found.append(queue.get())
    # EOFError: every writer is gone; OSError (BlockingIOError): a torn message;
    # unpickling garbage can raise nearly anything else.
    except Exception as exc:  # noqa: BLE001
        found.broken = f"{type(exc).__name__}: {exc}"
    return found


# -- worker side ----------------------------------------------------------------------


class Reporter:
    """Counts requests in a worker and flushes cumulative totals to the master.

    Why a SimpleQueue and small messages: ``put`` pickles the message and
    sends a 4-byte length plus the payload in one ``write``.  A pipe write of
    at most PIPE_BUF (4096 on Linux) bytes is atomic (POSIX), so a worker
    SIGKILLed at any moment leaves a whole message or none, never half of one
    that would wedge the reader.  There is no feeder thread to die with locks
    held.  The write end is non-blocking: if the master falls behind and the
    pipe fills, the flush is dropped, which loses nothing because the next one
    carries the same totals and more.
    """

    def __init__(self, queue: SimpleQueue[Any], *, pid: int, slot: int, generation: int,
                 interval: float = 1.0, threaded: bool = False) -> None:
        self.queue = queue
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.interval = interval
        self._lock = threading.Lock() if threaded else None
        self.cells = [0] * (len(STATUS_CLASSES) * len(HISTOGRAM_BUCKETS))  # see _ROW_START
        self.bytes_in = 0
        self.bytes_out = 0
        self.duration_sum = 0.0
        self.dropped_flushes = 0
        self._flushed_requests = -1
        self._next_flush = 0.0
        os.set_blocking(_writer_fd(queue), False)
        self.record = self._add if self._lock is None else self._locked_add  # type: ignore[method-assign]

    def record(self, status: int, bytes_in: int, bytes_out: int, duration: float) -> None:
        """Count one finished request: one increment, a bisect and three adds; no I/O.

        (Replaced per instance in ``__init__`` by the unlocked or locked adder,
        so the hot path pays no extra call.)
        """
        self._locked_add(status, bytes_in, bytes_out, duration)

    def _locked_add(self, status: int, bytes_in: int, bytes_out: int, duration: float) -> None:
        assert self._lock is not None
        with self._lock:
            self._add(status, bytes_in, bytes_out, duration)

    def _add(self, status: int, bytes_in: int, bytes_out: int, duration: float) -> None:
        self.cells[_ROW_START[status] + bisect.bisect_left(HISTOGRAM_BUCKETS, duration)] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.duration_sum += duration

    def flush_if_due(self, now: float) -> None:
        """Flush if ``interval`` has passed since the last check and a request was counted since.

        The first call always flushes, so the master hears from every worker.
        """
        if now < self._next_flush:
            return
        self._next_flush = now + self.interval
        if sum(self.cells) != self._flushed_requests:
            self.flush()

    def flush(self) -> bool:
        """Put the current totals on the queue now; False if the pipe was full."""
        message = self.message()
        try:
            self.queue.put(message)
        except BlockingIOError:
            self.dropped_flushes += 1
            return False
        except OSError:  # the master closed its end: nobody is listening
            return False
        self._flushed_requests = message.requests
        return True

    def message(self) -> CountersFlushed:
        """The totals so far, as the message ``flush`` sends."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            cells, bytes_in, bytes_out, duration_sum = self.cells[:], self.bytes_in, self.bytes_out, self.duration_sum
        finally:
            if lock is not None:
                lock.release()
        width = len(HISTOGRAM_BUCKETS)
        status = tuple(sum(cells[start:start + width]) for start in range(0, len(cells), width))
        histogram = tuple(sum(cells[bucket::width]) for bucket in range(width))
        return CountersFlushed(self.pid, sum(status), status, bytes_in, bytes_out, histogram, duration_sum,
                               time.process_time(), self.dropped_flushes)


# -- master side ----------------------------------------------------------------------


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
        return doc


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
        self.exits = dict.fromkeys(EXIT_CAUSES, 0)
        self.respawns = 0
        self.reloads = 0

    def add_worker(self, key: Hashable, *, pid: int, slot: int, generation: int) -> None:
        """Start tracking a freshly forked worker, in state ``booting``."""
        self.workers[key] = _Worker(pid, slot, generation, self.clock())

    def ingest(self, key: Hashable, message: object) -> None:
        """Take a worker's latest totals; messages for unknown workers or of a wrong type are ignored."""
        worker = self.workers.get(key)
        if worker is None or not isinstance(message, CountersFlushed):
            return
        if worker.last is None or message.requests >= worker.last.requests:
            worker.last = message
            worker.reported_at = self.clock()

    def mark_broken(self, key: Hashable, reason: str) -> None:
        """Note that a worker's queue failed; its last good totals still count."""
        worker = self.workers.get(key)
        if worker is not None:
            worker.broken = reason

    def set_state(self, key: Hashable, state: str) -> None:
        """Record ``booting``, ``idle``, ``busy`` or ``retiring``."""
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
        self.exits[cause] += 1

    def note_reload(self) -> None:
        """Count a reload (HUP) the master started."""
        self.reloads += 1

    def note_respawn(self) -> None:
        """Count a worker started to replace one that ended (not a first start, not a reload)."""
        self.respawns += 1

    def snapshot(self, extra_workers_info: dict[Hashable, dict[str, Any]] | None = None,
                 listeners: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        """Return the /stats document (schema: README, "Stats"); plain JSON types only."""
        now = self.clock()
        extra_workers_info = extra_workers_info or {}
        slots = {slot: totals.copy() for slot, totals in self.retired.items()}
        workers = []
        for key, worker in sorted(self.workers.items(), key=lambda kv: (kv[1].slot, kv[1].generation, kv[1].pid)):
            slots.setdefault(worker.slot, Totals()).merge(worker.last)
            workers.append(self._worker_json(worker, now, extra_workers_info.get(key, {})))
        everything = Totals()
        for totals in slots.values():
            everything.merge(totals)
        by_state = dict.fromkeys(WORKER_STATES, 0)
        for entry in workers:
            by_state[entry["state"]] = by_state.get(entry["state"], 0) + 1
        return {
            "schema": SCHEMA_VERSION,
            "master_pid": os.getpid(),
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
            },
            "slots": [{"slot": slot, **slots[slot].as_json(histogram=False)} for slot in sorted(slots)],
            "workers": workers,
            "listeners": [dict(listener) for listener in listeners],
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
            "age_seconds": round(now - worker.started_at, 3),
            "heartbeat_age_seconds": None,
            "report_age_seconds": None if worker.reported_at is None else round(now - worker.reported_at, 3),
            "dropped_reports": worker.last.dropped_flushes if worker.last else 0,
            "stats_error": worker.broken or None,
        }
        entry.update((name, extra[name]) for name in EXTRA_FIELDS if name in extra)
        return entry

    def prometheus(self, snapshot: dict[str, Any]) -> str:
        """Render a snapshot in the Prometheus text format 0.0.4 (status.render_prometheus)."""
        from .status import render_prometheus

        return render_prometheus(snapshot)


# -- readings from the kernel ---------------------------------------------------------------

TCP_LISTEN = 10  # tcp_states.h
_TCP_INFO = struct.Struct("8B6I")  # state, ..., rto, ato, snd_mss, rcv_mss, unacked, sacked


def accept_queue_depth(sock: socket.socket) -> int | None:
    """Connections that finished the handshake but no worker has accepted yet.

    For a listening TCP socket Linux reports the accept queue in TCP_INFO's
    ``tcpi_unacked`` (what ``ss -lt`` shows as Recv-Q), one syscall.  A socket
    bound but not listening is the master's placeholder under ``reuse_port``:
    then the LISTEN sockets of the workers on the same address are summed from
    /proc/net/tcp{,6}, where rx_queue of a LISTEN row is its accept queue.
    UNIX sockets expose no such number outside netlink: None.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    except OSError:
        return None
    fields = _TCP_INFO.unpack(info[:_TCP_INFO.size])
    if fields[0] == TCP_LISTEN:
        return int(fields[12])
    return _proc_listen_queue(sock)


def _proc_listen_queue(sock: socket.socket) -> int | None:
    """Sum rx_queue over LISTEN rows of /proc/net/tcp{,6} bound to this socket's port and address."""
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    if port == 0:
        return None
    table = "/proc/net/tcp6" if sock.family == socket.AF_INET6 else "/proc/net/tcp"
    wanted = _proc_address(sock.family, host, port)
    total, seen = 0, False
    try:
        with open(table, encoding="ascii") as rows:
            next(rows, None)
            for row in rows:
                parts = row.split()
                if len(parts) > 4 and parts[3] == "0A" and parts[1] == wanted:
                    total += int(parts[4].partition(":")[2], 16)
                    seen = True
    except OSError:
        return None
    return total if seen else None


def _proc_address(family: int, host: str, port: int) -> str:
    """Spell HOST:PORT as /proc/net/tcp does.

    The kernel prints each raw 32-bit word of the address with %08X, so on a
    little-endian host the bytes appear reversed; unpacking in native order
    reproduces that on any host.
    """
    packed = socket.inet_pton(family, host)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


def listener_stats(listeners: Iterable[Any]) -> list[dict[str, Any]]:
    """The ``listeners`` list for ``snapshot`` from the master's sockets.Listener objects."""
    from .sockets import describe

    found = []
    for listener in listeners:
        try:
            address = describe(listener)
        except OSError:
            continue  # closed during a stop
        found.append({"address": address, "accept_queue": accept_queue_depth(listener.sock)})
    return found


class ProcessSampler:
    """Memory and CPU of worker processes from psutil, cached for ``max_age`` seconds.

    Reading smaps for USS/PSS costs real time on big processes, and a scraper
    may ask several times a second; the cache bounds what the master spends.
    """

    def __init__(self, max_age: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self.clock = clock
        self._cache: dict[int, tuple[float, dict[str, Any]]] = {}

    def read(self, pid: int) -> dict[str, Any]:
        """Return ``memory_uss_bytes``, ``memory_pss_bytes`` and ``cpu_seconds`` for ``pid`` ({} if gone)."""
        import psutil

        now = self.clock()
        cached = self._cache.get(pid)
        if cached is not None and now - cached[0] < self.max_age:
            return cached[1]
        reading: dict[str, Any] = {}
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                times = process.cpu_times()
                reading["cpu_seconds"] = round(times.user + times.system, 3)
                memory = process.memory_full_info()
                reading["memory_uss_bytes"] = int(memory.uss)
                reading["memory_pss_bytes"] = int(getattr(memory, "pss", 0)) or None
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            reading = {}
        except psutil.AccessDenied:
            pass  # keep what was readable
        self._cache[pid] = (now, reading)
        return reading

    def forget(self, pid: int) -> None:
        """Drop a dead worker's cached reading."""
        self._cache.pop(pid, None)
