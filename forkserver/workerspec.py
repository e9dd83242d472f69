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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection as StatsChannel

    from .balance import AcceptBoard
    from .config import Config
    from .hooks import Hooks
    from .logs import LogFile
    from .scoreboard import Scoreboard
    from .sockets import Listener


# A plain class, not a dataclass: see forkserver.records.
class WorkerSpec:
    """Everything a worker is handed at fork time by the master.

    The optional fields: ``reload_dir``, with reload, where to report the
    files the app imported; ``accept_board`` and ``seat``, shared with the
    other workers to spread connections, and our entry on it;
    ``refork_channel``, with refork_after, our end of the channel
    (forkserver.refork); ``tls_context``, the master's ssl.SSLContext with
    certfile set (forkserver.worker.tls), and ``tls_listeners``, the
    listeners whose connections speak TLS; ``relay_channel``, our end of the
    connection relay (forkserver.relay); ``stop_began``, for a replacement
    forked during a TERM's shutdown delay, when the master got the TERM, so
    that we drain when the workers told then do.
    """

    __slots__ = ("config", "listeners", "slot", "generation", "board", "notify_fd", "master_pid", "log_files",
                 "access_logfile", "log_channel", "app", "hooks", "uid", "gid", "stats_channel", "reload_dir",
                 "accept_board", "seat", "refork_channel", "tls_context", "tls_listeners", "relay_channel",
                 "stop_began")

    def __init__(self, config: Config, listeners: list[Listener], slot: int, generation: int, board: Scoreboard,
                 notify_fd: int, master_pid: int, log_files: list[LogFile], access_logfile: LogFile | None,
                 log_channel: socket.socket, app: Callable[..., Any] | None, hooks: Hooks, uid: int | None,
                 gid: int | None, stats_channel: StatsChannel | None, reload_dir: str = "",
                 accept_board: AcceptBoard | None = None, seat: int = -1,
                 refork_channel: socket.socket | None = None, tls_context: Any = None,
                 tls_listeners: tuple[Listener, ...] = (), relay_channel: socket.socket | None = None,
                 stop_began: float = 0.0) -> None:
        self.config = config
        self.listeners = listeners
        self.slot = slot
        self.generation = generation
        self.board = board
        self.notify_fd = notify_fd
        self.master_pid = master_pid
        self.log_files = log_files  # the master's, inherited: the error log first
        self.access_logfile = access_logfile  # one of log_files, or None with the access log off
        self.log_channel = log_channel  # where the master sends reopened log descriptors (forkserver.handover)
        self.app = app
        self.hooks = hooks
        self.uid = uid
        self.gid = gid
        self.stats_channel = stats_channel  # the write end of our own stats channel, None with stats off
        self.reload_dir = reload_dir
        self.accept_board = accept_board
        self.seat = seat
        self.refork_channel = refork_channel
        self.tls_context = tls_context
        self.tls_listeners = tls_listeners
        self.relay_channel = relay_channel
        self.stop_began = stop_began

    def replace(self, **changes: Any) -> WorkerSpec:
        """A copy with ``changes`` (what a refork mold adapts for the worker it forks)."""
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return WorkerSpec(**values)


# A worker's whole life in the child: run it, return the exit code (forkserver.worker.run).
WorkerMain = Callable[[WorkerSpec], int]
