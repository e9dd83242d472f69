"""The master process: bind, fork, supervise, reload, upgrade, stop.

The master is single-threaded and sleeps in ``poll`` until a signal (through
the wakeup pipe), a worker's notice (ready, failed to boot, recycling) or the
next tick.  It never runs app code after forking; with ``preload`` it imports
the app before forking.  Signal meanings follow gunicorn (README, "Signals").
One bad event is logged and the loop goes on: the master must outlive bugs.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import random
import select
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from setproctitle import setproctitle

from .. import __version__, libc, preflight, relay
from . import systemd
from .aggregator import Aggregator
from ..balance import AcceptBoard
from .collector import StatsCollector
from ..config import AUTO_WORKERS, Config, environment_of
from ..errors import (
    EXIT_APP_LOAD,
    EXIT_OK,
    AppImportError,
    ForkserverError,
    WorkerBootError,
)
from ..forksafety import ForkSafety, open_descriptors, still_open
from ..handover import LogHandover
from ..hooks import HookContext, Hooks
from ..identity import resolve_identity
from ..loader import load_app, prepare_path
from ..logs import LogFile, capture_stdio, open_access_logfile, setup_error_log
from .notices import Notice, NoticeReader
from .pidfile import Pidfile
from .pool import Pool, WorkerHandle, describe_exit, plan
from ..reloader import Reloader
from ..safefiles import reason
from .sampler import BACKLOG_SAMPLE_INTERVAL, BacklogWatch, ProcessSampler, listener_stats
from ..scoreboard import Scoreboard
from ..signals import Wakeup
from ..sockets import Listener, adopt, bind_all, describe, remove_unanswered, reuse_port_handover_problem
from ..sources import load_config
from .upgrade import oldbin_path, start_new_master
from ..workerspec import WorkerMain, WorkerSpec

if TYPE_CHECKING:
    import socket
    from multiprocessing.connection import Connection

    from ..logconfig import FileHandlers
    from .refork import ReforkSupervisor
    from .statsd import StatsdExporter
    from .status import StatusServer

log = logging.getLogger("forkserver")

TICK_INTERVAL = 1.0
# At a cold start the first worker boots alone for this long (or until it is
# ready): the others' imports would compete with its own for the CPUs.
SOLO_BOOT = 0.1
FAST_STOP_GRACE = 2.0  # seconds between SIGQUIT and SIGKILL on a fast stop
# Seconds a hung worker gets to dump its stacks and run worker_abort before
# SIGKILL.  Fixed, not graceful_timeout: its slot is replaced only once it is
# gone, and a hung worker has no requests left to finish (docs/resilience.md).
ABORT_GRACE = 1.0
MAX_BOOT_BACKOFF = 30.0
FORK_RETRY = 1.0  # seconds before a slot whose fork failed is tried again
MEMORY_CHECK_INTERVAL = 5.0
MEMORY_SAMPLES = 3  # consecutive samples over max_worker_memory before a recycle: a spike is not a leak
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN,
                  signal.SIGTTOU, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH, signal.SIGCHLD)
# Standard-library modules that Flask, Django and Bottle all import (checked
# with Flask 3.1, Django 5.2 and Bottle 0.13); see ``share_stdlib``.
SHARED_STDLIB = ("hashlib", "hmac", "http.client", "pickle", "unicodedata")


def share_stdlib() -> None:
    """Import ``SHARED_STDLIB`` before any fork, so that the workers share it.

    Imported by the app after the fork, these modules would be a private
    copy in every worker; imported here, all the workers share the master's.
    ``http.client`` alone brings the email package and ``ssl``, whose OpenSSL
    tables take about a MiB in each process that loads them.  For an app
    that imports them anyway the start is no slower (the import moves from
    the workers to the master); one that needs none of them pays for one
    copy (1-2 MiB) and a few milliseconds.
    """
    for name in SHARED_STDLIB:
        importlib.import_module(name)


class Provisions:
    """What the master makes for each new worker, whether it forks it or a refork mold does.

    A plain class, not a dataclass: see ``forkserver.records``.
    """

    __slots__ = ("board", "board_fd", "stats_ends", "log_ends", "refork_ends", "seat", "relay_ends")

    def __init__(self, board: Scoreboard, board_fd: int, stats_ends: tuple[Connection, Connection] | None,
                 log_ends: tuple[socket.socket, socket.socket],
                 refork_ends: tuple[socket.socket, socket.socket] | None, seat: int,
                 relay_ends: tuple[socket.socket, socket.socket]) -> None:
        self.board = board
        self.board_fd = board_fd  # the scoreboard's memory file while a mold is to get it; else -1
        self.stats_ends = stats_ends  # None with stats off
        self.log_ends = log_ends
        self.refork_ends = refork_ends  # None with refork off
        self.seat = seat
        self.relay_ends = relay_ends  # the connection relay's channel (forkserver.relay)

    def worker_fds(self) -> list[int]:
        """The worker's ends, in the order a mold expects them (forkserver.worker.mold)."""
        assert self.refork_ends is not None
        fds = [self.board_fd, self.log_ends[1].fileno(), self.refork_ends[1].fileno(), self.relay_ends[1].fileno()]
        return fds + ([self.stats_ends[1].fileno()] if self.stats_ends is not None else [])

    def close_board_file(self) -> None:
        if self.board_fd >= 0:
            os.close(self.board_fd)
            self.board_fd = -1


def release_free_heap() -> None:
    """Give the master's free heap pages back to the kernel, before the first fork.

    Starting leaves freed memory behind in malloc's heap: compiling modules
    that have no bytecode cache, parsing the settings, a preloaded app's
    import.  Forked as it is, every worker inherits those pages as shared
    memory, and each page a worker then allocates into is copied while the
    master keeps its now useless original; released, they cost nothing.
    glibc only (``malloc_trim``); elsewhere this does nothing.
    """
    trim = libc.function("malloc_trim")
    if trim is not None:
        trim(0)


