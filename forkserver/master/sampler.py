"""What the kernel says about the server, for /stats: accept queues and worker memory and CPU.

Read only when /stats is asked for, and cached where reading costs (smaps),
except the accept queues' high-water marks (``BacklogWatch``), which the
master samples between reads.  psutil is imported at first use: only a
start with stats on needs it.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

TCP_LISTEN = 10  # tcp_states.h
_TCP_INFO = struct.Struct("8B6I")  # state, ..., rto, ato, snd_mss, rcv_mss, unacked, sacked


def listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(depth, maximum) of a listening TCP socket's accept queue, from one TCP_INFO read.

    For a socket in LISTEN state Linux reports the connections that finished
    the handshake but that no worker has accepted yet in ``tcpi_unacked``
    (what ``ss -lt`` shows as Recv-Q), and the queue's limit in
    ``tcpi_sacked``: the backlog given to listen(), capped by
    net.core.somaxconn as it was then, so the limit the kernel really
    applies, not the one configured.  None for any other socket.
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    except OSError:
        return None
    fields = _TCP_INFO.unpack(info[:_TCP_INFO.size])
    if fields[0] != TCP_LISTEN:
        return None
    return int(fields[12]), int(fields[13])


def accept_queue_depth(sock: socket.socket) -> int | None:
    """Connections that finished the handshake but no worker has accepted yet.

    ``listen_queue`` for a listening TCP socket.  A socket bound but not
    listening is the master's placeholder under ``reuse_port``: then the
    LISTEN sockets of the workers on the same address are summed from
    /proc/net/tcp{,6}.  UNIX sockets expose no such number outside netlink: None.
    """
    reading = listen_queue(sock)
    if reading is not None:
        return reading[0]
    rows = _proc_listen_rows(sock)
    return None if rows is None else sum(rows)


def somaxconn() -> int | None:
    """net.core.somaxconn: the most any listen() backlog can be in this network namespace."""
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as value:
            return int(value.read())
    except (OSError, ValueError):
        return None


def _proc_listen_rows(sock: socket.socket) -> list[int] | None:
    """The accept queue of every LISTEN row of /proc/net/tcp{,6} bound to this socket's port and address.

    rx_queue of a LISTEN row is its accept queue.  None when the socket is
    not bound to a port or no row matches (not a TCP socket, or not yet listening).
    """
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        host, port = sock.getsockname()[:2]
    except OSError:
        return None
    if port == 0:
        return None
    table = "/proc/net/tcp6" if sock.family == socket.AF_INET6 else "/proc/net/tcp"
    wanted = _proc_address(sock.family, host, port)
    found = []
    try:
        with open(table, encoding="ascii") as rows:
            next(rows, None)
            for row in rows:
                parts = row.split()
                if len(parts) > 4 and parts[3] == "0A" and parts[1] == wanted:
                    found.append(int(parts[4].partition(":")[2], 16))
    except OSError:
        return None
    return found or None


def _proc_address(family: int, host: str, port: int) -> str:
    """Spell HOST:PORT as /proc/net/tcp does.

    The kernel prints each raw 32-bit word of the address with %08X, so on a
    little-endian host the bytes appear reversed; unpacking in native order
    reproduces that on any host.
    """
    packed = socket.inet_pton(family, host)
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    return "".join(f"{word:08X}" for word in words) + f":{port:04X}"


# How often the master samples its listeners' accept queues for their high-water
# marks while stats are on.  What it costs an idle server (4 workers, one TCP
# listener, master CPU over 120 s on a shared 2-core VM): 0.03% of a core
# sampling once a second, 0.20% at this interval, 0.33% at 0.05 s.
BACKLOG_SAMPLE_INTERVAL = 0.1


class BacklogWatch:
    """The highest accept-queue depth of each listener since each reader last looked.

    The kernel tells how many connections wait now, never how many waited a
    moment ago, so a burst that filled the queue and drained between two
    scrapes would leave no trace.  The master therefore calls ``sample``
    every turn of its loop, which turns at least every
    ``BACKLOG_SAMPLE_INTERVAL`` while stats are on: one TCP_INFO read per
    listener (0.35 µs), nothing else.  A burst shorter than that can be
    missed, but a queue that matters to an autoscaler is one the workers
    take longer than that to drain.  The master's placeholder socket under
    ``reuse_port`` is not sampled (its depth comes from /proc/net/tcp, too
    costly to read ten times a second); its peak is the depth at the read.

    Each reader ("/stats", "/metrics", "statsd") keeps its own marks and
    resets only its own when it reads (``take``), so a person running
    ``forkserver top`` never hides a peak from Prometheus, nor StatsD's
    once-a-second send from either.  Two Prometheus servers scraping the
    same /metrics do share one mark: each sees the peak since the other's
    scrape, which still never misses a burst between them both.
    """

    def __init__(self, readers: tuple[str, ...]) -> None:
        self._peaks: dict[str, dict[Any, int]] = {reader: {} for reader in readers}

    def sample(self, listeners: Iterable[Any]) -> None:
        """Raise every reader's mark to the depth each listening TCP socket has now."""
        for listener in listeners:
            reading = listen_queue(listener.sock)
            if reading is not None and reading[0]:
                depth = reading[0]
                for peaks in self._peaks.values():
                    if depth > peaks.get(listener, 0):
                        peaks[listener] = depth

    def take(self, reader: str, listener: Any, depth: int) -> int:
        """The highest depth since ``reader`` last took this listener's (``depth`` is now's); restart its mark."""
        return max(self._peaks[reader].pop(listener, 0), depth)


