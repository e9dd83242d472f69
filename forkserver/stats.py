"""Request statistics in a worker: counted in plain integers, shipped in batches.

A worker's ``Reporter`` counts each request and now and then sends one small
cumulative message (``CountersFlushed``) down its own one-way channel; the
master reads the channels without ever waiting (``forkserver.master.collector``)
and sums them in ``aggregator.Aggregator``.  This module never blocks: a
worker never waits on a full pipe, the master never on an empty one, and the
master never writes to a channel.

A message is plain numbers in a fixed layout (``WIRE``), never a pickle: the
worker runs app code, perhaps as an unprivileged user, and whatever it sends
the master must be data that ``decode`` checks, not objects that run code
while they are rebuilt.
"""

from __future__ import annotations

import bisect
import math
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

# multiprocessing is imported where it is used, not here: workers import this
# module for ``Reporter`` and the master imports it at start, but channels are
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
NO_TIMES = (0,) * len(HISTOGRAM_BUCKETS)


class CountersFlushed(NamedTuple):
    """A worker's counters since it started; each message supersedes the one before.

    ``pid`` is not sent: the master knows it from the channel the message came on.
    """

    pid: int
    requests: int
    status: tuple[int, ...]  # one count per STATUS_CLASSES entry
    bytes_in: int
    bytes_out: int
    histogram: tuple[int, ...]  # one count per HISTOGRAM_BUCKETS entry, not cumulative
    duration_sum: float
    cpu_seconds: float
    dropped_flushes: int  # earlier flushes that found the pipe full
    dropped_log_lines: int = 0  # log lines the worker could not write (a full disk)
    # Queue time (see ``kernel_wait``), on the same buckets, of the requests
    # that could be timed: those that reached the app over TCP.
    queue_histogram: tuple[int, ...] = NO_TIMES
    queue_sum: float = 0.0
    # Time since a trusted proxy stamped the request (``proxy.proxy_queue_time``),
    # of the requests that carried such a stamp.
    proxy_queue_histogram: tuple[int, ...] = NO_TIMES
    proxy_queue_sum: float = 0.0


# -- the wire format ------------------------------------------------------------------

WIRE_VERSION = 2
WIRE_KIND_COUNTERS = 1
# Version and kind, then requests, status classes, bytes in and out, the
# histogram, duration and CPU sums, dropped flushes and dropped log lines,
# then the queue-time histogram and sum and the proxy one's; little-endian,
# no padding.  Well under PIPE_BUF with its 4-byte frame header.
_TIMES = f"{len(HISTOGRAM_BUCKETS)}qd"
WIRE = struct.Struct(f"<HHq{len(STATUS_CLASSES)}qqq{len(HISTOGRAM_BUCKETS)}qddqq{_TIMES}{_TIMES}")
_COUNTS = slice(2, 2 + 1 + len(STATUS_CLASSES) + 2 + len(HISTOGRAM_BUCKETS))
_QUEUE = _COUNTS.stop + 4  # where the queue-time histogram starts
_PROXY_QUEUE = _QUEUE + len(HISTOGRAM_BUCKETS) + 1
# Anything above these is a lie, not a count: 2**53 requests or bytes would
# take a worker millennia, and a float sum past 1e12 s is 30,000 years.
MAX_COUNT = 2**53
MAX_SECONDS = 1e12


def encode(message: CountersFlushed) -> bytes:
    """The bytes a worker sends for ``message``."""
    return WIRE.pack(WIRE_VERSION, WIRE_KIND_COUNTERS, message.requests, *message.status, message.bytes_in,
                     message.bytes_out, *message.histogram, message.duration_sum, message.cpu_seconds,
                     message.dropped_flushes, message.dropped_log_lines, *message.queue_histogram,
                     message.queue_sum, *message.proxy_queue_histogram, message.proxy_queue_sum)


