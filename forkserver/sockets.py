"""Listening sockets: parse addresses, bind or inherit them, and clean them up.

The master binds every listener before forking, so a bad address fails the
start in the master (one clear line) instead of in every worker.  Listeners
are non-blocking and close-on-exec; only the upgrade path makes them
inheritable.  This module accepts no connections; workers do that.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from .errors import BindError
from .safefiles import is_socket_file

DEFAULT_PORT = 8000
STATSD_DEFAULT_PORT = 8125  # StatsD's port, also gunicorn's default


# Plain classes, not dataclasses: see forkserver.records.
class Address:
    """A parsed bind address: TCP (host, port), a UNIX path, or an inherited fd."""

    __slots__ = ("text", "family", "host", "port", "path", "fd")

    def __init__(self, text: str, family: int, host: str = "", port: int = 0, path: str = "", fd: int = -1) -> None:
        self.text = text
        self.family = family
        self.host = host
        self.port = port
        self.path = path
        self.fd = fd


def parse_address(text: str) -> Address:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT``, ``unix:PATH`` or ``fd://N``.

    Raises:
        BindError: naming the address and what was expected.
    """
    if text.startswith("unix:"):
        path = text[5:]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise BindError(f"bind {text!r}: unix: needs a path, e.g. unix:/run/app.sock")
        return Address(text, socket.AF_UNIX, path=path)
    if text.startswith("fd://"):
        try:
            fd = int(text[5:])
        except ValueError:
            raise BindError(f"bind {text!r}: fd:// needs a descriptor number, e.g. fd://3") from None
        return Address(text, -1, fd=fd)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise BindError(f"bind {text!r}: expected [IPV6]:PORT")
        port_text = rest[1:]
        family = socket.AF_INET6
    else:
        host, _, port_text = text.rpartition(":") if ":" in text else (text, "", "")
        family = socket.AF_INET
    try:
        port = int(port_text) if port_text else DEFAULT_PORT
    except ValueError:
        raise BindError(f"bind {text!r}: port must be a number") from None
    if not 0 <= port <= 65535:
        raise BindError(f"bind {text!r}: port must be between 0 and 65535")
    if family == socket.AF_INET:
        host = host or "0.0.0.0"
        family = _resolve_family(text, host)
    return Address(text, family, host=host, port=port)


def _resolve_family(text: str, host: str) -> int:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(f"bind {text!r}: cannot resolve {host!r}: {exc.strerror}") from None
    return infos[0][0]


class Listener:
    """A bound, listening socket and what it was bound from."""

    __slots__ = ("address", "sock", "owns_path", "reuse_port", "backlog", "name")

    def __init__(self, address: Address, sock: socket.socket, owns_path: bool = False, reuse_port: bool = False,
                 backlog: int = 2048, name: tuple[str, str] = ("", "")) -> None:
        self.address = address
        self.sock = sock
        self.owns_path = owns_path
        self.reuse_port = reuse_port
        self.backlog = backlog
        self.name = name

    @property
    def is_tcp(self) -> bool:
        """True for IPv4/IPv6 listeners, whose connections want TCP_NODELAY."""
        return self.sock.family in (socket.AF_INET, socket.AF_INET6)

    def worker_socket(self) -> socket.socket:
        """Return the socket a worker accepts on: its own under reuse_port, else the shared one."""
        if not self.reuse_port:
            return self.sock
        own = socket.socket(self.sock.family, socket.SOCK_STREAM)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(self.sock.getsockname())
        own.listen(self.backlog)
        own.setblocking(False)
        return own

    def close(self, *, remove: bool = False) -> None:
        """Close our descriptor; with ``remove``, also our socket file if nobody answers on it."""
        self.sock.close()
        if remove and self.owns_path:
            remove_unanswered(self.address.path)


def remove_unanswered(path: str) -> None:
    """Unlink a UNIX socket file unless some process still answers on it.

    Several processes can hold one listening socket: our workers while they
    drain, or the other master during a USR2 upgrade.  Whoever exits last,
    with nobody answering any more, removes the file.
    """
    if not is_socket_file(path):
        return  # gone, or replaced by something else (a link, a file) that is not ours to delete
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        try:
            os.unlink(path)
        except OSError:
            pass
    finally:
        probe.close()


