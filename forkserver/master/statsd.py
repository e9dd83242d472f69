"""StatsD export: the master's aggregated stats, sent as StatsD metrics over UDP.

gunicorn sends one StatsD line per request from each worker.  forkserver's
workers already count requests and report totals to the master
(``stats.Reporter``, ``aggregator.Aggregator``), so here the master turns
the difference between two snapshots of those totals into StatsD lines once
a second: counters as deltas (``|c``), worker counts as gauges (``|g``),
and request durations and queue times as timings (``|ms``) rebuilt from
their histograms.
Metrics gunicorn has keep gunicorn's names (``gunicorn.requests``,
``gunicorn.request.duration``, ``gunicorn.workers``...), so dashboards built
for it keep working; the others are named ``forkserver.*``.  The mapping is
documented in docs/logging-and-metrics.md.

Sending never blocks the master: the socket is non-blocking, a datagram
that cannot go is dropped and counted, only the first failure is logged,
and the count when the exporter closes.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .aggregator import EXIT_CAUSES, WORKER_STATES, estimate_quantile
from ..errors import ConfigError
from ..sockets import parse_statsd_address
from ..stats import HISTOGRAM_BUCKETS, STATUS_CLASSES

log = logging.getLogger("forkserver")

INTERVAL = 1.0  # seconds between sends; workers report their totals as often
# The payload usually recommended for StatsD over the Internet: it fits in one
# Ethernet frame with room for headers and tunnels, so no datagram is fragmented.
MAX_DATAGRAM = 1432
# About this many timing lines per send at most.  More requests than that
# are represented by a proportional sample marked with its rate (``|@0.25``),
# which StatsD servers scale counts back up by.
MAX_TIMINGS = 100


def normal_prefix(prefix: str) -> str:
    """``app``, ``app.`` and ``app..`` all become ``app.``; empty stays empty (gunicorn's rule)."""
    stem = prefix.rstrip(".")
    return stem + "." if stem else prefix


def _bucket_milliseconds(index: int) -> float:
    """One duration to stand for every request counted in histogram bucket ``index``.

    The middle of the bucket; the open-ended last bucket is given its lower
    bound, the least those requests took.
    """
    upper = HISTOGRAM_BUCKETS[index]
    lower = HISTOGRAM_BUCKETS[index - 1] if index else 0.0
    if upper == float("inf"):
        return lower * 1000
    return round((lower + upper) / 2 * 1000, 3)


def _delta(now: int, before: int) -> int:
    return max(0, now - before)  # the totals only grow; a new master starts them again at 0


def timing_lines(name: str, histogram: Sequence[int]) -> list[str]:
    """Timing lines (``name:MS|ms``) for the requests counted in ``histogram``, sampled above MAX_TIMINGS.

    Every bucket that counted a request keeps at least one line, with the
    rate that makes its count right: a few slow requests among thousands of
    fast ones must still reach StatsD's upper percentiles and maximum.
    """
    total = sum(histogram)
    if total == 0:
        return []
    share = min(1.0, MAX_TIMINGS / total)
    lines = []
    for index, count in enumerate(histogram):
        if not count:
            continue
        sent = max(1, round(count * share))
        rate = sent / count
        lines.extend([f"{name}:{_bucket_milliseconds(index):g}|ms" + ("" if rate == 1 else f"|@{rate:.4g}")] * sent)
    return lines


def metric_lines(before: Mapping[str, Any] | None, now: Mapping[str, Any], prefix: str) -> list[str]:
    """The StatsD lines for what changed from snapshot ``before`` (None: nothing yet) to ``now``.

    Counters are sent only when they moved; gauges every time, as StatsD
    keeps a gauge's last value anyway and a restarted StatsD server needs it.
    """
    zero: dict[str, Any] = {"totals": {"requests": 0, "status": dict.fromkeys(STATUS_CLASSES, 0), "bytes_in": 0,
                                       "bytes_out": 0, "histogram": [0] * len(HISTOGRAM_BUCKETS)},
                            "counters": {"workers_respawned": 0, "reloads": 0,
                                         "worker_exits": dict.fromkeys(EXIT_CAUSES, 0)}}
    before = before or zero
    totals, old_totals = now["totals"], before["totals"]
    counters, old_counters = now["counters"], before["counters"]
    p = prefix
    counts = [
        ("gunicorn.requests", totals["requests"], old_totals["requests"]),
        *((f"gunicorn.request.status.{cls}", totals["status"][cls], old_totals["status"][cls])
          for cls in STATUS_CLASSES),
        ("forkserver.bytes_in", totals["bytes_in"], old_totals["bytes_in"]),
        ("forkserver.bytes_out", totals["bytes_out"], old_totals["bytes_out"]),
        ("forkserver.workers.respawned", counters["workers_respawned"], old_counters["workers_respawned"]),
        ("forkserver.reloads", counters["reloads"], old_counters["reloads"]),
        *((f"forkserver.worker.exits.{cause}", counters["worker_exits"][cause], old_counters["worker_exits"][cause])
          for cause in EXIT_CAUSES),
    ]
    lines = [f"{p}{name}:{_delta(value, old)}|c" for name, value, old in counts if _delta(value, old)]
    lines.append(f"{p}gunicorn.workers:{counters['workers_alive']}|g")
    lines.extend(f"{p}forkserver.workers.{state}:{counters['workers_by_state'].get(state, 0)}|g"
                 for state in WORKER_STATES)
    recent = [_delta(a, b) for a, b in zip(totals["histogram"], old_totals["histogram"])]
    lines.extend(timing_lines(f"{p}gunicorn.request.duration", recent))
    for q in (0.5, 0.9, 0.99):
        value = estimate_quantile(q, recent)
        if value is not None:
            lines.append(f"{p}forkserver.request.duration.p{round(q * 100)}:{round(value * 1000, 3):g}|g")
    lines.extend(saturation_lines(before, now, p))
    lines.extend(queue_lines(before, now, p))
    return lines


def queue_lines(before: Mapping[str, Any], now: Mapping[str, Any], prefix: str) -> list[str]:
    """Timing lines for the queue times of the requests since ``before`` (see aggregator.QueueTimes).

    ``forkserver.request.queue`` is the wait measured here, and
    ``forkserver.request.proxy_queue`` the time since a trusted proxy stamped
    the request; a StatsD server makes percentiles of each, as of durations.
    """
    lines = []
    for name, key in (("forkserver.request.queue", "queue_time"), ("forkserver.request.proxy_queue",
                                                                   "proxy_queue_time")):
        counts = now["totals"].get(key, {}).get("histogram")
        if counts is None:
            continue
        old = before["totals"].get(key, {}).get("histogram") or [0] * len(counts)
        lines.extend(timing_lines(f"{prefix}{name}", [_delta(a, b) for a, b in zip(counts, old)]))
    return lines


def saturation_lines(before: Mapping[str, Any], now: Mapping[str, Any], prefix: str) -> list[str]:
    """The busy-thread gauges and counter, and each listener's accept-queue gauges.

    Busy thread time goes as whole milliseconds (``thread_busy_ms``):
    several StatsD servers keep counters as integers and would drop a
    fraction of a second.  The difference of the truncated totals is sent,
    so the milliseconds lost to truncation in one send arrive in a later one.
    A listener's address becomes one name segment (``127_0_0_1_8000``).
    The peak is the highest depth since the previous send.
    """
    saturation = now.get("saturation")
    if saturation is None:
        return []
    old = before.get("saturation") or {"thread_busy_seconds": 0.0}
    lines = [f"{prefix}forkserver.threads:{saturation['threads']}|g",
             f"{prefix}forkserver.requests_in_flight:{saturation['requests_in_flight']}|g",
             f"{prefix}forkserver.threads_busy_ratio:{saturation['threads_busy_ratio']:g}|g"]
    busy_ms = _delta(int(saturation["thread_busy_seconds"] * 1000), int(old["thread_busy_seconds"] * 1000))
    if busy_ms:
        lines.append(f"{prefix}forkserver.thread_busy_ms:{busy_ms}|c")
    for entry in now.get("listeners", ()):
        name = f"{prefix}forkserver.listener.{listener_segment(entry['address'])}"
        lines.extend(f"{name}.{field}:{entry[field]}|g" for field in ("accept_queue", "accept_queue_max",
                                                                       "accept_queue_peak")
                     if entry.get(field) is not None)
    return lines


def listener_segment(address: str) -> str:
    """A listener's address as one StatsD name segment: ``http://127.0.0.1:8000`` -> ``127_0_0_1_8000``."""
    shown = address.rpartition("(")[2].rstrip(")")  # fd://3 (http://h:p) -> the address it serves
    shown = shown.removeprefix("http://")
    return "".join(char if char.isalnum() else "_" for char in shown).strip("_") or "listener"


def datagrams(lines: Iterable[str], limit: int = MAX_DATAGRAM) -> list[bytes]:
    """Pack lines, newline-separated, into as few datagrams of at most ``limit`` bytes as they fit."""
    packed: list[bytes] = []
    current = b""
    for line in lines:
        data = line.encode("ascii")
        if current and len(current) + 1 + len(data) > limit:
            packed.append(current)
            current = b""
        current = current + b"\n" + data if current else data
    if current:
        packed.append(current)
    return packed


class LogCounts(logging.Handler):
    """Counts the master's log records of level WARNING and up, for gunicorn's ``gunicorn.log.*``.

    An ERROR with a traceback counts as ``exception``, as gunicorn's
    ``log.exception`` does.  Only the master's records: a worker's are in
    another process.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        exception = record.levelno == logging.ERROR and record.exc_info
        self.counts["exception" if exception else record.levelname.lower()] += 1


class StatsdExporter:
    """Sends the master's stats to one StatsD server every INTERVAL seconds."""

    def __init__(self, address: str, prefix: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.prefix = normal_prefix(prefix)
        self.clock = clock
        self.sock = self._connect(address)
        self.previous: Mapping[str, Any] | None = None
        self.next_send = clock() + INTERVAL
        self.failed = 0  # datagrams that could not be sent
        self.log_counts = LogCounts()
        self.sent_log_counts: Counter[str] = Counter()
        log.addHandler(self.log_counts)

    @staticmethod
    def _connect(address: str) -> socket.socket:
        """A non-blocking datagram socket connected to ``address``.

        Connected, so the name is resolved once, here, and the kernel
        reports a refusing port (ICMP) as an error on a later send.
        """
        family, target = parse_statsd_address(address)
        try:
            if family == socket.AF_UNIX:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            else:
                host, port = target
                family, kind, proto, _, target = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)[0]
                sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConfigError(f"statsd_host {address!r}: {exc.strerror or exc}") from None
        sock.setblocking(False)
        try:
            sock.connect(target)
        except OSError as exc:
            if family != socket.AF_UNIX:
                sock.close()
                raise ConfigError(f"statsd_host {address!r}: {exc.strerror or exc}") from None
            # A StatsD UNIX socket that is not there yet may come later; sends fail until then.
            log.warning("statsd: cannot reach %s yet: %s", address, exc.strerror or exc)
        return sock

    def send_if_due(self, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        """Send what changed since the last send, if INTERVAL has passed."""
        now = self.clock()
        if now < self.next_send:
            return
        self.next_send = now + INTERVAL
        self.send(snapshot())

    def send(self, current: Mapping[str, Any]) -> None:
        """Send the lines for the change from the last snapshot sent to ``current``."""
        lines = metric_lines(self.previous, current, self.prefix)
        self.previous = current
        counts = self.log_counts.counts.copy()
        lines.extend(f"{self.prefix}gunicorn.log.{level}:{number - self.sent_log_counts[level]}|c"
                     for level, number in sorted(counts.items()) if number > self.sent_log_counts[level])
        self.sent_log_counts = counts
        for datagram in datagrams(lines):
            self._send_one(datagram)

    def _send_one(self, datagram: bytes) -> None:
        try:
            self.sock.send(datagram)
        except OSError as exc:
            # Logged once only: with nothing listening, sends fail and succeed
            # by turns (each ICMP "port unreachable" fails the next send), so
            # "working again" cannot be told apart from the next failure.
            if not self.failed:
                log.warning("statsd: cannot send to %s: %s; further failures are counted, not logged",
                            self.address, exc.strerror or exc)
            self.failed += 1

    def finish(self, current: Mapping[str, Any]) -> None:
        """At the master's exit: send ``current`` (the workers' last reports), say what was lost, close."""
        self.send(current)
        if self.failed:
            log.warning("statsd: %d datagram(s) to %s could not be sent", self.failed, self.address)
        self.close()

    def close(self) -> None:
        """Stop counting and sending (also in a new worker, which inherited the exporter)."""
        log.removeHandler(self.log_counts)
        self.sock.close()