def decode(data: bytes, pid: int) -> CountersFlushed:
    """Check and unpack a message that came on worker ``pid``'s channel; ValueError says what is wrong.

    Nothing in ``data`` is trusted: its length, tag, every number's range,
    that the status classes and histogram each add up to the requests, and
    that no more requests were queue-timed than there were requests.
    """
    if len(data) != WIRE.size:
        raise ValueError(f"{len(data)} bytes, not {WIRE.size}")
    fields = WIRE.unpack(data)
    if fields[:2] != (WIRE_VERSION, WIRE_KIND_COUNTERS):
        raise ValueError(f"unknown version/kind {fields[0]}/{fields[1]}")
    queue, queue_sum = _times(fields, _QUEUE)
    proxy_queue, proxy_queue_sum = _times(fields, _PROXY_QUEUE)
    if not all(0 <= count <= MAX_COUNT for count in fields[_COUNTS] + fields[_QUEUE - 2:_QUEUE] + queue
               + proxy_queue):
        raise ValueError("a count out of range")
    if not all(0.0 <= seconds <= MAX_SECONDS for seconds in fields[_COUNTS.stop:_COUNTS.stop + 2]
               + (queue_sum, proxy_queue_sum)):
        raise ValueError("a time that is negative, too large or not a number")  # NaN fails every comparison
    classes = len(STATUS_CLASSES)
    requests, status = fields[2], tuple(fields[3:3 + classes])
    bytes_in, bytes_out = fields[3 + classes:5 + classes]
    histogram = tuple(fields[5 + classes:_COUNTS.stop])
    if sum(status) != requests or sum(histogram) != requests:
        raise ValueError("status classes or histogram do not add up to the requests")
    if sum(queue) > requests or sum(proxy_queue) > requests:
        raise ValueError("more queue times than requests")
    duration_sum, cpu_seconds, dropped_flushes, dropped_log_lines = fields[_COUNTS.stop:_QUEUE]
    return CountersFlushed(pid, requests, status, bytes_in, bytes_out, histogram, duration_sum, cpu_seconds,
                           dropped_flushes, dropped_log_lines, queue, queue_sum, proxy_queue, proxy_queue_sum)


def _times(fields: tuple[Any, ...], start: int) -> tuple[tuple[int, ...], float]:
    """The histogram and sum of seconds that start at ``fields[start]``."""
    end = start + len(HISTOGRAM_BUCKETS)
    return tuple(fields[start:end]), fields[end]


def new_channel() -> tuple[Connection, Connection]:
    """Make a worker's stats channel, (master's read end, worker's write end), before forking it.

    A one-way ``multiprocessing.Pipe``: an os.pipe underneath, so a message
    sent in one write of at most PIPE_BUF bytes arrives whole or not at all.
    The fork context is explicit: under "spawn" it could start a
    resource-tracker process from the master.  Both ends are non-blocking:
    the master never waits for a message, a worker never for room.
    """
    import multiprocessing

    reader, writer = multiprocessing.get_context("fork").Pipe(duplex=False)
    os.set_blocking(reader.fileno(), False)
    os.set_blocking(writer.fileno(), False)  # see Reporter: a full pipe drops a flush, never waits
    return reader, writer


# -- worker side ----------------------------------------------------------------------


