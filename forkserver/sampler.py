"""What the kernel says about the server, for /stats: accept queues and worker memory and CPU.

Read only when /stats is asked for, and cached where reading costs (smaps).
psutil is imported at first use: only a start with stats on needs it.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterable
from typing import Any

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
        """Return ``memory_uss_bytes``, ``memory_pss_bytes``, ``memory_shared_bytes`` and ``cpu_seconds``
        for ``pid`` ({} if gone).

        Shared is resident memory that other processes map too (RSS minus
        USS): with preload or refork, what a worker did not have to copy.
        """
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
                reading["memory_shared_bytes"] = max(0, int(memory.rss) - int(memory.uss))
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            reading = {}
        except psutil.AccessDenied:
            pass  # keep what was readable
        self._cache[pid] = (now, reading)
        return reading

    def forget(self, pid: int) -> None:
        """Drop a dead worker's cached reading."""
        self._cache.pop(pid, None)
