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

A request's app may move the moment its request counts as hung (see
``Deadline``).  The master caps that moment at ``longest`` seconds after the
request started, whatever the mapping says, so no value an app writes can
keep a worker alive longer than the operator allowed; an app running
arbitrary code in the worker could still fake progress stamps, as it always
could, so the cap bounds honest use and garbage, not a deliberate forger.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import time

HEADER = struct.Struct("d")  # when the worker's loop last went round
SLOT = struct.Struct("ddd8s200s48s")  # started, last progress, the app's deadline, method, path, client
TEXTS = struct.Struct("8s200s48s")  # a slot's fields after its three stamps
STAMP_BYTES = 8
BEAT = 0  # index of the beat among the mapping's doubles
# Where a slot's other stamps are among the doubles, counted from its start stamp.
PROGRESS, DEADLINE, TEXTS_AT = 1, 2, 3
assert SLOT.size % STAMP_BYTES == 0  # every slot's stamps stay 8-byte aligned
# Latin-1 decodes any byte; these are its C0 and C1 control characters and DEL.
_CONTROL = {code: "?" for code in (*range(32), *range(127, 160))}


def _stamp(value: float, now: float) -> float:
    """A stamp the master can compute with: ``value`` if it is a time up to ``now``, else ``now``."""
    return value if 0.0 < value <= now else now  # NaN fails the comparison too


def _text(raw: bytes) -> str:
    return raw.partition(b"\0")[0].decode("latin-1").translate(_CONTROL)


class InFlight:
    """One request a worker is serving, as read by the master.

    A plain class, not a dataclass: see ``forkserver.records``.
    """

    __slots__ = ("thread", "method", "path", "client", "elapsed", "stalled", "deadline")

    def __init__(self, thread: int, method: str, path: str, client: str, elapsed: float, stalled: float,
                 deadline: float | None = None) -> None:
        self.thread = thread
        self.method = method
        self.path = path
        self.client = client
        self.elapsed = elapsed
        self.stalled = stalled
        self.deadline = deadline  # seconds from now to the deadline its app set (capped); None if unset

    def overdue(self, timeout: float) -> float:
        """Seconds past the moment this request counts as hung; negative while it does not.

        Its app's deadline decides when it set one; otherwise ``timeout``
        without progress does.
        """
        return -self.deadline if self.deadline is not None else self.stalled - timeout

    def describe(self) -> str:
        """A log fragment: ``GET /path client=1.2.3.4 elapsed=31.2s``, and ``deadline=...`` if its app set one."""
        text = f"{self.method} {self.path} client={self.client or 'unix'} elapsed={self.elapsed:.1f}s"
        if self.deadline is not None:
            text += f" deadline={self.elapsed + self.deadline:.1f}s"  # counted from its start, like elapsed
        return text


class Deadline:
    """``environ["forkserver.deadline"]``: when this request counts as hung, which its app may move.

    Until the app calls ``allow`` or ``extend``, the request counts as hung
    once it has moved no bytes for ``timeout`` seconds, as every request
    does.  After a call, the deadline it set alone decides, so a report
    export can take ten minutes without ``timeout`` rising for everything,
    and a request that must never take long can be cut short.  No deadline
    lies more than ``longest`` seconds (``deadline_limit``) after the request
    started: a longer one is cut to that, and the methods return what was
    granted.

    There is one per scoreboard slot (thread), handed to each request it
    serves: a new object per request added 47 bytecodes and a call to a
    hello-world request's 1027 (scripts/profile_request.py --bytecodes),
    one per slot adds 23.  So an app that keeps it past its request moves
    whatever request that thread serves then; between requests it raises
    RuntimeError.
    """

    __slots__ = ("_board", "_slot")

    def __init__(self, board: Scoreboard, thread: int) -> None:
        self._board, self._slot = board, board._starts[thread]

    @property
    def started(self) -> float:
        """``time.monotonic()`` when the app got the request being served; RuntimeError between requests."""
        started = self._board._stamps[self._slot]
        if not started:
            raise RuntimeError("no request is being served: its deadline is gone with it")
        return started

    @property
    def remaining(self) -> float:
        """Seconds until this request counts as hung (inf with no timeout and no deadline)."""
        started, board = self.started, self._board
        stamps = board._stamps
        deadline = stamps[self._slot + DEADLINE]
        if deadline:
            until = min(deadline, started + board.longest)
        elif board.timeout:
            until = max(started, stamps[self._slot + PROGRESS]) + board.timeout
        else:
            return math.inf
        return until - time.monotonic()

    def allow(self, seconds: float) -> float:
        """Let this request run ``seconds`` more from now, moving bytes or not; the seconds granted."""
        if not seconds >= 0:  # NaN fails too
            raise ValueError(f"a deadline needs seconds >= 0, got {seconds!r}")
        started = self.started
        now = time.monotonic()
        until = max(min(now + seconds, started + self._board.longest), now)
        self._board._stamps[self._slot + DEADLINE] = until
        return until - now

    def extend(self, seconds: float) -> float:
        """Move the deadline ``seconds`` later (earlier if negative); the seconds now granted from now."""
        if math.isnan(seconds):
            raise ValueError("a deadline cannot move by NaN seconds")
        return self.allow(max(self.remaining + seconds, 0.0))


