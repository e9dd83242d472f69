"""The scoreboard as the master reads it, including states a worker leaves mid-write."""

from __future__ import annotations

import json
import math
import os
import signal
import time

import pytest

from forkserver.scoreboard import HEADER, SLOT, TEXTS, Scoreboard

# A deadline's remaining time is a sum and a difference of monotonic
# floats: read back at once it can come out a few ulps above what was set
# (300.00000000000045 for 300).
CLOCK_SLACK = 1e-6


def test_with_nothing_in_flight_the_loop_beat_decides():
    board = Scoreboard(threads=1, timeout=30.0)
    HEADER.pack_into(board._map, 0, time.monotonic() - 40.0)
    overdue, in_flight = board.overdue()
    assert in_flight == [] and 9.0 < overdue < 15.0


def test_a_request_in_flight_is_stalled_since_it_last_moved_bytes():
    board = Scoreboard(threads=2, timeout=30.0)
    board.request_started(1, "GET", "/slow", "127.0.0.1", {}, time.monotonic())
    (request,) = board.in_flight()
    assert (request.thread, request.method, request.path, request.client) == (1, "GET", "/slow", "127.0.0.1")
    now = time.monotonic()
    SLOT.pack_into(board._map, HEADER.size + SLOT.size, now - 50.0, now - 40.0, 0.0, b"GET", b"/slow", b"127.0.0.1")
    overdue, _ = board.overdue()
    assert 9.0 < overdue < 15.0
    board.request_finished(1)
    assert board.in_flight() == []


def test_a_start_read_beside_the_previous_requests_progress_is_not_a_stall():
    """A start stamp beside an older progress stamp is counted from the start.

    request_started writes the progress stamp first, but a reader must not
    rely on that order alone (it once was the other way round).  After an
    idle spell longer than the timeout, the old progress stamp is older than
    the timeout; counted from it, a healthy worker taking its first request
    in a while would be killed as hung.
    """
    board = Scoreboard(threads=1, timeout=30.0)
    now = time.monotonic()
    SLOT.pack_into(board._map, HEADER.size, now, now - 3600.0, 0.0, b"GET", b"/", b"127.0.0.1")
    overdue, (request,) = board.overdue()
    assert overdue < -25.0 and request.stalled < 5.0


def test_a_master_reading_while_the_worker_beats_never_sees_a_stale_beat():
    """The bug this guards against killed healthy workers under load, rarely.

    ``struct.pack_into`` zeroes a struct before filling it in, so a master
    reading in between saw a beat of 0.0, a worker silent for the machine's
    whole uptime, and aborted it.  Here a forked child beats and serves
    requests as fast as it can while this process reads as the master does.
    """
    board = Scoreboard(threads=1, timeout=30.0)
    child = os.fork()
    if child == 0:  # the worker: beat and serve until the deadline, then leave without cleanup
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for _ in range(100):
                board.beat()
                board.request_started(0, "GET", "/", "127.0.0.1", {}, time.monotonic())
                board.request_progressed(0)
                board.request_finished(0)
        os._exit(0)
    try:
        worst = 0.0
        reads = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            worst = max(worst, board.overdue()[0] + 30.0)
            reads += 1
        assert reads > 1000
        assert worst < 5.0, f"the master read a stall of {worst:.0f}s from a worker beating all along"
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_what_a_hostile_worker_writes_reads_as_sane_numbers_and_printable_text():
    """The worker can write anything into its mapping; the master's reads stay finite and log-safe."""
    board = Scoreboard(3)
    try:
        stamps = memoryview(board._map).cast("d")
        for thread, (start, progress) in enumerate(((math.nan, math.nan), (-5.0, math.inf), (1e300, 1e300))):
            offset = (HEADER.size + thread * SLOT.size) // 8
            stamps[offset], stamps[offset + 1] = start, progress
            TEXTS.pack_into(board._map, (offset + 3) * 8, b"GET\n", b"/a\r\n[x] forged line\0hidden", b"\x1b[2J")
        stamps[0] = math.nan
        stamps.release()
        assert math.isfinite(board.last_beat_age()) and board.last_beat_age() >= 0
        found = board.in_flight()
        assert len(found) == 3
        for request in found:
            assert math.isfinite(request.elapsed) and math.isfinite(request.stalled)
            assert request.elapsed >= 0 and request.stalled >= 0
            assert (request.method, request.path, request.client) == ("GET?", "/a??[x] forged line", "?[2J")
            assert "\n" not in request.describe()
        json.dumps([request.elapsed for request in found], allow_nan=False)
    finally:
        board.close()


