"""The refork mold: a warmed worker that stopped serving and forks new workers (see forkserver.refork).

It runs in the worker's own process once the worker's loop has finished its
connections: stop the request threads and the relay's watcher (a fork
copies only the forking thread), close what only a serving worker needs,
run the ``on_mold`` hook, collect and freeze the heap (so the children's
collectors never write to the shared pages), and wait for fork requests
from the master.  Each request carries the new worker's resources, made by
the master; the mold forks twice so that the worker's parent is the master,
and reports its pid.
"""

from __future__ import annotations

import array
import gc
import logging
import os
import random
import select
import signal
import socket
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from setproctitle import setproctitle

from .. import handover, libc, refork
from ..errors import EXIT_OK
from ..forksafety import ForkSafety, open_descriptors
from ..hooks import HookContext
from ..scoreboard import Scoreboard

if TYPE_CHECKING:
    from .process import Worker

log = logging.getLogger("forkserver")

BEAT_INTERVAL = 1.0  # seconds between scoreboard beats, which the master's timeout watches
REPARENT_WAIT = 2.0  # seconds a new worker waits for the master to become its parent
MOLD_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1, signal.SIGWINCH, signal.SIGINT, signal.SIGQUIT)


class Mold:
    """A worker turned mold: forks the workers the master asks for, until told to stop."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.spec = worker.spec
        assert self.spec.refork_channel is not None
        self.channel = self.spec.refork_channel
        self.safety = ForkSafety("mold")

    def run(self) -> int:
        worker, spec = self.worker, self.spec
        setproctitle(f"forkserver: mold [{worker.config.proc_name}] gen={spec.generation}")
        worker.stop_serving()
        spec.hooks.run("on_mold", HookContext(worker.config, worker.pid, spec.slot, spec.generation))
        gc.collect()
        trim = libc.function("malloc_trim")
        if trim is not None:
            trim(0)  # freed heap pages would be copied into every child for nothing
        gc.freeze()
        self.safety.check(self.app_descriptors())
        log.info("worker became the mold slot=%d pid=%d gen=%d after %d requests", spec.slot, worker.pid,
                 spec.generation, worker.served)
        refork.send(self.channel, b"molded")
        poller = select.poll()
        poller.register(self.channel.fileno(), select.POLLIN)
        poller.register(worker.wakeup.fileno(), select.POLLIN)
        while True:
            spec.board.beat()
            if os.getppid() != spec.master_pid:
                log.warning("master died; mold exiting pid=%d", worker.pid)
                return EXIT_OK
            poller.poll(BEAT_INTERVAL * 1000)
            for signum in worker.wakeup.drain():
                if signum in (signal.SIGTERM, signal.SIGUSR2):
                    return EXIT_OK
                if signum == signal.SIGUSR1:
                    handover.receive(spec.log_channel, spec.log_files)  # our children inherit the new logs
            if not self.answer_requests():
                return EXIT_OK

    def app_descriptors(self) -> set[int]:
        """Descriptors open now that the server did not give this worker: the app opened them.

        The logs are the server's even when a reopen (USR1) put another file
        behind the same number, and so are the standard streams.
        """
        given = self.worker.server_descriptors
        logs = {target.fd for target in self.spec.log_files}
        logs.update(fd for target in self.spec.log_files for fd in target.captured)
        return {fd for fd, identity in open_descriptors().items()
                if given.get(fd) != identity and fd not in logs and fd > 2 and fd != self.channel.fileno()}

    def answer_requests(self) -> bool:
        """Fork a worker for each request waiting; False once the master's end is gone."""
        while True:
            try:
                data, ancillary, _flags, _address = self.channel.recvmsg(
                    refork.MAX_MESSAGE, socket.CMSG_SPACE(refork.MAX_FDS * 4), socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
            if not data:
                return False
            received = array.array("i")
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received.frombytes(payload[:len(payload) - len(payload) % received.itemsize])
            fds = list(received)
            request = refork.parse_fork(data)
            try:
                if request is None or len(fds) not in (4, 5):
                    log.warning("mold: ignoring a malformed fork request")
                    continue
                self.fork_worker(*request, fds)
            finally:
                for fd in fds:
                    os.close(fd)

    def fork_worker(self, token: int, slot: int, generation: int, seat: int, fds: list[int]) -> None:
        """Fork twice: the intermediate reports the worker's pid and exits, leaving it to the master."""
        self.safety.check(self.app_descriptors() - set(fds))
        pid_r, pid_w = os.pipe2(os.O_CLOEXEC)
        # Until the worker has its own handlers, a signal it got would go into our wakeup pipe.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, MOLD_SIGNALS)
        pid = -1
        try:
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(pid_r)
                    intermediate = os.getpid()
                    child = os.fork()
                    if child:
                        os.write(pid_w, b"%d" % child)
                        code = 0
                    else:
                        os.close(pid_w)
                        self.become_worker(intermediate, slot, generation, seat, fds)
                finally:
                    os._exit(code)
        except OSError as exc:
            refork.send(self.channel, b"unforked %d fork failed: %s" % (token, (exc.strerror or "").encode()[:60]))
            os.close(pid_r)
            os.close(pid_w)
            return
        finally:
            if pid != 0:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.close(pid_w)
        with os.fdopen(pid_r, "rb") as pipe:
            text = pipe.read(16)  # the intermediate writes its child's pid and exits at once
        os.waitpid(pid, 0)  # once it is reaped, its child is the master's
        if text.isdigit():
            refork.send(self.channel, b"forked %d %s" % (token, text))
        else:
            refork.send(self.channel, b"unforked %d the second fork failed" % token)

    def become_worker(self, intermediate: int, slot: int, generation: int, seat: int, fds: list[int]) -> None:
        """In the new worker: wait to be the master's, swap the mold's resources for our own, serve."""
        deadline = time.monotonic() + REPARENT_WAIT
        while os.getppid() == intermediate and time.monotonic() < deadline:
            time.sleep(0.001)
        worker, spec = self.worker, self.spec
        board_fd, log_fd, channel_fd, relay_fd, *stats_fd = fds
        own = spec.replace(
            slot=slot, generation=generation, seat=seat, app=worker.app,
            board=Scoreboard(worker.config.threads, board_fd, timeout=worker.config.timeout,
                             longest=worker.config.deadline_limit),
            log_channel=socket.socket(fileno=os.dup(log_fd)),
            refork_channel=socket.socket(fileno=os.dup(channel_fd)),
            relay_channel=socket.socket(fileno=os.dup(relay_fd)),
            stats_channel=Connection(os.dup(stats_fd[0]), readable=False) if stats_fd else None,
        )
        for fd in fds:
            os.close(fd)
        # The mold's own ends would let this worker speak as the mold, or hold its channels open.
        self.channel.close()
        spec.log_channel.close()
        if spec.stats_channel is not None:
            spec.stats_channel.close()
        worker.wakeup.close()
        random.seed()  # not the mold's sequence, shared with every sibling
        from .process import Worker  # the module that imported us

        code = 1
        try:
            code = Worker(own).run()
        except BaseException:
            log.exception("worker crashed slot=%d", slot)
        finally:
            os._exit(code)