def _server_name(sock: socket.socket) -> tuple[str, str]:
    """SERVER_NAME and SERVER_PORT for environs of connections on ``sock``."""
    bound = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return (bound if isinstance(bound, str) and bound else "localhost", "0")
    return (bound[0], str(bound[1]))


def _remove_stale_unix(address: Address) -> None:
    """Unlink a leftover socket file, but never one a live server still answers on.

    The path itself is examined (``lstat``): a link there is refused, not
    followed to whatever socket or file it names.
    """
    found = is_socket_file(address.path)
    if found is None:
        return
    if not found:
        what = "a symbolic link" if os.path.islink(address.path) else "not a socket"
        raise BindError(f"bind {address.text!r}: {address.path} exists and is {what}; remove it if it is yours")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address.path)
    except OSError:
        os.unlink(address.path)  # nobody answers: a crashed server's leftover
        return
    finally:
        probe.close()
    raise BindError(f"bind {address.text!r}: another server is listening on {address.path}")


def _bind_with_mode(sock: socket.socket, path: str, mode: int) -> None:
    """Create the socket file at ``path`` with exactly ``mode``, from its first instant.

    The kernel gives a new socket file ``0777 & ~umask``, so the umask is
    set to grant ``mode`` for the one ``bind`` and put back at once (the
    master is single-threaded here; nothing else creates files meanwhile).
    A ``chmod`` afterwards would leave a moment where the file is wider,
    and would follow a link swapped in at the path.
    """
    previous = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(previous)


def bind(address: Address, *, backlog: int, reuse_port: bool, unix_mode: int) -> Listener:
    """Bind and listen on one address.

    With ``reuse_port`` on a TCP address the master's socket is bound but never
    listens: it holds the port while each worker listens on its own socket, so
    no connection is ever queued where nobody accepts.
    """
    if address.fd >= 0:
        return _inherit(address, backlog)
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        if address.family == socket.AF_UNIX:
            _remove_stale_unix(address)
            _bind_with_mode(sock, address.path, unix_mode)
            sock.listen(backlog)
            listener = Listener(address, sock, owns_path=True, backlog=backlog)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address.host, address.port))
            if not reuse_port:
                sock.listen(backlog)
            listener = Listener(address, sock, reuse_port=reuse_port, backlog=backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            reason = "address already in use"
        elif address.family == socket.AF_UNIX and exc.errno == errno.ENOENT:
            reason = f"directory {os.path.dirname(os.path.abspath(address.path))!r} does not exist"
        else:
            reason = exc.strerror or str(exc)
        raise BindError(f"bind {address.text!r}: {reason}") from None
    sock.setblocking(False)
    listener.name = _server_name(sock)
    return listener


def _reuse_port_holder(sock: socket.socket) -> bool:
    """Is ``sock`` what ``bind`` makes under ``reuse_port``: a TCP socket bound with SO_REUSEPORT, not listening?

    That is what an upgrading master hands over for such an address; its
    workers listen on their own sockets, and the new master's will too.
    """
    return (sock.family in (socket.AF_INET, socket.AF_INET6)
            and bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))
            and sock.getsockname()[1] != 0)


MIGRATE_SETTING = "/proc/sys/net/ipv4/tcp_migrate_req"


def reuse_port_handover_problem(setting: str = MIGRATE_SETTING) -> str | None:
    """Why connections may be reset when a ``reuse_port`` worker leaves; None when the kernel moves them.

    Under ``reuse_port`` each worker's socket has a queue of its own.  A
    leaving worker (a reload, a recycle, a refork, a stop) accepts what is
    queued and then closes its socket, but a connection the kernel puts in
    that queue between the last accept and the close is reset, unless
    ``net.ipv4.tcp_migrate_req`` is 1: the kernel then moves it to another
    worker's socket of the same port (Linux 5.14 and later).  A setting of
    the network namespace, not ours to change: we say what to do.
    """
    try:
        with open(setting, "rb") as file:
            value = file.read(16).strip()
    except FileNotFoundError:
        return ("reuse_port: this kernel cannot move a leaving worker's queued connections to another worker "
                "(net.ipv4.tcp_migrate_req needs Linux 5.14): a connection that arrives as a worker closes "
                "its socket is reset")
    except OSError:
        return None  # unreadable (a restricted /proc): nothing known to report
    if value == b"0":
        return ("reuse_port: net.ipv4.tcp_migrate_req is 0, so a connection that arrives as a worker closes "
                "its socket (reload, recycle, refork, stop) is reset; set it to 1 "
                "(sysctl -w net.ipv4.tcp_migrate_req=1) and the kernel moves it to another worker")
    return None


