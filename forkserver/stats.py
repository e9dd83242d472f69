"""Request statistics in a worker: counted in plain integers, shipped in batches.

A worker's ``Reporter`` counts each request and now and then puts one small
cumulative message (``CountersFlushed``) on its own ``SimpleQueue``; the
master reads the queues with ``drain``, without ever waiting, and sums them
in ``aggregator.Aggregator``.  This module never blocks: a worker never
waits on a full pipe, the master never on an empty one, and the master
never puts on a queue.
"""

from __future__ import annotations

import bisect
import math
import os
import threading
import time
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from multiprocessing.queues import SimpleQueue

# multiprocessing is imported where it is used, not here: workers import this
# module for ``Reporter`` and the master imports it at start, but queues are
# made only with stats on (``stats_bind``).  Imported unused, it costs every
# start milliseconds and the master memory.

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
MAX_DRAIN = 1000  # messages per queue per call: a flood cannot hold the master's loop


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
