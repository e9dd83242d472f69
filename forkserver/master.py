"""The master process: bind, fork, supervise, reload, stop.

The master is single-threaded and sleeps in ``poll`` until a signal (through
the wakeup pipe), a worker's notice (ready / failed to boot) or the next tick.
It never runs app code after forking; with ``preload`` it imports the app
before forking.  Signal meanings follow gunicorn (README, "Signals").
One bad event is logged and the loop goes on: the master must outlive bugs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import select
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from setproctitle import setproctitle

from .config import Config, load_config
from .errors import EXIT_APP_LOAD, EXIT_OK, AppImportError, ForkserverError, WorkerBootError
from .heartbeat import Heartbeat
from .loader import load_app, prepare_path
from .logs import LogFile, setup_error_log
from .pidfile import Pidfile
from .pool import Pool, WorkerHandle, describe_exit, plan
from .signals import Wakeup
from .sockets import Listener, bind_all, describe
from .worker import Worker, WorkerSpec

log = logging.getLogger("forkserver")

TICK_INTERVAL = 1.0
FAST_STOP_GRACE = 2.0  # seconds between SIGQUIT and SIGKILL on a fast stop
MAX_BOOT_BACKOFF = 30.0
MASTER_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGTTIN,
                  signal.SIGTTOU, signal.SIGUSR1, signal.SIGCHLD)


class Master:
    """Supervises the worker pool for the lifetime of the server."""

    def __init__(self, config: Config, argv: Sequence[str], environ: Mapping[str, str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.environ = dict(environ)
        self.pid = os.getpid()
        self.pool = Pool()
        self.heartbeat = Heartbeat()
        self.generation = 1
        self.desired = config.workers
        self.listeners: list[Listener] = []
        self.log_files: list[LogFile] = []
        self.app: Callable[..., Any] | None = None
        self.preloaded_modules: set[str] = set()
        self.pidfile: Pidfile | None = None
        self.stopping = False
        self.stop_deadline = 0.0
        self.started = False  # a worker of the first generation became ready
        self.boot_failures: dict[int, int] = {}  # slot -> consecutive failed boots
        self.respawn_after: dict[int, float] = {}
        self.last_tick = time.monotonic()
        self.actions: dict[int, Callable[[], None]] = {
            signal.SIGHUP: self.reload,
            signal.SIGTERM: lambda: self.stop(graceful=True),
            signal.SIGINT: lambda: self.stop(graceful=False),
            signal.SIGQUIT: lambda: self.stop(graceful=False),
            signal.SIGTTIN: lambda: self.scale(+1),
            signal.SIGTTOU: lambda: self.scale(-1),
            signal.SIGUSR1: self.reopen_logs,
            signal.SIGCHLD: lambda: None,  # only wakes the loop; reaping follows
        }

    # -- start ------------------------------------------------------------------

    def start(self) -> None:
        """Open logs, bind, preload and daemonize; raise ForkserverError on any problem."""
        config = self.config
        self.log_files.append(setup_error_log(config.error_logfile, config.log_level))
        if config.umask:
            os.umask(int(config.umask, 8))
        self.listeners = bind_all(config.bind, backlog=config.backlog, reuse_port=config.reuse_port,
                                  unix_mode=int(config.unix_socket_mode, 8))
        try:
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
            raise
        self.notify_r, self.notify_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = Wakeup(MASTER_SIGNALS)
        setproctitle(f"forkserver: master [{config.proc_name}]")

    def preload(self) -> None:
        """Import the app in the master, remembering which modules that added."""
        before = set(sys.modules)
        prepare_path(self.config.chdir, self.config.pythonpath)
        self.app = load_app(self.config.app)
        self.preloaded_modules = set(sys.modules) - before

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
        poller = select.poll()
        poller.register(self.wakeup.fileno(), select.POLLIN)
        poller.register(self.notify_r, select.POLLIN)
        try:
            self.spawn_missing()
            while True:
                try:
                    poller.poll(TICK_INTERVAL * 1000)
                    for signum in self.wakeup.drain():
                        self.actions.get(signum, lambda: None)()
                    self.read_notices()
                    self.reap_exited()
                    if self.stopping:
                        if not self.pool.workers:
                            break
                        self.enforce_stop_deadline()
                        continue
                    self.kill_hung()
                    self.spawn_missing()
                except ForkserverError:
                    raise
                except Exception:
                    log.exception("master loop error; carrying on")
        finally:
            self.shutdown()
        return EXIT_OK

    def read_notices(self) -> None:
        """Act on the lines workers wrote: ``ready PID`` or ``failed PID CODE reason``."""
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

    def on_ready(self, handle: WorkerHandle) -> None:
        handle.ready = True
        self.boot_failures.pop(handle.slot, None)
        log.info("worker ready slot=%d pid=%d gen=%d", handle.slot, handle.pid, handle.generation)
        if handle.generation == self.generation:
            if not self.started:
                self.announce()
            self.started = True
            self.retire_old_generations()

    def announce(self) -> None:
        """Log the start once a worker serves: a failed start then prints only its one error line."""
        for listener in self.listeners:
            log.info("listening at %s", describe(listener))
        log.info("master started pid=%d workers=%d threads=%d", self.pid, self.desired, self.config.threads)

    def on_boot_failure(self, handle: WorkerHandle, reason: str, code: int) -> None:
        """A worker could not boot: give up at startup, else abort the reload or back off."""
        handle.retiring = True  # it exits on its own; do not count it as live
        if not self.started:
            self.stop(graceful=False)
            raise (AppImportError if code == EXIT_APP_LOAD else WorkerBootError)(reason)
        if handle.generation == self.generation and self.generation_ready(self.generation - 1):
            log.error("reload failed, keeping generation %d: %s", self.generation - 1, reason)
            self.abandon_generation()
            return
        failures = self.boot_failures.get(handle.slot, 0) + 1
        self.boot_failures[handle.slot] = failures
        delay = min(MAX_BOOT_BACKOFF, 2.0 ** (failures - 1))
        self.respawn_after[handle.slot] = time.monotonic() + delay
        log.error("worker failed to boot slot=%d (retry in %.0fs): %s", handle.slot, delay, reason)

    def reap_exited(self) -> None:
        for handle, status in self.pool.reap():
            self.heartbeat.give_back(handle.cell)
            how = describe_exit(status)
            if self.stopping or handle.retiring:
                log.info("worker exited slot=%d pid=%d gen=%d %s", handle.slot, handle.pid, handle.generation, how)
            elif not handle.ready:
                self.on_boot_failure(handle, f"worker slot={handle.slot} died during boot ({how})",
                                     os.waitstatus_to_exitcode(status))
            else:
                log.warning("worker died slot=%d pid=%d gen=%d %s; replacing", handle.slot, handle.pid,
                            handle.generation, how)

    def kill_hung(self) -> None:
        """SIGKILL workers whose heartbeat is older than ``timeout``."""
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
            age = self.heartbeat.age(handle.cell)
            if age > timeout and not handle.killed:
                log.critical("worker timeout slot=%d pid=%d: no progress for %.1fs; killing",
                             handle.slot, handle.pid, age)
                handle.killed = True
                self.signal_worker(handle, signal.SIGKILL)

    def spawn_missing(self) -> None:
        occupied = {h.slot for h in self.pool.of_generation(self.generation)}
        spawn, retire = plan(occupied, self.desired)
        now = time.monotonic()
        for slot in spawn:
            if self.respawn_after.get(slot, 0) <= now:
                self.spawn(slot)
        by_slot = {h.slot: h for h in self.pool.of_generation(self.generation)}
        for slot in retire:
            self.retire(by_slot[slot])

    def spawn(self, slot: int) -> None:
        cell = self.heartbeat.take()
        spec = WorkerSpec(
            config=self.config, listeners=self.listeners, slot=slot, generation=self.generation, cell=cell,
            heartbeat=self.heartbeat, notify_fd=self.notify_w, master_pid=self.pid,
            log_files=list(self.log_files), app=self.app,
        )
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                self.wakeup.close()
                os.close(self.notify_r)
                random.seed()
                code = Worker(spec).run()
            except BaseException:
                log.exception("worker crashed slot=%d", slot)
            finally:
                os._exit(code)
        self.pool.add(WorkerHandle(slot, pid, self.generation, cell, time.monotonic()))
        log.debug("worker spawned slot=%d pid=%d gen=%d", slot, pid, self.generation)

    def signal_worker(self, handle: WorkerHandle, signum: int) -> None:
        try:
            os.kill(handle.pid, signum)
        except ProcessLookupError:
            pass

    def retire(self, handle: WorkerHandle) -> None:
        """Ask a worker to finish its requests and exit."""
        handle.retiring = True
        self.signal_worker(handle, signal.SIGTERM)

    # -- signal actions -----------------------------------------------------------

    def reload(self) -> None:
        """HUP: read the config again and replace every worker with a new generation.

        The old generation keeps serving until the new one is ready, and keeps
        serving for good if the new config or app is broken.
        """
        log.info("reloading (HUP)")
        try:
            config = load_config(self.argv, self.environ).config
        except ForkserverError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        if config.bind != self.config.bind:
            log.warning("bind changed from %s to %s: listeners change only on restart or upgrade (USR2)",
                        ",".join(self.config.bind), ",".join(config.bind))
            config = dataclasses.replace(config, bind=self.config.bind)
        if config.preload:
            old_app, old_modules = self.app, self.preloaded_modules
            for name in self.preloaded_modules:
                sys.modules.pop(name, None)
            try:
                self.config = config
                self.preload()
            except ForkserverError as exc:
                self.app, self.preloaded_modules = old_app, old_modules
                log.error("reload failed, keeping the running app: %s", exc)
                return
        else:
            self.app = None
        self.config = config
        self.desired = config.workers
        self.generation += 1
        self.respawn_after.clear()
        self.spawn_missing()

    def generation_ready(self, generation: int) -> bool:
        return any(h.ready for h in self.pool.of_generation(generation))

    def retire_old_generations(self) -> None:
        """Once the whole current generation is ready, retire every older worker."""
        current = self.pool.of_generation(self.generation)
        if len(current) < self.desired or not all(h.ready for h in current):
            return
        for handle in list(self.pool.workers.values()):
            if handle.generation < self.generation and not handle.retiring:
                self.retire(handle)

    def abandon_generation(self) -> None:
        """Give up on a reload: stop the new workers and go back to the previous generation."""
        for handle in self.pool.of_generation(self.generation):
            self.retire(handle)
        self.generation -= 1
        self.desired = len(self.pool.of_generation(self.generation)) or self.desired

    def scale(self, delta: int) -> None:
        """TTIN/TTOU: one worker more or fewer, never fewer than one."""
        self.desired = max(1, self.desired + delta)
        log.info("workers now %d", self.desired)

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
        for listener in self.listeners:
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
        if self.pidfile is not None:
            self.pidfile.remove()
        log.log(logging.INFO if self.started else logging.DEBUG, "master exiting pid=%d", self.pid)


