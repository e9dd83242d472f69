"""The accept board: shared connection counts that keep keep-alive load spread over workers.

One real shared mapping, written and read the way the master and workers do.
"""

from __future__ import annotations

import time

from forkserver.balance import AVAILABLE_WITHIN, SLACK, AcceptBoard


def seated(board: AcceptBoard, count: int) -> list[int]:
    seats = [board.take() for _ in range(count)]
    for pid, seat in enumerate(seats, start=1000):
        board.bind(seat, pid)
    return seats


def test_seats_are_handed_out_lowest_first_and_reused_after_release():
    board = AcceptBoard()
    assert seated(board, 3) == [0, 1, 2]
    board.release(1001)  # the worker in seat 1 was reaped
    assert board.take() == 1
    assert board.take() == 3


def test_a_worker_with_more_connections_than_a_willing_peer_stops_accepting():
    board = AcceptBoard()
    busy, light = seated(board, 2)
    board.writer(busy).publish(10, True, time.monotonic())
    board.writer(light).publish(2, True, time.monotonic())
    assert not board.may_accept(busy, 10)
    assert board.may_accept(light, 2)
    assert board.may_accept(busy, 2 + SLACK)  # within the slack it takes its turn


def test_the_fewest_always_may_accept_even_when_counts_are_equal():
    board = AcceptBoard()
    seats = seated(board, 3)
    for seat in seats:
        board.writer(seat).publish(7, True, time.monotonic())
    assert all(board.may_accept(seat, 7) for seat in seats)


def test_unwilling_stale_and_released_peers_do_not_hold_a_worker_back():
    board = AcceptBoard()
    me, stopping, stuck, reaped = seated(board, 4)
    board.writer(me).publish(20, True, time.monotonic())
    board.writer(stopping).publish(0, False, time.monotonic())  # stopping, or every thread busy
    board.writer(stuck).publish(0, True, time.monotonic())
    board.writer(reaped).publish(0, True, time.monotonic())
    board.release(1003)
    time.sleep(AVAILABLE_WITHIN * 2)  # "stuck" has not gone round its loop since
    board.writer(me).publish(20, True, time.monotonic())
    assert board.may_accept(me, 20)


def test_a_peer_asleep_in_epoll_counts_as_responsive_while_it_sleeps():
    board = AcceptBoard()
    me, sleeper = seated(board, 2)
    board.writer(sleeper).publish(0, True, time.monotonic(), sleeping_for=5.0)
    time.sleep(AVAILABLE_WITHIN * 2)
    assert not board.may_accept(me, 5)


def test_a_scribbled_header_neither_misleads_the_master_nor_breaks_the_others():
    """A worker can write anything into the shared table; the master never reads it back."""
    from forkserver.balance import HEADER, MAX_SEATS

    board = AcceptBoard()
    first = board.take()
    board.bind(first, 1001)
    HEADER.pack_into(board._map, 0, 2**31 - 1)  # a hostile worker claims every seat is in use
    second = board.take()
    assert second == first + 1 and HEADER.unpack_from(board._map, 0)[0] == second + 1
    HEADER.pack_into(board._map, 0, -7)
    assert board.may_accept(first, 5) in (True, False)  # reads a bounded table, raises nothing
    HEADER.pack_into(board._map, 0, MAX_SEATS * 4)
    assert board.may_accept(first, 5) in (True, False)
