"""Refork's channel: the messages a worker or the mold and the master exchange.

With ``refork_after`` each worker has a ``SOCK_SEQPACKET`` socketpair to the
master (one record per message, so messages never merge or split).  A
worker says on it when it crossed each count (``warm N``); the mold answers
``molded`` once ready, then gets fork requests (``fork TOKEN SLOT GENERATION
SEAT``, with the new worker's descriptors attached) and answers ``forked
TOKEN PID`` or ``unforked TOKEN WHY``.  Both sides speak it, so it lives
here; the master's supervision is ``forkserver.master.refork``, the mold's
side ``forkserver.worker.mold``.  Every message is parsed as untrusted: the
mold runs app code.
"""

from __future__ import annotations

import array
import re
import socket

MAX_MESSAGE = 128  # bytes; the longest real message is about 40
MAX_FDS = 5  # a fork request's descriptors: scoreboard, log handover, refork channel, relay channel, stats
_FROM_WORKER = re.compile(rb"(warm) ([0-9]{1,12})|(molded)|(forked) ([0-9]{1,12}) ([0-9]{1,10})"
                          rb"|(unforked) ([0-9]{1,12}) (.{0,80})", re.DOTALL)
_FORK_REQUEST = re.compile(rb"fork ([0-9]{1,12}) ([0-9]{1,6}) ([0-9]{1,9}) ([0-9]{1,6})")


def new_channel() -> tuple[socket.socket, socket.socket]:
    """A worker's refork channel: (the master's end, non-blocking; the worker's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


def parse(message: bytes) -> tuple[str, ...] | None:
    """A message from a worker or mold as (kind, fields...), or None if it is not one."""
    match = _FROM_WORKER.fullmatch(message)
    if match is None:
        return None
    parts = [part for part in match.groups() if part is not None]
    text = [part.decode("ascii", "replace") for part in parts]
    return tuple(text[:-1] + [text[-1].translate({code: "?" for code in (*range(32), 127)})])


def encode_fork(token: int, slot: int, generation: int, seat: int) -> bytes:
    return b"fork %d %d %d %d" % (token, slot, generation, seat)


def parse_fork(message: bytes) -> tuple[int, int, int, int] | None:
    """A fork request as (token, slot, generation, seat), in the mold."""
    match = _FORK_REQUEST.fullmatch(message)
    if match is None:
        return None
    token, slot, generation, seat = (int(group) for group in match.groups())
    return token, slot, generation, seat


def send(sock: socket.socket, message: bytes, fds: list[int] | None = None) -> bool:
    """One record, never waiting; False if it could not go (the peer is gone or not reading)."""
    try:
        if fds:
            sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                           socket.MSG_DONTWAIT)
        else:
            sock.send(message, socket.MSG_DONTWAIT)
    except OSError:
        return False
    return True
