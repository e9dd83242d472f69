"""Fork WORKERS processes that serve one inherited listening socket, for the bench's small peers.

scripts/floor_server.py and scripts/bjoern_server.py have no master of their
own; this is the least one that a two-worker comparison needs: fork, wait,
and on SIGINT or SIGTERM kill every worker by its PID and reap it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable


def run(serve: Callable[[socket.socket], object], fd: int, workers: int) -> None:
    """Serve ``fd`` with ``workers`` forked processes, each running ``serve(listener)``."""
    listener = socket.socket(fileno=fd)
    listener.setblocking(False)
    # Set before the first fork, and held off while one is forked until its
    # PID is noted: a stop that came while the workers were being forked
    # would otherwise end this process alone and leave them running (the
    # start-up bench stops each server at its first answer).
    stops = (signal.SIGINT, signal.SIGTERM)
    for signum in stops:  # set even where a shell started us ignoring SIGINT
        signal.signal(signum, lambda *_: sys.exit(0))
    live = set()  # not yet reaped, so none of these PIDs can have been reused
    try:
        for _ in range(workers):
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
            pid = os.fork()
            if pid == 0:
                for signum in stops:
                    signal.signal(signum, signal.SIG_DFL)
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
                try:
                    serve(listener)
                finally:
                    os._exit(0)
            live.add(pid)
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        while live:
            live.discard(os.wait()[0])
    except SystemExit:
        for pid in live:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
