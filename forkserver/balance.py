"""Keep-alive connections spread evenly over the workers.

All workers wait on the same listening sockets and the kernel lets whichever
is awake first take a new connection.  With keep-alive that first choice
lasts: a burst of connections at start-up could leave one worker holding
most of them, and serving most requests, while another idled.  So each
worker publishes, in one shared table the master maps before forking, how
many connections it holds, whether it is willing to accept (not stopping,
not every thread busy), and until when it is sure to be responsive.  A
worker stops accepting while another willing, responsive worker holds fewer
connections than it (minus a little slack), and looks again on every turn
of its loop, at least every ``RECHECK``.

Responsive means the worker's loop went round within ``AVAILABLE_WITHIN``
(or it sleeps in epoll, where a new connection wakes it at once): a worker
stuck in a long request does not count, so it does not hold the others
back, and a dead worker's seat goes stale on its own.  Whoever holds the
fewest connections among the willing always may accept, so the queue waits
at most one ``RECHECK`` for somebody to take it.

Seats, not slots: old and new generations share slot numbers during a
reload, so the master hands out seats and takes them back when it reaps.
A seat read while its worker rewrites it (``struct.pack_into`` zeroes it
first) reads as unwilling, so a race costs at most one accept out of turn.

Workers run app code and can scribble on the table, so the master never
reads it: it keeps the seats it handed out (and their count) to itself and
only writes.  A worker reading a scribbled count bounds it to the table.
"""

from __future__ import annotations

import functools
import mmap
import struct
import time

MAX_SEATS = 1024
HEADER = struct.Struct("<i4x")  # seats in use: the high-water mark of handed-out seats
HEADER_BYTES = HEADER.size
# Responsive until (monotonic), connections held, willing to accept (0/1); 16 bytes, no padding.
SEAT_FORMAT = "dii"
SEAT = struct.Struct("<" + SEAT_FORMAT)
SEAT_BYTES = SEAT.size
# A loop that has not gone round for this long is busy in the app (or gone).
AVAILABLE_WITHIN = 0.05
# How often a worker that stopped accepting looks again.
RECHECK = 0.01
# Connections a worker may hold beyond the least-loaded available worker.
SLACK = 1


class AcceptBoard:
    """The shared table: the master hands out seats, each worker writes its own."""

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, HEADER_BYTES + MAX_SEATS * SEAT_BYTES)
        self._taken: dict[int, int] = {}  # master side: pid -> seat
        self._reserved: set[int] = set()
        self._seats = 0  # master side: the high-water mark it last wrote to the header

    # -- master side ---------------------------------------------------------

    def take(self) -> int:
        """Reserve the lowest free seat for a worker about to be forked; -1 if none is left."""
        used = self._reserved | set(self._taken.values())
        seat = next((s for s in range(MAX_SEATS) if s not in used), -1)
        if seat < 0:
            return -1  # that worker simply does not take part in balancing
        self._reserved.add(seat)
        SEAT.pack_into(self._map, HEADER_BYTES + seat * SEAT_BYTES, 0.0, 0, 0)
        if seat >= self._seats:
            self._seats = seat + 1
        HEADER.pack_into(self._map, 0, self._seats)  # rewritten each time: a worker may have scribbled on it
        return seat

    def bind(self, seat: int, pid: int) -> None:
        """Record which forked worker sits in ``seat``."""
        if seat >= 0:
            self._reserved.discard(seat)
            self._taken[pid] = seat

    def give_back(self, seat: int) -> None:
        """Free a seat taken for a worker that could not be forked."""
        self._reserved.discard(seat)

    def release(self, pid: int) -> None:
        """Free the seat of a reaped worker."""
        seat = self._taken.pop(pid, -1)
        if seat >= 0:
            SEAT.pack_into(self._map, HEADER_BYTES + seat * SEAT_BYTES, 0.0, 0, 0)

    # -- worker side ---------------------------------------------------------

    def writer(self, seat: int) -> SeatWriter:
        """The writer of ``seat`` (not -1: a worker without a seat takes no part)."""
        return SeatWriter(self._map, HEADER_BYTES + seat * SEAT_BYTES)

    def may_accept(self, seat: int, connections: int) -> bool:
        """Should a worker holding ``connections`` take another one?"""
        if connections <= SLACK or seat < 0:
            return True
        seats = min(max(HEADER.unpack_from(self._map, 0)[0], 0), MAX_SEATS)
        fields = struct.unpack_from("<" + SEAT_FORMAT * seats, self._map, HEADER_BYTES)
        now = time.monotonic()
        fewest = connections
        for index in range(0, len(fields), 3):
            if fields[index + 2] and fields[index] >= now and fields[index + 1] < fewest and index != seat * 3:
                fewest = fields[index + 1]
        return connections <= fewest + SLACK


class SeatWriter:
    """A worker's own seat, written by its loop on every wake.

    The seat's place in the table is bound once, so a publish is one
    ``pack_into`` call: 17 bytecodes instead of 30 when the offset and the
    seat check were worked out on each of the two publishes per wake.
    """

    __slots__ = ("_pack",)

    def __init__(self, table: mmap.mmap, offset: int) -> None:
        self._pack = functools.partial(SEAT.pack_into, table, offset)

    def publish(self, connections: int, willing: bool, now: float, sleeping_for: float = 0.0) -> None:
        """Say that our loop goes round at ``now`` (its turn's ``time.monotonic()``), or then sleeps ``sleeping_for``."""
        self._pack(now + AVAILABLE_WITHIN + sleeping_for, connections, willing)
