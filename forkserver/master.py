"""The master process: bind, fork, supervise, reload, upgrade, stop.

The master is single-threaded and sleeps in ``poll`` until a signal (through
the wakeup pipe), a worker's notice (ready, failed to boot, recycling) or the
next tick.  It never runs app code after forking; with ``preload`` it imports
the app before forking.  Signal meanings follow gunicorn (README, "Signals").
One bad event is logged and the loop goes on: the master must outlive bugs.
"""

from __future__ import annotations

import dataclasses
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

from . import libc, systemd
from .aggregator import Aggregator
from .balance import AcceptBoard
from .config import Config, environment_of, load_config
from .errors import (
    EXIT_APP_LOAD,
    EXIT_OK,
    AppImportError,
    ForkserverError,
    WorkerBootError,
)
from .hooks import HookContext, Hooks
from .identity import resolve_group, resolve_user
from .loader import load_app, prepare_path
from .logs import LogFile, setup_error_log
from .pidfile import Pidfile
from .pool import Pool, WorkerHandle, describe_exit, plan
from .reloader import Reloader
from .sampler import ProcessSampler, listener_stats
from .scoreboard import Scoreboard
from .signals import Wakeup
from .sockets import Listener, adopt, bind_all, describe, remove_unanswered
from .stats import drain, new_queue, queue_fd
from .upgrade import oldbin_path, start_new_master
from .worker import Worker, WorkerSpec

if TYPE_CHECKING:
    from .status import StatusServer

log = logging.getLogger("forkserver")

