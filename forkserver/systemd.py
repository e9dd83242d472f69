"""systemd integration: sd_notify messages and socket activation.

Both protocols are small enough to speak directly (no libsystemd): a datagram
to ``$NOTIFY_SOCKET``, and descriptors 3.. announced by ``LISTEN_FDS`` for the
process named by ``LISTEN_PID``.  forkserver's own USR2 upgrade hands its
listeners to the new master the same way, so there is one inheritance path.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
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
