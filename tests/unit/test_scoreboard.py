"""The scoreboard as the master reads it, including states a worker leaves mid-write."""

from __future__ import annotations

import json
import math
import os
import signal
import time

from forkserver.scoreboard import HEADER, SLOT, TEXTS, Scoreboard


def test_with_nothing_in_flight_the_loop_beat_decides():
    board = Scoreboard(threads=1)
    HEADER.pack_into(board._map, 0, time.monotonic() - 40.0)
    stalled, in_flight = board.stalled_for()
    assert in_flight == [] and 39.0 < stalled < 45.0


def test_a_request_in_flight_is_stalled_since_it_last_moved_bytes():
    board = Scoreboard(threads=2)
    board.request_started(1, "GET", "/slow", "127.0.0.1")
    (request,) = board.in_flight()
    assert (request.thread, request.method, request.path, request.client) == (1, "GET", "/slow", "127.0.0.1")
    now = time.monotonic()
    SLOT.pack_into(board._map, HEADER.size + SLOT.size, now - 50.0, now - 40.0, b"GET", b"/slow", b"127.0.0.1")
    stalled, _ = board.stalled_for()
    assert 39.0 < stalled < 45.0
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
    board = Scoreboard(threads=1)
    now = time.monotonic()
    SLOT.pack_into(board._map, HEADER.size, now, now - 3600.0, b"GET", b"/", b"127.0.0.1")
    stalled, (request,) = board.stalled_for()
    assert stalled < 5.0 and request.stalled < 5.0


def test_a_master_reading_while_the_worker_beats_never_sees_a_stale_beat():
    """The bug this guards against killed healthy workers under load, rarely.

    ``struct.pack_into`` zeroes a struct before filling it in, so a master
    reading in between saw a beat of 0.0, a worker silent for the machine's
    whole uptime, and aborted it.  Here a forked child beats and serves
    requests as fast as it can while this process reads as the master does.
    """
    board = Scoreboard(threads=1)
    child = os.fork()
    if child == 0:  # the worker: beat and serve until the deadline, then leave without cleanup
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for _ in range(100):
                board.beat()
                board.request_started(0, "GET", "/", "127.0.0.1")
                board.request_progressed(0)
                board.request_finished(0)
        os._exit(0)
    try:
        worst = 0.0
        reads = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            worst = max(worst, board.stalled_for()[0])
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
            TEXTS.pack_into(board._map, (offset + 2) * 8, b"GET\n", b"/a\r\n[x] forged line\0hidden", b"\x1b[2J")
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
