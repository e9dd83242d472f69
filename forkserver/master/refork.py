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

``ReforkSupervisor`` here is the master's side of all this, ``forkserver.worker.mold``
the mold's, and ``forkserver.refork`` the channel between them.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import libc
from ..hooks import HookContext
from ..refork import MAX_MESSAGE, encode_fork, parse, send

if TYPE_CHECKING:
    from .pool import WorkerHandle
    from .process import Master, Provisions

log = logging.getLogger("forkserver")

PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
MAX_MESSAGES = 16  # per channel and turn of the master's loop
ANSWER_TIMEOUT = 5.0  # seconds a mold has to answer a fork request (a fork takes milliseconds)
ROLL_SHARE = 4  # a rollover replaces at most a quarter of the pool (at least one worker) at once
MAX_EARLY = 64  # notices held for workers a mold forked but the master has not adopted yet


def become_subreaper() -> bool:
    """Make orphaned descendants our children (Linux); False, with a warning, where that fails."""
    prctl = libc.function("prctl")
    if prctl is None or prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning("refork: cannot become a child subreaper; workers fork from the master instead")
        return False
    return True


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


class ReforkSupervisor:
    """The master's refork duties: promoting molds, asking them for workers, adopting and rolling over.

    The master calls it at a few points of its loop and of a worker's life
    (spawn, admission, readiness, boot failure, reaping, reload); for what
    every worker gets whoever forks it (its provisions, admission, retiring,
    signals) it calls back into the master.
    """

    def __init__(self, master: Master, counts: tuple[int, ...]) -> None:
        self.master = master
        self.state = ReforkState(counts)

    def fork_source(self) -> str:
        """Who forks the next worker of this generation: "mold", "master", or "wait" (the mold gets ready)."""
        state = self.state
        if not state.mold or state.off_for == self.master.generation:
            return "master"
        mold = self.master.pool.workers.get(state.mold)
        if mold is None or mold.generation != self.master.generation:
            return "master"
        if state.mold_ready:
            return "mold"
        # While the mold finishes its last connections, wait for it, unless
        # nobody else serves (one worker): then the master forks at once.
        serving = any(h.ready for h in self.master.pool.of_generation(self.master.generation))
        return "wait" if serving else "master"

    def ask_mold(self, slot: int, replaces: int = 0) -> None:
        """Send the mold a fork request with the new worker's resources; the answer comes on its channel."""
        state = self.state
        provisions = self.master.provide(for_mold=True)
        token = state.token()
        master = self.master
        master.hooks.run("pre_fork", HookContext(master.config, master.pid, slot, master.generation))
        sent = send(state.channels[state.mold], encode_fork(token, slot, master.generation, provisions.seat),
                    provisions.worker_fds())
        if not sent:
            self.master.give_back(provisions)
            self.drop_mold(state.mold, "it takes no fork requests")
            return
        provisions.close_board_file()  # the mold has its own copy now
        state.pending[token] = PendingFork(token, state.mold, slot, self.master.generation, provisions, replaces)

    def read(self) -> None:
        """Act on what workers and molds said on their channels; a mold's words count only for its own forks."""
        state = self.state
        for pid in list(state.channels):
            for message in state.receive(pid):
                handle = self.master.pool.workers.get(pid)
                if handle is None:
                    break
                kind = message[0]
                if kind == "warm":
                    handle.warm = max(handle.warm, int(message[1]))
                elif kind == "molded" and pid == state.mold and not state.mold_ready:
                    self.on_molded(handle)
                elif kind == "molded" and not handle.is_mold:
                    # Promoted by a WINCH from someone else: it serves nobody now. Replace it.
                    log.warning("refork: worker slot=%d pid=%d became a mold unasked; replacing it",
                                handle.slot, handle.pid)
                    self.master.retire(handle)
                elif kind in ("forked", "unforked"):
                    pending = state.pending.get(int(message[1]))
                    if pending is None or pending.mold != pid:
                        if kind == "forked":
                            self.stop_stray(int(message[2]))  # an answer after we gave up on it
                        continue
                    del state.pending[pending.token]
                    if kind == "forked":
                        self.adopt(pending, int(message[2]))
                    else:
                        self.master.give_back(pending.provisions)
                        self.drop_mold(pid, f"it could not fork: {message[2]}")

    def on_molded(self, mold: WorkerHandle) -> None:
        state = self.state
        state.mold_ready = True
        state.lineage += 1
        self.master.accept_board.release(mold.pid)  # it accepts nothing any more
        log.info("refork: mold ready pid=%d gen=%d; new workers fork from it, the others roll over",
                 mold.pid, mold.generation)

    def adopt(self, pending: PendingFork, pid: int) -> None:
        """Take a worker the mold forked, once the kernel confirms it is our child."""
        if not self.is_unknown_child(pid):
            # The mold runs app code: a pid it names may be anybody's, or a
            # worker we have already. Never signal it, never adopt it twice.
            log.warning("refork: mold pid=%d named pid=%d, which is not a child of the master; not adopted",
                        pending.mold, pid)
            self.master.give_back(pending.provisions)
            self.drop_mold(pending.mold, "it named a process that is not ours")
            return
        self.master.admit(pid, pending.slot, pending.generation, pending.provisions, mold=pending.mold,
                          replaces=pending.replaces)

    def is_unknown_child(self, pid: int) -> bool:
        """Is ``pid`` the master's child (the kernel says so) and neither a worker it has nor a new master?"""
        master = self.master
        return pid not in master.pool.workers and pid != master.new_master and parent_of(pid) == master.pid

    def stop_stray(self, pid: int) -> None:
        """A worker a mold forked that we never adopted: if it is our child, let it finish and leave (TERM)."""
        if not self.is_unknown_child(pid):
            return
        log.warning("refork: pid=%d is a worker nobody adopted (its mold failed before reporting it); "
                    "stopping it", pid)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    def drop_mold(self, pid: int, reason: str, *, kill: bool = False, expected: bool = False) -> None:
        """Stop forking from mold ``pid``: its unanswered requests are given back and the master forks instead.

        ``expected``: a reload retires it, which is no cause for a warning.
        """
        state = self.state
        for token, pending in list(state.pending.items()):
            if pending.mold == pid:
                del state.pending[token]
                self.master.give_back(pending.provisions)
                self.clear_rolling(pending.replaces)
        if pid == state.mold:
            state.mold, state.mold_ready = 0, False
            log.log(logging.INFO if expected else logging.WARNING,
                    "refork: dropping mold pid=%d: %s; new workers fork from the master", pid, reason)
        handle = self.master.pool.workers.get(pid)
        if handle is not None:
            self.master.signal_worker(handle, signal.SIGKILL if kill else signal.SIGTERM)

    def worker_failed(self, handle: WorkerHandle, reason: str) -> None:
        """A worker a mold forked failed to boot: refork is off for the generation, the slot forks from us now."""
        state = self.state
        self.clear_rolling(handle.replaces)
        if handle.generation != self.master.generation:
            return
        if state.off_for != self.master.generation:
            state.off_for = self.master.generation
            log.error("refork: a worker forked from mold pid=%d failed to boot slot=%d: %s; refork is off for "
                      "generation %d, workers fork from the master", handle.mold, handle.slot, reason,
                      self.master.generation)
            for pid in [state.mold, *state.retired_molds]:
                if pid:
                    self.drop_mold(pid, "a worker it forked failed to boot")
        self.master.respawn_after.pop(handle.slot, None)

    def end_rollover(self, handle: WorkerHandle) -> None:
        """A mold's worker that replaces an older one is ready: retire the older one now."""
        old = self.master.pool.workers.get(handle.replaces)
        if old is not None and not old.retiring:
            old.recycled = True
            self.master.retire(old)

    def clear_rolling(self, pid: int) -> None:
        """A replacement did not come: the worker it was for is rolled over later."""
        old = self.master.pool.workers.get(pid) if pid else None
        if old is not None:
            old.rolling = False

    def tend(self) -> None:
        """Each turn: time out a silent mold, promote the next one when due, roll the pool over."""
        state = self.state
        now = time.monotonic()
        for pid in state.strays():
            self.stop_stray(pid)
        for pending in list(state.pending.values()):
            if now - pending.asked_at > ANSWER_TIMEOUT:
                self.drop_mold(pending.mold, f"no answer to a fork request in {ANSWER_TIMEOUT:g}s", kill=True)
        if state.mold and not state.mold_ready and \
                now - state.promoted_at > self.master.config.graceful_timeout + ANSWER_TIMEOUT:
            self.drop_mold(state.mold, "it did not get ready in time", kill=True)
        for pid in list(state.retired_molds):
            if state.mold_ready and not any(p.mold == pid for p in state.pending.values()):
                state.retired_molds.discard(pid)
                self.drop_mold(pid, "replaced by a newer mold")
        if self.master.reloading or state.off_for == self.master.generation:
            return
        self.promote_if_due()
        self.roll_over()

    def promote_if_due(self) -> None:
        """Promote a worker that served the next count (or, the mold lost, the last count) to mold."""
        state = self.state
        if state.mold and not state.mold_ready:
            return  # one promotion at a time
        if not state.mold and state.stage:
            count, advance = state.counts[state.stage - 1], 0  # the mold was lost: replace it
        elif state.next_count():
            count, advance = state.next_count(), 1
        else:
            return
        for handle in self.master.pool.of_generation(self.master.generation):
            if handle.ready and handle.warm >= count and (not state.mold or handle.lineage == state.lineage):
                break
        else:
            return
        state.stage += advance
        if state.mold:
            state.retired_molds.add(state.mold)
        state.mold, state.mold_ready, state.promoted_at = handle.pid, False, time.monotonic()
        handle.retiring = handle.is_mold = True
        self.master.stats.set_state(handle.pid, "mold")
        log.info("refork: promoting worker slot=%d pid=%d gen=%d to mold after %d requests", handle.slot,
                 handle.pid, handle.generation, count)
        self.master.signal_worker(handle, signal.SIGWINCH)

    def roll_over(self) -> None:
        """Replace workers forked before the mold with ones it forks, a few at a time, each old one
        retiring only once its replacement is ready: capacity never drops."""
        state = self.state
        if not state.mold_ready or self.fork_source() != "mold":
            return
        current = self.master.pool.of_generation(self.master.generation)
        booting = sum(1 for p in state.pending.values() if p.replaces) + \
            sum(1 for h in current if h.replaces and not h.ready)
        room = max(1, self.master.desired // ROLL_SHARE) - booting
        for handle in current:
            if room <= 0:
                return
            if handle.ready and not handle.rolling and handle.lineage < state.lineage:
                handle.rolling = True
                room -= 1
                self.ask_mold(handle.slot, replaces=handle.pid)

    def forget(self, handle: WorkerHandle, how: str) -> None:
        """A worker (or mold) was reaped: close its channel; a lost mold's requests go to the master."""
        state = self.state
        sock = state.forget(handle.pid)
        if sock is not None:
            self.master.poller.unregister(sock.fileno())
            sock.close()
        self.clear_rolling(handle.replaces)
        if handle.is_mold:
            if handle.pid == state.mold:
                self.drop_mold(handle.pid, f"it exited ({how})")
            else:
                self.drop_mold(handle.pid, "")
            log.info("mold exited slot=%d pid=%d gen=%d %s", handle.slot, handle.pid, handle.generation, how)

    def drop_inherited(self, own: Provisions) -> None:
        """In a new worker: close the master's ends of every refork channel, our own included, and
        both ends of what was made for workers a mold is forking right now (else we could speak as them)."""
        assert own.refork_ends is not None
        for sock in self.state.channels.values():
            sock.close()
        own.refork_ends[0].close()
        for pending in self.state.pending.values():
            theirs = pending.provisions
            for end in (*(theirs.stats_ends or ()), *theirs.log_ends, *(theirs.refork_ends or ()), *theirs.relay_ends):
                end.close()

    def restart(self) -> None:
        """A reload: the new generation starts from the master again, the old mold leaves.

        The reloaded ``refork_after`` applies from here; once on, the master
        stays a subreaper and keeps the channels even if it is emptied.
        """
        state = self.state
        for pid in [state.mold, *state.retired_molds]:
            if pid:
                self.drop_mold(pid, "reloading", expected=True)
        state.retired_molds.clear()
        state.stage = 0
        state.counts = self.master.config.refork_after

    def attach(self, handle: WorkerHandle, ends: tuple[socket.socket, socket.socket]) -> None:
        """A new worker is ours: listen on its channel, and act on what it said before we knew it."""
        ours, theirs = ends
        theirs.close()
        self.state.channels[handle.pid] = ours
        self.master.poller.register(ours.fileno(), select.POLLIN)
        if handle.mold:
            handle.lineage = self.state.lineage
        for notice in self.state.claim_early(handle.pid):
            self.master.act_on_notice(handle, notice)

    def hold_early(self, notice: Any) -> None:
        """A notice from a pid the master does not know: maybe a mold's worker it has yet to adopt."""
        self.state.hold_early(notice)