class Reporter:
    """Counts requests in a worker and flushes cumulative totals to the master.

    Why small fixed messages: ``send_bytes`` writes a 4-byte length plus the
    payload in one ``write``.  A pipe write of at most PIPE_BUF (4096 on
    Linux) bytes is atomic (POSIX), so a worker SIGKILLed at any moment leaves
    a whole message or none, never half of one.  There is no feeder thread to
    die with locks held.  The write end is non-blocking: if the master falls
    behind and the pipe fills, the flush is dropped, which loses nothing
    because the next one carries the same totals and more.
    ``dropped_log_lines`` says how many log lines this process lost so far.
    """

    def __init__(self, channel: Connection, *, pid: int, slot: int, generation: int,
                 interval: float = 1.0, threaded: bool = False,
                 dropped_log_lines: Callable[[], int] = lambda: 0) -> None:
        self.channel = channel
        self.dropped_log_lines = dropped_log_lines
        self.pid = pid
        self.slot = slot
        self.generation = generation
        self.interval = interval
        self._lock = threading.Lock() if threaded else None
        self.cells = [0] * (len(STATUS_CLASSES) * len(HISTOGRAM_BUCKETS))  # see _ROW_START
        self.bytes_in = 0
        self.bytes_out = 0
        self.duration_sum = 0.0
        self.queue_cells = [0] * len(HISTOGRAM_BUCKETS)
        self.queue_sum = 0.0
        self.proxy_queue_cells = [0] * len(HISTOGRAM_BUCKETS)
        self.proxy_queue_sum = 0.0
        self.dropped_flushes = 0
        self._flushed_requests = -1
        self._flushed_log_drops = 0
        self._next_flush = 0.0
        os.set_blocking(channel.fileno(), False)
        self.record = self._add if self._lock is None else self._locked_add  # type: ignore[method-assign]

    def record(self, status: int, bytes_in: int, bytes_out: int, duration: float,
               queued: float | None = None, proxy_queued: float | None = None) -> None:
        """Count one finished request: one increment, a bisect and three adds, and as many per queue time; no I/O.

        ``queued`` and ``proxy_queued`` are its queue times in seconds, None
        where it has none (see ``kernel_wait`` and ``proxy.proxy_queue_time``).
        (Replaced per instance in ``__init__`` by the unlocked or locked adder,
        so the hot path pays no extra call.)
        """
        self._locked_add(status, bytes_in, bytes_out, duration, queued, proxy_queued)

    def _locked_add(self, status: int, bytes_in: int, bytes_out: int, duration: float,
                    queued: float | None = None, proxy_queued: float | None = None) -> None:
        assert self._lock is not None
        with self._lock:
            self._add(status, bytes_in, bytes_out, duration, queued, proxy_queued)

    def _add(self, status: int, bytes_in: int, bytes_out: int, duration: float,
             queued: float | None = None, proxy_queued: float | None = None) -> None:
        self.cells[_ROW_START[status] + bisect.bisect_left(HISTOGRAM_BUCKETS, duration)] += 1
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out
        self.duration_sum += duration
        if queued is not None:
            self.queue_cells[bisect.bisect_left(HISTOGRAM_BUCKETS, queued)] += 1
            self.queue_sum += queued
        if proxy_queued is not None:
            self.proxy_queue_cells[bisect.bisect_left(HISTOGRAM_BUCKETS, proxy_queued)] += 1
            self.proxy_queue_sum += proxy_queued

    def flush_if_due(self, now: float) -> None:
        """Flush if ``interval`` has passed since the last check and a request (or a lost log line) was counted since.

        The first call always flushes, so the master hears from every worker.
        """
        if now < self._next_flush:
            return
        self._next_flush = now + self.interval
        if sum(self.cells) != self._flushed_requests or self.dropped_log_lines() != self._flushed_log_drops:
            self.flush()

    def flush(self) -> bool:
        """Send the current totals now; False if the pipe was full."""
        message = self.message()
        try:
            self.channel.send_bytes(encode(message))
        except BlockingIOError:
            self.dropped_flushes += 1
            return False
        except OSError:  # the master closed its end: nobody is listening
            return False
        self._flushed_requests = message.requests
        self._flushed_log_drops = message.dropped_log_lines
        return True

    def message(self) -> CountersFlushed:
        """The totals so far, as the message ``flush`` sends."""
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            cells, bytes_in, bytes_out, duration_sum = self.cells[:], self.bytes_in, self.bytes_out, self.duration_sum
            queue, queue_sum = tuple(self.queue_cells), self.queue_sum
            proxy_queue, proxy_queue_sum = tuple(self.proxy_queue_cells), self.proxy_queue_sum
        finally:
            if lock is not None:
                lock.release()
        width = len(HISTOGRAM_BUCKETS)
        status = tuple(sum(cells[start:start + width]) for start in range(0, len(cells), width))
        histogram = tuple(sum(cells[bucket::width]) for bucket in range(width))
        return CountersFlushed(self.pid, sum(status), status, bytes_in, bytes_out, histogram, duration_sum,
                               time.process_time(), self.dropped_flushes, self.dropped_log_lines(),
                               queue, queue_sum, proxy_queue, proxy_queue_sum)


# -- queue time -----------------------------------------------------------------------

# struct tcp_info (linux/tcp.h): eight one-byte fields, then 32-bit ones, of
# which tcpi_last_data_recv is the twelfth.
_LAST_DATA_RECV = struct.Struct("=I")
_LAST_DATA_RECV_AT = 8 + 11 * 4
_TCP_INFO_BYTES = _LAST_DATA_RECV_AT + _LAST_DATA_RECV.size


def kernel_wait(sock: socket.socket) -> float | None:
    """Seconds since the kernel last received bytes on this connection: a request's queue time.

    Called as a worker starts on a request, this is how long the request
    has been waiting since its last bytes arrived, wherever it waited: in
    the listen backlog (a new connection's request arrives with it), unread
    in the socket while every thread was busy, or in the thread pool's
    queue.  The kernel keeps the time of the last data segment
    (``tcpi_last_data_recv``) in clock ticks, so a figure is off by up to a
    tick (4 ms at HZ=250) while the mean is not.  None over UNIX sockets,
    which keep no such time.  One getsockopt: 0.8 us a request, paid only
    with stats on.
    """
    if sock.family == socket.AF_UNIX:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES)
    except OSError:
        return None
    if len(info) < _TCP_INFO_BYTES:
        return None
    return _LAST_DATA_RECV.unpack_from(info, _LAST_DATA_RECV_AT)[0] / 1000
