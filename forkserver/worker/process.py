"""A worker process: accept connections, read requests, run the app.

One epoll loop watches the listeners, every idle keep-alive connection, and
the signal pipe at once, and hands a connection to the app only when a whole
request head has arrived; idle and slow clients therefore cost a file
descriptor, never the worker.  With ``threads`` > 1 complete requests go to a
pool of threads and the loop stops accepting while all of them are busy, so
new connections go to a worker that can serve them.  The worker leaves with
``os._exit`` through ``run``'s return code; it never returns into the
master's code.
"""

from __future__ import annotations

import errno
import faulthandler
import importlib
import logging
import os
import queue
import random
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from setproctitle import setproctitle

from .. import handover, libc, reloader
from ..backoff import AcceptPause
from ..balance import RECHECK
from .connection import BodyClock, BodyRules, ClientGone, Connection
from ..errors import EXIT_APP_LOAD, EXIT_OK, EXIT_WORKER_BOOT, AppImportError
from ..forksafety import open_descriptors
from ..hooks import HookContext, StuckRequest
from ..http.errors import RequestTimeout
# GATHER is also Worker._serve's answer when the next request's body is still on its way.
from ..http.exchange import GATHER, SERVE, WAIT, Closing
from ..http.parser import Limits, RequestParser
from ..http.response import DateHeader
from ..identity import drop_privileges
from ..loader import load_app, prepare_path
from ..logs import AccessLog, make_access_log
from ..proxy import Trust
from ..relay import Relay
from .serving import Service, serve
from ..signals import Wakeup
from ..sockets import Listener
from ..stats import Reporter
from ..workerspec import WorkerSpec
from .wsgi import base_environ

if TYPE_CHECKING:
    from types import FrameType

    from ..config import Config

log = logging.getLogger("forkserver")

# Accepts per wakeup: a few, to spare a loop turn per connection when they
# come fast; the accept board (forkserver.balance) is asked before each, so
# a burst of keep-alive connections still spreads over the workers.
ACCEPT_BATCH = 4
MAX_POLL_INTERVAL = 1.0
# On a graceful stop, a keep-alive connection used this recently may have a
# request in flight to us; it gets this long to arrive before we close.
IDLE_GRACE = 1.0
# With shutdown_delay, the master closes its copies of the listeners when the
# delay is over; we start draining this much later, so the last holder of a
# socket is a worker that empties its queue even when the master's loop runs
# a little late (a queue closed by the master would reset what waits in it).
DRAIN_AFTER_MASTER = 0.5
SWEEP_INTERVAL = 0.25
# TERM: the server stops, so serve what is queued on the listeners first.
# USR2: this worker is retired while others go on; they take the queue.
# glibc mallopt() parameters, and how much freed heap a worker may keep.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MALLOC_KEEP_BYTES = 4 << 20
# What the loop polls a connection for; only its close while the body memory is full.
WATCH_EVENTS = select.EPOLLIN | select.EPOLLRDHUP
PAUSED_EVENTS = select.EPOLLRDHUP
# Reading paused at body_buffer_total resumes once bodies in memory are down
# to this share of it: resuming at the first byte freed would pause again at
# once, and log both each time.
RESUME_FRACTION = 0.75
# A body still to come of at least this many bytes wakes the loop once it is
# all queued (see Worker._raise_mark); a body not in after MARK_PATIENCE
# seconds is read as it arrives again.  A smaller rest comes in a read or
# two anyway, and waiting for it costs three syscalls.
MARK_MIN_BYTES = 65536
MARK_PATIENCE = 1.0
# WINCH: become the refork mold (forkserver.refork); ignored without refork.
WORKER_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1, signal.SIGWINCH)
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)


def load_configured(config: Config) -> None:
    """Import the worker's modules that only some configurations use: static files, TLS.

    The entry point calls this before the master forks, so every worker
    shares one copy of them, as it shares the rest of the worker's code; a
    configuration without them does not load them at all.
    """
    if config.static:
        importlib.import_module(".static", __package__)
    if config.certfile:
        importlib.import_module(".tls", __package__)


