"""Idle keep-alive connections move from a busy worker to a free one, through the master.

A kept-alive connection belongs to the worker that accepted it.  While that
worker runs a long request (in its loop, single-threaded, or on every one of
its threads), a request arriving on one of its other, idle, connections
would wait for it although another worker sits idle: behind a proxy that
keeps upstream connections alive, one slow endpoint would become latency for
unrelated requests.  So a worker busy for longer than ``BUSY_THRESHOLD``
gives its idle connections away: a small watcher thread sends their
descriptors to the master over the worker's own AF_UNIX socketpair
(``SCM_RIGHTS``), and the master passes them on to the least busy other
worker, which adopts them as if it had just accepted them.  Only a
connection with nothing read from it past its last request moves (no
partial request in user space, no response waiting to go out, no PROXY
header read): whatever its client sent since is still in the kernel, and
the adopting worker reads it there.

Never two readers: the giving worker takes the connections out of its loop
before it sends them, and closes its own copies only once the master says
another worker took them; if none could, the master says so and they go
back into the loop.  One offer is outstanding per worker at a time, of at
most ``MAX_FDS`` descriptors, so the descriptors in flight are bounded.

The master runs as root and workers run app code, so it trusts nothing a
worker sends: a message that is not exactly an offer, or a descriptor that
is not a connected stream socket, is dropped (logged once per worker) and
every descriptor that came with it closed; ``SO_LINGER`` is switched off
first, so a worker cannot make that close block.  It never reads or writes
a relayed socket, and reads at most ``MAX_MESSAGES`` per worker per turn of
its loop, so a flood cannot stall it.

Messages (one SOCK_SEQPACKET record each, descriptors as ancillary data):

* worker to master, ``OFFER``: offer number (u32), count (u8), then the
  index of the listener each connection came from (u8 each);
* master to worker, ``VERDICT``: offer number, and whether it was taken;
* master to worker, ``ADOPT``: count, then the listener indexes.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .worker.connection import Connection
    from .scoreboard import Scoreboard

log = logging.getLogger("forkserver")

# A request running this long makes its worker give its idle connections
# away: a request arriving on one of them waits about this long (up to
# IDLE_WATCH_INTERVAL when the worker was idle before) at worst.  Most
# requests end sooner; moving a connection
# costs a fraction of a millisecond of the master's and the workers' time.
# At 50 ms the quick requests' p99 in scripts/holb_bench.py (3 slow clients,
# 4 workers) was about twice gunicorn sync's; at 20 ms it is no worse.
BUSY_THRESHOLD = 0.02
# How often the watcher looks at its worker's scoreboard while no request
# is in flight (with one, it sleeps until the request is BUSY_THRESHOLD
# old): a request that starts meanwhile is noticed this much later at
# worst.  Each look costs a few tens of microseconds; looking every 10 ms
# cost an idle worker 0.5 % of a CPU, every 50 ms about 0.1 %.
IDLE_WATCH_INTERVAL = 0.05
# How soon the watcher tries again when its loop held the lock (threads).
RETRY_SOON = 0.005
# After an offer nobody could take (every other worker busy too), or with
# nothing to give, the watcher looks again this much later.
RETRY_INTERVAL = 0.2
MAX_FDS = 16  # connections in one offer, and so in flight from one worker
MAX_MESSAGES = 4  # read per worker per turn of the master's loop
OFFER = struct.Struct("<4sIB")
VERDICT = struct.Struct("<4sI?")
ADOPT = struct.Struct("<4sB")
OFFER_TAG, VERDICT_TAG, ADOPT_TAG = b"FSo1", b"FSv1", b"FSa1"
RECORD_BYTES = OFFER.size + MAX_FDS
_FD_BYTES = array.array("i").itemsize
_ANCILLARY_BYTES = socket.CMSG_SPACE(MAX_FDS * _FD_BYTES)
_NO_LINGER = struct.pack("ii", 0, 0)


def channel() -> tuple[socket.socket, socket.socket]:
    """Before a fork: a socketpair, (the master's end, the worker's end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def _send(sock: socket.socket, data: bytes, fds: Sequence[int]) -> bool:
    """One record with ``fds`` attached, never waiting; False if the peer's queue is full or gone."""
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    try:
        sock.sendmsg([data], ancillary, socket.MSG_DONTWAIT)
    except OSError:
        return False
    return True


def _receive(sock: socket.socket) -> tuple[bytes, list[int], bool] | None:
    """One record without waiting: (data, descriptors, whole); None if there is none.

    ``whole`` is False when the record or its descriptors did not fit (the
    kernel closed the descriptors that did not).  The descriptors are
    opened close-on-exec: a process the app starts must not inherit them.
    """
    try:
        data, ancillary, flags, _ = sock.recvmsg(RECORD_BYTES, _ANCILLARY_BYTES,
                                                 socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
    except (BlockingIOError, InterruptedError):
        return None
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(array.array("i", payload[:len(payload) - len(payload) % _FD_BYTES]))
    whole = not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    return data, fds, whole


# -- the master's side ------------------------------------------------------------


class _Peer:
    __slots__ = ("sock", "fd", "complained")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.complained = False


class RelayHub:
    """The master's ends of the workers' relay channels."""

    def __init__(self, poller: select.poll) -> None:
        self.poller = poller
        self.peers: dict[int, _Peer] = {}  # worker pid -> its channel
        self.listeners = 0  # how many the master listens on: an offer names one of them per connection

    def attach(self, pid: int, ends: tuple[socket.socket, socket.socket]) -> None:
        """After the fork, in the master: keep our end, watch it, close the worker's."""
        ours, theirs = ends
        theirs.close()
        ours.setblocking(False)
        self.peers[pid] = _Peer(ours)
        self.poller.register(ours.fileno(), select.POLLIN)

    @staticmethod
    def abandon(ends: tuple[socket.socket, socket.socket]) -> None:
        """The fork failed: close both ends made for it."""
        for end in ends:
            end.close()

    def close_inherited(self, own: tuple[socket.socket, socket.socket] | None) -> None:
        """In a new worker: close the master's ends we inherited, keep our own end (if it has one)."""
        for peer in self.peers.values():
            peer.sock.close()
        if own is not None:
            own[0].close()

    def forget(self, pid: int) -> None:
        """A worker was reaped (or hung up)."""
        peer = self.peers.pop(pid, None)
        if peer is not None:
            self.poller.unregister(peer.fd)
            peer.sock.close()

    def close(self) -> None:
        for pid in list(self.peers):
            self.forget(pid)

    def drain(self, takers: Callable[[int], Iterable[int]]) -> None:
        """Act on what the workers sent, without ever waiting for more.

        ``takers(pid)``: the workers that may adopt connections from worker ``pid``, best first.
        """
        for pid, peer in list(self.peers.items()):
            for _ in range(MAX_MESSAGES):
                try:
                    record = _receive(peer.sock)
                except OSError as exc:
                    log.warning("relay channel of worker pid=%d failed (%s); closing it", pid, exc.strerror)
                    self.forget(pid)
                    break
                if record is None:
                    break
                data, fds, whole = record
                if not data and not fds:
                    self.forget(pid)  # the worker is gone
                    break
                self._relay(pid, peer, data, fds, whole, takers)

    def _relay(self, pid: int, peer: _Peer, data: bytes, fds: list[int], whole: bool,
               takers: Callable[[int], Iterable[int]]) -> None:
        socks = []
        for index, fd in enumerate(fds):
            try:
                socks.append(_checked_socket(fd))
            except ValueError as exc:
                for sock in socks:
                    sock.close()
                for rest in fds[index + 1:]:
                    _close_quietly(rest)
                self._drop(pid, peer, str(exc))
                return
        try:
            problem = _check_offer(data, len(fds), whole, self.listeners)
            if problem:
                self._drop(pid, peer, problem)
                return
            number = OFFER.unpack_from(data)[1]
            taken = self._pass_on(pid, data[OFFER.size:], fds, takers)
            if not _send(peer.sock, VERDICT.pack(VERDICT_TAG, number, taken), ()):
                # Gone since it sent the offer, or not reading what we send (an
                # honest worker has room for this: one offer is out at a time).
                log.debug("cannot answer the connection offer of worker pid=%d", pid)
        finally:
            for sock in socks:
                sock.close()  # our copies: the taker has its own, or the giver keeps its

    def _pass_on(self, giver: int, origins: bytes, fds: list[int], takers: Callable[[int], Iterable[int]]) -> bool:
        message = ADOPT.pack(ADOPT_TAG, len(fds)) + origins
        for taker in takers(giver):
            peer = self.peers.get(taker)
            if peer is not None and taker != giver and _send(peer.sock, message, fds):
                log.debug("relayed %d idle connection(s) from busy worker pid=%d to pid=%d", len(fds), giver, taker)
                return True
        return False

    def _drop(self, pid: int, peer: _Peer, why: str) -> None:
        if not peer.complained:
            peer.complained = True
            log.warning("dropped a malformed connection offer from worker pid=%d (%s); "
                        "later ones from it are dropped without a word", pid, why)


def _check_offer(data: bytes, fds: int, whole: bool, listeners: int) -> str:
    """What is wrong with an offer record carrying ``fds`` descriptors; "" if nothing."""
    if not whole:
        return "a record or descriptors beyond the limits"
    if len(data) < OFFER.size or data[:4] != OFFER_TAG:
        return "not an offer"
    count = OFFER.unpack_from(data)[2]
    if not 0 < count <= MAX_FDS or count != fds or len(data) != OFFER.size + count:
        return f"{fds} descriptor(s) for a count of {count} in {len(data)} bytes"
    if any(index >= listeners for index in data[OFFER.size:]):
        return "a listener that does not exist"
    return ""


def _checked_socket(fd: int) -> socket.socket:
    """Wrap a received descriptor, which must be a connected stream socket; ValueError (closed) if not.

    Never a file: a socket is asked for its options only, which cannot
    block, and its close cannot block once lingering is off.
    """
    try:
        sock = socket.socket(fileno=fd)  # raises ENOTSOCK for anything else
    except OSError:
        _close_quietly(fd)
        raise ValueError("a descriptor that is not a socket") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 1
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX) \
            or listening:
        sock.close()
        raise ValueError("a descriptor that is not a connected stream socket")
    return sock


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# -- the worker's side ----------------------------------------------------------------


class Relay:
    """A worker's end: the watcher thread that gives idle connections away and takes others in.

    The loop owns its connection table; the watcher touches it only while
    holding ``lock``, which the loop holds all the time except while it
    waits (in epoll, or in the app when it serves inline).  Connections
    coming back (an offer nobody took) or arriving (adopted) go straight
    into the table while the loop waits, so that they can move on again
    should the loop be busy; otherwise they are queued, the loop is woken
    through ``wake_fd``, and it takes them (``take_queued``), unless the
    watcher's next offer, made with the lock, takes them first.  Either way
    they are only watched, never read, here: the loop reads them when
    epoll says so.
    """

    def __init__(self, sock: socket.socket, board: Scoreboard, wake_fd: int,
                 offerable: Callable[[], list[tuple[Connection, int]]],
                 take_out: Callable[[Connection], None], put_back: Callable[[Connection], None],
                 adopt: Callable[[socket.socket, int], None]) -> None:
        self.sock = sock
        self.board = board
        self.wake_fd = wake_fd
        self.offerable = offerable  # called with the lock held: idle connections and their listener index
        self.take_out = take_out  # called with the lock held: remove one from the loop
        self.put_back = put_back  # called with the lock held: watch one in the loop again
        self.adopt = adopt  # called with the lock held: watch one that came from the listener numbered so
        self.lock = threading.Lock()
        self.enabled = True  # off once the worker stops: its connections stay to be closed by it
        self.returned: deque[Connection] = deque()  # for the loop: offered, but nobody took them
        self.arrived: deque[tuple[socket.socket, int]] = deque()  # for the loop: adopt these
        self.pending: tuple[int, list[Connection]] | None = None  # the offer out, and its connections
        self.offers = 0
        self.next_offer = 0.0  # no offer before this (monotonic), after one came to nothing
        self.watcher: threading.Thread | None = None

    def start(self) -> bool:
        """Start the watcher; False if no thread can be started (a cgroup's ``pids.max`` counts threads)."""
        watcher = threading.Thread(target=self._watch, name="relay", daemon=True)
        try:
            watcher.start()
        except RuntimeError:
            return False
        self.watcher = watcher
        return True

    def stop(self) -> None:
        """End the watcher and close the channel: the worker becomes a refork mold, which must fork alone.

        Shutting the channel down is what wakes the watcher (it reads the
        end of the stream and returns); the master then forgets the channel.
        Connections still out in an offer, or handed back and not yet taken
        by the loop, are closed: the mold serves nothing, and every worker
        it forks would inherit them.
        """
        self.enabled = False
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        if self.watcher is not None:
            self.watcher.join()
        self.sock.close()
        stranded = [*(self.pending[1] if self.pending else ()), *self.returned]
        self.pending = None
        self.returned.clear()
        for connection in stranded:
            connection.close()
        while self.arrived:
            self.arrived.popleft()[0].close()

    def _watch(self) -> None:
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        wait = IDLE_WATCH_INTERVAL
        while True:
            if poller.poll(wait * 1000):
                if not self._read():
                    return  # the master is gone
            wait = IDLE_WATCH_INTERVAL
            if self.pending is None and self.enabled:
                since = self.board.busy_since()
                if since:
                    due = max(since + BUSY_THRESHOLD, self.next_offer)
                    now = time.monotonic()
                    if now >= due:
                        self._offer()
                        due = self.next_offer
                    wait = min(max(due - now, RETRY_SOON), IDLE_WATCH_INTERVAL)

    def _offer(self) -> None:
        if not self.lock.acquire(blocking=False):
            return  # the loop is running its own code: look again on the next turn
        try:
            if not self.enabled:
                return
            # Connections queued for the loop while it ran its own code count
            # too: the loop may now be in a long request, not taking them.
            self.take_queued()
            chosen = self.offerable()[:MAX_FDS]
            if not chosen:
                self.next_offer = time.monotonic() + RETRY_INTERVAL
                return
            for connection, _ in chosen:
                self.take_out(connection)
        finally:
            self.lock.release()
        self.offers = (self.offers + 1) & 0xFFFFFFFF
        connections = [connection for connection, _ in chosen]
        data = OFFER.pack(OFFER_TAG, self.offers, len(chosen)) + bytes(index for _, index in chosen)
        if _send(self.sock, data, [connection.fd for connection in connections]):
            self.pending = (self.offers, connections)
        else:
            self._give_back(connections)

    def _read(self) -> bool:
        """Take every record the master sent; False once it has hung up."""
        while True:
            try:
                record = _receive(self.sock)
            except OSError:
                return False
            if record is None:
                return True
            data, fds, _ = record
            if not data and not fds:
                return False
            if data[:4] == VERDICT_TAG and len(data) == VERDICT.size:
                _, number, taken = VERDICT.unpack(data)
                self._settle(number, taken)
            elif data[:4] == ADOPT_TAG and len(data) == ADOPT.size + len(fds):
                self.arrived.extend((socket.socket(fileno=fd), index) for fd, index in zip(fds, data[ADOPT.size:]))
                self._hand_to_loop()
                continue
            for fd in fds:
                _close_quietly(fd)

    def _settle(self, number: int, taken: bool) -> None:
        if self.pending is None or self.pending[0] != number:
            return
        connections = self.pending[1]
        self.pending = None
        if taken:
            for connection in connections:
                connection.close()  # our copy only: the worker that took it has its own
        else:
            self._give_back(connections)

    def _give_back(self, connections: list[Connection]) -> None:
        """Nobody took them: back into the loop."""
        self.next_offer = time.monotonic() + RETRY_INTERVAL
        self.returned.extend(connections)
        self._hand_to_loop()

    def _hand_to_loop(self) -> None:
        """What is queued goes into the table at once while the loop waits; else the loop is woken to take it."""
        if self.lock.acquire(blocking=False):
            try:
                self.take_queued()
            finally:
                self.lock.release()
        else:
            self._wake()

    def take_queued(self) -> None:
        """With the lock held (by the loop, or us): put every queued connection in the table."""
        while self.returned:
            self.put_back(self.returned.popleft())
        while self.arrived:
            self.adopt(*self.arrived.popleft())

    def _wake(self) -> None:
        try:
            os.write(self.wake_fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is already due to wake