def test_an_app_deadline_replaces_the_progress_rule_for_its_request_only():
    board = Scoreboard(threads=2, timeout=30.0, longest=600.0)
    try:
        slow, quick = {}, {}
        board.request_started(0, "GET", "/export", "127.0.0.1", slow, time.monotonic())
        board.request_started(1, "GET", "/", "127.0.0.1", quick, time.monotonic())
        deadline = slow["forkserver.deadline"]
        assert 29.0 < deadline.remaining <= 30.0 + CLOCK_SLACK  # untouched: timeout without progress
        assert 299.0 < deadline.allow(300) <= 300.0 + CLOCK_SLACK
        assert 299.0 < deadline.remaining <= 300.0 + CLOCK_SLACK
        assert 309.0 < deadline.extend(10) <= 310.0 + CLOCK_SLACK
        # The other thread's request keeps its own.
        assert 29.0 < quick["forkserver.deadline"].remaining <= 30.0 + CLOCK_SLACK
        # Had both run 100 s without progress, the extended request would not be overdue; the other would.
        stamps = memoryview(board._map).cast("d")
        for thread in (0, 1):
            start = (HEADER.size + thread * SLOT.size) // 8
            stamps[start + 1] = stamps[start] = time.monotonic() - 100.0
        stamps.release()
        export, plain = sorted(board.in_flight(), key=lambda request: request.thread)
        assert export.overdue(30.0) < -300.0 and plain.overdue(30.0) > 60.0
        assert "deadline=" in export.describe() and "deadline=" not in plain.describe()
        # Shortening counts too, progress or not: the app said this request must end now.
        assert deadline.allow(0) == 0.0
        export = next(request for request in board.in_flight() if request.thread == 0)
        assert export.overdue(30.0) >= 0.0
    finally:
        board.close()


def test_a_deadline_is_cut_to_the_limit_counted_from_the_requests_start():
    board = Scoreboard(threads=1, timeout=30.0, longest=600.0)
    try:
        environ = {}
        board.request_started(0, "POST", "/import", "127.0.0.1", environ, time.monotonic())
        deadline = environ["forkserver.deadline"]
        assert 599.0 < deadline.allow(math.inf) <= 600.0
        for _ in range(5):  # extending again and again never passes the limit
            assert deadline.extend(600) <= 600.0
        with pytest.raises(ValueError):
            deadline.allow(math.nan)
        with pytest.raises(ValueError):
            deadline.allow(-1)
        with pytest.raises(ValueError):
            deadline.extend(math.nan)
        with pytest.raises(TypeError):
            deadline.allow("300")
        board.request_finished(0)
        with pytest.raises(RuntimeError, match="no request is being served"):
            deadline.allow(10)  # kept past its request, between requests
        with pytest.raises(RuntimeError):
            deadline.remaining
        following = {}
        board.request_started(0, "GET", "/next", "127.0.0.1", following, time.monotonic())
        (request,) = board.in_flight()
        assert request.deadline is None  # a new request starts without the old one's deadline
        assert 29.0 < following["forkserver.deadline"].remaining <= 30.0
    finally:
        board.close()


def test_whatever_a_hostile_worker_writes_as_deadline_the_master_caps_it():
    board = Scoreboard(threads=5, timeout=30.0, longest=600.0)
    try:
        now = time.monotonic()
        stamps = memoryview(board._map).cast("d")
        written = (math.nan, -1.0, math.inf, 1e300, now - 5.0)
        for thread, value in enumerate(written):
            start = (HEADER.size + thread * SLOT.size) // 8
            started = now - 10.0 if thread == 4 else now - 1000.0
            stamps[start], stamps[start + 1], stamps[start + 2] = started, now, value
        stamps.release()
        found = {request.thread: request for request in board.in_flight()}
        assert found[0].deadline is None and found[1].deadline is None  # NaN, negative: unset
        for thread in (2, 3):  # infinity and huge: the limit after the start, long past
            assert -401.0 < found[thread].deadline < -399.0 and found[thread].overdue(30.0) > 399.0
        assert -6.0 < found[4].deadline < -4.0
        overdue, _ = board.overdue()
        assert math.isfinite(overdue) and overdue > 399.0
    finally:
        board.close()