def _inherit(address: Address, backlog: int) -> Listener:
    try:
        sock = socket.socket(fileno=address.fd)
    except OSError as exc:
        raise BindError(f"bind {address.text!r}: descriptor {address.fd} is not a socket ({exc.strerror})") from None
    listening = sock.type == socket.SOCK_STREAM and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    reuse_port = sock.type == socket.SOCK_STREAM and not listening and _reuse_port_holder(sock)
    if not listening and not reuse_port:
        sock.detach()
        raise BindError(f"bind {address.text!r}: descriptor {address.fd} is not a listening stream socket")
    sock.set_inheritable(False)
    sock.setblocking(False)
    listener = Listener(address, sock, reuse_port=reuse_port, backlog=backlog)
    listener.name = _server_name(sock)
    return listener


def adopt(fd: int, name: str, *, backlog: int) -> Listener:
    """Take over a listening socket passed in at ``fd`` (socket activation, USR2).

    ``name`` is the address it was bound from when an upgrading forkserver
    passed it (so a UNIX socket file is again ours to remove at exit);
    systemd's names are unit names, and those sockets stay systemd's.
    """
    listener = _inherit(Address(f"fd://{fd}", -1, fd=fd), backlog)
    try:
        address = parse_address(name) if name else None
    except BindError:
        address = None
    if address is not None and address.fd < 0:
        listener.address = address
        listener.owns_path = address.family == socket.AF_UNIX
    elif address is not None:
        # It was fd://N for the old master; keep that name so the same bind
        # setting finds it, though it now sits at another descriptor.
        listener.address = Address(name, -1, fd=fd)
    return listener


def bind_all(addresses: tuple[str, ...], *, backlog: int, reuse_port: bool, unix_mode: int) -> list[Listener]:
    """Bind every configured address, or none: a failure closes those already bound."""
    listeners: list[Listener] = []
    try:
        for text in addresses:
            listeners.append(bind(parse_address(text), backlog=backlog, reuse_port=reuse_port, unix_mode=unix_mode))
    except BindError:
        for listener in listeners:
            listener.close(remove=True)
        raise
    return listeners


def describe(listener: Listener) -> str:
    """Return the address a listener actually serves, with the real port for port 0."""
    sock, address = listener.sock, listener.address
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
    return f"http://{shown}:{port}" if address.fd < 0 else f"fd://{address.fd} (http://{shown}:{port})"


def parse_statsd_address(text: str) -> tuple[int, Any]:
    """Split ``HOST[:PORT]``, ``[IPV6][:PORT]``, ``unix:PATH`` or ``unix://PATH`` into (family, address).

    Host names are kept as given (resolved when the socket is made).

    Raises:
        ValueError: saying what is wrong with ``text``.
    """
    if text.startswith("unix:"):
        path = text[len("unix://"):] if text.startswith("unix://") else text[len("unix:"):]
        if not path:
            raise ValueError("unix: needs a path")
        return socket.AF_UNIX, path
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not host or (rest and not rest.startswith(":")):
            raise ValueError("expected [IPV6]:PORT")
        port_text = rest[1:]
        family = socket.AF_INET6
    else:
        host, _, port_text = text.partition(":")
        if not host or ":" in port_text:
            raise ValueError("expected HOST:PORT")
        family = socket.AF_UNSPEC
    port = STATSD_DEFAULT_PORT
    if port_text:
        if not port_text.isdigit():
            raise ValueError("the port must be a number")
        port = int(port_text)
        if not 0 < port < 65536:
            raise ValueError("the port must be between 1 and 65535")
    return family, (host, port)