class Scoreboard:
    """Shared fields of one worker, with ``threads`` request slots."""

    def __init__(self, threads: int, fd: int = -1, *, timeout: float = 0.0, longest: float = 0.0) -> None:
        """An anonymous mapping, or with ``fd`` the memory file a mold's child is handed (see ``shareable``).

        ``timeout`` and ``longest`` are the worker's settings ``timeout`` and
        ``deadline_limit``: how long a request may go without progress, and how
        long after its start its app may move its deadline to.  The master
        judges the worker by the values the worker was made with.
        """
        self.threads = threads
        self.timeout = timeout
        self.longest = longest
        self._map = mmap.mmap(fd, HEADER.size + threads * SLOT.size)
        self._stamps = memoryview(self._map).cast("d")  # see the module docstring
        # Where each slot's start stamp is among the doubles; its progress stamp follows.
        self._starts = tuple((HEADER.size + thread * SLOT.size) // STAMP_BYTES for thread in range(threads))
        self._shown: list[tuple[str, str, str] | None] = [None] * threads  # worker side: each slot's texts
        # Worker side: each slot's Deadline, and the environ of the request it serves (for worker_abort).
        self._deadlines = tuple(Deadline(self, thread) for thread in range(threads))
        self._environs: list[dict[str, object] | None] = [None] * threads
        self.beat()

    @classmethod
    def shareable(cls, threads: int, *, timeout: float = 0.0, longest: float = 0.0) -> tuple[Scoreboard, int]:
        """A scoreboard backed by a memory file, and that file's descriptor.

        For a worker forked by a refork mold rather than by the master: the
        mold passes the descriptor on, and the worker maps the same pages.
        The caller closes the descriptor once it has been sent.
        """
        fd = os.memfd_create("forkserver-scoreboard", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, HEADER.size + threads * SLOT.size)
            return cls(threads, fd, timeout=timeout, longest=longest), fd
        except BaseException:
            os.close(fd)
            raise

    # -- worker side ---------------------------------------------------------

    def beat(self, now: float | None = None) -> None:
        """Record that the worker's loop is alive at ``now`` (``time.monotonic()``; by default, now)."""
        self._stamps[BEAT] = time.monotonic() if now is None else now

    def request_started(self, thread: int, method: str, path: str, client: str, environ: dict[str, object],
                        now: float) -> None:
        """Fill a request slot as a request is handed to the app, and give ``environ`` its Deadline.

        ``now`` is when the worker took the request (``time.monotonic()``):
        it read the clock for the request's duration already.  The texts are
        written only when they differ from the slot's previous request's:
        under load most requests repeat the one before.
        """
        started = self._starts[thread]
        shown = (method, path, client)
        if self._shown[thread] != shown:
            self._shown[thread] = shown
            # struct cuts each text to its field's size (and pads the rest with NULs).
            TEXTS.pack_into(self._map, (started + TEXTS_AT) * STAMP_BYTES, method.encode("latin-1", "replace"),
                            path.encode("latin-1", "replace"), client.encode("latin-1", "replace"))
        stamps = self._stamps
        stamps[started + DEADLINE] = 0.0
        stamps[started + PROGRESS] = now
        stamps[started] = now
        self._environs[thread] = environ
        environ["forkserver.deadline"] = self._deadlines[thread]

    def request_progressed(self, thread: int) -> None:
        """Stamp a request slot (and the worker): the request moved bytes, so it is not hung."""
        now = time.monotonic()
        self._stamps[self._starts[thread] + PROGRESS] = now
        self._stamps[BEAT] = now

    def request_finished(self, thread: int) -> None:
        """Clear a request slot, and beat: the worker is alive and back in its own code.

        (The beat is written here rather than by calling ``beat``: this runs
        for every request, and the call was a fifth of its cost.)
        """
        stamps = self._stamps
        stamps[self._starts[thread]] = 0.0
        self._environs[thread] = None
        stamps[BEAT] = time.monotonic()

    def serving(self) -> list[tuple[int, dict[str, object], float]]:
        """Worker side: each busy slot, the environ of its request, and when the app got it."""
        return [(thread, environ, self._stamps[self._starts[thread]])
                for thread, environ in enumerate(self._environs) if environ is not None]

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
                progressed = _stamp(stamps[start + PROGRESS], now)
                deadline = self._deadline(stamps[start + DEADLINE], started, now)
                method, path, client = TEXTS.unpack_from(self._map, (start + TEXTS_AT) * STAMP_BYTES)
                found.append(InFlight(thread, _text(method), _text(path), _text(client),
                                      now - started, now - max(started, progressed), deadline))
        return sorted(found, key=lambda request: -request.elapsed)

    def _deadline(self, value: float, started: float, now: float) -> float | None:
        """Seconds from ``now`` to a slot's deadline as the worker wrote it, capped; None if unset.

        Any double is safe here: NaN, zero and negatives read as unset, and
        nothing lies beyond ``longest`` after the start (infinity included).
        """
        if not value > 0.0:
            return None
        return min(value, started + self.longest) - now

    def overdue(self) -> tuple[float, list[InFlight]]:
        """How far past its allowance the worker is (positive: hung), and the requests in flight.

        With requests in flight, the most overdue one decides: an app stuck
        in one thread is hung even while other threads, and the loop, move.
        With none, the loop's own beat decides.  (While a single-threaded
        worker runs the app its loop cannot beat; request progress stamps it.)
        """
        requests = self.in_flight()
        if requests:
            return max(request.overdue(self.timeout) for request in requests), requests
        return self.last_beat_age() - self.timeout, requests

    def close(self) -> None:
        """Unmap (master side, once the worker is reaped)."""
        self._stamps.release()  # a mapping with a view on it cannot be closed
        self._map.close()
