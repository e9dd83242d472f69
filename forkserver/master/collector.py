"""The master's end of the workers' stats channels: read without waiting, trust nothing.

Each worker gets its own one-way channel (``stats.new_channel``) before it
is forked.  The master reads the raw bytes itself and does the framing that
``send_bytes`` wrote (a 4-byte big-endian length, then the payload) instead
of calling ``recv_bytes``: that way a frame split across reads simply waits
for its rest, and no library code decides what to do with a length a worker
made up.  Every payload must be exactly one ``stats.WIRE`` message, pass
``stats.decode`` and carry totals no lower than the worker's last ones;
whose message it is follows from the channel, never from its content.

What a worker gets wrong costs it, never the master:

* a well-framed message that fails validation is dropped and counted
  (``stats_messages_rejected``), and logged once for that worker;
* a frame of any other length means the stream cannot be trusted to line up
  again, so that worker's channel is closed with one log line; its last good
  totals keep counting, as when a worker dies mid-write;
* a flood is read at most ``MAX_READ_BYTES`` per channel per turn of the
  master's loop, so the master goes on with its other work in between.
"""

from __future__ import annotations

import logging
import os
import select
import struct
from typing import TYPE_CHECKING

from ..stats import WIRE, decode, new_channel

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from .aggregator import Aggregator

log = logging.getLogger("forkserver")

FRAME_HEADER = struct.Struct("!i")  # what multiprocessing's send_bytes puts before a payload
FRAME_BYTES = FRAME_HEADER.size + WIRE.size
# Per channel and turn of the loop: about 35 messages, far more than a
# worker flushing once a second sends, and a quarter of what a pipe holds,
# so a flooding worker delays the master's other work by microseconds a turn.
MAX_READ_BYTES = 16 * 1024
FINAL_READS = (1 << 20) // MAX_READ_BYTES


class _Channel:
    """One worker's channel as the master reads it."""

    __slots__ = ("reader", "fd", "pid", "slot", "pending", "complained")

    def __init__(self, reader: Connection, pid: int, slot: int) -> None:
        self.reader = reader
        self.fd = reader.fileno()
        self.pid = pid
        self.slot = slot
        self.pending = bytearray()  # bytes of a frame whose rest has not arrived yet
        self.complained = False  # a rejected message was logged already


class StatsCollector:
    """Every live worker's stats channel, read into an ``Aggregator`` from the master's loop."""

    def __init__(self, aggregator: Aggregator, poller: select.poll) -> None:
        self.aggregator = aggregator
        self.poller = poller
        self.channels: dict[int, _Channel] = {}  # worker pid -> its channel

    # -- a worker's life -----------------------------------------------------------

    @staticmethod
    def prepare() -> tuple[Connection, Connection]:
        """Before a fork: a fresh channel, (read end, write end); the write end goes to the worker."""
        return new_channel()

    def attach(self, pid: int, slot: int, ends: tuple[Connection, Connection]) -> None:
        """After the fork, in the master: keep the read end, watch it, let go of the worker's end.

        Only the worker holds the write end now, so its exit reads as end of file.
        """
        reader, writer = ends
        writer.close()
        channel = _Channel(reader, pid, slot)
        self.channels[pid] = channel
        self.poller.register(channel.fd, select.POLLIN)

    @staticmethod
    def abandon(ends: tuple[Connection, Connection]) -> None:
        """The fork failed: close both ends of the channel made for it."""
        for end in ends:
            end.close()

    def close_inherited(self, own: tuple[Connection, Connection] | None) -> None:
        """In a new worker: close every read end we inherited, our own included; keep our write end."""
        for channel in self.channels.values():
            channel.reader.close()
        if own is not None:
            own[0].close()

    def forget(self, pid: int) -> None:
        """A worker was reaped: read what it left in its pipe, its last flush included, then close it.

        Bounded: a pipe holds at most 1 MiB (``pipe-max-size``), and one that
        does not end (a child of the worker still holds the write end) is
        closed after as many reads.
        """
        for _ in range(FINAL_READS):
            channel = self.channels.get(pid)
            if channel is None:
                return
            self._read(channel)
        if pid in self.channels:
            self._close(self.channels[pid])

    def close(self) -> None:
        for channel in list(self.channels.values()):
            self._close(channel)

    # -- reading -------------------------------------------------------------------

    def drain(self) -> None:
        """Take whatever the workers sent, without ever waiting for more."""
        for channel in list(self.channels.values()):
            self._read(channel)

    def _read(self, channel: _Channel) -> None:
        try:
            data = os.read(channel.fd, MAX_READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._break(channel, f"read failed: {exc.strerror}")
            return
        if not data:
            if channel.pending:
                self._break(channel, f"the worker left {len(channel.pending)} bytes of a torn message")
            else:
                self._close(channel)  # the worker is gone and said everything
            return
        pending = channel.pending
        pending += data
        used = 0
        while len(pending) - used >= FRAME_HEADER.size:
            (length,) = FRAME_HEADER.unpack_from(pending, used)
            if length != WIRE.size:
                self.aggregator.note_rejected(channel.pid)
                self._break(channel, f"a frame of {length} bytes where every message is {WIRE.size}")
                return
            if len(pending) - used < FRAME_BYTES:
                break  # the rest arrives with a later read
            payload = bytes(pending[used + FRAME_HEADER.size:used + FRAME_BYTES])
            used += FRAME_BYTES
            try:
                self.aggregator.ingest(channel.pid, decode(payload, channel.pid))
            except ValueError as exc:
                self._reject(channel, str(exc))
        del pending[:used]

    def _reject(self, channel: _Channel, reason: str) -> None:
        self.aggregator.note_rejected(channel.pid)
        if not channel.complained:
            channel.complained = True
            log.warning("stats channel slot=%d pid=%d: dropped a malformed message (%s); "
                        "more are counted in stats_messages_rejected, not logged", channel.slot, channel.pid, reason)

    def _break(self, channel: _Channel, reason: str) -> None:
        log.warning("stats channel slot=%d pid=%d closed: %s; its last good totals still count",
                    channel.slot, channel.pid, reason)
        self.aggregator.mark_broken(channel.pid, reason)
        self._close(channel)

    def _close(self, channel: _Channel) -> None:
        self.poller.unregister(channel.fd)
        channel.reader.close()
        del self.channels[channel.pid]
