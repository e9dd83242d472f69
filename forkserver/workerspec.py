"""What the master hands a worker at fork time, as one value.

It lives apart from ``forkserver.worker`` so that the master, which builds
it, never imports the worker's module and through it the HTTP side: the
entry point loads the worker and passes its entry function to the master
(see ``forkserver.cli``), so the code is still loaded before the first fork
and shared by every worker.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection as StatsChannel

    from .balance import AcceptBoard
    from .config import Config
    from .hooks import Hooks
    from .logs import LogFile
    from .scoreboard import Scoreboard
    from .sockets import Listener


@dataclass(eq=False, repr=False)
class WorkerSpec:
    """Everything a worker is handed at fork time by the master."""

    config: Config
    listeners: list[Listener]
    slot: int
    generation: int
    board: Scoreboard
    notify_fd: int
    master_pid: int
    log_files: list[LogFile]  # the master's, inherited: the error log first
    access_logfile: LogFile | None  # one of log_files, or None with the access log off
    log_channel: socket.socket  # where the master sends reopened log descriptors (forkserver.handover)
    app: Callable[..., Any] | None
    hooks: Hooks
    uid: int | None
    gid: int | None
    stats_channel: StatsChannel | None  # the write end of our own stats channel, None with stats off
    reload_dir: str = ""  # with reload: where to report the files the app imported
    accept_board: AcceptBoard | None = None  # shared with the other workers, to spread connections
    seat: int = -1  # our entry on it
    refork_channel: socket.socket | None = None  # with refork_after: our end of the channel (forkserver.refork)
    tls_context: Any = None  # the master's ssl.SSLContext, with certfile set (forkserver.worker.tls)
    tls_listeners: tuple[Listener, ...] = ()  # the listeners whose connections speak TLS
    relay_channel: socket.socket | None = None  # our end of the connection relay (forkserver.relay)
    # Forked during a TERM's shutdown delay (a replacement): when the master
    # got the TERM, so that we drain when the workers told then do.
    stop_began: float = 0.0


# A worker's whole life in the child: run it, return the exit code (forkserver.worker.run).
WorkerMain = Callable[[WorkerSpec], int]
