"""systemd integration: sd_notify messages and socket activation.

Both protocols are small enough to speak directly (no libsystemd): a datagram
to ``$NOTIFY_SOCKET``, and descriptors 3.. announced by ``LISTEN_FDS`` for the
process named by ``LISTEN_PID``.  forkserver's own USR2 upgrade hands its
listeners to the new master the same way, so there is one inheritance path.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from urllib.parse import quote, unquote

FIRST_INHERITED_FD = 3  # SD_LISTEN_FDS_START


def notify(message: str, environ: MutableMapping[str, str] | None = None) -> bool:
    """Send one sd_notify message (e.g. ``READY=1``); False when not under systemd.

    Errors are swallowed: a missing or broken notify socket must never take
    the server down.
    """
    path = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # an abstract socket address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), path)
    except OSError:
        return False
    return True


def watchdog_interval(environ: Mapping[str, str]) -> float:
    """Seconds between the ``WATCHDOG=1`` pings systemd expects of us; 0 when it expects none.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, the process it
    means) when the unit has ``WatchdogSec=``.  We ping at half that, as
    sd_watchdog_enabled(3) advises, so one late loop turn is not fatal.
    """
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return 0.0
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return 0.0
    return int(usec) / 2_000_000


WORKER_HIDDEN = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def hide_from_workers() -> None:
    """In a new worker: forget systemd's notify socket and watchdog.

    App code must not be able to tell systemd the service is ready,
    stopping, or alive, nor name another process as its main one (the shipped
    unit has NotifyAccess=all, which an upgraded master needs).
    ``os.environ.pop`` also unsets the variable for anything the app starts.
    """
    for name in WORKER_HIDDEN:
        os.environ.pop(name, None)


@contextmanager
def watchdog_kept_alive(interval: float) -> Iterator[None]:
    """Ping the watchdog from a thread while the body runs (a slow re-import on HUP).

    The master's loop is the watchdog's proof of life; while it is blocked in
    something long but healthy, this thread speaks for it.  No-op when
    ``interval`` is 0.  The master never forks inside the body, so the thread
    cannot leak into a worker.
    """
    if not interval:
        yield
        return
    done = threading.Event()

    def ping() -> None:
        while not done.wait(interval):
            notify("WATCHDOG=1")

    thread = threading.Thread(target=ping, name="watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def inherited_fds(environ: MutableMapping[str, str]) -> list[tuple[int, str]]:
    """Return (fd, name) for sockets passed to this process, and unset the variables.

    The variables are removed so that nothing we start later (workers, an
    upgraded master) mistakes them for its own.
    """
    pid = environ.pop("LISTEN_PID", "")
    count = environ.pop("LISTEN_FDS", "")
    names = environ.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    # Names are ":"-separated, so ours (addresses like 127.0.0.1:80) travel
    # percent-encoded; systemd's own names contain neither ":" nor "%".
    labels = [unquote(label) for label in names.split(":")] if names else []
    fds = range(FIRST_INHERITED_FD, FIRST_INHERITED_FD + int(count))
    return [(fd, labels[i] if i < len(labels) else "") for i, fd in enumerate(fds)]


def pass_fds_env(fds: list[int], names: list[str], pid: int) -> dict[str, str]:
    """The variables that announce ``fds`` (already moved to 3..) to process ``pid``."""
    return {"LISTEN_PID": str(pid), "LISTEN_FDS": str(len(fds)),
            "LISTEN_FDNAMES": ":".join(quote(name, safe="") for name in names)}
