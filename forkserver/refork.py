"""Refork: new workers forked from a warmed worker (the mold), still supervised by the master.

A worker that has served real traffic holds what the app loads lazily (URL
resolvers, compiled templates, translation catalogues, ORM metadata, warm
caches); a fresh fork of the master holds none of it, and every worker
builds its own private copy.  With ``refork_after`` the master promotes a
worker of the current generation that has served that many requests to be
the *mold*: it stops accepting, finishes its connections like a retiring
worker, runs the ``on_mold`` hook, ``gc.collect()`` and ``gc.freeze()``,
and from then on only forks.  Every new worker of the generation (respawns,
recycles, TTIN, and the older workers, rolled over a few at a time) is
forked from it and shares its warmed heap.  Each further count in
``refork_after`` promotes a new mold, from a worker the current mold
forked, and retires the old one.  HUP, code reload and USR2 start again
from the master.

Design, and why:

* **The master stays every worker's parent.**  The master makes itself a
  child subreaper (``PR_SET_CHILD_SUBREAPER``); the mold forks twice and
  the intermediate exits at once, so the worker is reparented to the
  master, which reaps it, times it out, recycles it and counts its stats
  exactly as a worker it forked itself.  The mold waits for the
  intermediate before it reports, so by then the reparenting is done.

* **One channel per worker, both ways.**  With refork on, the master makes
  a ``SOCK_SEQPACKET`` socketpair for every worker it starts (one record per
  message, so messages never merge or split).  A worker says on it when it
  crossed each count (``warm N``); the master promotes it with SIGWINCH (a
  signal wakes its loop; the channel alone would need a place in the request
  loop); the mold answers ``molded`` once ready, then gets fork requests.
  Whose message it is follows from the channel, never from its content.

* **The master makes every per-worker resource**, as for a worker it forks
  itself, and hands the worker's ends to the mold with the fork request
  (``SCM_RIGHTS``): the scoreboard (a memory file instead of an anonymous
  mapping, so it can travel), the stats channel's write end, the log
  handover socket, the worker's own refork channel, and an accept board
  seat number (the board itself is one shared mapping every process already
  has).  So a mold-forked worker is indistinguishable from a master-forked
  one, and nothing is created by code the master does not control.

* **Trust nothing the mold says.**  The mold runs app code.  A pid it
  reports is adopted only if ``/proc/PID/status`` names the master as its
  parent: otherwise the master would signal (as root, maybe) whatever
  process the mold named.  A message of any other form is dropped; at most
  ``MAX_MESSAGES`` are read per channel per turn of the master's loop.

* **Nothing is lost when the mold fails.**  The mold serves no requests, so
  killing it drops none.  A fork request unanswered after ``ANSWER_TIMEOUT``
  marks the mold as hung: it is killed and the slot is forked from the
  master.  A dead mold's pending requests fall back to the master too.  A
  worker forked from the mold that fails to boot turns refork off for the
  generation (the mold's state, e.g. a hook that closed what workers need,
  is the likely cause) and its slot is forked from the master at once.
"""

from __future__ import annotations

import array
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from . import libc

log = logging.getLogger("forkserver")

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
MAX_MESSAGE = 128  # bytes; the longest real message is about 40
MAX_MESSAGES = 16  # per channel and turn of the master's loop
ANSWER_TIMEOUT = 5.0  # seconds a mold has to answer a fork request (a fork takes milliseconds)
MAX_FDS = 4  # a fork request's descriptors: scoreboard, log handover, refork channel, stats
MAX_EARLY = 64  # notices held for workers a mold forked but the master has not adopted yet
_FROM_WORKER = re.compile(rb"(warm) ([0-9]{1,12})|(molded)|(forked) ([0-9]{1,12}) ([0-9]{1,10})"
                          rb"|(unforked) ([0-9]{1,12}) (.{0,80})", re.DOTALL)
_FORK_REQUEST = re.compile(rb"fork ([0-9]{1,12}) ([0-9]{1,6}) ([0-9]{1,9}) ([0-9]{1,6})")


def become_subreaper() -> bool:
    """Make orphaned descendants our children (Linux); False, with a warning, where that fails."""
    prctl = libc.function("prctl")
    if prctl is None or prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("refork: cannot become a child subreaper; workers fork from the master instead")
        return False
    return True