class Entrance:
    """A socket this worker accepts on, and what every connection from it needs, looked up once."""

    __slots__ = ("sock", "listener", "family", "tcp", "environ", "tls", "queued")

    def __init__(self, listener: Listener, environ: dict[str, Any], tls: Any = None) -> None:
        self.listener = listener
        self.tls = tls  # the SSLContext its connections are wrapped in, or None for plain HTTP
        self.sock = listener.worker_socket()
        self.family = self.sock.family  # an enum conversion, too slow to repeat per connection
        self.tcp = listener.is_tcp
        self.environ = environ  # the constant part of every environ
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN)
        self.queued = poller.poll  # queued(0): whether a connection waits to be accepted, without accepting it
        if self.tcp:
            # Accepted sockets inherit it (Linux): one call here, not one per connection.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Worker:
    """The event loop of one worker process."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.config = spec.config
        self.pid = os.getpid()
        self.stopping = False
        self.term_received = False
        self.stop_deadline = 0.0
        # TERM with shutdown_delay: when it came, and when the drain begins; 0 otherwise.
        self.term_at = spec.stop_began
        self.drain_at = 0.0
        self.connections: dict[int, Connection] = {}
        self.deadlines: dict[int, float] = {}  # fd -> when an idle connection is closed
        # Connections whose request body the loop is reading before the app
        # runs (fd -> bytes of it in memory), the sum of those bytes, and
        # whether reading them is paused because it reached body_buffer_total.
        self.gathering: dict[int, int] = {}
        self.gathered = 0
        self.bodies_paused = False
        self.favoured = -1  # while paused: the one body still read (see _pause_bodies)
        self.marks: dict[int, float] = {}  # fd -> until when its body may wait in the kernel, 0 after (see _raise_mark)
        self.body_buffer_size = self.config.body_buffer_size
        # Requests served when the free heap was last given back (see _release_heap).
        self.served_at_release = 0
        self.malloc_trim = libc.function("malloc_trim")
        self.next_sweep = 0.0
        self.listening: dict[int, Entrance] = {}
        # The parser of the last connection the loop closed, released, which
        # the next connection renews instead of making its own (see _close).
        self.spare_parser: RequestParser | None = None
        self.entrances: list[Entrance] = []  # in the order of spec.listeners, which the relay numbers them by
        self.relay: Relay | None = None
        self.serving: Connection | None = None  # inline: the connection whose request the app runs
        self.parked: set[int] = set()  # with threads, all busy: idle connections with a request left unread
        self.busy = 0
        self.accepting = False
        self.accept_pause = AcceptPause("accept")  # out of descriptors or memory: see forkserver.backoff
        self.balancing = False  # not accepting because we hold more connections than the others
        # With reuse_port the kernel spreads connections over the workers' own
        # sockets, and one queued to ours can only be taken by us: no turns.
        self.accept_board = None if any(listener.reuse_port for listener in spec.listeners) else spec.accept_board
        self.finished: deque[tuple[Connection, int]] = deque()
        self.jobs: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self.served = 0
        self.inline = self.config.threads == 1  # requests are served by the loop itself
        self.access_log: AccessLog | None = None  # set up once the app has loaded
        self.title_busy = True  # so the first idle moment replaces "booting"
        self.shown_method = self.shown_path = ""  # the request the busy title names
        self.app: Callable[..., Any] | None = None  # as loaded, before any wrapping: a mold's children reuse it
        self.threads: list[threading.Thread] = []
        # Refork: the request counts still to report, whether we are to become
        # the mold, and the descriptors the server gave us (the rest the app opened).
        self.warm_marks = list(self.config.refork_after) if spec.refork_channel is not None else []
        self.becoming_mold = False
        self.server_descriptors: dict[int, tuple[int, int]] = {}
        self.max_requests = 0
        if self.config.max_requests:
            self.max_requests = self.config.max_requests + random.randint(0, self.config.max_requests_jitter)
        # Our share of every exchange's keep-alive verdict: set once we take
        # no more requests (stopping, recycling), or from the start with
        # keep-alive off; a response whose head goes out after that closes.
        self.closing = Closing(active=not self.config.keepalive)
        # While the loop serves a batch of ready connections: those whose
        # last response waits to go out at the end of the batch.
        self.outbox: list[Connection] | None = None
        # Idle timeouts of kept-alive connections (see _watch).
        self.keepalive = self.config.keepalive
        self.proxy_keepalive = self.config.proxy_keepalive

    def _context(self, requests: tuple[StuckRequest, ...] = ()) -> HookContext:
        return HookContext(self.config, self.pid, self.spec.slot, self.spec.generation, requests=requests)

    def _on_term(self, signum: int, frame: object) -> None:
        self.term_received = True
        self.closing.active = True
        if signum == signal.SIGTERM and not self.term_at:
            # The shutdown delay counts from here: an inline worker may be
            # in a long request and handle the TERM only when it ends.
            self.term_at = time.monotonic()

    def _exit_now(self, signum: int, frame: object) -> None:
        """INT/QUIT: a fast stop means now, even in the middle of app code."""
        self._flush_access_log()
        self.spec.hooks.run("worker_int", self._context())
        os._exit(EXIT_OK)

    def _on_abort(self, signum: int, frame: FrameType | None) -> None:
        """ABRT with a gunicorn worker_abort hook: dump the stacks, log the stuck requests, call it, and exit.

        Every thread's stack is dumped first, as without a hook, by
        faulthandler, which takes no lock (a thread no request runs in may
        hold the lock the others wait for, logging's included).  Then each
        stuck request is logged with its own thread's stack, and only then
        the hook runs, so a hook that hangs loses none of it; the master's
        KILL ``ABORT_GRACE`` after its ABRT ends us whatever the hook does.
        A Python handler runs between bytecodes of the main thread; should
        the hang keep it from ever running, that KILL still ends us (and the
        master has logged the requests from the scoreboard).
        """
        faulthandler.dump_traceback(file=_Descriptor(self.spec.log_files[0].fd), all_threads=True)
        stuck = self._stuck_requests(frame)
        for request in stuck:
            log.critical("worker abort pid=%d: stuck in %s; stack (most recent call last):\n%s",
                         self.pid, request.describe(), request.stack.rstrip("\n"))
        self.spec.hooks.run("worker_abort", self._context(requests=tuple(stuck)))
        os._exit(1)

    def _stuck_requests(self, frame: FrameType | None) -> list[StuckRequest]:
        """The requests in flight, each with the stack of the thread running it.

        Inline, the app runs in the main thread, where this signal handler
        interrupted it at ``frame``; with threads, slot N is ``self.threads[N]``.
        """
        frames = sys._current_frames()
        now = time.monotonic()
        stuck = []
        for thread, environ, started in self.spec.board.serving():
            where = frame if self.inline else frames.get(self.threads[thread].ident or 0)
            stack = "".join(traceback.format_stack(where)) if where is not None else "(its thread is gone)\n"
            stuck.append(StuckRequest(environ, now - started, stack))
        return stuck

    # -- boot -----------------------------------------------------------------

    def run(self) -> int:
        """Boot, serve until told to stop, and return the process exit code."""
        spec = self.spec
        signal.signal(signal.SIGINT, self._exit_now)
        signal.signal(signal.SIGQUIT, self._exit_now)
        for signum in IGNORED_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.wakeup = Wakeup(WORKER_SIGNALS)
        # Besides waking the loop, TERM and USR2 flip this flag at once, so a
        # response an app is producing right now already says Connection:
        # close, and the loop stops before it accepts anything more.
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGUSR2, self._on_term)
        # The master forked us with its signals blocked; our handlers are in
        # place now, so let them (and anything pending) through.
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        self.title = f"forkserver: worker [{self.config.proc_name}]"
        setproctitle(self.title + " booting")
        # On SIGABRT (sent by the master to a hung worker) dump every thread's
        # stack into the error log before dying: the operator sees where it hung.
        faulthandler.enable(file=_Descriptor(spec.log_files[0].fd), all_threads=True)
        for target in spec.log_files:
            target.forget_losses()  # from here on they count this worker's lost lines
        if spec.hooks.defines("worker_abort"):  # the stacks, the stuck requests, then gunicorn's hook
            signal.signal(signal.SIGABRT, self._on_abort)
        keep_heap_warm()
        if spec.refork_channel is not None:
            self.server_descriptors = open_descriptors()
        spec.hooks.run("post_fork", self._context())
        try:
            drop_privileges(spec.uid, spec.gid)
            self.app = spec.app or self._load_app()
            app = spec.hooks.wrap_requests(self.app, self._context())
            self.service = self._build_service(app)
            spec.hooks.run("post_worker_init", self._context(), fatal=True)
        except AppImportError as exc:
            self._notify(f"failed {self.pid} {EXIT_APP_LOAD} {exc}")
            return EXIT_APP_LOAD
        except Exception as exc:
            log.exception("worker boot failed slot=%d", spec.slot)
            self._notify(f"failed {self.pid} {EXIT_WORKER_BOOT} worker boot failed: {type(exc).__name__}: {exc}")
            return EXIT_WORKER_BOOT
        self.epoll = select.epoll()
        self.epoll.register(self.wakeup.fileno(), select.EPOLLIN)
        self.finished_r, self.finished_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.epoll.register(self.finished_r, select.EPOLLIN)
        for listener in spec.listeners:
            environ = base_environ(*listener.name, multithread=self.config.threads > 1)
            tls = spec.tls_context if listener in spec.tls_listeners else None
            if tls is not None:
                environ["wsgi.url_scheme"] = "https"
            entrance = Entrance(listener, environ, tls)
            self.listening[entrance.sock.fileno()] = entrance
            self.entrances.append(entrance)
        if spec.relay_channel is not None and not self.config.proxy_protocol:
            # (A PROXY header names the client once, at the start: a
            # connection that moved would lose it, so with one none moves.)
            self.relay = Relay(spec.relay_channel, spec.board, self.finished_w, self._offerable, self._unwatch,
                               self._watch_again, self._adopt)
            self.relay.lock.acquire()  # the loop's from now on, but while it waits
            if not self.relay.start():
                log.warning("cannot start a thread (out of processes?); worker pid=%d keeps its connections "
                            "even while busy", self.pid)
                self.relay = None
        self._set_accepting(True)
        for thread in range(self.config.threads if self.config.threads > 1 else 0):
            self.threads.append(threading.Thread(target=self._run_jobs, args=(thread,), daemon=True))
            self.threads[-1].start()
        log.debug("worker ready slot=%d pid=%d gen=%d", spec.slot, self.pid, spec.generation)
        # Booted: say idle now, not at the first wait that times out, which
        # health checks arriving faster than that would put off for good.
        self._show_idle()
        # Beat before saying so: from "ready" on the master judges our beat
        # by ``timeout``, and the last one may date from before a boot that
        # took longer than that.  Left to the loop's first turn, a master
        # quick to read "ready" killed a worker as hung in between.
        spec.board.beat()
        self._notify(f"ready {self.pid}")
        self._loop()
        self._flush_access_log()
        if self.reporter is not None:
            self.reporter.flush()
        if self.becoming_mold:
            from .mold import Mold  # only a worker promoted by refork needs it

            return Mold(self).run()
        spec.hooks.run("worker_exit", self._context())
        return EXIT_OK

    def _load_app(self) -> Callable[..., Any]:
        prepare_path(self.config.chdir, self.config.pythonpath)
        with reloader.reporting(self.spec.reload_dir):
            return load_app(self.config.app)

    def _build_service(self, app: Callable[..., Any]) -> Service:
        config = self.config
        self.reporter = None
        if self.spec.stats_channel is not None:
            log_files = self.spec.log_files
            self.reporter = Reporter(self.spec.stats_channel, pid=self.pid, slot=self.spec.slot,
                                     generation=self.spec.generation, threaded=config.threads > 1,
                                     dropped_log_lines=lambda: sum(target.dropped for target in log_files))
        # Opened by the master, never here: we may run as a user who could not.
        # Lines are batched only where one thread writes them: the loop's.
        self.access_log = make_access_log(self.spec.access_logfile, config.access_logformat,
                                          batched=config.threads == 1)
        if config.static:
            from . import static  # loaded before the fork (load_configured); unused, never loaded

            app = static.wrap(app, config)
        return Service(
            app=app,
            limits=Limits(config.limit_request_line, config.limit_request_fields,
                          config.limit_request_field_size, config.limit_request_body),
            date=DateHeader(),
            access_log=self.access_log,
            io_timeout=config.body_timeout or None,
            closing=self.closing,
            board=self.spec.board,
            stats=self.reporter,
            show=self._show,
            trust=Trust(config.forwarded_allow_ips),
            proxy_protocol=config.proxy_protocol,
            health_target=config.health_path.encode("ascii"),
            body=BodyRules(config.body_min_rate, config.body_rate_window, config.body_deadline),
        )

    def _notify(self, message: str) -> None:
        # One write under PIPE_BUF is atomic, so lines from workers never mix.
        data = (message.replace("\n", " ")[:1000] + "\n").encode("utf-8", "replace")
        try:
            os.write(self.spec.notify_fd, data)
        except OSError:
            pass

    # -- the loop ----------------------------------------------------------------

    def _loop(self) -> None:
        board = self.spec.board
        interval = MAX_POLL_INTERVAL
        if self.config.timeout:
            interval = min(interval, self.config.timeout / 4)
        reporter = self.reporter
        poll = self.epoll.poll
        connections = self.connections
        wakeup_fd = self.wakeup.fileno()
        inline = self.inline
        accept_board, seat = self.accept_board, self.spec.seat
        # A worker without a seat takes no part: it never defers, so it has nothing to publish.
        seat_writer = accept_board.writer(seat) if accept_board is not None and seat >= 0 else None
        pause = self.accept_pause
        access_log = self.access_log  # (made before the loop starts, and kept: see _build_service)
        # (The relay is set up before the loop starts, and stopped only after it ends.)
        relay_lock = self.relay.lock if self.relay is not None else None
        while True:
            # The turn's one reading of the clock, for its timers, its beat
            # and what it publishes before it sleeps: read once, not by each
            # of them, it spares a kept-alive request three calls into C and
            # about 15 bytecodes (scripts/loop_cost.py).  A timer that ran
            # may have taken a while (a stop serves what is queued): then it
            # is read again.
            now = time.monotonic()
            if now >= self.next_sweep:
                self._sweep_idle()
                now = time.monotonic()
            if self.drain_at and not self.stopping and now >= self.drain_at:
                self._begin_stop(drain=True)  # the shutdown delay is over
                now = time.monotonic()
            if self.stopping and self._done():
                return
            board.beat(now)
            if seat_writer is not None:
                held = len(connections) + self.busy
                if self.balancing and accept_board.may_accept(seat, held):
                    self.balancing = False
                    self._set_accepting(self._willing())
                # Only the loop changes what makes us willing (stopping, busy
                # threads, an accept pause), so it holds for this whole turn.
                willing = self._willing()
            if reporter is not None:
                reporter.flush_if_due(now)
            events = poll(0)
            if events:
                if seat_writer is not None:
                    seat_writer.publish(held, willing, now)
            else:
                # About to wait: the cheapest moment to write batched log lines.
                if access_log is not None:
                    access_log.flush()
                timeout = self._poll_timeout(interval, now)
                if seat_writer is not None:
                    seat_writer.publish(held, willing, now, timeout)
                if relay_lock is not None:
                    relay_lock.release()  # the relay may take idle connections while we sleep
                    try:
                        events = poll(timeout)
                    finally:
                        relay_lock.acquire()
                else:
                    events = poll(timeout)
                if events and seat_writer is not None:
                    # Awake now: no longer "responsive while asleep".  Left as
                    # published, a long request among these events would keep
                    # the others deferring to us for up to a whole timeout.
                    seat_writer.publish(len(connections) + self.busy, willing, time.monotonic())
                if not events:
                    # A whole wait without work: now the title says idle.  Not
                    # before every wait, which under load comes between most
                    # connections and would retitle the process twice per request.
                    self._show_idle()
                    self._release_heap()
            if self.term_received and not self.stopping and not self.drain_at:
                # A stop signal that came with (or just after) these events is
                # handled first: a retired worker must not take one more connection.
                self._handle_signals()
            batch = inline and len(events) > 1
            if batch:
                self.outbox = outbox = []
            for fd, _ in events:
                connection = connections.get(fd)
                if connection is not None:
                    self._on_readable(connection)
                elif fd in self.listening:
                    self._accept(self.listening[fd])
                elif fd == wakeup_fd:
                    self._handle_signals()
                elif fd == self.finished_r:
                    self._collect_finished()
            if batch:
                self.outbox = None
                for connection in outbox:
                    self._flush(connection)
            if pause.resume_at and pause.due():
                self._set_accepting(self._willing() and not self.balancing)

    def _flush_access_log(self) -> None:
        if self.access_log is not None:
            self.access_log.flush()

    def _show(self, method: str, path: str) -> None:
        """Put the request being served in the process title, for ``ps``.

        Skipped when the title already names this very request line: under
        load most requests repeat the one before, and the title is for people.
        """
        if self.title_busy and path == self.shown_path and method == self.shown_method:
            return
        self.shown_method, self.shown_path = method, path
        # A decoded %00 would make setproctitle raise.
        setproctitle(f"{self.title} busy {method} {path[:80].replace(chr(0), '%00')}")
        self.title_busy = True

    def _show_idle(self) -> None:
        if self.title_busy and not self.busy:
            setproctitle(f"{self.title} idle, {self.served} served")
            self.title_busy = False

    def _poll_timeout(self, interval: float, now: float) -> float:
        if self.balancing:
            interval = min(interval, RECHECK)  # look again soon: the others may fill up
        if self.accept_pause.resume_at:
            interval = min(interval, max(0.0, self.accept_pause.resume_at - now))
        if self.drain_at and not self.stopping:  # wake when the shutdown delay ends
            interval = min(interval, max(0.0, self.drain_at - now))
        if self.deadlines:
            return max(0.0, min(interval, self.next_sweep - now))
        return interval

    def _done(self) -> bool:
        """While stopping: is everything we held finished, or the graceful timeout over?"""
        if time.monotonic() >= self.stop_deadline:
            if self.connections or self.busy:
                log.warning("graceful timeout: closing %d connection(s) pid=%d",
                            len(self.connections) + self.busy, self.pid)
            return True
        return not self.connections and not self.busy

    def _handle_signals(self) -> None:
        for signum in self.wakeup.drain():
            if signum == signal.SIGTERM:
                self.becoming_mold = False
                self._leave_rotation()
            elif signum == signal.SIGUSR2:
                self.becoming_mold = False
                self._begin_stop(drain=False)
            elif signum == signal.SIGWINCH and self.spec.refork_channel is not None and not self.stopping:
                # Promoted to refork mold: finish like a retiring worker, but the
                # listeners stay open for the workers we will fork.
                self.becoming_mold = True
                self._begin_stop(drain=False, keep_listeners=True)
            elif signum == signal.SIGUSR1:
                # The master has sent the reopened files' descriptors; lines
                # batched so far belong in the old file.
                self._flush_access_log()
                handover.receive(self.spec.log_channel, self.spec.log_files)
                if self.config.logconfig or self.config.logconfig_dict:
                    from ..logconfig import FileHandlers  # imported by the master already, with the config

                    FileHandlers().reopen()

    def _set_accepting(self, on: bool) -> None:
        """Start or stop taking new connections from the listeners (never while an accept pause lasts)."""
        on = on and not self.accept_pause.resume_at
        if on == self.accepting:
            return
        self.accepting = on
        for fd in self.listening:
            if on:
                # Not EPOLLEXCLUSIVE: it wakes the same waiter again and again,
                # so one worker ends up holding every keep-alive connection.
                # Waking all idle workers costs a failed accept() each; busy
                # workers are not waiting and are not woken.
                self.epoll.register(fd, select.EPOLLIN)
            else:
                self.epoll.unregister(fd)

    def _leave_rotation(self) -> None:
        """TERM: the health path says 503 from now on; drain at once, or after ``shutdown_delay``.

        Through the delay we accept and serve as usual, so nothing is refused
        while load balancers notice the 503 and stop sending; every response
        already says Connection: close (``closing``, set by the signal
        handler), and idle kept-alive connections stay open until the drain.
        """
        self.service.rotation.leaving = True
        delay = self.config.shutdown_delay
        if not delay or self.stopping:
            self._begin_stop(drain=True)
        elif not self.drain_at:
            self.drain_at = (self.term_at or time.monotonic()) + delay + DRAIN_AFTER_MASTER

    def _begin_stop(self, *, drain: bool, keep_listeners: bool = False) -> None:
        """Graceful stop: stop listening, finish what we hold, then leave.

        With ``drain`` (the whole server stops) we first accept everything the
        kernel already queued, since nobody else will.  A retired worker leaves
        a shared queue to the workers that stay, but drains its own
        ``reuse_port`` socket, which dies with it.
        """
        if self.stopping:
            return
        self.stopping = True
        self.term_received = True
        self.closing.active = True
        setproctitle(self.title + " retiring")
        self.stop_deadline = time.monotonic() + self.config.graceful_timeout
        for entrance in list(self.listening.values()):
            if drain or entrance.sock is not entrance.listener.sock:
                self._accept(entrance, limit=entrance.listener.backlog, balanced=False)
        self._set_accepting(False)
        for entrance in self.listening.values():
            # Close our descriptor, not just stop watching it: once every
            # process has closed the socket the kernel refuses new connections
            # (a proxy then tries another upstream) instead of queueing them
            # for a reset when the last holder exits.  A refork mold keeps
            # the shared ones: the workers it forks inherit them.
            if not keep_listeners or entrance.sock is not entrance.listener.sock:
                entrance.sock.close()
        self.listening.clear()
        if self.relay is not None:
            self.relay.enabled = False  # what we hold is ours to finish or close now
        if self.parked:
            self._unpark()
        now = time.monotonic()
        for connection in list(self.connections.values()):
            self._on_readable(connection)  # a request already in the socket is served
            if connection.fd not in self.connections:
                continue
            if connection.mid_request() or not connection.has_served:
                continue  # a request on its way: answer it (with Connection: close)
            if now - connection.idle_since < IDLE_GRACE:
                # Active a moment ago, so a request may be in flight to us right
                # now; closing would reset it.  Give it a moment to arrive.
                self.deadlines[connection.fd] = now + IDLE_GRACE
                continue
            self._close(connection)

    def _willing(self) -> bool:
        """Would we take a connection if we held the fewest?

        Not when stopping, nor with every thread busy, nor during an accept
        pause: out of descriptors, we leave the queue to the other workers.
        """
        return not self.stopping and self.busy < self.config.threads and not self.accept_pause.resume_at

    def _defer(self) -> None:
        """Another worker holds fewer connections (see forkserver.balance): stop accepting until that changes."""
        self.balancing = True
        self._set_accepting(False)

    def _accept(self, entrance: Entrance, limit: int = ACCEPT_BATCH, balanced: bool = True) -> None:
        sock = entrance.sock
        board = self.accept_board if balanced else None
        seat = self.spec.seat
        for attempt in range(limit):
            if attempt == 1 and not entrance.queued(0):
                # Most wakes bring one connection.  Asking whether a second
                # waits (a poll, 0.4 us) costs less than an accept that finds
                # none (2.5 us: the call, and BlockingIOError raised and
                # caught); once one did, more are likely, and they are
                # accepted without asking.
                return
            if board is not None and not board.may_accept(seat, len(self.connections) + self.busy):
                self._defer()
                return
            try:
                # socket.accept() without its wrapper, which converts the
                # family to an enum on every call.
                fd, peer = sock._accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if self.accept_pause.failed(exc):
                    # The connection stays queued and the listener readable:
                    # trying again at once would spin.  Stop polling for a while.
                    self._set_accepting(False)
                else:
                    log.error("accept failed: %s", exc.strerror)
                return
            if self.accept_pause.streak:  # the first accept after a shortage
                self.accept_pause.succeeded()
            connection = self._connection(entrance, fd, peer)
            if connection is None:
                continue
            # The request usually arrives with the connection: read it now.
            # A connection whose whole exchange happens here never costs an
            # epoll registration; one that waits is watched with the header timeout.
            self._on_readable(connection, fresh=True)
            if self.stopping and not self.listening:
                return  # serving it began our stop (max_requests), which closed the listeners

    def _tls_connection(self, entrance: Entrance, sock: socket.socket, remote: tuple[str, str],
                        trusted: bool) -> Connection | None:
        """Wrap an accepted socket for TLS; its handshake starts with the first readiness (``_handshake``).

        None when the client reset the connection while it waited in the
        queue: ``ssl`` looks at the peer as it wraps, and refuses then.
        """
        from .tls import TLSConnection  # loaded before the fork (load_configured)

        try:
            wrapped = entrance.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        except OSError as exc:
            log.debug("client gone before the TLS handshake remote=%s: %s", remote[0] or "unix", exc)
            sock.close()  # (already detached into the failed wrapper, which closed it, if it got that far)
            return None
        return TLSConnection(wrapped, remote, entrance.environ, self.service, trusted=trusted)

    def _handshake(self, connection: Any, fresh: bool) -> bool:
        """Advance a TLS handshake; True once done and the connection can be read.

        Until then the connection waits in the loop like any idle one, under
        the header timeout set when it was accepted; a failed handshake is
        the client's problem, logged at info, and costs the worker nothing.
        """
        from .tls import EPOLL_READ, EPOLL_WRITE, HandshakeFailed

        wanted_write = connection.wants_write
        try:
            done = connection.handshake()
        except HandshakeFailed as exc:
            log.info("TLS handshake failed remote=%s: %s", connection.remote[0] or "unix", exc)
            self._close(connection)
            return False
        if not done and fresh:
            self._watch(connection, self.config.header_timeout)
        if connection.wants_write != wanted_write and connection.fd in self.connections:
            self.epoll.modify(connection.fd, EPOLL_WRITE if connection.wants_write else EPOLL_READ)
        return done

    def _connection(self, entrance: Entrance, fd: int, peer: Any) -> Connection | None:
        """A Connection for socket ``fd``, just accepted (or adopted) from ``entrance``, from ``peer``.

        None when a TLS connection's client reset it while it waited in the queue.
        """
        # The C socket type alone: socket.socket's Python wrapper adds
        # nothing a connection uses, and costs a call on open and close.
        conn_sock = socket.SocketType(entrance.family, socket.SOCK_STREAM, 0, fd)
        conn_sock.setblocking(False)
        if entrance.tcp:
            remote = (peer[0], str(peer[1]))
            trusted = remote[0] in self.service.trust
        else:
            remote = ("", "")
            trusted = True  # a local process, as trusted as the socket file's mode made it
        if entrance.tls is None:
            parser, self.spare_parser = self.spare_parser, None
            return Connection(conn_sock, remote, entrance.environ, self.service, trusted=trusted, parser=parser)
        return self._tls_connection(entrance, conn_sock, remote, trusted)

    def _watch(self, connection: Connection, timeout: float | None = None) -> None:
        """Put a connection under the loop's eye with an idle deadline: ``timeout`` from now.

        By default, its keep-alive timeout: a trusted proxy's connection may
        idle longer, outliving the proxy's own timeout.  (Worked out here,
        not by a method of its own: every kept-alive request comes this way.)
        """
        fd = connection.fd
        if fd not in self.connections:
            self.connections[fd] = connection
            self.epoll.register(fd, WATCH_EVENTS)
        if timeout is None:
            timeout = self.proxy_keepalive if connection.trusted else self.keepalive
        connection.idle_since = now = time.monotonic()
        self.deadlines[fd] = now + timeout

    def _unwatch(self, connection: Connection) -> None:
        """Take a connection from the loop (a serving thread owns it now, or it is being closed).

        Unregistered before it is closed, always: epoll watches the socket,
        not our descriptor, and a child the app forked may hold the socket
        open after we close it.  Left in the set, a socket at end of file is
        ready on every wait and the loop would spin until that child exits.
        (A connection served whole as it was accepted was never registered,
        so most ``Connection: close`` requests pay nothing for this.)
        """
        fd = connection.fd
        if self.gathering:
            self._stop_gathering(fd)
        if self.connections.pop(fd, None) is not None:
            if fd in self.parked:
                self.parked.discard(fd)  # (not registered while parked)
            else:
                self.epoll.unregister(fd)
        self.deadlines.pop(fd, None)

    def _park(self, connection: Connection) -> bool:
        """Every thread busy: leave a kept-alive connection's new request in the kernel; True if we did.

        Read now, the request would wait in the queue for a thread, beyond
        the relay's reach; unread, the relay can move the connection to a
        free worker.  Watched again (``_unpark``) as soon as a thread is free.
        """
        relay = self.relay
        if relay is None or not relay.enabled or connection.fd not in self.connections or connection.mid_request():
            return False
        if connection.__class__ is not Connection:
            return False  # TLS: it never moves (see _offerable), so nothing is won by leaving it unread
        self.epoll.unregister(connection.fd)
        self.parked.add(connection.fd)
        self.deadlines.pop(connection.fd, None)  # its client is waiting for us, not idle
        return True

    def _unpark(self) -> None:
        """A thread is free: watch the parked connections again; epoll reports their requests at once."""
        deadline = time.monotonic() + self.config.header_timeout
        for fd in self.parked:
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
            self.deadlines[fd] = deadline
        self.parked.clear()

    def _flush(self, connection: Connection) -> None:
        """Send what a connection deferred during the batch; close it if the peer is gone."""
        if not connection.unsent:
            return  # flushed by a later send meanwhile
        try:
            connection.flush()
        except ClientGone as exc:
            log.debug("client gone remote=%s: %s", connection.remote[0], exc)
            self._close(connection)

    def _close(self, connection: Connection) -> None:
        """Close a connection the loop owns, and keep its parser for the next connection.

        Only the loop takes and gives the spare, and only from a connection
        it closes itself (a thread or the relay closing one lets its parser
        go), so one parser never serves two connections at once.
        """
        self._unwatch(connection)
        released = connection.close()
        if released is not None:
            self.spare_parser = released.give_up_parser()

    def _on_readable(self, connection: Connection, fresh: bool = False) -> None:
        if connection.handshaking and not self._handshake(connection, fresh):
            return
        if not self.inline and self.busy >= self.config.threads and not fresh and self._park(connection):
            return
        if not connection.receive():
            self._close(connection)
            return
        step = connection.exchange.next_step(self.body_buffer_size)
        if step == SERVE:
            if self.inline:
                self._serve_inline(connection)
            else:
                self._dispatch(connection)
        elif step == GATHER:
            self._gather(connection)
        elif fresh:
            self._watch(connection, self.config.header_timeout)

    # -- request bodies read by the loop ------------------------------------------------

    def _gather(self, connection: Connection, progressed: bool = True) -> None:
        """A request head is in and its body is still arriving: keep reading it here, under the body rules.

        The connection stays in epoll and the request is served once its
        body is in memory (or body_buffer_size of it): a slow upload costs a
        descriptor and some memory, never a worker or a thread.  Also called
        by the sweep, when the body clock says a rule is due for a check
        (``progressed`` False: nothing was received).
        """
        fd = connection.fd
        now = time.monotonic()
        paused = self.bodies_paused and fd != self.favoured
        if progressed or paused:
            connection.idle_since = now  # (a stall while we do not read is not the client's)
        elif self.config.body_timeout and now - connection.idle_since >= self.config.body_timeout:
            log.info("body timeout: no progress for %gs remote=%s: closing", self.config.body_timeout,
                     connection.remote[0] or "unix")
            self._close(connection)
            return
        clock = connection.body_clock
        if clock is None:
            clock = connection.body_clock = BodyClock(self.service.body, now, connection.bytes_in)
            if fd not in self.connections:  # fresh from accept
                self.connections[fd] = connection
                self.epoll.register(fd, PAUSED_EVENTS if paused else WATCH_EVENTS)
            elif paused:
                self.epoll.modify(fd, PAUSED_EVENTS)
        elif paused:
            clock.wait_from(now)  # not reading it is not the client's fault
        else:
            clock.waited_until(now)
        size = connection.exchange.gathered()
        self.gathered += size - self.gathering.get(fd, 0)
        self.gathering[fd] = size
        try:
            check_at = clock.check(now, connection.bytes_in)
        except RequestTimeout as error:
            log.info("%s remote=%s: 408, closing", error.detail, connection.remote[0] or "unix")
            connection.refuse_now(connection.exchange.refusal(error))
            self._close(connection)
            return
        if self.config.body_timeout:
            check_at = min(check_at, connection.idle_since + self.config.body_timeout)
        if connection.body_can_wait():
            check_at = self._raise_mark(connection, now, check_at)
        self.deadlines[fd] = check_at
        if self.gathered >= self.config.body_buffer_total and not self.bodies_paused:
            log.info("request bodies in memory reached body_buffer_total=%d: reading them paused pid=%d",
                     self.config.body_buffer_total, self.pid)
            self._pause_bodies(True)

    def _raise_mark(self, connection: Connection, now: float, check_at: float) -> float:
        """Have the loop woken for this body once what it still needs is in the kernel; return the next check.

        Not woken for every piece, the loop then starts the request and the
        app reads the body straight from the socket, copied once (see
        Connection._receive_early): a 1 MiB POST echo cost the worker
        175-188 us of user CPU against 217-233 when the loop read it into
        pieces, its system CPU unchanged within noise for the three
        syscalls this adds (compare_checkouts.py --post 1048576, five
        runs of 4-6 rounds).  Not woken, the loop
        cannot see a slow body's progress either: one not in within
        MARK_PATIENCE is read as it arrives again (see _sweep_idle), under
        the body rules as before; a stall is then seen at most that much late.
        """
        fd = connection.fd
        until = self.marks.get(fd, now + MARK_PATIENCE)
        if not until or not connection.exchange.raw_left:
            return check_at  # its patience ran out, or it is chunked (the mark would count its framing)
        left = connection.exchange.gather_left(self.body_buffer_size)
        if left < MARK_MIN_BYTES and fd not in self.marks:
            return check_at
        self.marks[fd] = until
        connection.wait_for(left)
        return min(check_at, until)

    def _stop_gathering(self, fd: int) -> None:
        """The connection's body is no longer the loop's to read (complete, or closing): free its share."""
        if self.marks.pop(fd, None) is not None:
            connection = self.connections[fd]
            if connection.low_water > 1:
                connection.wait_for(1)  # the next request's head, or the app's reads, are not held back
        size = self.gathering.pop(fd, None)
        if size is None:
            return
        self.gathered -= size
        if self.bodies_paused:
            if fd in self.connections and fd != self.favoured:
                self.epoll.modify(fd, WATCH_EVENTS)  # served inline, it stays registered
            if fd == self.favoured:
                self.favoured = -1
            if self.gathered <= self.config.body_buffer_total * RESUME_FRACTION:
                self._pause_bodies(False)
            elif self.favoured < 0 and self.gathering:
                self._favour(time.monotonic())

    def _favour(self, now: float) -> None:
        """While paused: go on reading the body being gathered that has the least left to come."""
        limit = self.body_buffer_size
        connections = self.connections
        fd = min(self.gathering, key=lambda fd: connections[fd].exchange.gather_left(limit))
        self.favoured = fd
        self.epoll.modify(fd, WATCH_EVENTS)
        connection = connections[fd]
        connection.body_clock.wait_from(now)  # type: ignore[union-attr]
        connection.idle_since = now

    def _pause_bodies(self, paused: bool) -> None:
        """Stop (or resume) reading every body being gathered: memory is full (or has been freed).

        While paused, only a client's close is watched for, and the rate
        rule's clock stops (the deadline does not); except that the body
        with the least left to come is still read, under every rule: either
        it completes and is served, or its client is too slow and leaves,
        and either way memory is freed.  Stopping them all could wait on
        one another until the deadline, and a client that closed with body
        bytes still queued to us would not be noticed until then.
        """
        self.bodies_paused = paused
        now = time.monotonic()
        events = PAUSED_EVENTS if paused else WATCH_EVENTS
        for fd in self.gathering:
            if fd == self.favoured:
                continue
            self.epoll.modify(fd, events)
            clock = self.connections[fd].body_clock
            if paused:
                clock.waited_until(now)  # type: ignore[union-attr]
            else:
                clock.wait_from(now)  # type: ignore[union-attr]
        if paused:
            self._favour(now)
        else:
            self.favoured = -1
            log.info("request bodies in memory below body_buffer_total again: reading resumed pid=%d", self.pid)

    def _release_heap(self) -> None:
        """After a whole wait without work: give the heap that requests freed back to the kernel.

        keep_heap_warm keeps freed blocks in the heap, so the next large
        body reuses pages already faulted in; but blocks freed in the middle
        of the heap are never returned by themselves (only its top is
        trimmed), and after a burst of uploads, with many bodies in memory
        at once, a worker kept 6-12 MiB it no longer used.  glibc's
        malloc_trim also hands back the free pages inside the heap.  Called
        only when a wait found nothing to do, so it runs at most once per
        poll timeout, never per request under load, and only when requests
        were served since it last ran.
        """
        if self.served == self.served_at_release or self.malloc_trim is None:
            return
        self.served_at_release = self.served
        self.malloc_trim(0)

    def _sweep_idle(self) -> None:
        """Close connections past their deadline, and check that the master lives.

        Called a few times a second (every SWEEP_INTERVAL), not per request:
        deadlines differ (header timeout, keep-alive, the stop grace), so the
        table is scanned whole, which is cheap at that rate and still closes
        within a fraction of a second.
        """
        now = time.monotonic()
        self.next_sweep = now + SWEEP_INTERVAL
        # Body bytes let out of the kernel by this sweep (see _raise_mark),
        # which the loop reads next: all at once, they must not overrun
        # body_buffer_total before the pause can stop them.
        coming = 0
        for fd, deadline in list(self.deadlines.items()):
            if deadline > now:
                continue
            connection = self.connections[fd]
            if fd in self.gathering:
                if self.marks.get(fd):
                    if not self.bodies_paused and self.gathered + coming >= self.config.body_buffer_total:
                        continue  # read once the loop has taken what it was let read, or paused reading
                    self.marks[fd] = 0.0  # its patience ran out: read it as it arrives
                    queued = connection.stop_waiting()
                    if queued:
                        coming += queued
                        continue  # that is progress: read on the next turn, as any body bytes
                self._gather(connection, progressed=False)  # a body rule is due for a check
                continue
            if connection.handshaking:
                log.info("TLS handshake timeout remote=%s: closing", connection.remote[0] or "unix")
            elif connection.mid_request():
                log.info("header timeout remote=%s: closing", connection.remote[0] or "unix")
            else:
                log.info("keep-alive timeout remote=%s: closing", connection.remote[0] or "unix")
            self._close(connection)
        for target in self.spec.log_files:
            target.report_losses(now)
        while self.warm_marks and self.served >= self.warm_marks[0]:
            assert self.spec.refork_channel is not None
            from .. import refork  # the master loaded it before the fork: only with refork on is it needed

            refork.send(self.spec.refork_channel, b"warm %d" % self.warm_marks.pop(0))
        if not self.stopping and os.getppid() != self.spec.master_pid:
            log.warning("master died; worker exiting pid=%d", self.pid)
            self._begin_stop(drain=True)

    # -- serving -------------------------------------------------------------------

    def _serve_inline(self, connection: Connection) -> None:
        """Single-threaded: serve the connection's requests right here, in the loop.

        The loop cannot look at the connection meanwhile, so it may stay
        registered with epoll, saving two epoll_ctl calls per request.  Its
        idle deadline may stay too: only the loop's sweep reads it, and
        afterwards ``_watch`` sets a new one or ``_close`` drops it (a pop
        here cost 9 bytecodes and a call per request).
        """
        if self.gathering:
            self._stop_gathering(connection.fd)
        relay = self.relay
        if relay is None:
            keep = self._serve(connection, 0)
        else:
            # The relay may take our other idle connections, should this
            # request run long (and those queued for us meanwhile: see Relay._offer).
            self.serving = connection
            relay.lock.release()
            try:
                keep = self._serve(connection, 0)
            finally:
                relay.lock.acquire()
                self.serving = None
        if keep:
            self._watch(connection)  # idle until its next request...
            if keep == GATHER:
                self._gather(connection)  # ...or reading a pipelined one's body
        else:
            self._close(connection)
        if self.max_requests and self.served == self.max_requests and not self.stopping:
            self._begin_stop(drain=False)  # see _recycle; we are the loop: stop before accepting again

    def _offerable(self) -> list[tuple[Connection, int]]:
        """For the relay (which holds the lock): our idle connections that may move, and their listeners.

        Only those with nothing of theirs read past their last request: no
        part of a request in the parser, no PROXY header (whose client
        address would not move along).  Responses deferred to the end of the
        batch the loop is in go out first: a long request in the same batch
        would otherwise hold them back as long as it runs.
        """
        for connection in self.outbox or ():
            if connection.unsent and connection is not self.serving:
                try:
                    connection.flush()
                except ClientGone:
                    pass  # the loop finds the connection closed when it next reads it
        origin = {id(entrance.environ): index for index, entrance in enumerate(self.entrances)}
        # A TLS connection's session lives in this process's OpenSSL state: it never moves.
        return [(connection, origin[id(connection.base_environ)]) for connection in self.connections.values()
                if connection.__class__ is Connection
                and connection is not self.serving and not connection.unsent and connection.preamble is None
                and id(connection.base_environ) in origin and not connection.mid_request()]

    def _watch_again(self, connection: Connection) -> None:
        """A connection the relay offered and nobody took: idle again, with a fresh keep-alive deadline.

        Once we are stopping, closed instead, as every idle connection is then.
        """
        if self.stopping:
            connection.close()
        else:
            self._watch(connection)

    def _adopt(self, sock: socket.socket, index: int) -> None:
        """Watch a connection another worker gave us, as if we had just accepted it (it served before).

        Never read here: the relay calls this too, while the loop may be in
        the app; epoll tells the loop when the connection has something.
        """
        if index >= len(self.entrances) or self.stopping:
            sock.close()  # (closing an idle connection is what a keep-alive timeout does)
            return
        try:
            peer = sock.getpeername()
        except OSError:
            sock.close()
            return
        connection = self._connection(self.entrances[index], sock.detach(), peer)
        if connection is None:
            return
        connection.has_served = True
        self._watch(connection)

    def _dispatch(self, connection: Connection) -> None:
        """With threads: hand the connection to the pool, and stop accepting when it is full."""
        self._unwatch(connection)
        self.busy += 1
        if self.busy >= self.config.threads:
            self._set_accepting(False)
        self.jobs.put(connection)

    def _serve(self, connection: Connection, thread: int) -> int:
        """Answer every complete request queued on ``connection``; whether to keep it open.

        0: close it; 1: keep it; GATHER: keep it, and read the body of the
        request pipelined next in the loop (see _gather).

        ``thread`` is the scoreboard slot of the thread doing the serving.
        """
        while True:
            if self.max_requests and self.served + 1 >= self.max_requests:
                self.closing.active = True  # this response is our last: it says Connection: close
            try:
                keep = serve(connection, thread, self.outbox)
            except Exception:
                log.exception("unexpected error serving remote=%s", connection.remote[0])
                keep = False
            self.served += 1
            if self.max_requests and self.served == self.max_requests:  # (0: no limit)
                self._recycle()
            if not keep:
                return 0
            if not connection.exchange.events:
                # Nothing parsed waits: the usual end, seen without a call
                # (next_step would say WAIT; 13 of a kept-alive request's
                # 1,441 bytecodes, scripts/loop_cost.py).
                return 1
            step = connection.exchange.next_step(self.body_buffer_size)
            if step == WAIT:
                return 1
            if step == GATHER:
                return GATHER

    def _recycle(self) -> None:
        """The request that reached ``max_requests`` is done: retire gracefully."""
        # Tell the master first, so it starts a replacement right away.
        self._notify(f"recycle {self.pid} max_requests={self.max_requests}")
        self.term_received = True
        self.closing.active = True  # a response in progress says Connection: close
        # Inline, _serve_inline begins the stop once this connection is closed.
        # Begun from here, the stop would read the connection again and answer
        # a request pipelined behind the one that just said Connection: close.
        if not self.inline:
            os.write(self.wakeup.write_fd, bytes([signal.SIGUSR2]))

    def _run_jobs(self, thread: int) -> None:
        while True:
            connection = self.jobs.get()
            if connection is None:
                return
            keep = self._serve(connection, thread)
            if not keep:
                connection.close()  # not registered with epoll while a thread has it
            self.finished.append((connection, keep))
            try:
                os.write(self.finished_w, b"\0")
            except BlockingIOError:
                pass  # the pipe is full, so the loop is already due to wake

    def _collect_finished(self) -> None:
        try:
            os.read(self.finished_r, 4096)
        except BlockingIOError:
            pass
        if self.relay is not None:
            self.relay.take_queued()
        while self.finished:
            connection, keep = self.finished.popleft()
            self.busy -= 1
            if keep:
                self._watch(connection)
                if keep == GATHER:
                    self._gather(connection)
        if self.parked and self.busy < self.config.threads:
            self._unpark()
        if self.busy < self.config.threads and not self.stopping and not self.balancing:
            self._set_accepting(True)

    def stop_serving(self) -> None:
        """Becoming the refork mold: end the request threads and close what only serving needs.

        A fork copies only the calling thread; threads left blocked here
        would be missing from every worker forked after, holding whatever
        lock they held.
        """
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join(timeout=5.0)
        self.threads.clear()
        if self.relay is not None:
            self.relay.stop()  # its watcher is a thread too; the mold's workers start their own
            self.relay = None
        if self.spec.relay_channel is not None:
            self.spec.relay_channel.close()  # (closed already if a relay ran) the workers get their own
        self.epoll.close()
        os.close(self.finished_r)
        os.close(self.finished_w)


def keep_heap_warm() -> None:
    """Ask glibc's malloc to keep freed large blocks in the heap instead of unmapping them at once.

    A large request body arrives in buffers of a few hundred KiB, which by
    default glibc maps fresh for each request and unmaps after it, or trims
    off the heap top and grows back: either way every page is faulted in
    again, which cost a 1 MiB upload about twice the CPU of the copy itself.
    Raising the mmap and trim thresholds to MALLOC_KEEP_BYTES lets those
    buffers be reused; a worker keeps at most that much freed memory at the
    top of its heap (and gives back the rest once idle: Worker._release_heap).
    Elsewhere (musl, no libc found) this does nothing.
    """
    mallopt = libc.function("mallopt")
    if mallopt is None:
        return
    mallopt(M_MMAP_THRESHOLD, MALLOC_KEEP_BYTES)
    mallopt(M_TRIM_THRESHOLD, MALLOC_KEEP_BYTES)


class _Descriptor:
    """The smallest file-like object faulthandler accepts: just a descriptor."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def fileno(self) -> int:
        return self._fd
