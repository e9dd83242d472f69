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
    pids = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                serve(listener)
            finally:
                os._exit(0)
        pids.append(pid)
    for signum in (signal.SIGINT, signal.SIGTERM):  # set even where a shell started us ignoring SIGINT
        signal.signal(signum, lambda *_: sys.exit(0))
    live = set(pids)  # not yet reaped, so none of these PIDs can have been reused
    try:
        while live:
            live.discard(os.wait()[0])
    except SystemExit:
        for pid in live:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