def new_channel() -> tuple[socket.socket, socket.socket]:
    """A worker's refork channel: (the master's end, non-blocking; the worker's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    return ours, theirs


def parent_of(pid: int) -> int:
    """The parent pid the kernel reports for ``pid``; 0 if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


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


@dataclass(eq=False)
class PendingFork:
    """A fork the master asked the mold for, waiting for its answer."""

    token: int
    mold: int  # the pid asked: only its answer counts
    slot: int
    generation: int
    provisions: Any  # the master's Provisions for the worker
    replaces: int  # pid of the worker it takes over from in a rollover; 0 for a new slot
    asked_at: float = field(default_factory=time.monotonic)


@dataclass(eq=False)
class ReforkState:
    """The master's refork bookkeeping for the current generation."""

    counts: tuple[int, ...]  # refork_after
    stage: int = 0  # how many of ``counts`` have promoted a mold
    mold: int = 0  # pid of the mold (promoted, maybe not ready yet); 0 for none
    mold_ready: bool = False
    promoted_at: float = 0.0
    lineage: int = 0  # bumped whenever a mold becomes ready; workers forked before are rolled over
    retired_molds: set[int] = field(default_factory=set)  # old molds told to leave
    off_for: int = 0  # a generation for which refork was turned off after a failure
    channels: dict[int, socket.socket] = field(default_factory=dict)  # worker pid -> the master's end
    pending: dict[int, PendingFork] = field(default_factory=dict)  # token -> the fork asked for
    next_token: int = 1
    early: dict[int, list[Any]] = field(default_factory=dict)  # pid -> notices that came before its adoption
    early_since: dict[int, float] = field(default_factory=dict)  # pid -> when its first early notice came

    def next_count(self) -> int:
        """The request count that promotes the next mold; 0 once every count has."""
        return self.counts[self.stage] if self.stage < len(self.counts) else 0

    def token(self) -> int:
        self.next_token += 1
        return self.next_token

    def receive(self, pid: int) -> list[tuple[str, ...]]:
        """The well-formed messages waiting on worker ``pid``'s channel, at most MAX_MESSAGES."""
        sock = self.channels.get(pid)
        found: list[tuple[str, ...]] = []
        if sock is None:
            return found
        for _ in range(MAX_MESSAGES):
            try:
                data = sock.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not data:
                break  # the worker is gone; its reaping closes the channel
            message = parse(data)
            if message is not None:
                found.append(message)
        return found

    def hold_early(self, notice: Any) -> None:
        """Keep a notice from an unknown pid: a mold's worker may be faster than its mold.

        The worker writes ``ready`` on the notice pipe, the mold its pid on
        the channel; either may be read first.  Held ones are acted on at
        adoption; one still unclaimed after ``ANSWER_TIMEOUT`` names a stray
        (see ``strays``).  Never more than ``MAX_EARLY`` are held, so a
        worker writing made-up pids fills nothing.
        """
        if sum(map(len, self.early.values())) < MAX_EARLY:
            self.early.setdefault(notice.pid, []).append(notice)
            self.early_since.setdefault(notice.pid, time.monotonic())

    def strays(self) -> list[int]:
        """Pids whose notices went unclaimed for ``ANSWER_TIMEOUT``: dropped from the table and returned.

        A mold killed between its fork and its report, or one that answers
        after the master gave up on it, leaves a worker nobody supervises;
        its ``ready`` notice is how the master learns of it.
        """
        now = time.monotonic()
        late = [pid for pid, since in self.early_since.items() if now - since > ANSWER_TIMEOUT]
        for pid in late:
            self.early.pop(pid, None)
            del self.early_since[pid]
        return late

    def claim_early(self, pid: int) -> list[Any]:
        """The notices held for a worker being adopted now."""
        self.early_since.pop(pid, None)
        return self.early.pop(pid, [])

    def forget(self, pid: int) -> socket.socket | None:
        """A worker was reaped: drop its channel (the caller unregisters and closes it)."""
        self.claim_early(pid)
        self.retired_molds.discard(pid)
        return self.channels.pop(pid, None)