TICK_INTERVAL = 1.0
# At a cold start the first worker boots alone for this long (or until it is
# ready): the others' imports would compete with its own for the CPUs.
SOLO_BOOT = 0.1
FAST_STOP_GRACE = 2.0  # seconds between SIGQUIT and SIGKILL on a fast stop
ABORT_GRACE = 1.0  # seconds a hung worker gets to dump its stacks before SIGKILL
MAX_BOOT_BACKOFF = 30.0
FORK_RETRY = 1.0  # seconds before a slot whose fork failed is tried again
MEMORY_CHECK_INTERVAL = 5.0
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

    def __init__(self, config: Config, argv: Sequence[str], environ: Mapping[str, str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.environ = dict(environ)
        self.pid = os.getpid()
        self.start_dir = os.getcwd()  # relative paths in the config are from here, even after chdir
        self.pool = Pool()
        self.accept_board = AcceptBoard()  # workers spread keep-alive connections through it
        self.generation = 1
        self.desired = config.workers
        self.listeners: list[Listener] = []
        self.socket_paths: list[str] = []  # UNIX socket files to remove at exit
        self.log_files: list[LogFile] = []
        self.app: Callable[..., Any] | None = None
        self.preloaded_modules: set[str] = set()
        self.pidfile: Pidfile | None = None
        self.new_master = 0  # PID of the master a USR2 started, while it runs
        self.stopping = False
        self.stop_deadline = 0.0
        self.started = False  # a worker of the first generation became ready
        self.first_fork = 0.0  # when the first worker was forked (see SOLO_BOOT)
        self.reloading = False
        self.boot_failures: dict[int, int] = {}  # slot -> consecutive failed boots
        self.respawn_after: dict[int, float] = {}
        self.last_tick = time.monotonic()
        self.next_memory_check = 0.0
        self.stats = Aggregator()
        self.sampler = ProcessSampler()
        self.status: StatusServer | None = None
        self.reloader: Reloader | None = None  # watches the app's files with ``reload``
        self.respawn_due: set[int] = set()  # slots whose worker ended and awaits a replacement
        self.poller = select.poll()
        self.actions: dict[int, Callable[[], None]] = {
            signal.SIGHUP: self.reload,
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
        self.log_files.append(setup_error_log(config.error_logfile, config.log_level))
        os.environ.update(environment_of(config))  # gunicorn's raw_env: before hooks and the app load
        prepare_path(config.chdir, config.pythonpath)  # hook modules live beside the app
        if config.static:
            # Imported only when configured, and before the fork so that the workers share it.
            from .static import check_roots

            check_roots(config)  # static directories are relative to chdir, as the workers see it
        self.hooks = Hooks(config)
        self.uid, self.gid = resolve_user(config.user), resolve_group(config.group)
        self.hooks.run("nworkers_changed", self.context(), values=(self.desired, None))
        self.hooks.run("on_starting", self.context(), fatal=True)
        if config.umask:
            os.umask(int(config.umask, 8))
        self.listeners = self.open_listeners()
        share_stdlib()
        try:
            if config.stats_bind:
                # Deferred: only a start with stats on needs it.
                from .status import StatusServer

                self.status = StatusServer(config.stats_bind, self.stats_snapshot)
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
            raise
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if config.reload:
            self.reloader = Reloader(config.reload_extra_file, owner=(self.uid, self.gid))
        self.wakeup = Wakeup(MASTER_SIGNALS)
        setproctitle(f"forkserver: master [{config.proc_name}]")
        release_free_heap()

    def open_listeners(self) -> list[Listener]:
        """Adopt sockets handed to us (systemd, or an upgrading master), bind the rest."""
        config = self.config
        inherited = systemd.inherited_fds(os.environ)
        self.environ = {k: v for k, v in self.environ.items() if not k.startswith("LISTEN_")}
        adopted = [adopt(fd, name, backlog=config.backlog) for fd, name in inherited]
        names = {listener.address.text for listener in adopted}
        # With sockets handed over, the default bind is not also wanted.
        wanted = () if adopted and config.source_of("bind") == "default" else config.bind
        fresh = bind_all(tuple(a for a in wanted if a not in names), backlog=config.backlog,
                         reuse_port=config.reuse_port, unix_mode=int(config.unix_socket_mode, 8))
        return adopted + fresh

    def preload(self) -> None:
        """Import the app in the master, remembering which modules that added."""
        self._modules_before_app = set(sys.modules)
        prepare_path(self.config.chdir, self.config.pythonpath)
        self.app = load_app(self.config.app)
        self.preloaded_modules = set(sys.modules) - self._modules_before_app

    def daemonize(self) -> None:
        """Detach: fork twice around setsid and point stdio at /dev/null."""
        if os.fork():
            os._exit(EXIT_OK)
        os.setsid()
        if os.fork():
            os._exit(EXIT_OK)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            if not any(f.fd == fd for f in self.log_files):
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
                    poller.poll(self.tick() * 1000)
                    for signum in self.wakeup.drain():
                        self.actions.get(signum, lambda: None)()
                    self.read_notices()
                    # Always drained (its fd must not stay readable); a reload waits for the one under way.
                    if self.reloader is not None and self.reloader.changed(hold=self.reloading or self.stopping):
                        self.reload()
                    self.drain_stats()
                    self.reap_exited()
                    if self.status is not None:
                        self.status.handle_ready()
                    if self.stopping:
                        if not self.pool.workers:
                            break
                        self.enforce_stop_deadline()
                        continue
                    self.kill_hung()
                    self.check_memory()
                    self.spawn_missing()
                except ForkserverError:
                    raise
                except Exception:
                    log.exception("master loop error; carrying on")
        finally:
            self.shutdown()
        return EXIT_OK

    def read_notices(self) -> None:
        """Act on the lines workers wrote: ``ready PID``, ``failed PID CODE reason``, ``recycle PID why``."""
        try:
            data = os.read(self.notify_r, 65536)
        except BlockingIOError:
            return
        for line in data.decode("utf-8", "replace").splitlines():
            kind, _, rest = line.partition(" ")
            pid_text, _, reason = rest.partition(" ")
            handle = self.pool.workers.get(int(pid_text)) if pid_text.isdigit() else None
            if handle is None:
                continue
            if kind == "ready":
                self.on_ready(handle)
            elif kind == "failed":
                code, _, reason = reason.partition(" ")
                self.on_boot_failure(handle, reason, int(code) if code.isdigit() else 1)
            elif kind == "recycle":
                handle.retiring = handle.recycled = True  # it leaves on its own; a replacement starts now
                self.stats.set_state(handle.pid, "retiring")
                log.info("worker recycling slot=%d pid=%d %s", handle.slot, handle.pid, reason)

    def on_ready(self, handle: WorkerHandle) -> None:
        handle.ready = True
        if not handle.retiring:
            self.stats.set_state(handle.pid, "idle")
        self.boot_failures.pop(handle.slot, None)
        log.info("worker ready slot=%d pid=%d gen=%d", handle.slot, handle.pid, handle.generation)
        if handle.generation != self.generation:
            return
        if not self.started:
            self.started = True
            self.announce()
        self.retire_old_generations()

    def announce(self) -> None:
        """The first worker serves: log the start, run when_ready, tell systemd.

        Logging only now means a start that fails prints nothing but its one
        error line.
        """
        self.hooks.run("when_ready", self.context(), fatal=True)
        for line in self.config.warnings:
            log.warning("%s", line)
        for line in self.config.notices:
            log.info("%s", line)
        for listener in self.listeners:
            log.info("listening at %s", describe(listener))
        log.info("master started pid=%d workers=%d threads=%d", self.pid, self.desired, self.config.threads)
        # An upgraded master tells systemd it is the main process now.
        systemd.notify(f"READY=1\nMAINPID={self.pid}\n{self.status_line()}")

    def status_line(self) -> str:
        ready = sum(1 for h in self.pool.of_generation(self.generation) if h.ready)
        return f"STATUS=workers {ready}/{self.desired} ready, generation {self.generation}"

    def on_boot_failure(self, handle: WorkerHandle, reason: str, code: int) -> None:
        """A worker could not boot: give up at startup, else abort the reload or back off."""
        handle.retiring = True  # it exits on its own; do not count it as live
        if handle.generation > self.generation:
            return  # one more worker of a reload already abandoned
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
            if not self.stopping and handle.generation == self.generation:
                self.respawn_due.add(handle.slot)
            if self.stopping or handle.retiring:
                log.info("worker exited slot=%d pid=%d gen=%d %s", handle.slot, handle.pid, handle.generation, how)
            elif not handle.ready:
                self.on_boot_failure(handle, f"worker slot={handle.slot} died during boot ({how})",
                                     os.waitstatus_to_exitcode(status))
            else:
                log.warning("worker died slot=%d pid=%d gen=%d %s; replacing", handle.slot, handle.pid,
                            handle.generation, how)

    def kill_hung(self) -> None:
        """Abort workers that made no progress for ``timeout``; kill those that ignore it.

        SIGABRT makes the worker's faulthandler write every thread's stack to
        the error log; we log the requests it had in flight from its scoreboard
        first, since a hung worker cannot tell us itself.
        """
        now = time.monotonic()
        slept = now - self.last_tick
        self.last_tick = now
        timeout = self.config.timeout
        if not timeout or slept > 2 * TICK_INTERVAL:
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
            stalled, in_flight = handle.board.stalled_for()
            if stalled <= timeout:
                continue
            requests = "; ".join(request.describe() for request in in_flight) or "none"
            log.critical("worker timeout slot=%d pid=%d: no progress for %.1fs; in flight: %s; "
                         "dumping stacks and killing", handle.slot, handle.pid, stalled, requests)
            handle.aborted_at = now
            handle.retiring = True  # replaced at once, not after it is reaped
            self.signal_worker(handle, signal.SIGABRT)

    def check_memory(self) -> None:
        """Every few seconds, retire a worker whose unique memory is over the limit."""
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
            if uss > limit * 1024 * 1024:
                log.warning("worker over memory slot=%d pid=%d uss=%.1fMiB limit=%dMiB; recycling",
                            handle.slot, handle.pid, uss / 1048576, limit)
                handle.recycled = True
                self.retire(handle)

    def tick(self) -> float:
        """Seconds the loop may sleep: a second, or until the solo boot is over."""
        solo_left = self.first_fork + SOLO_BOOT - time.monotonic()
        if self.started or not self.first_fork or solo_left <= 0:
            return TICK_INTERVAL
        return min(TICK_INTERVAL, solo_left)

    def spawn_missing(self) -> None:
        occupied = {h.slot for h in self.pool.of_generation(self.generation)}
        spawn, retire = plan(occupied, self.desired)
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
        board = Scoreboard(self.config.threads)
        stats_queue = new_queue() if self.status is not None else None
        spec = WorkerSpec(
            config=self.config, listeners=self.listeners, slot=slot, generation=self.generation, board=board,
            notify_fd=self.notify_w, master_pid=self.pid, log_files=list(self.log_files), app=self.app,
            hooks=self.hooks, uid=self.uid, gid=self.gid, stats_queue=stats_queue,
            reload_dir=self.reloader.report_dir if self.reloader is not None else "",
            accept_board=self.accept_board, seat=self.accept_board.take(),
        )
        self.hooks.run("pre_fork", HookContext(self.config, self.pid, slot, self.generation))
        try:
            pid = self.fork()
        except OSError as exc:
            # Out of processes or memory (EAGAIN, ENOMEM): give back what was
            # made for this worker, or every retry would leak a seat, a
            # mapping and a pipe, and try again after a pause.
            self.accept_board.give_back(spec.seat)
            board.close()
            if stats_queue is not None:
                stats_queue.close()
            self.respawn_after[slot] = time.monotonic() + FORK_RETRY
            log.error("fork failed slot=%d: %s; retrying in %gs", slot, exc.strerror, FORK_RETRY)
            return
        if pid == 0:
            code = 1
            try:
                self.wakeup.close()
                os.close(self.notify_r)
                self.drop_inherited_stats()
                random.seed()
                code = Worker(spec).run()
            except BaseException:
                log.exception("worker crashed slot=%d", slot)
            finally:
                os._exit(code)
        self.accept_board.bind(spec.seat, pid)
        self.pool.add(WorkerHandle(slot, pid, self.generation, board, time.monotonic(), stats_queue=stats_queue))
        self.stats.add_worker(pid, pid=pid, slot=slot, generation=self.generation)
        if slot in self.respawn_due:
            self.respawn_due.discard(slot)
            self.stats.note_respawn()
        if stats_queue is not None:
            self.poller.register(queue_fd(stats_queue), select.POLLIN)
        log.debug("worker spawned slot=%d pid=%d gen=%d", slot, pid, self.generation)

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

    def drain_stats(self) -> None:
        """Take whatever the workers flushed, without ever waiting for more."""
        for handle in list(self.pool.workers.values()):
            self.take_stats(handle)

    def take_stats(self, handle: WorkerHandle) -> None:
        if handle.stats_queue is None:
            return
        batch = drain(handle.stats_queue)
        for message in batch:
            self.stats.ingest(handle.pid, message)
        if batch.broken:
            # Only this worker's queue is lost (one queue per worker); its last
            # good totals still count.
            log.warning("stats queue broken slot=%d pid=%d: %s", handle.slot, handle.pid, batch.broken)
            self.stats.mark_broken(handle.pid, batch.broken)
            self.close_stats_queue(handle)

    def close_stats_queue(self, handle: WorkerHandle) -> None:
        self.poller.unregister(queue_fd(handle.stats_queue))
        handle.stats_queue.close()
        handle.stats_queue = None

    def forget_stats(self, handle: WorkerHandle) -> None:
        """A worker was reaped: read its final flush, then fold it into the retired totals."""
        self.take_stats(handle)
        if handle.stats_queue is not None:
            self.close_stats_queue(handle)
        if handle.aborted_at:
            cause = "killed_timeout"
        elif handle.recycled:
            cause = "recycled"
        elif handle.retiring or self.stopping:
            cause = "exited"
        else:
            cause = "died"
        self.stats.worker_exited(handle.pid, cause)
        self.sampler.forget(handle.pid)

    def drop_inherited_stats(self) -> None:
        """In a new worker: close the stats socket and other workers' queues we inherited."""
        if self.status is not None:
            self.status.close(unlink=False)
        for handle in self.pool.workers.values():
            if handle.stats_queue is not None:
                handle.stats_queue.close()

    def stats_snapshot(self) -> dict[str, Any]:
        """The /stats document: the workers' counters plus what only the master can see."""
        extra: dict[int, dict[str, Any]] = {}
        for handle in self.pool.workers.values():
            info = dict(self.sampler.read(handle.pid))
            in_flight = handle.board.in_flight()
            info["heartbeat_age_seconds"] = round(handle.board.last_beat_age(), 3)
            info["current_request"] = None
            if in_flight:
                oldest = in_flight[0]
                info["current_request"] = {"method": oldest.method, "path": oldest.path,
                                           "elapsed_seconds": round(oldest.elapsed, 3)}
            if handle.ready and not handle.retiring:
                self.stats.set_state(handle.pid, "busy" if in_flight else "idle")
            extra[handle.pid] = info
        return self.stats.snapshot(extra, listener_stats(self.listeners))

    # -- signal actions -----------------------------------------------------------

    def reload(self) -> None:
        """HUP: read the config again and replace every worker with a new generation.

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
            config = dataclasses.replace(config, bind=self.config.bind)
        if config.preload and not self.reimport(config):
            systemd.notify("READY=1")
            return
        if not config.preload:
            self.app = None
        self.config, self.hooks = config, hooks
        self.hooks.run("on_reload", self.context())
        self.set_desired(config.workers)
        self.generation += 1
        self.reloading = True
        self.stats.note_reload()
        self.respawn_after.clear()
        self.spawn_missing()

    def reimport(self, config: Config) -> bool:
        """Import the app afresh in the master (preload); False, keeping the old app, if it fails."""
        old_config, old_app = self.config, self.app
        saved = {name: sys.modules.pop(name) for name in self.preloaded_modules if name in sys.modules}
        try:
            self.config = config
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
        self.desired = len(self.pool.of_generation(self.generation)) or self.desired
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
            os.replace(self.pidfile.path, oldbin_path(self.config.pid))
            self.pidfile.path = oldbin_path(self.config.pid)
        self.hooks.run("pre_exec", self.context())
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, MASTER_SIGNALS)  # see fork()
        try:
            self.new_master = start_new_master(self.listeners, self.argv, self.environ, previous)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        log.info("upgrading: new master pid=%d", self.new_master)

    def on_new_master_exit(self, how: str) -> None:
        """The new master died: take the PID file back and carry on as before."""
        log.error("new master pid=%d exited (%s); this master stays in charge", self.new_master, how)
        self.new_master = 0
        if self.pidfile is not None and self.config.pid:
            try:
                os.replace(self.pidfile.path, self.config.pid)
                self.pidfile.path = self.config.pid
            except OSError as exc:
                log.error("cannot restore pid file %s: %s", self.config.pid, exc.strerror)

    def reopen_logs(self) -> None:
        """USR1: reopen our logs and tell every worker to reopen theirs."""
        for target in self.log_files:
            target.reopen()
        for handle in list(self.pool.workers.values()):
            self.signal_worker(handle, signal.SIGUSR1)
        log.info("logs reopened")

    def stop(self, *, graceful: bool) -> None:
        """TERM stops gracefully; INT and QUIT stop fast."""
        if self.stopping and graceful:
            return
        self.stopping = True
        grace = self.config.graceful_timeout if graceful else FAST_STOP_GRACE
        self.stop_deadline = time.monotonic() + grace + (1.0 if graceful else 0.0)
        log.log(logging.INFO if self.started else logging.DEBUG, "%s stop", "graceful" if graceful else "fast")
        systemd.notify("STOPPING=1")
        # Closing our copies now means the sockets vanish once the workers,
        # which first serve everything already queued, close theirs.
        self.close_listeners()
        for handle in list(self.pool.workers.values()):
            self.signal_worker(handle, signal.SIGTERM if graceful else signal.SIGQUIT)

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
        if self.reloader is not None:
            self.reloader.close()
        if self.pidfile is not None:
            self.pidfile.remove()
        if self.started:
            self.hooks.run("on_exit", self.context())
        log.log(logging.INFO if self.started else logging.DEBUG, "master exiting pid=%d", self.pid)