class Master:
    """Supervises the worker pool for the lifetime of the server."""

    def __init__(self, config: Config, argv: Sequence[str], environ: Mapping[str, str],
                 run_worker: WorkerMain) -> None:
        self.config = config
        # The worker's entry, given by the caller that loaded it: this module never imports
        # the worker (and through it HTTP), yet its code is loaded before the first fork.
        self.run_worker = run_worker
        self.argv = list(argv)
        self.environ = dict(environ)
        self.pid = os.getpid()
        self.start_dir = os.getcwd()  # relative paths in the config are from here, even after chdir
        self.pool = Pool()
        self.accept_board = AcceptBoard()  # workers spread keep-alive connections through it
        self.generation = 1
        self.memory_limit: int | None = None  # with workers auto: the cgroup's, to check once a worker runs
        self.sizing = ""  # with workers auto: how the count was chosen, for the start-up log
        self.desired = self.size_pool(config)
        self.desired_before_reload = self.desired  # what an abandoned reload goes back to
        self.listeners: list[Listener] = []
        self.tls_context: Any = None  # an ssl.SSLContext with certfile set; workers inherit it (forkserver.tlscontext)
        self.tls_listeners: tuple[Listener, ...] = ()  # those of self.listeners that serve TLS
        self.socket_paths: list[str] = []  # UNIX socket files to remove at exit
        self.log_files: list[LogFile] = []  # the error log, then the access log if on; workers inherit them
        self.logging_files: FileHandlers | None = None  # with a logging configuration: its handlers' files
        self.access_logfile: LogFile | None = None
        self.handover = LogHandover()  # gives workers the reopened logs on USR1
        self.app: Callable[..., Any] | None = None
        self.preloaded_modules: set[str] = set()
        self.app_descriptors: dict[int, tuple[int, int]] = {}  # what the preloaded app opened (forkserver.forksafety)
        self.fork_safety = ForkSafety("master")
        self.refork: ReforkSupervisor | None = None  # with refork_after (forkserver.refork)
        self.pidfile: Pidfile | None = None
        self.new_master = 0  # PID of the master a USR2 started, while it runs
        # Whether the merge flag was set before memory_merge first asked (systemd's
        # MemoryKSM=yes, an old master's across exec); None until it asks.
        self.merge_found: bool | None = None
        self.stopping = False
        self.stop_began = 0.0  # when the stop began: replacements forked in a shutdown delay drain with the rest
        self.stop_deadline = 0.0
        self.close_listeners_at = 0.0  # TERM with shutdown_delay: when our copies of the listeners go
        self.started = False  # a worker of the first generation became ready
        self.first_fork = 0.0  # when the first worker was forked (see SOLO_BOOT)
        self.reloading = False
        self.reload_requested = False  # a HUP (or a file change) waits for the reload under way
        self.boot_failures: dict[int, int] = {}  # slot -> consecutive failed boots
        self.respawn_after: dict[int, float] = {}
        self.last_tick = time.monotonic()
        self.watchdog_interval = systemd.watchdog_interval(os.environ)
        self.next_watchdog = 0.0
        self.next_memory_check = 0.0
        self.stats = Aggregator()
        self.sampler = ProcessSampler()
        self.status: StatusServer | None = None
        self.statsd: StatsdExporter | None = None
        self.backlog: BacklogWatch | None = None  # accept-queue high-water marks, with stats on
        self.reloader: Reloader | None = None  # watches the app's files with ``reload``
        self.respawn_due: set[int] = set()  # slots whose worker ended and awaits a replacement
        self.poller = select.poll()
        self.collector = StatsCollector(self.stats, self.poller)  # used with stats on
        self.relay = relay.RelayHub(self.poller)  # moves a busy worker's idle connections to a free one
        self.actions: dict[int, Callable[[], None]] = {
            signal.SIGHUP: self.request_reload,
            signal.SIGTERM: lambda: self.stop(graceful=True),
            signal.SIGINT: lambda: self.stop(graceful=False),
            signal.SIGQUIT: lambda: self.stop(graceful=False),
            signal.SIGTTIN: lambda: self.scale(+1),
            signal.SIGTTOU: lambda: self.scale(-1),
            signal.SIGUSR1: self.reopen_logs,
            signal.SIGUSR2: self.upgrade,
            signal.SIGWINCH: self.stop_workers,
            signal.SIGCHLD: lambda: None,  # only wakes the loop; reaping follows
        }

    def context(self) -> HookContext:
        return HookContext(self.config, self.pid)

    # -- start ------------------------------------------------------------------

    def start(self) -> None:
        """Open logs, bind, preload and daemonize; raise ForkserverError on any problem."""
        config = self.config
        preflight.refuse(preflight.start_problems(config))  # before anything is bound or written
        if config.certfile:
            # Deferred: a start without TLS does not import ssl.  Read here, by
            # the master, before anything is bound: a bad file is one line.
            from ..tlscontext import build_context

            self.tls_context = build_context(config)
        self.log_files.append(setup_error_log(config.error_logfile, config.log_level))
        if config.capture_output:
            capture_stdio(self.log_files[0])
        self.access_logfile = open_access_logfile(config.access_logfile)
        if self.access_logfile is not None:
            self.log_files.append(self.access_logfile)
        os.environ.update(environment_of(config))  # gunicorn's raw_env: before hooks and the app load
        prepare_path(config.chdir, config.pythonpath)  # hook modules live beside the app
        if config.logconfig or config.logconfig_dict:
            # Deferred, as few starts have one. After prepare_path: a handler
            # or formatter class may come from the app's own package.
            from .. import logconfig

            logconfig.apply(config, self.start_dir)
            self.logging_files = logconfig.FileHandlers()
        if config.static:
            from ..mounts import check_roots  # imported only when configured

            check_roots(config)  # static directories are relative to chdir, as the workers see it
        self.hooks = Hooks(config)
        self.hooks.workers = self.desired  # what server.num_workers says: the sized count, also for auto
        self.uid, self.gid = resolve_identity(config.user, config.group)
        self.hooks.run("nworkers_changed", self.context(), values=(self.desired, None))
        self.hooks.run("on_starting", self.context(), fatal=True)
        if config.umask:
            os.umask(int(config.umask, 8))
        self.listeners = self.open_listeners()
        if config.certfile:
            from ..tlscontext import serves_tls

            self.tls_listeners = tuple(listener for listener in self.listeners
                                       if serves_tls(config, listener.address.text))
        self.relay.listeners = len(self.listeners)
        if any(listener.reuse_port for listener in self.listeners):
            if (problem := reuse_port_handover_problem()) is not None:
                log.warning("%s", problem)
        if config.memory_merge:  # off, the flag is left as inherited (systemd's MemoryKSM=, say)
            self.follow_memory_merge(config)
        share_stdlib()
        try:
            if config.stats_bind:
                # Deferred: only a start with stats on needs it.
                from .status import StatusServer

                self.status = StatusServer(config.stats_bind, self.stats_snapshot, allow=config.stats_allow_ips)
            if config.statsd_host:
                from .statsd import StatsdExporter  # deferred, as the status server

                self.statsd = StatsdExporter(config.statsd_host, config.statsd_prefix)
            readers = (("/stats", "/metrics") if self.status else ()) + (("statsd",) if self.statsd else ())
            if readers:
                self.backlog = BacklogWatch(readers)
            if config.preload:
                self.preload()
            if config.daemon:
                self.daemonize()
                self.pid = os.getpid()
            if config.pid:
                self.pidfile = Pidfile(config.pid)
                self.pidfile.create(self.pid)
        except ForkserverError:
            self.close_listeners()
            if self.status is not None:
                self.status.close()
            if self.statsd is not None:
                self.statsd.close()
            raise
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.notices = NoticeReader(self.notify_r)
        if config.reload:
            self.reloader = Reloader(config.reload_extra_file, owner=(self.uid, self.gid))
        self.wakeup = Wakeup(MASTER_SIGNALS)
        if config.refork_after and config.reload:
            log.info("refork_after is off under reload: every worker loads the code afresh")
        else:
            self.refork = self.refork_supervisor()  # after daemonize: forks do not inherit the subreaper
        setproctitle(f"forkserver: master [{config.proc_name}]")
        release_free_heap()

    def refork_supervisor(self) -> ReforkSupervisor | None:
        """The supervisor ``refork_after`` asks for; None with it off, under reload, or without a subreaper.

        Imported here: a start without refork (the default) does not load
        ``forkserver.refork``, 1.5 ms of import.
        """
        if not self.config.refork_after or self.config.reload:
            return None
        from . import refork

        return refork.ReforkSupervisor(self, self.config.refork_after) if refork.become_subreaper() else None

    def open_listeners(self) -> list[Listener]:
        """Adopt sockets handed to us (systemd, or an upgrading master), bind the rest."""
        config = self.config
        inherited = systemd.inherited_fds(os.environ)
        self.environ = {k: v for k, v in self.environ.items() if not k.startswith("LISTEN_")}
        adopted = [adopt(fd, name, backlog=config.backlog) for fd, name in inherited]
        names = {listener.address.text for listener in adopted}
        # With sockets handed over, the default bind is not also wanted.
        wanted = () if adopted and config.source_of("bind") == "default" else config.bind
        if config.tls_bind:
            from ..tlscontext import listen_addresses

            wanted = listen_addresses(config)  # bind left at its default beside tls_bind is not wanted
        fresh = bind_all(tuple(a for a in wanted if a not in names), backlog=config.backlog,
                         reuse_port=config.reuse_port, unix_mode=int(config.unix_socket_mode, 8))
        return adopted + fresh

    def preload(self) -> None:
        """Import the app in the master, remembering which modules that added."""
        self._modules_before_app = set(sys.modules)
        prepare_path(self.config.chdir, self.config.pythonpath)
        descriptors_before = open_descriptors()
        self.app = load_app(self.config.app)
        self.app_descriptors = {fd: identity for fd, identity in open_descriptors().items()
                                if descriptors_before.get(fd) != identity}
        self.preloaded_modules = set(sys.modules) - self._modules_before_app

    def daemonize(self) -> None:
        """Detach: fork twice around setsid and point stdio at /dev/null, except where logs go."""
        if os.fork():
            os._exit(EXIT_OK)
        os.setsid()
        if os.fork():
            os._exit(EXIT_OK)
        # The error log stays where it is, even on stderr; an access log on stdout goes quiet.
        keep = {self.log_files[0].fd} | {f.fd for f in self.log_files if f.path != "-"}
        keep |= {fd for f in self.log_files for fd in f.captured}
        if self.config.enable_stdio_inheritance:
            # gunicorn's -R: output redirected by the shell (> out.log 2>&1) stays there; a terminal does not.
            keep |= {fd for fd in (1, 2) if not os.isatty(fd)}
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            if fd not in keep:
                os.dup2(null, fd)
        os.close(null)

    # -- the loop -----------------------------------------------------------------

    def run(self) -> int:
        """Supervise workers until told to stop; return the process exit code."""
        poller = self.poller
        poller.register(self.wakeup.fileno(), select.POLLIN)
        poller.register(self.notify_r, select.POLLIN)
        if self.reloader is not None:
            poller.register(self.reloader.fileno(), select.POLLIN)
        if self.status is not None:
            poller.register(self.status.fileno(), select.POLLIN)
        try:
            self.spawn_missing()
            while True:
                try:
                    self.wait_for_events(self.tick())
                    self.feed_watchdog()
                    for signum in self.wakeup.drain():
                        self.actions.get(signum, lambda: None)()
                    if self.refork is not None:
                        self.refork.read()  # first: a worker a mold forked may already say it is ready
                    self.read_notices()
                    # Always drained (its fd must not stay readable); a reload waits for the one under way.
                    if self.reloader is not None and self.reloader.changed(hold=self.reloading or self.stopping):
                        self.request_reload()
                    self.collector.drain()
                    self.relay.drain(self.relay_takers)
                    self.reap_exited()
                    # After the notices and the reaping, which end a reload under way.
                    self.reload_if_requested()
                    if self.statsd is not None:
                        self.statsd.send_if_due(self.statsd_snapshot)
                    if self.status is not None:
                        self.status.handle_ready()
                    self.kill_hung()  # while stopping too: a hung worker must not hold the stop up
                    self.report_lost_log_lines()
                    if self.stopping and not self.replaces_workers():
                        if self.listeners:
                            self.close_listeners()  # the shutdown delay is over; the workers drain
                        if not self.pool.workers:
                            break
                        self.enforce_stop_deadline()
                        continue
                    # In a shutdown delay the pool only keeps its strength: no recycling, no refork.
                    if not self.stopping:
                        self.check_memory()
                    self.spawn_missing()
                    if self.refork is not None and not self.stopping:
                        self.refork.tend()
                except ForkserverError:
                    raise
                except Exception:
                    log.exception("master loop error; carrying on")
        finally:
            self.shutdown()
        return EXIT_OK

    def read_notices(self) -> None:
        """Act on the lines workers wrote: ``ready PID``, ``failed PID CODE reason``, ``recycle PID why``.

        The pipe is shared, so a line may name another worker than its
        writer.  A worker that says it is leaving is therefore also told to
        leave (USR2, which one already on its way ignores): a false notice
        can only retire a worker, never leave one running uncounted beside
        its replacement.
        """
        for notice in self.notices.read():
            handle = self.pool.workers.get(notice.pid)
            if handle is None:
                if self.refork is not None:
                    self.refork.hold_early(notice)  # maybe a mold's worker, not adopted yet
                continue
            self.act_on_notice(handle, notice)

    def act_on_notice(self, handle: WorkerHandle, notice: Notice) -> None:
        if notice.kind == "ready":
            self.on_ready(handle)
        elif notice.kind == "failed":
            self.on_boot_failure(handle, notice.reason, notice.code)
            self.signal_worker(handle, signal.SIGUSR2)
        elif notice.kind == "recycle":
            handle.retiring = handle.recycled = True  # it leaves on its own; a replacement starts now
            self.stats.set_state(handle.pid, "retiring")
            log.info("worker recycling slot=%d pid=%d %s", handle.slot, handle.pid, notice.reason)
            self.signal_worker(handle, signal.SIGUSR2)

    def on_ready(self, handle: WorkerHandle) -> None:
        handle.ready = True
        if handle.replaces and self.refork is not None:
            self.refork.end_rollover(handle)
        if not handle.retiring:
            self.stats.set_state(handle.pid, "idle")
        self.boot_failures.pop(handle.slot, None)
        first = handle.generation == self.generation and not self.started
        if first:
            self.started = True
            self.announce()
        if self.memory_limit is not None and handle.generation == self.generation:
            self.fit_memory(handle)
        log.info("worker ready slot=%d pid=%d gen=%d", handle.slot, handle.pid, handle.generation)
        if first:
            # An upgraded master tells systemd it is the main process now.
            systemd.notify(f"READY=1\nMAINPID={self.pid}\n{self.status_line()}")
        if handle.generation == self.generation:
            self.retire_old_generations()

    def announce(self) -> None:
        """The first worker serves: run when_ready, then log the start, before any "worker ready" line.

        Logging only now means a start that fails prints nothing but its one
        error line; logging before the first "worker ready" makes the log read
        in order: where we listen, what runs, then the workers.
        """
        self.hooks.run("when_ready", self.context(), fatal=True)
        for line in self.config.warnings:
            log.warning("%s", line)
        for line in self.config.notices:
            log.info("%s", line)
        for listener in self.listeners:
            where = describe(listener)
            if listener in self.tls_listeners:  # a URL says https; a UNIX socket's path gets a word
                where = where.replace("http://", "https://") if "http://" in where else f"{where} (TLS)"
            log.info("listening at %s", where)
        log.info("master started pid=%d app=%s version=%s workers=%d threads=%d", self.pid, self.config.app,
                 __version__, self.desired, self.config.threads)
        if self.sizing:
            log.info("%s", self.sizing)

    def status_line(self) -> str:
        ready = sum(1 for h in self.pool.of_generation(self.generation) if h.ready)
        return f"STATUS=workers {ready}/{self.desired} ready, generation {self.generation}"

    def on_boot_failure(self, handle: WorkerHandle, reason: str, code: int) -> None:
        """A worker could not boot: give up at startup, else abort the reload or back off."""
        handle.retiring = True  # it exits on its own; do not count it as live
        if handle.generation > self.generation:
            return  # one more worker of a reload already abandoned
        if handle.mold and self.refork is not None and self.started:
            self.refork.worker_failed(handle, reason)
            return
        if not self.started:
            self.stop(graceful=False)
            raise (AppImportError if code == EXIT_APP_LOAD else WorkerBootError)(reason)
        if handle.generation == self.generation and self.reloading:
            log.error("reload failed, keeping generation %d: %s", self.generation - 1, reason)
            self.abandon_generation()
            return
        failures = self.boot_failures.get(handle.slot, 0) + 1
        self.boot_failures[handle.slot] = failures
        delay = min(MAX_BOOT_BACKOFF, 2.0 ** (failures - 1))
        self.respawn_after[handle.slot] = time.monotonic() + delay
        log.error("worker failed to boot slot=%d (retry in %.0fs): %s", handle.slot, delay, reason)

    def reap_exited(self) -> None:
        for pid, status, handle in self.pool.reap():
            how = describe_exit(status)
            if handle is None:
                if pid == self.new_master:
                    self.on_new_master_exit(how)
                continue
            handle.board.close()
            self.accept_board.release(pid)
            self.hooks.run("child_exit", HookContext(self.config, self.pid, handle.slot, handle.generation, pid))
            self.forget_stats(handle)
            self.handover.forget(pid)
            self.relay.forget(pid)
            if self.refork is not None:
                self.refork.forget(handle, how)
                if handle.is_mold:
                    continue
            replaced = self.replaces_workers()
            if replaced and handle.generation == self.generation:
                self.respawn_due.add(handle.slot)
            if not replaced or handle.retiring:
                log.info("worker exited slot=%d pid=%d gen=%d %s", handle.slot, handle.pid, handle.generation, how)
            elif not handle.ready:
                why = f"not ready within boot_timeout, {how}" if handle.aborted_at else how
                self.on_boot_failure(handle, f"worker slot={handle.slot} died during boot ({why})",
                                     os.waitstatus_to_exitcode(status))
            else:
                log.warning("worker died slot=%d pid=%d gen=%d %s; replacing", handle.slot, handle.pid,
                            handle.generation, how)

    def kill_hung(self) -> None:
        """Abort workers with a request past its allowance, or silent for ``timeout``; kill those that ignore it.

        A request's allowance is ``timeout`` without progress, or the
        deadline its app set (capped at ``deadline_limit`` after its start;
        see ``forkserver.scoreboard.Deadline``).  SIGABRT makes the worker
        dump every thread's stack (and, with a ``worker_abort`` hook, log
        each stuck request with its stack and run the hook); we log the
        requests it had in flight from its scoreboard first, since a hung
        worker may not tell us itself.  SIGKILL follows ``ABORT_GRACE``
        later whatever the worker does meanwhile.
        """
        now = time.monotonic()
        slept = now - self.last_tick
        self.last_tick = now
        if slept > 2 * TICK_INTERVAL:
            # We were stopped (SIGSTOP, a frozen process group): workers stopped
            # with us have stale stamps through no fault of theirs.  Give them
            # one tick to beat again before judging.
            return
        for handle in list(self.pool.workers.values()):
            if handle.aborted_at:
                if not handle.killed and now - handle.aborted_at > ABORT_GRACE:
                    handle.killed = True
                    self.signal_worker(handle, signal.SIGKILL)
                continue
            if not handle.ready:
                self.limit_boot(handle, now)
                continue
            if not handle.board.timeout:  # made while timeout was 0: never judged
                continue
            overdue, in_flight = handle.board.overdue()
            if overdue <= 0:
                continue
            timeout = handle.board.timeout
            culprit = max(in_flight, key=lambda request: request.overdue(timeout), default=None)
            if culprit is not None and culprit.deadline is not None:
                why = f"{overdue:.1f}s past the deadline its app set"
            else:
                why = f"no progress for {overdue + timeout:.1f}s"
            requests = "; ".join(request.describe() for request in in_flight) or "none"
            log.critical("worker timeout slot=%d pid=%d: %s; in flight: %s; dumping stacks and killing",
                         handle.slot, handle.pid, why, requests)
            handle.aborted_at = now
            handle.retiring = True  # replaced at once, not after it is reaped
            self.signal_worker(handle, signal.SIGABRT)

    def limit_boot(self, handle: WorkerHandle, now: float) -> None:
        """Abort a worker still booting after ``boot_timeout`` (or ``timeout``, if longer).

        Importing an app is not a request: a Django project or a model that
        loads for longer than ``timeout`` must not be killed as hung, again
        and again.  A boot that never ends (an import waiting on a database
        that does not answer) is still ended, with its stack dumped, and
        counts as a failed boot: at start-up the server exits naming it,
        later the slot backs off.
        """
        limit = self.config.boot_timeout and max(self.config.boot_timeout, self.config.timeout)
        if not limit or now - handle.started_at <= limit:
            return
        log.critical("worker boot timeout slot=%d pid=%d: not ready after %.1fs (boot_timeout %gs); "
                     "dumping stacks and killing", handle.slot, handle.pid, now - handle.started_at, limit)
        handle.aborted_at = now
        self.signal_worker(handle, signal.SIGABRT)

    def check_memory(self) -> None:
        """Every few seconds, retire a worker whose unique memory was over the limit MEMORY_SAMPLES times in a row.

        One sample over is not enough: a request that briefly needs a lot
        (an export, a big upload) would recycle the worker, and the warm
        state it built (or shares with a refork mold) with it.
        """
        limit = self.config.max_worker_memory
        now = time.monotonic()
        if not limit or now < self.next_memory_check:
            return
        # Deferred: only max_worker_memory needs psutil, and importing it slows every start.
        import psutil

        self.next_memory_check = now + MEMORY_CHECK_INTERVAL
        for handle in list(self.pool.workers.values()):
            if handle.retiring or not handle.ready:
                continue
            try:
                uss = psutil.Process(handle.pid).memory_full_info().uss
            except psutil.Error:
                continue
            if uss <= limit * 1024 * 1024:
                if handle.over_memory:
                    log.info("worker back under the memory limit slot=%d pid=%d uss=%.1fMiB after %d sample(s) "
                             "over; kept", handle.slot, handle.pid, uss / 1048576, handle.over_memory)
                handle.over_memory = 0
                continue
            handle.over_memory += 1
            if handle.over_memory < MEMORY_SAMPLES:
                log.info("worker over memory slot=%d pid=%d uss=%.1fMiB limit=%dMiB (sample %d of %d)",
                         handle.slot, handle.pid, uss / 1048576, limit, handle.over_memory, MEMORY_SAMPLES)
                continue
            log.warning("worker over memory slot=%d pid=%d uss=%.1fMiB limit=%dMiB for %d samples; recycling",
                        handle.slot, handle.pid, uss / 1048576, limit, MEMORY_SAMPLES)
            handle.recycled = True
            self.retire(handle)

    def tick(self) -> float:
        """Seconds the loop may sleep: a second, or until the solo boot, the watchdog or a stats accept pause is due."""
        now = time.monotonic()
        wait = TICK_INTERVAL
        solo_left = self.first_fork + SOLO_BOOT - now
        if not self.started and self.first_fork and solo_left > 0:
            wait = min(wait, solo_left)
        if self.watchdog_interval:
            wait = min(wait, max(0.0, self.next_watchdog - now))
        if self.close_listeners_at and self.listeners:
            wait = min(wait, max(0.0, self.close_listeners_at - now))
        if self.status is not None:
            wait = min(wait, max(0.0, self.status.wake_at() - now))
        return wait

    def wait_for_events(self, seconds: float) -> None:
        """Sleep until a descriptor the loop watches is ready, or for ``seconds``.

        With stats on, the accept queues are sampled for their high-water
        marks every BACKLOG_SAMPLE_INTERVAL meanwhile, in this small loop
        rather than by turning the whole master loop that often.
        """
        backlog = self.backlog
        if backlog is None:
            self.poller.poll(seconds * 1000)
            return
        deadline = time.monotonic() + seconds
        while True:
            backlog.sample(self.listeners)
            left = deadline - time.monotonic()
            if left <= 0 or self.poller.poll(min(left, BACKLOG_SAMPLE_INTERVAL) * 1000):
                return

    def feed_watchdog(self) -> None:
        """Tell systemd's watchdog (``WatchdogSec=``) that this loop still turns."""
        now = time.monotonic()
        if self.watchdog_interval and now >= self.next_watchdog:
            self.next_watchdog = now + self.watchdog_interval
            systemd.notify("WATCHDOG=1")

    def size_pool(self, config: Config) -> int:
        """The number of workers wanted: the setting, or with ``auto`` the CPUs the container grants.

        A memory limit is only noted here: what a worker needs is known once
        one has booted the app (``fit_memory``).
        """
        self.memory_limit, self.sizing = None, ""
        if config.workers != AUTO_WORKERS:
            return config.workers
        # Deferred: only ``auto`` reads the cgroup, and the module's pathlib is 2 ms of a start.
        from .containers import available_cpus, read_limits, workers_for_cpus

        limits, cpus = read_limits(), available_cpus()
        count = workers_for_cpus(limits, cpus)
        self.memory_limit = limits.memory
        self.sizing = f"workers auto: {count} from {cpus} CPUs available, {limits.describe()}"
        return count

    def fit_memory(self, handle: WorkerHandle) -> None:
        """With ``auto`` under a memory limit: measure the first booted worker and keep the pool inside the limit."""
        import psutil  # deferred, as in check_memory

        from .containers import workers_that_fit  # loaded by size_pool, which set memory_limit

        limit, self.memory_limit = self.memory_limit, None
        assert limit is not None
        try:
            worker = psutil.Process(handle.pid).memory_full_info().uss
            master = psutil.Process().memory_info().rss
        except psutil.Error:
            return
        fit = workers_that_fit(limit, master, worker)
        mib = 1048576
        if fit < self.desired:
            log.warning("workers auto: memory limit %.0fMiB holds %d workers (master %.0fMiB, each worker "
                        "%.0fMiB unique at boot); running %d instead of %d", limit / mib, fit, master / mib,
                        worker / mib, fit, self.desired)
            self.set_desired(fit)
        else:
            log.info("workers auto: memory limit %.0fMiB holds %d workers (master %.0fMiB, each worker %.0fMiB "
                     "unique at boot); running %d", limit / mib, fit, master / mib, worker / mib, self.desired)

    def spawn_missing(self) -> None:
        occupied = {h.slot for h in self.pool.of_generation(self.generation)}
        if self.refork is not None:
            occupied |= {p.slot for p in self.refork.state.pending.values()
                         if p.generation == self.generation and not p.replaces}
        spawn, retire = plan(occupied, self.desired)
        if self.memory_limit is not None and occupied:
            spawn = []  # one worker boots alone until fit_memory has measured it
        now = time.monotonic()
        if not self.started:
            # Cold start: nobody serves yet, so what counts is how soon one
            # worker can.  It boots alone for SOLO_BOOT (less if it is ready
            # sooner); the rest follow, at most that much later than at once.
            if not self.first_fork:
                self.first_fork = now
                spawn = spawn[:1]
            elif now < self.first_fork + SOLO_BOOT:
                spawn = []
        for slot in spawn:
            if self.respawn_after.get(slot, 0) <= now:
                self.spawn(slot)
        by_slot = {h.slot: h for h in self.pool.of_generation(self.generation)}
        for slot in retire:
            self.retire(by_slot[slot])

    def spawn(self, slot: int) -> None:
        """Start a worker in ``slot``: forked by the refork mold if there is one, else by us."""
        # A stop under way has told the mold to leave too: the master forks.
        if self.refork is not None and not self.stopping:
            source = self.refork.fork_source()
            if source == "mold":
                self.refork.ask_mold(slot)
                return
            if source == "wait":
                return  # the mold is getting ready; it forks this one in a moment
        provisions = self.provide(for_mold=False)
        spec = WorkerSpec(
            config=self.config, listeners=self.listeners, slot=slot, generation=self.generation,
            board=provisions.board, notify_fd=self.notify_w, master_pid=self.pid, log_files=list(self.log_files),
            access_logfile=self.access_logfile, log_channel=provisions.log_ends[1], app=self.app,
            hooks=self.hooks, uid=self.uid, gid=self.gid,
            stats_channel=None if provisions.stats_ends is None else provisions.stats_ends[1],
            reload_dir=self.reloader.report_dir if self.reloader is not None else "",
            accept_board=self.accept_board, seat=provisions.seat,
            refork_channel=None if provisions.refork_ends is None else provisions.refork_ends[1],
            tls_context=self.tls_context, tls_listeners=self.tls_listeners,
            relay_channel=provisions.relay_ends[1],
            stop_began=self.stop_began,
        )
        self.hooks.run("pre_fork", HookContext(self.config, self.pid, slot, self.generation))
        try:
            pid = self.fork()
        except OSError as exc:
            # Out of processes or memory (EAGAIN, ENOMEM): give back what was
            # made for this worker, or every retry would leak a seat, a
            # mapping and a pipe, and try again after a pause.
            self.give_back(provisions)
            self.respawn_after[slot] = time.monotonic() + FORK_RETRY
            log.error("fork failed slot=%d: %s; retrying in %gs", slot, exc.strerror, FORK_RETRY)
            return
        if pid == 0:
            code = 1
            try:
                self.wakeup.close()
                os.close(self.notify_r)
                systemd.hide_from_workers()
                self.drop_inherited_stats(provisions.stats_ends)
                self.handover.close_inherited(provisions.log_ends)
                self.relay.close_inherited(provisions.relay_ends)
                if self.refork is not None:
                    self.refork.drop_inherited(provisions)
                random.seed()
                code = self.run_worker(spec)
            except BaseException:
                log.exception("worker crashed slot=%d", slot)
            finally:
                os._exit(code)
        handle = self.admit(pid, slot, self.generation, provisions)
        if self.stopping:
            # A replacement in the shutdown delay: like every worker since
            # the TERM it answers the health path with 503 and drains with
            # the others (WorkerSpec.stop_began); the TERM waits, blocked,
            # until its handlers are in place.
            self.signal_worker(handle, signal.SIGTERM)

    def request_limits(self) -> dict[str, float]:
        """A new worker's scoreboard limits: ``timeout``, and how far an app may move a request's deadline."""
        return {"timeout": self.config.timeout, "longest": self.config.deadline_limit}

    def provide(self, *, for_mold: bool) -> Provisions:
        """Make a new worker's scoreboard, channels and accept-board seat, before it is forked."""
        if for_mold:
            board, board_fd = Scoreboard.shareable(self.config.threads, **self.request_limits())
        else:
            board, board_fd = Scoreboard(self.config.threads, **self.request_limits()), -1
        # Workers count requests only for someone who reads the counts: /stats or StatsD.
        stats_ends = self.collector.prepare() if self.status is not None or self.statsd is not None else None
        refork_ends = None
        if self.refork is not None:
            from ..refork import new_channel  # loaded with the supervisor

            refork_ends = new_channel()
        return Provisions(board, board_fd, stats_ends, self.handover.prepare(), refork_ends, self.accept_board.take(),
                          relay.channel())

    def give_back(self, provisions: Provisions) -> None:
        """The worker was never forked (or never adopted): release everything made for it."""
        self.accept_board.give_back(provisions.seat)
        provisions.board.close()
        provisions.close_board_file()
        if provisions.stats_ends is not None:
            self.collector.abandon(provisions.stats_ends)
        self.handover.abandon(provisions.log_ends)
        for end in (*(provisions.refork_ends or ()), *provisions.relay_ends):
            end.close()

    def admit(self, pid: int, slot: int, generation: int, provisions: Provisions, *, mold: int = 0,
              replaces: int = 0) -> WorkerHandle:
        """A new worker runs as our child: keep our ends of its resources and start watching it."""
        provisions.close_board_file()
        self.accept_board.bind(provisions.seat, pid)
        handle = WorkerHandle(slot, pid, generation, provisions.board, time.monotonic(), mold=mold,
                              replaces=replaces)
        self.pool.add(handle)
        self.stats.add_worker(pid, pid=pid, slot=slot, generation=generation)
        if slot in self.respawn_due and not replaces:
            self.respawn_due.discard(slot)
            self.stats.note_respawn()
        if provisions.stats_ends is not None:
            self.collector.attach(pid, slot, provisions.stats_ends)
        self.handover.attach(pid, provisions.log_ends)
        self.relay.attach(pid, provisions.relay_ends)
        if self.refork is not None and provisions.refork_ends is not None:
            self.refork.attach(handle, provisions.refork_ends)
        log.debug("worker spawned slot=%d pid=%d gen=%d%s", slot, pid, generation,
                  f" from mold pid={mold}" if mold else "")
        return handle

    def fork(self) -> int:
        """Fork with our signals blocked until the child has its own handlers.

        Until the child drops our wakeup fd, a signal it received would be
        written into *our* pipe: a TERM meant for a booting worker would stop
        the master.  Blocked, the signal waits for the child's handlers.

        Every object alive at the fork is frozen in the child (``gc.freeze``):
        its collector never walks them, so it never writes their GC headers
        and the pages stay shared with the master instead of being copied
        into each worker.  The master unfreezes at once, so its own garbage
        is still collected (a reload with ``preload`` drops a whole app).
        """
        self.fork_safety.check(still_open(self.app_descriptors) if self.app_descriptors else ())
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)
        gc.freeze()
        pid = -1
        try:
            pid = os.fork()
        finally:
            if pid:  # the master, also when the fork failed
                gc.unfreeze()
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return pid

    def relay_takers(self, giver: int) -> list[int]:
        """The workers that may adopt idle connections from busy worker ``giver``: the least busy first.

        Serving, and with a thread free or about to be (no thread busy for
        as long as makes a worker give connections away), as their
        scoreboards say.
        """
        if self.stopping:
            return []
        free = []
        for handle in self.pool.workers.values():
            if handle.pid == giver or not handle.ready or handle.retiring or handle.aborted_at:
                continue
            in_flight = handle.board.in_flight()
            if len(in_flight) >= handle.board.threads and in_flight[-1].elapsed >= relay.BUSY_THRESHOLD:
                continue  # busy for long itself: it would give them away again
            free.append((len(in_flight), random.random(), handle.pid))
        return [pid for *_, pid in sorted(free)]

    def signal_worker(self, handle: WorkerHandle, signum: int) -> None:
        try:
            os.kill(handle.pid, signum)
        except ProcessLookupError:
            pass

    def retire(self, handle: WorkerHandle) -> None:
        """Ask a worker to finish its requests and exit, leaving the listeners to the others (USR2)."""
        handle.retiring = True
        self.stats.set_state(handle.pid, "retiring")
        self.signal_worker(handle, signal.SIGUSR2)

    # -- stats --------------------------------------------------------------------

    def forget_stats(self, handle: WorkerHandle) -> None:
        """A worker was reaped: read its final flush, then fold it into the retired totals."""
        self.collector.forget(handle.pid)
        if handle.aborted_at:
            cause = "killed_timeout"
        elif handle.recycled:
            cause = "recycled"
        elif handle.retiring or not self.replaces_workers():
            cause = "exited"
        else:
            cause = "died"
        self.stats.worker_exited(handle.pid, cause)
        self.sampler.forget(handle.pid)

    def drop_inherited_stats(self, own: tuple[Any, Any] | None) -> None:
        """In a new worker: close the stats socket and the stats channels' read ends we inherited."""
        if self.status is not None:
            self.status.close(unlink=False)
        if self.statsd is not None:
            self.statsd.close()
        self.collector.close_inherited(own)

    def stats_snapshot(self, reader: str = "/stats") -> dict[str, Any]:
        """The /stats document: the workers' counters plus what only the master can see.

        ``reader`` is the path asked for ("/stats" or "/metrics"): each keeps
        its own accept-queue high-water marks (``sampler.BacklogWatch``).
        """
        extra = self.board_readings()
        for handle in self.pool.workers.values():
            extra[handle.pid].update(self.sampler.read(handle.pid))
            extra[handle.pid]["forked_by"] = handle.mold or None  # the refork mold's pid; None: the master
        self.mark_busy_workers()
        return self.stats.snapshot(extra, listener_stats(self.listeners, self.backlog, reader),
                                   master_log_lines_dropped=sum(target.dropped for target in self.log_files),
                                   master=self.sampler.read(self.pid))

    def statsd_snapshot(self) -> dict[str, Any]:
        """The counters StatsD gets: the /stats document without the per-process kernel readings."""
        self.mark_busy_workers()
        return self.stats.snapshot(self.board_readings(), listener_stats(self.listeners, self.backlog, "statsd"))

    def board_readings(self) -> dict[int, dict[str, Any]]:
        """What each worker's scoreboard says now: its threads and the requests they run, and since when."""
        readings: dict[int, dict[str, Any]] = {}
        for handle in self.pool.workers.values():
            in_flight = handle.board.in_flight()
            info: dict[str, Any] = {
                "heartbeat_age_seconds": round(handle.board.last_beat_age(), 3),
                "current_request": None,
                "threads": handle.board.threads,
                "requests_in_flight": len(in_flight),
                "in_flight_seconds": sum(request.elapsed for request in in_flight),
            }
            if in_flight:
                oldest = in_flight[0]
                info["current_request"] = {"method": oldest.method, "path": oldest.path,
                                           "elapsed_seconds": round(oldest.elapsed, 3)}
            readings[handle.pid] = info
        return readings

    def mark_busy_workers(self) -> None:
        """Tell the aggregator which serving workers have a request in flight right now."""
        for handle in self.pool.workers.values():
            if handle.ready and not handle.retiring:
                self.stats.set_state(handle.pid, "busy" if handle.board.in_flight() else "idle")

    # -- signal actions -----------------------------------------------------------

    def request_reload(self) -> None:
        """HUP: ask for a reload, which ``reload_if_requested`` starts as soon as none is under way.

        HUPs that arrive while a new generation boots, or several read from
        one wakeup, make one more reload, not one each: 50 HUPs in a second
        used to fork about 100 workers.  The follow-up reload reads the config
        and app as they are when it starts, so the last HUP's changes win.
        """
        if self.reloading and not self.reload_requested:
            log.info("reload requested while generation %d boots; reloading again once it is ready",
                     self.generation)
        self.reload_requested = True

    def reload_if_requested(self) -> None:
        if self.reload_requested and not self.reloading and not self.stopping:
            self.reload_requested = False
            self.reload()

    def reload(self) -> None:
        """Read the config again and replace every worker with a new generation.

        The old generation keeps serving until the new one is ready, and keeps
        serving for good if the new config or app is broken.
        """
        log.info("reloading (HUP)")
        systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            config = load_config(self.argv, self.environ, self.start_dir).config
            os.environ.update(environment_of(config))
            prepare_path(config.chdir, config.pythonpath)
            hooks = Hooks(config, spawned=self.hooks.spawned)
        except ForkserverError as exc:  # AppImportError from a bad chdir, too
            log.error("reload failed, keeping the running config: %s", exc)
            systemd.notify("READY=1")
            return
        if config.bind != self.config.bind:
            log.warning("bind changed from %s to %s: listeners change only on restart or upgrade (USR2)",
                        ",".join(self.config.bind), ",".join(config.bind))
            config = config.replace(bind=self.config.bind)
        config, tls_context = self.reload_tls(config)
        if (config.stats_bind, config.stats_allow_ips) != (self.config.stats_bind, self.config.stats_allow_ips):
            log.warning("stats_bind and stats_allow_ips change only on restart or upgrade (USR2)")
        access_logfile = self.access_logfile
        if config.access_logfile != self.config.access_logfile:
            try:
                access_logfile = open_access_logfile(config.access_logfile)  # workers never open logs
            except ForkserverError as exc:
                log.error("reload failed, keeping the running config: %s", exc)
                systemd.notify("READY=1")
                return
        if config.preload and not self.reimport(config):
            if access_logfile is not None and access_logfile is not self.access_logfile:
                access_logfile.close()
            systemd.notify("READY=1")
            return
        self.use_access_log(access_logfile)
        if not config.preload:
            self.app = None
        if config.memory_merge != self.config.memory_merge:
            self.follow_memory_merge(config)
        self.config, self.hooks = config, hooks
        self.tls_context = tls_context
        self.hooks.run("on_reload", self.context())
        self.desired_before_reload = self.desired
        self.set_desired(self.size_pool(config))
        if self.sizing:
            log.info("%s", self.sizing)
        self.generation += 1
        self.reloading = True
        if self.refork is not None:
            self.refork.restart()  # the new generation starts from the master again
        else:
            self.refork = self.refork_supervisor()  # None unless the reload turned refork on
        self.stats.note_reload()
        self.respawn_after.clear()
        self.spawn_missing()

    def follow_memory_merge(self, config: Config) -> None:
        """Set the master's same-page merging flag as ``config`` asks, before it forks (forkserver.memorymerge).

        Every process the master forks after this inherits the flag: the
        workers, the mold and the mold's workers.  At start, and on a
        reload that turns ``memory_merge`` on or off, since the new
        generation is forked from the master (or from a mold it forks anew).
        """
        from ..memorymerge import offered, opt_in, opt_out  # deferred: only a server that merges needs it

        if self.merge_found is None:
            self.merge_found = offered()
        if config.memory_merge:
            problem = opt_in()
        elif self.merge_found:
            return  # set before us: not ours to clear
        else:
            problem = opt_out()
        if problem is not None:
            log.warning("%s", problem)

    def reload_tls(self, config: Config) -> tuple[Config, Any]:
        """The TLS context the new generation serves with: the files read again (certificate rotation).

        Which listeners speak TLS is fixed at start, like the listeners
        themselves.  A certificate or key that does not load keeps the
        running context (the rest of the reload goes on), and says why.
        """
        old = self.config
        if config.tls_bind != old.tls_bind:
            log.warning("tls_bind changed from %s to %s: listeners change only on restart or upgrade (USR2)",
                        ",".join(old.tls_bind), ",".join(config.tls_bind))
            config = config.replace(tls_bind=old.tls_bind)
        if bool(config.certfile) != bool(old.certfile):
            log.warning("TLS is turned on or off only on restart or upgrade (USR2); keeping it %s",
                        "on, with the running certificate" if old.certfile else "off")
            return config, self.tls_context
        if not config.certfile:
            return config, None
        from ..tlscontext import build_context  # imported at start already

        try:
            context = build_context(config)
        except ForkserverError as exc:
            log.error("TLS reload failed, keeping the running certificate: %s", exc)
            return config, self.tls_context
        log.info("TLS certificate loaded from %s", config.certfile)
        return config, context

    def use_access_log(self, target: LogFile | None) -> None:
        """From now on new workers write their access lines to ``target`` (a reload may change it)."""
        old = self.access_logfile
        if target is old:
            return
        if old is not None:
            self.log_files.remove(old)
            old.close()  # the old generation's workers keep their own copies until they leave
        self.access_logfile = target
        if target is not None:
            self.log_files.append(target)

    def reimport(self, config: Config) -> bool:
        """Import the app afresh in the master (preload); False, keeping the old app, if it fails."""
        old_config, old_app = self.config, self.app
        saved = {name: sys.modules.pop(name) for name in self.preloaded_modules if name in sys.modules}
        try:
            self.config = config
            with systemd.watchdog_kept_alive(self.watchdog_interval):
                self.preload()
        except ForkserverError as exc:
            # Put the running app's modules back, so workers forked from now
            # on import nothing of the broken code.
            for name in set(sys.modules) - set(saved) - self.preloaded_modules:
                if name not in self._modules_before_app:
                    sys.modules.pop(name, None)
            sys.modules.update(saved)
            self.config, self.app, self.preloaded_modules = old_config, old_app, set(saved)
            log.error("reload failed, keeping the running app: %s", exc)
            return False
        return True

    def retire_old_generations(self) -> None:
        """Once the whole current generation is ready, retire every older worker."""
        current = self.pool.of_generation(self.generation)
        if len(current) < self.desired or not all(h.ready for h in current):
            return
        for handle in list(self.pool.workers.values()):
            if handle.generation < self.generation and not handle.retiring:
                self.retire(handle)
        if self.reloading:
            self.reloading = False
            log.info("reload complete gen=%d", self.generation)
            systemd.notify(f"READY=1\n{self.status_line()}")

    def abandon_generation(self) -> None:
        """Give up on a reload: stop the new workers and go back to the previous generation."""
        for handle in self.pool.of_generation(self.generation):
            self.retire(handle)
        self.generation -= 1
        self.reloading = False
        # The old generation's size, not a count of its live workers: one that
        # happened to be dead or failing its boot at this moment keeps its slot.
        self.set_desired(self.desired_before_reload)
        systemd.notify(f"READY=1\n{self.status_line()}")

    def scale(self, delta: int) -> None:
        """TTIN/TTOU: one worker more or fewer, never fewer than one."""
        self.set_desired(max(1, self.desired + delta))
        log.info("workers now %d", self.desired)
        systemd.notify(self.status_line())

    def set_desired(self, count: int) -> None:
        """Change how many workers should run, telling a gunicorn nworkers_changed hook."""
        old, self.desired = self.desired, count
        self.hooks.workers = count
        if count != old:
            self.hooks.run("nworkers_changed", self.context(), values=(count, old))

    def stop_workers(self) -> None:
        """WINCH (daemonized only): stop every worker gracefully, keep the master.

        After a USR2 upgrade this leaves the old master idle but ready to take
        over again (HUP or TTIN) should the new one misbehave.
        """
        if not self.config.daemon:
            log.info("WINCH ignored: only a daemonized master stops its workers on WINCH")
            return
        log.info("stopping all workers (WINCH)")
        self.set_desired(0)

    def upgrade(self) -> None:
        """USR2: start a new master on our listeners; both serve until one is stopped."""
        if self.new_master:
            log.warning("USR2 ignored: new master pid=%d is still running", self.new_master)
            return
        if self.pidfile is not None:
            try:
                self.pidfile.move(oldbin_path(self.config.pid))
            except FileNotFoundError:
                log.warning("pid file %s is gone; the new master writes its own", self.pidfile.path)
            except OSError as exc:  # the new master would refuse to start on it
                log.error("USR2 ignored: cannot move the pid file to %s: %s", oldbin_path(self.config.pid), reason(exc))
                return
        self.hooks.run("pre_exec", self.context())
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)  # see fork()
        try:
            # The kernel keeps the merge flag across exec: the new master finds it as we did.
            drop_merge = self.config.memory_merge and self.merge_found is False
            self.new_master = start_new_master(self.listeners, self.argv, self.environ, previous,
                                               drop_memory_merge=drop_merge)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        log.info("upgrading: new master pid=%d", self.new_master)

    def on_new_master_exit(self, how: str) -> None:
        """The new master died: take the PID file back and carry on as before."""
        log.error("new master pid=%d exited (%s); this master stays in charge", self.new_master, how)
        self.new_master = 0
        if self.pidfile is not None and self.pidfile.path != self.config.pid:
            try:
                self.pidfile.move(self.config.pid)
            except OSError as exc:
                log.error("cannot restore pid file %s: %s", self.config.pid, reason(exc))

    def reopen_logs(self) -> None:
        """USR1: reopen our log files, hand the new descriptors to every worker, then signal it to take them.

        A file that cannot be reopened keeps its old descriptor (one error
        line says why), here and in the workers; workers forked later inherit
        whichever descriptor works.  Requests in flight are not touched.
        """
        reopened = [target.reopen() for target in self.log_files]
        if self.logging_files is not None:
            reopened.append(self.logging_files.reopen())
        for handle in list(self.pool.workers.values()):
            self.handover.send(handle.pid, self.log_files)
            self.signal_worker(handle, signal.SIGUSR1)
        log.info("logs reopened" if all(reopened) else "logs reopened, except as logged above")

    def report_lost_log_lines(self) -> None:
        now = time.monotonic()
        for target in self.log_files:
            target.report_losses(now)

    def stop(self, *, graceful: bool) -> None:
        """TERM stops gracefully, after ``shutdown_delay``; INT and QUIT stop fast."""
        if self.stopping and graceful:
            return
        self.stopping = True
        self.stop_began = time.monotonic()
        delay = self.config.shutdown_delay if graceful else 0.0
        grace = self.config.graceful_timeout if graceful else FAST_STOP_GRACE
        self.stop_deadline = time.monotonic() + delay + grace + (1.0 if graceful else 0.0)
        log.log(logging.INFO if self.started else logging.DEBUG, "%s stop%s", "graceful" if graceful else "fast",
                f" after a shutdown delay of {delay:g}s" if delay else "")
        systemd.notify("STOPPING=1")
        # Closing our copies means the sockets vanish once the workers, which
        # first serve everything already queued, close theirs.  Through the
        # shutdown delay the workers keep accepting, and so the sockets stay;
        # the workers start their drain a moment after the delay (see
        # worker.DRAIN_AFTER_MASTER), so the last holder is one that drains.
        if delay:
            self.close_listeners_at = time.monotonic() + delay
        else:
            self.close_listeners_at = 0.0
            self.close_listeners()
        for handle in list(self.pool.workers.values()):
            self.signal_worker(handle, signal.SIGTERM if graceful else signal.SIGQUIT)

    def replaces_workers(self) -> bool:
        """Does a worker that dies or hangs get a successor now?

        Yes, except in a stop's drain: through a TERM's ``shutdown_delay``
        load balancers may still send us their share, so the pool is kept
        at full strength until the delay is over.
        """
        return not self.stopping or time.monotonic() < self.close_listeners_at

    def enforce_stop_deadline(self) -> None:
        if time.monotonic() < self.stop_deadline:
            return
        for handle in list(self.pool.workers.values()):
            if not handle.killed:
                log.warning("worker did not stop in time slot=%d pid=%d; killing", handle.slot, handle.pid)
                handle.killed = True
                self.signal_worker(handle, signal.SIGKILL)

    def close_listeners(self) -> None:
        """Close our copies of the listeners; their socket files go in ``shutdown``."""
        for listener in self.listeners:
            if listener.owns_path:
                self.socket_paths.append(listener.address.path)
            listener.close()
        self.listeners = []

    def shutdown(self) -> None:
        """Leave nothing behind: workers, sockets, pid file."""
        for handle in list(self.pool.workers.values()):
            self.signal_worker(handle, signal.SIGKILL)
        while self.pool.workers:
            try:
                pid, _ = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            self.pool.workers.pop(pid, None)
        self.close_listeners()
        for path in self.socket_paths:
            remove_unanswered(path)
        if self.status is not None:
            self.status.close()
        if self.statsd is not None:
            # The workers' last reports are in now: send them, so a stop loses no requests.
            self.statsd.finish(self.statsd_snapshot())
        if self.reloader is not None:
            self.reloader.close()
        self.relay.close()
        if self.pidfile is not None:
            self.pidfile.remove()
        if self.started:
            self.hooks.run("on_exit", self.context())
        log.log(logging.INFO if self.started else logging.DEBUG, "master exiting pid=%d", self.pid)