def listener_stats(listeners: Iterable[Any], watch: BacklogWatch | None = None,
                   reader: str = "") -> list[dict[str, Any]]:
    """The ``listeners`` list for ``snapshot`` from the master's sockets.Listener objects.

    Each entry has ``accept_queue`` (the depth now), ``accept_queue_max``
    (the limit the kernel applies; under ``reuse_port`` the sum over the
    workers' sockets) and ``accept_queue_peak`` (the highest depth since
    ``reader`` last read ``watch``; the depth now without a watch); None
    for what the kernel does not tell (UNIX sockets).
    """
    from ..sockets import describe

    found = []
    for listener in listeners:
        try:
            address = describe(listener)
        except OSError:
            continue  # closed during a stop
        depth: int | None = None
        limit: int | None = None
        reading = listen_queue(listener.sock)
        if reading is not None:
            depth, limit = reading
        elif (rows := _proc_listen_rows(listener.sock)) is not None:  # the reuse_port placeholder
            depth = sum(rows)
            cap = somaxconn()
            limit = len(rows) * (listener.backlog if cap is None else min(listener.backlog, cap))
        peak = depth
        if depth is not None and watch is not None:
            peak = watch.take(reader, listener, depth)
        found.append({"address": address, "accept_queue": depth, "accept_queue_max": limit,
                      "accept_queue_peak": peak})
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
        """Return ``memory_uss_bytes``, ``memory_pss_bytes``, ``memory_shared_bytes``,
        ``memory_merged_bytes`` and ``cpu_seconds`` for ``pid`` ({} if gone).

        Shared is resident memory that other processes map too (RSS minus
        USS): with preload or refork, what a worker did not have to copy.
        Merged is the part the kernel's same-page merging mapped onto one
        frame (``memory_merge``): 0 when it merged nothing, None where the
        kernel does not tell.
        """
        import psutil

        from ..memorymerge import merged_bytes

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
                reading["memory_shared_bytes"] = max(0, int(memory.rss) - int(memory.uss))
                reading["memory_merged_bytes"] = merged_bytes(pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            reading = {}
        except psutil.AccessDenied:
            pass  # keep what was readable
        self._cache[pid] = (now, reading)
        return reading

    def forget(self, pid: int) -> None:
        """Drop a dead worker's cached reading."""
        self._cache.pop(pid, None)
