"""What a start refuses before it binds, forks or writes anything, all problems at once.

The master runs ``start_problems`` first thing; ``--check-config`` runs
``check`` (the same and what the start checks later, short of binding,
writing and importing), so a configuration the check passes is not refused
by a real start over a file's location or the stats endpoint's exposure.
Neither looks at what only a running server can settle: whether the ports
are free or the pid file names a live process (while the server runs and
the check is made before a reload, both are expected).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Callable

from .config import Config, environment_of
from .errors import BindError, ConfigError
from .identity import resolve_identity
from .loader import prepare_path
from .safefiles import location_problems
from .sockets import parse_address, reuse_port_handover_problem


def written_files(config: Config) -> list[tuple[str, str]]:
    """(setting, path) for every file the master creates or writes: logs, pid file, UNIX sockets."""
    places = [(name, path) for name, path in (("error_logfile", config.error_logfile),
                                               ("access_logfile", config.access_logfile),
                                               ("pid", config.pid)) if path and path != "-"]
    for name, addresses in (("bind", config.bind), ("tls_bind", config.tls_bind), ("stats_bind", (config.stats_bind,))):
        places += [(name, parse_address(text).path) for text in addresses if text.startswith("unix:")]
    return places


def stats_exposure(config: Config) -> str | None:
    """Why ``stats_bind`` is refused as it stands (reachable from other hosts, nobody allowed), or None.

    Decided on the address the bind would take, found without binding.  An
    inherited descriptor (fd://N) is only known once adopted: the status
    server checks it then.

    Raises:
        BindError: ``stats_bind`` is malformed or its host does not resolve.
    """
    if not config.stats_bind or config.stats_allow_ips:
        return None
    try:
        address = parse_address(config.stats_bind)
        if address.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        infos = socket.getaddrinfo(address.host, address.port, address.family, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
    except BindError as exc:
        raise BindError(f"stats-bind: {exc}") from None
    except socket.gaierror as exc:
        raise BindError(f"stats-bind {config.stats_bind!r}: cannot resolve {address.host!r}: {exc.strerror}") from None
    return exposure_problem(config.stats_bind, infos[0][4][0])


def start_problems(config: Config) -> list[str]:
    """One line per problem the master refuses to start on before it creates anything."""
    problems = location_problems(written_files(config))
    exposure = stats_exposure(config)
    return problems + ([exposure] if exposure else [])


def refuse(problems: list[str]) -> None:
    """Raise one ConfigError naming every problem, one per line, if there are any."""
    if problems:
        raise ConfigError("\n".join(problems))


def _problem(step: Callable[[], object]) -> list[str]:
    """``step``'s ConfigError as lines (none if it passed), so that one check does not hide the next."""
    try:
        step()
    except ConfigError as exc:
        return str(exc).splitlines()
    return []


def check(config: Config) -> None:
    """``--check-config``: every setting problem a start would refuse on, all at once (ConfigError, exit 78).

    Binds nothing and writes nothing.  Sets ``raw_env``, changes to
    ``chdir`` and puts ``pythonpath`` first, as a start does before it
    imports anything; the caller then imports the hooks and the app.
    """
    for address in (*config.bind, *config.tls_bind):
        parse_address(address)  # a malformed address is a bind error (exit 5), as at start
    problems = start_problems(config)  # relative paths from the directory we were started in, as at start
    if config.certfile:
        from .tlscontext import build_context  # deferred: only TLS needs ssl

        problems += _problem(lambda: build_context(config))  # the files load as the master will load them
    problems += _problem(lambda: resolve_identity(config.user, config.group))
    os.environ.update(environment_of(config))  # raw_env, which hooks and the app may read at import
    prepare_path(config.chdir, config.pythonpath)
    if config.static:
        from .mounts import check_roots  # imported only when configured, as the master does

        problems += _problem(lambda: check_roots(config))  # relative to chdir, as the workers see them
    refuse(problems)


def warnings(config: Config) -> list[str]:
    """What ``--check-config`` warns of without refusing: the kernel's state, which a start reports too."""
    found = []
    if config.reuse_port and any(parse_address(text).family in (socket.AF_INET, socket.AF_INET6)
                                 for text in config.bind + config.tls_bind):
        if (problem := reuse_port_handover_problem()) is not None:
            found.append(problem)
    if config.memory_merge:
        from .memorymerge import check_problem  # deferred: only a start that merges needs it

        if (problem := check_problem()) is not None:
            found.append(problem)
    return found


def _is_loopback(host: str) -> bool:
    """Is ``host`` (an address a socket is bound to) reachable from this machine only?"""
    address = ipaddress.ip_address(host)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def exposure_problem(address: str, host: str) -> str | None:
    """Why stats may not bind ``address`` (which binds ``host``) without ``stats_allow_ips``; None if it may.

    The endpoint has no authentication and shows request paths, so only
    loopback may reach it unless the clients allowed are named.
    """
    if _is_loopback(host):
        return None
    return (f"stats_bind {address!r} binds {host}, reachable from other hosts, and the stats endpoint has "
            "no authentication: bind 127.0.0.1 or unix:PATH, or set stats_allow_ips to the clients "
            "that may read it (for Prometheus in Kubernetes, its pods' network, e.g. [\"10.0.0.0/8\"])")
