"""A worker's scoreboard: liveness and requests in flight, in shared memory.

The master creates one small anonymous shared mapping per worker before
forking it and drops it when the worker is gone.  The worker overwrites
fixed-size fields in place; the master reads them whenever it likes, with no
message passing, so it can see a hung worker's stamp go stale and name the
request it hung on even when the worker cannot say anything itself.  There is
no file (gunicorn's temp-file heartbeat stalls on disk-backed /tmp) and no
queue (a wedged stats queue must never look like a hung worker).

Timestamps are ``time.monotonic()``: one system-wide clock on Linux.  Reads
race writes, so every stamp is one aligned 8-byte store through a view of
the mapping as doubles, which a reader sees whole.  Not ``struct.pack_into``:
it zeroes its whole struct before filling it in, and a master that read a
beat in between saw a worker silent since boot and killed it.  A slot's
progress stamp is written before its start and the start is cleared first,
so a start the master sees always has its progress beside it; a torn path
in a diagnostic line is harmless.

The worker runs app code and can write anything into its mapping, so the
master's reads are checked: a stamp that is not a time up to now (NaN, a
negative or future value) reads as now, and texts keep only what precedes a
NUL, with control characters replaced, so they cannot forge log lines.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass

HEADER = struct.Struct("d")  # when the worker's loop last went round
SLOT = struct.Struct("dd8s200s48s")  # started, last progress, method, path, client
TEXTS = struct.Struct("8s200s48s")  # a slot's fields after its two stamps
STAMP_BYTES = 8
BEAT = 0  # index of the beat among the mapping's doubles
assert SLOT.size % STAMP_BYTES == 0  # every slot's stamps stay 8-byte aligned
# Latin-1 decodes any byte; these are its C0 and C1 control characters and DEL.
_CONTROL = {code: "?" for code in (*range(32), *range(127, 160))}


def _stamp(value: float, now: float) -> float:
    """A stamp the master can compute with: ``value`` if it is a time up to ``now``, else ``now``."""
    return value if 0.0 < value <= now else now  # NaN fails the comparison too


def _text(raw: bytes) -> str:
    return raw.partition(b"\0")[0].decode("latin-1").translate(_CONTROL)


@dataclass(frozen=True, eq=False)
class InFlight:
    """One request a worker is serving, as read by the master."""

    thread: int
    method: str
    path: str
    client: str
    elapsed: float
    stalled: float

    def describe(self) -> str:
        """A log fragment: ``GET /path client=1.2.3.4 elapsed=31.2s``."""
        return f"{self.method} {self.path} client={self.client or 'unix'} elapsed={self.elapsed:.1f}s"


class Scoreboard:
    """Shared fields of one worker, with ``threads`` request slots."""

    def __init__(self, threads: int, fd: int = -1) -> None:
        """An anonymous mapping, or with ``fd`` the memory file a mold's child is handed (see ``shareable``)."""
        self.threads = threads
        self._map = mmap.mmap(fd, HEADER.size + threads * SLOT.size)
        self._stamps = memoryview(self._map).cast("d")  # see the module docstring
        # Where each slot's start stamp is among the doubles; its progress stamp follows.
        self._starts = tuple((HEADER.size + thread * SLOT.size) // STAMP_BYTES for thread in range(threads))
        self._shown: list[tuple[str, str, str] | None] = [None] * threads  # worker side: each slot's texts
        self.beat()

    @classmethod
    def shareable(cls, threads: int) -> tuple[Scoreboard, int]:
        """A scoreboard backed by a memory file, and that file's descriptor.

        For a worker forked by a refork mold rather than by the master: the
        mold passes the descriptor on, and the worker maps the same pages.
        The caller closes the descriptor once it has been sent.
        """
        fd = os.memfd_create("forkserver-scoreboard", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, HEADER.size + threads * SLOT.size)
            return cls(threads, fd), fd
        except BaseException:
            os.close(fd)
            raise

    # -- worker side ---------------------------------------------------------

    def beat(self) -> None:
        """Record that the worker's loop is alive now."""
        self._stamps[BEAT] = time.monotonic()

    def request_started(self, thread: int, method: str, path: str, client: str) -> None:
        """Fill a request slot as a request is handed to the app.

        The texts are written only when they differ from the slot's previous
        request's: under load most requests repeat the one before.
        """
        now = time.monotonic()
        started = self._starts[thread]
        shown = (method, path, client)
        if self._shown[thread] != shown:
            self._shown[thread] = shown
            # struct cuts each text to its field's size (and pads the rest with NULs).
            TEXTS.pack_into(self._map, (started + 2) * STAMP_BYTES, method.encode("latin-1", "replace"),
                            path.encode("latin-1", "replace"), client.encode("latin-1", "replace"))
        stamps = self._stamps
        stamps[started + 1] = now
        stamps[started] = now

    def request_progressed(self, thread: int) -> None:
        """Stamp a request slot (and the worker): the request moved bytes, so it is not hung."""
        now = time.monotonic()
        self._stamps[self._starts[thread] + 1] = now
        self._stamps[BEAT] = now

    def request_finished(self, thread: int) -> None:
        """Clear a request slot, and beat: the worker is alive and back in its own code."""
        self._stamps[self._starts[thread]] = 0.0
        self.beat()

    def busy_since(self) -> float:
        """Worker side: when the last of our threads became busy; 0.0 while one is free."""
        stamps = self._stamps
        latest = 0.0
        for start in self._starts:
            started = stamps[start]
            if not started:
                return 0.0
            latest = max(latest, started)
        return latest

    # -- master side ---------------------------------------------------------

    def last_beat_age(self) -> float:
        """Seconds since the worker's loop last beat."""
        now = time.monotonic()
        return now - _stamp(self._stamps[BEAT], now)

    def in_flight(self) -> list[InFlight]:
        """Requests being served right now, oldest first."""
        now = time.monotonic()
        stamps = self._stamps
        found = []
        for thread, start in enumerate(self._starts):
            started = stamps[start]  # read through the same view the worker writes, each stamp whole
            if started:
                started = _stamp(started, now)
                progressed = _stamp(stamps[start + 1], now)
                method, path, client = TEXTS.unpack_from(self._map, (start + 2) * STAMP_BYTES)
                found.append(InFlight(thread, _text(method), _text(path), _text(client),
                                      now - started, now - max(started, progressed)))
        return sorted(found, key=lambda request: -request.elapsed)

    def stalled_for(self) -> tuple[float, list[InFlight]]:
        """How long the worker has made no progress, and the requests in flight.

        With requests in flight, the most stalled one decides: an app stuck
        in one thread is hung even while other threads, and the loop, move.
        With none, the loop's own beat decides.  (While a single-threaded
        worker runs the app its loop cannot beat; request progress stamps it.)
        """
        requests = self.in_flight()
        if requests:
            return max(request.stalled for request in requests), requests
        return self.last_beat_age(), requests

    def close(self) -> None:
        """Unmap (master side, once the worker is reaped)."""
        self._stamps.release()  # a mapping with a view on it cannot be closed
        self._map.close()
