"""The settings schema, and the merge of defaults, TOML file, environment and CLI.

Each setting is declared once, as a field of the frozen ``Config`` dataclass:
its name, type, default, validation and help text.  The CLI parser, the TOML
keys, the ``FORKSERVER_*`` environment variables, ``--help`` and the option
table of docs/options.md are all derived from these fields, so they cannot
drift apart.
This module never prints and never exits; it raises ``ConfigError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import math
import os
import re
import shlex
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import gunicorn
from .errors import ConfigError
from .proxy import check_trust_entries

ENV_PREFIX = "FORKSERVER_"
DEFAULT_ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
# Hard ceilings of the request limits, which 0 ("no limit", as in gunicorn)
# stands for: a request head can then take up to fields * field size bytes of
# a worker's memory, and gunicorn caps the field count at the same 32768.
REQUEST_LINE_CEILING = 65536
HEADER_FIELDS_CEILING = 32768
HEADER_FIELD_CEILING = 65536
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
# The idle timeout of a keep-alive connection from a trusted proxy when
# ``keepalive`` is not set: above nginx's upstream keepalive_timeout and AWS
# ALB's idle timeout (60 s each), so the proxy, which knows when it sends,
# always closes an idle connection first and never sends a request down one
# we are closing at that moment.
PROXY_KEEPALIVE = 75.0
AUTO_WORKERS = 0  # ``workers = "auto"``: the master sizes the pool (forkserver.sizing)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flags: Sequence[str] = (),
    minimum: float | None = None,
    choices: Sequence[str] | None = None,
    check: Callable[[Any], str | None] | None = None,
    default_factory: Callable[[], Any] | None = None,
    default_text: str | None = None,
    metavar: str | None = None,
    separator: str = ",",
    table: bool = False,
    words: Mapping[str, Any] | None = None,
    normalize: Callable[[Any], Any] | None = None,
    zero_means: int | None = None,
) -> Any:
    """Declare one setting: a dataclass field whose metadata drives every source.

    ``check`` returns None for a good value or a short description of what was
    expected.  ``flags`` adds short CLI spellings beside ``--name-with-dashes``.
    A list setting's items are split on ``separator`` in text sources; with
    ``table`` a TOML table ``{KEY = "VALUE"}`` is also taken, as ``KEY=VALUE`` items.
    ``words`` names values by a word (any case, from any source), such as
    ``auto`` for ``workers``.
    ``normalize`` turns an accepted spelling into the one stored (any case of a
    log level, gunicorn's names of a worker class).  With ``zero_means``, 0
    means "no limit" as in gunicorn, and stands for that hard ceiling, which
    no value may exceed: the limit still protects the worker's memory.
    """
    metadata = {
        "help": help,
        "flags": tuple(flags),
        "minimum": minimum,
        "choices": tuple(choices) if choices else None,
        "check": check,
        "default_text": default_text,
        "metavar": metavar,
        "separator": separator,
        "table": table,
        "words": dict(words or {}),
        "normalize": normalize,
        "zero_means": zero_means,
    }
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


class Because(str):
    """A check's answer that is a whole reason ("... is not served: why; what to use"),
    rather than a description of what was expected."""


def _check_octal(value: str) -> str | None:
    try:
        mode = int(value, 8)
    except ValueError:
        return "an octal number such as 022"
    return None if 0 <= mode <= 0o777 else "an octal number between 000 and 777"


def _check_octal_or_empty(value: str) -> str | None:
    return None if value == "" else _check_octal(value)


def _check_worker_class(value: str) -> str | None:
    refusal = gunicorn.worker_class_refusal(value)
    return Because(f"is not served: {refusal}") if refusal else None


def _check_env(value: tuple[str, ...]) -> str | None:
    for entry in value:
        key, sep, _ = entry.partition("=")
        if not sep or not ENV_KEY.fullmatch(key):
            return f"KEY=VALUE entries with KEY a variable name; entry {entry!r} is not"
    return None


def _log_level(value: str) -> str:
    """A log level in any case, with the other names Python's logging knows for two of them."""
    text = value.strip().lower()
    return {"warn": "warning", "fatal": "critical"}.get(text, text)


def _without_tcp_scheme(value: tuple[str, ...]) -> tuple[str, ...]:
    """gunicorn also takes tcp://HOST:PORT for HOST:PORT."""
    return tuple(entry.removeprefix("tcp://") for entry in value)


def _check_bind(value: tuple[str, ...]) -> str | None:
    return None if value else "at least one address"


def _check_health_path(value: str) -> str | None:
    if value == "":
        return None
    if not value.startswith("/") or any(c in value for c in "?# ") or not value.isascii() or not value.isprintable():
        return "empty, or a path starting with '/' (ASCII, no spaces, '?' or '#'), e.g. /healthz"
    return None


STATIC_PREFIX_BAD = re.compile(r"[^\x21-\x7e]|[?#%\\]|//|/\.\.?(/|$)")


def _check_static_prefix(prefix: str) -> str | None:
    if not prefix.startswith("/"):
        return "start with '/'"
    if STATIC_PREFIX_BAD.search(prefix):
        return "be plain ASCII without spaces, '?', '#', '%', '\\', '//' or dot segments"
    return None


def _check_static(value: tuple[str, ...]) -> str | None:
    seen: set[str] = set()
    for entry in value:
        prefix, sep, directory = (part.strip() for part in entry.partition("="))
        problem = _check_static_prefix(prefix) if sep else "have the form PREFIX=DIRECTORY"
        if problem is None and not directory:
            problem = "name a directory after '='"
        normal = prefix.rstrip("/") or "/"
        if problem is None and normal in seen:
            problem = f"not repeat the prefix {normal}"
        if problem:
            return f"PREFIX=DIRECTORY entries such as /static=./public; entry {entry!r} must {problem}"
        seen.add(normal)
    return None


def _check_cache_control(value: tuple[str, ...]) -> str | None:
    for entry in value:
        prefix, _, header = entry.partition("=") if entry.startswith("/") else ("", "", entry)
        problem = _check_static_prefix(prefix.strip()) if prefix else None
        if problem is None and (not header.strip() or FIELD_VALUE_BAD.search(header)):
            problem = "have a header value without control characters"
        if problem:
            return f"VALUE or PREFIX=VALUE entries such as /static=max-age=3600; entry {entry!r} must {problem}"
    return None


def _check_statsd_host(value: str) -> str | None:
    if value == "":
        return None
    from .statsd import parse_statsd_address  # deferred: only a start with statsd needs the module

    try:
        parse_statsd_address(value)
    except ValueError as exc:
        return f"empty, HOST:PORT, [IPV6]:PORT or unix:PATH ({exc})"
    return None


STATSD_PREFIX_BAD = re.compile(r"[^\x21-\x7e]|[:|@#]")


def _check_statsd_prefix(value: str) -> str | None:
    if STATSD_PREFIX_BAD.search(value):
        return "printable ASCII without spaces, ':', '|', '@' or '#' (they delimit StatsD lines)"
    return None


def _check_access_format(value: str) -> str | None:
    if value == "json":
        return None
    from .logs import validate_access_format  # deferred: logs imports config

    return validate_access_format(value)


# No generated __eq__/__repr__: nothing compares or prints settings, and
# generating them for 53 fields costs every start about a millisecond.
@dataclass(frozen=True, eq=False, repr=False)
class Config:
    """Every setting forkserver has.  Field order is the order of ``--help``."""

    app: str = setting(
        "",
        help="WSGI application: 'module:callable', 'module:factory()' or 'module' "
        "(which looks for 'application', then 'app').",
        metavar="APP",
    )
    bind: tuple[str, ...] = setting(
        ("127.0.0.1:8000",),
        flags=("-b",),
        help="Address to listen on: HOST:PORT, [IPV6]:PORT, unix:PATH or fd://N. "
        "Repeat it (or give a list) to listen on several.",
        check=_check_bind,
        normalize=_without_tcp_scheme,
        metavar="ADDRESS",
    )
    workers: int = setting(
        AUTO_WORKERS,
        help="Number of worker processes, or auto: as many as the CPUs the container's "
        "cgroup quota allows (the machine's CPUs outside one), fewer if its memory limit would "
        "not hold them; the start-up log shows the inputs.",
        flags=("-w",),
        minimum=1,
        words={"auto": AUTO_WORKERS},
        default_text="auto",
    )
    threads: int = setting(
        1, minimum=1, help="Requests each worker runs at once, in threads, for I/O-bound apps."
    )
    worker_class: str = setting(
        "sync",
        flags=("-k",),
        check=_check_worker_class,
        normalize=gunicorn.normalize_worker_class,
        help="gunicorn's worker class: sync and gthread run as threads says; gevent and eventlet "
        "run on forkserver's keep-alive loop with worker_connections threads (at most "
        f"{gunicorn.EVENTED_THREAD_CAP}) unless threads is given. ASGI, WebSocket and custom "
        "worker classes are refused.",
        metavar="CLASS",
    )
    worker_connections: int = setting(
        1000,
        minimum=1,
        help="With worker_class gevent or eventlet: concurrent requests per worker, served by "
        f"that many threads (at most {gunicorn.EVENTED_THREAD_CAP}); otherwise unused.",
    )
    timeout: float = setting(
        30.0,
        flags=("-t",),
        minimum=0,
        help="Seconds a worker may go without making progress before the master "
        "kills and replaces it; 0 disables.",
    )
    graceful_timeout: float = setting(
        30.0, minimum=0, help="Seconds workers get to finish their requests on a graceful stop."
    )
    shutdown_delay: float = setting(
        0.0,
        minimum=0,
        help="On TERM, keep accepting and serving for this many seconds while the health_path "
        "answers 503, so load balancers take the instance out of rotation first; then drain.",
    )
    keepalive: float = setting(
        5.0,
        minimum=0,
        help="Seconds an idle keep-alive connection is kept open; 0 closes after each response. "
        f"Unless set, peers in forwarded_allow_ips get {PROXY_KEEPALIVE:g} s, longer than "
        "proxies keep idle upstream connections.",
    )
    header_timeout: float = setting(
        10.0, minimum=0.1, help="Seconds a new connection has to send a complete request head."
    )
    body_timeout: float = setting(
        30.0,
        minimum=0,
        help="Seconds a request body read or response write may stall before the "
        "connection is closed; 0 waits forever.",
    )
    backlog: int = setting(2048, minimum=1, help="Listen queue length of each socket.")
    reuse_port: bool = setting(
        False,
        help="Give each worker its own SO_REUSEPORT socket on TCP addresses, "
        "so the kernel spreads connections evenly.",
    )
    unix_socket_mode: str = setting(
        "660", check=_check_octal, help="Permissions of UNIX socket files, in octal."
    )
    forwarded_allow_ips: tuple[str, ...] = setting(
        ("127.0.0.1", "::1"),
        check=check_trust_entries,
        help="Peers trusted to say who the client is, through Forwarded and "
        "X-Forwarded-For/-Proto/-Host or a PROXY header: IP addresses, CIDR networks, "
        "or '*' for any. UNIX-socket peers are always trusted.",
        metavar="ADDRESSES",
    )
    proxy_protocol: bool = setting(
        False,
        help="Require a PROXY protocol v1 or v2 header at the start of every connection "
        "from a trusted peer, and take the client address from it.",
    )
    preload: bool = setting(
        False,
        help="Import the app once in the master before forking, so workers share its memory.",
    )
    reload: bool = setting(
        False,
        help="Development mode: start new workers when a module the app imported (or a "
        "reload_extra_file) changes; while a change breaks the import, the last good code "
        "keeps serving. Cannot be combined with preload.",
    )
    reload_extra_file: tuple[str, ...] = setting(
        (),
        help="More files whose changes restart the workers under reload (templates, .env); "
        "a directory means any file directly in it.",
        metavar="PATHS",
    )
    chdir: str = setting("", help="Change to this directory before loading the app.")
    pythonpath: tuple[str, ...] = setting(
        (), help="Directories to put in front of sys.path, comma-separated.", metavar="DIRS"
    )
    limit_request_line: int = setting(
        8190,
        minimum=0,
        zero_means=REQUEST_LINE_CEILING,
        help=f"Longest request line accepted, in bytes; longer gets 414. 0 means the most "
        f"allowed, {REQUEST_LINE_CEILING}.",
    )
    limit_request_fields: int = setting(
        100,
        minimum=0,
        zero_means=HEADER_FIELDS_CEILING,
        help=f"Most header fields in a request; more gets 431. 0 means the most allowed, "
        f"{HEADER_FIELDS_CEILING}.",
    )
    limit_request_field_size: int = setting(
        8190,
        minimum=0,
        zero_means=HEADER_FIELD_CEILING,
        help=f"Longest header field (name and value) in bytes; longer gets 431. 0 means the most "
        f"allowed, {HEADER_FIELD_CEILING}.",
    )
    limit_request_body: int = setting(
        0, minimum=0, help="Largest request body in bytes; larger gets 413. 0 means unlimited."
    )
    stats_bind: str = setting(
        "",
        help="Serve live stats (GET /stats JSON, GET /metrics Prometheus) from the master at "
        "unix:PATH or HOST:PORT; empty disables stats. A HOST other than loopback needs "
        "stats_allow_ips: the endpoint has no authentication and shows request paths.",
        metavar="ADDRESS",
    )
    stats_allow_ips: tuple[str, ...] = setting(
        (),
        check=check_trust_entries,
        help="Clients allowed to read a TCP stats_bind: IP addresses, CIDR networks, or '*' for any; "
        "others are disconnected unanswered. Required to bind stats beyond loopback (e.g. the pod "
        "IP, for Prometheus); enforced on loopback too when set. Not used for unix:PATH.",
        metavar="ADDRESSES",
    )
    health_path: str = setting(
        "",
        check=_check_health_path,
        help="Answer GET and HEAD on exactly this path (e.g. /healthz) with 200 'ok' from the "
        "worker itself, without calling the app or writing an access log line; empty disables it.",
        metavar="PATH",
    )
    static: tuple[str, ...] = setting(
        (),
        check=_check_static,
        table=True,
        help="Serve the files of DIRECTORY (relative to chdir) under URL PREFIX from the workers, "
        "without calling the app: PREFIX=DIRECTORY, repeatable, or a TOML table "
        "{\"/static\" = \"./public\"}.",
        metavar="PREFIX=DIR",
    )
    static_index: bool = setting(
        True, help="Answer a static directory's URL (ending in '/') with its index.html."
    )
    static_fallthrough: bool = setting(
        False,
        help="Pass requests for missing static files, and methods other than GET and HEAD, to "
        "the app instead of answering 404 or 405.",
    )
    static_follow_symlinks: bool = setting(
        False,
        help="Serve files that symlinks under a static directory point to outside it "
        "(otherwise those get 404).",
    )
    static_cache_control: tuple[str, ...] = setting(
        (),
        check=_check_cache_control,
        separator=";",
        table=True,
        help="Cache-Control of static files: PREFIX=VALUE for one mapping (or a TOML table of "
        "prefix to value) and a bare VALUE for the others, which otherwise get 'no-cache' "
        "(revalidate each time, cheap with ETags); 'none' sends no header. ';' separates "
        "entries in the environment.",
        metavar="VALUE",
    )
    access_logfile: str = setting(
        "", help="Where to write the access log: a path, or '-' for stdout. Empty disables it."
    )
    access_logformat: str = setting(
        DEFAULT_ACCESS_LOG_FORMAT,
        check=_check_access_format,
        help="Access log line format with gunicorn's %(x)s atoms, or 'json' for JSON lines.",
        metavar="FORMAT",
    )
    error_logfile: str = setting("-", help="Where to write the error log: a path, or '-' for stderr.")
    log_level: str = setting(
        "info",
        choices=LOG_LEVELS,
        normalize=_log_level,
        help="Lowest level the error log records, in any case ('warn' and 'fatal' too).",
    )
    capture_output: bool = setting(
        False,
        help="Send the app's stdout and stderr (print(), writes to descriptors 1 and 2) to the "
        "error log file, as gunicorn does; nothing changes while error_logfile is '-'.",
    )
    enable_stdio_inheritance: bool = setting(
        False,
        help="With daemon: keep stdout and stderr where the shell pointed them (unless they are "
        "a terminal) instead of /dev/null, as gunicorn's -R does.",
    )
    logconfig: str = setting(
        "",
        help="Python logging configuration file (logging.config.fileConfig INI) applied at start; "
        "gunicorn's logger names gunicorn.error and gunicorn.access work.",
        metavar="FILE",
    )
    logconfig_dict: dict = setting(
        default_factory=dict,
        default_text="{}",
        help="Python logging configuration (logging.config.dictConfig), a TOML table or JSON object, "
        "applied at start instead of logconfig; gunicorn's logger names work.",
        metavar="JSON",
    )
    statsd_host: str = setting(
        "",
        check=_check_statsd_host,
        help="Send the aggregated stats every second as StatsD metrics over UDP to HOST:PORT "
        "(port 8125 if left out) or unix:PATH; empty disables it.",
        metavar="ADDRESS",
    )
    statsd_prefix: str = setting(
        "",
        check=_check_statsd_prefix,
        help="Prefix of every StatsD metric name; a '.' is added after it if missing.",
        metavar="PREFIX",
    )
    name: str = setting("", help="Name shown in process titles; defaults to the app spec.")
    pid: str = setting("", help="Write the master's PID to this file.", metavar="FILE")
    umask: str = setting(
        "",
        check=_check_octal_or_empty,
        help="umask of the server processes, in octal; empty keeps the inherited one.",
    )
    env: tuple[str, ...] = setting(
        (),
        flags=("-e",),
        check=_check_env,
        separator="\n",
        table=True,
        help="Environment variables set in the master before the app and hooks load, as "
        "KEY=VALUE (repeatable), or a TOML table {KEY = \"VALUE\"}; gunicorn's raw_env.",
        metavar="KEY=VALUE",
    )
    user: str = setting("", help="Run workers as this user (name or uid); the master keeps its own.")
    group: str = setting("", help="Run workers as this group (name or gid).")
    max_requests: int = setting(
        0, minimum=0, help="Recycle a worker gracefully after this many requests; 0 never."
    )
    max_requests_jitter: int = setting(
        0, minimum=0, help="Add up to this many requests, at random per worker, so they do not all recycle at once."
    )
    max_worker_memory: int = setting(
        0,
        minimum=0,
        help="Recycle a worker after its current request once its unique memory (USS) "
        "exceeds this many MiB; 0 never.",
        metavar="MIB",
    )
    on_starting: str = setting("", help="Hook 'module:function' called in the master before binding.")
    when_ready: str = setting("", help="Hook called in the master once the first workers serve.")
    pre_fork: str = setting("", help="Hook called in the master before each worker is forked.")
    post_fork: str = setting("", help="Hook called in each worker right after fork.")
    post_worker_init: str = setting("", help="Hook called in each worker after it loaded the app.")
    worker_int: str = setting("", help="Hook called in a worker on INT or QUIT, before it exits.")
    worker_exit: str = setting("", help="Hook called in a worker as it exits normally.")
    on_reload: str = setting("", help="Hook called in the master on HUP, before the new workers start.")
    on_exit: str = setting("", help="Hook called in the master just before it exits.")
    daemon: bool = setting(False, flags=("-D",), help="Detach from the terminal and run in the background.")
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    # Lines the master logs once at start: gunicorn settings accepted but not
    # needed, defaults a gunicorn user might not expect, where values came from.
    notices: tuple[str, ...] = field(default=(), compare=False, repr=False)
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)  # the same, worth a look
    # Hooks defined as functions in a gunicorn config file, called with gunicorn's arguments.
    gunicorn_hooks: Mapping[str, Callable[..., Any] | str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def proc_name(self) -> str:
        """The name in process titles and logs: ``name`` or else the app spec."""
        return self.name or self.app or "forkserver"

    @property
    def proxy_keepalive(self) -> float:
        """The idle timeout of keep-alive connections from ``forwarded_allow_ips`` peers.

        A ``keepalive`` that was set (0 included: keep-alive off) applies to
        every peer; otherwise proxies get PROXY_KEEPALIVE.
        """
        return self.keepalive if self.source_of("keepalive") != "default" else PROXY_KEEPALIVE

    def source_of(self, name: str) -> str:
        """Say where a setting's value came from: default, a file, env or CLI."""
        return self.origins.get(name, "default")


def settings() -> list[dataclasses.Field[Any]]:
    """Return the declared settings, in order (``origins`` is bookkeeping, not one)."""
    return [f for f in dataclasses.fields(Config) if "help" in f.metadata]


@functools.cache
def _kinds() -> dict[str, Any]:
    """Each setting's type, evaluated from the annotations once per process.

    ``get_type_hints`` compiles every annotation string anew on each call, and
    ``coerce`` needs it for every value given: uncached, that cost about a
    millisecond per setting given, and left garbage in the heap the workers
    are forked from.
    """
    return typing.get_type_hints(Config)


def cli_flag(name: str) -> str:
    """Return the long CLI option of a setting, e.g. ``--graceful-timeout``."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """Return the environment variable of a setting, e.g. ``FORKSERVER_WORKERS``."""
    return ENV_PREFIX + name.upper()


def default_of(f: dataclasses.Field[Any]) -> Any:
    """Return a setting's default value, calling its factory if it has one."""
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _is_word(f: dataclasses.Field[Any], raw: Any) -> bool:
    """Whether ``raw`` names a value by one of the setting's words (exempt from its range check)."""
    return isinstance(raw, str) and raw.strip().lower() in f.metadata["words"]


def _describe(kind: Any, table: bool = False) -> str:
    if table:
        return "a table of strings, a string or a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a table (a JSON object in text)"}.get(
        kind, "a string or a list of strings"
    )


def coerce(name: str, value: Any, where: str, *, typed: bool = False) -> Any:
    """Turn a raw value from a file (``typed``) or env/CLI (text) into the setting's type.

    A TOML file has real types, so there ``workers = "4"`` is a mistake; only
    text sources (environment, command line) have numbers and booleans parsed
    from strings.

    Raises:
        ConfigError: naming ``where`` the value came from, the key and what was expected.
    """
    kind = _kinds()[name]
    meta = _field(name).metadata
    expected = " or ".join([_describe(kind, meta["table"]), *meta["words"]])
    bad = ConfigError(f"{where}: {name} must be {expected}, got {value!r}")
    if isinstance(value, str) and value.strip().lower() in meta["words"]:
        return meta["words"][value.strip().lower()]
    text = isinstance(value, str) and not typed
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
            return value.strip().lower() in TRUE_WORDS
        raise bad
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int) or (kind is float and isinstance(value, float)):
            number = kind(value)
        elif text:
            try:
                number = kind(value.strip())
            except ValueError:
                raise bad from None
        else:
            raise bad
        if kind is float and not math.isfinite(number):
            raise bad
        return number
    if kind is str:
        if isinstance(value, str):
            return value
        raise bad
    if kind is dict:
        # A TOML table as it is; in the environment or on the command line, a JSON object.
        if text:
            import json  # deferred: only a logconfig_dict given as text needs it

            try:
                value = json.loads(value)
            except ValueError:
                raise bad from None
        if isinstance(value, dict):
            return value
        raise bad
    # tuple[str, ...]: a list, or one string of comma-separated items.
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(meta["separator"]) if item.strip())
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    if isinstance(value, dict) and meta["table"] and typed:
        # A TOML table {"/static" = "./public"} is the list ["/static=./public"].
        items = []
        for key, item in value.items():
            if not isinstance(item, str):
                raise ConfigError(f"{where}: {name} entry {key!r} must be a string, got {item!r}")
            items.append(item if key == "*" else f"{key}={item}")
        return tuple(items)
    raise bad


def _validate(f: dataclasses.Field[Any], value: Any, where: str) -> Any:
    """Check a coerced value and return it as stored: normalized, and 0 as its ceiling.

    Raises:
        ConfigError: naming ``where``, the setting, and what was expected or why not.
    """
    meta = f.metadata
    if meta["normalize"] is not None:
        value = meta["normalize"](value)
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ConfigError(f"{where}: {f.name} must be at least {meta['minimum']:g}, got {value!r}")
    ceiling = meta["zero_means"]
    if ceiling is not None:
        if value > ceiling:
            raise ConfigError(f"{where}: {f.name} must be at most {ceiling} (0 also means {ceiling}), got {value!r}")
        value = value or ceiling
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{where}: {f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["check"] is not None:
        expected = meta["check"](value)
        if isinstance(expected, Because):
            raise ConfigError(f"{where}: {f.name} {value!r} {expected}")
        if expected:
            raise ConfigError(f"{where}: {f.name} must be {expected}, got {value!r}")
    return value


def environment_of(config: Config) -> dict[str, str]:
    """The variables the ``env`` setting puts into the server's environment."""
    return dict(entry.split("=", 1) for entry in config.env)


def toml_value(value: Any) -> str:
    """Write a setting's value as TOML (JSON's string escapes are TOML's too)."""
    import json  # deferred: only --print-config writes TOML
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + " }"
    return "[" + ", ".join(toml_value(item) for item in value) + "]"


def render_toml(config: Config) -> str:
    """The effective settings as a TOML config file, each line saying where its value came from.

    Defaults are commented out, so the file pins only what was chosen; hook
    functions from a gunicorn config file, which TOML cannot hold, are named
    in comments with what to do instead.
    """
    lines = ["# forkserver's effective settings, usable as a config file: forkserver -c FILE",
             "# Each line says where its value came from; commented lines are defaults."]
    lines += [f"# warning: {line}" for line in config.warnings] + [f"# note: {line}" for line in config.notices]
    for f in settings():
        source = config.source_of(f.name)
        if f.name in config.gunicorn_hooks:
            lines.append(f"# {f.name}: a function in {source}; to keep it here, move it into a module and set "
                         f"{f.name} = \"module:function\" (it then gets one HookContext argument)")
            continue
        value = getattr(config, f.name)
        if value is None:
            continue
        # A value a word stands for is written as the word (workers = "auto"), which reads back.
        word = next((w for w, v in f.metadata["words"].items() if v == value and type(v) is type(value)), None)
        text = f"{f.name} = {toml_value(value if word is None else word)}"
        lines.append(f"# {text}" if source == "default" else f"{text}  # from {source}")
    lines += [f"# {name}: a gunicorn hook function in the config file; TOML has no equivalent, "
              "so keep the gunicorn config file for it"
              for name in config.gunicorn_hooks if name not in _setting_names()]
    return "\n".join(lines) + "\n"


@functools.cache
def _setting_names() -> frozenset[str]:
    return frozenset(f.name for f in settings())


def _unknown(key: str, where: str) -> str:
    """The problem line for a key that names no setting, with the right hint."""
    gunicorn_name = gunicorn.BY_NAME.get(key)
    if gunicorn_name is not None and gunicorn_name.native in _setting_names():
        return f"{where}: unknown setting '{key}' (that is gunicorn's name; forkserver's is '{gunicorn_name.native}')"
    close = difflib.get_close_matches(key, sorted(_setting_names()), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else " (forkserver --help lists the settings)"
    return f"{where}: unknown setting '{key}'{hint}"


def _text(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as fh:
        return fh.read()


def read_toml(path: str) -> tuple[dict[str, Any], list[str]]:
    """Read a TOML config file into raw values, and a problem line for each unknown key.

    Raises:
        ConfigError: the file cannot be read or parsed.
    """
    # Deferred: most starts have no config file, and the parser takes milliseconds to import.
    import tomllib

    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        hint = "; a gunicorn config file must be named *.py" if re.search(r"^\s*(import|def) ", _text(path), re.M) else ""
        raise ConfigError(f"{path}: invalid TOML: {exc}{hint}") from None
    known = _setting_names()
    problems = [_unknown(key, path) for key in data if key not in known]
    return {key: value for key, value in data.items() if key in known}, problems


def read_env(environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Collect ``FORKSERVER_<NAME>`` variables, and a problem line for each that names no setting."""
    known = _setting_names()
    found, problems = {}, []
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key in known:
            found[key] = value
        else:
            problems.append(_unknown(key, f"environment {var}"))
    return found, problems


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


ACTION_FLAGS = ("-c", "--config", "--check-config", "--print-config", "--version", "-v", "-h", "--help")
GUNICORN_DEST = "gunicorn:"


@functools.cache
def _native_flags() -> frozenset[str]:
    """Every spelling forkserver's own flags have; computed once, as the parser is built per load."""
    flags = set(ACTION_FLAGS)
    for f in settings():
        flags.update([*f.metadata["flags"], cli_flag(f.name)])
        if _kinds()[f.name] is bool:
            flags.add("--no-" + f.name.replace("_", "-"))
    return frozenset(flags)


def gunicorn_only_flags(spec: gunicorn.GunicornSetting) -> list[str]:
    """The spellings of a gunicorn setting that forkserver's own flags do not already have."""
    native = _native_flags()
    return [flag for flag in spec.flags if flag not in native]


def _gunicorn_help(spec: gunicorn.GunicornSetting) -> str:
    if spec.disposition() == "native":
        return f"gunicorn's spelling of {cli_flag(spec.native)}."
    return f"Refused: {spec.reason()}."


def build_arg_parser() -> argparse.ArgumentParser:
    """Build the CLI from the schema and gunicorn's spellings; flags left out are absent from the namespace."""
    parser = _ArgumentParser(
        prog="forkserver",
        description="Serve a WSGI application from a supervised pool of pre-forked workers. "
        "gunicorn's command lines, gunicorn.conf.py files and GUNICORN_CMD_ARGS, PORT and "
        "WEB_CONCURRENCY work too.",
        epilog="Other commands: 'forkserver stats ADDR' prints one snapshot of a running server's "
        "stats (its --stats-bind address); 'forkserver top ADDR' shows its workers live.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="Read settings from this TOML file, or from a gunicorn config file (*.py).")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="Validate the settings and import the app, then exit: 0 if all is well.",
    )
    parser.add_argument("--print-config", action="store_true",
                        help="Print the effective settings as a TOML config file, each with where it came "
                        "from, then exit.")
    parser.add_argument("-v", "--version", action="store_true", help="Print the version and exit.")
    kinds = _kinds()
    for f in settings():
        meta, kind = f.metadata, kinds[f.name]
        default = meta["default_text"] or default_of(f)
        help_text = f"{meta['help']} (default: {default!r})".replace("%", "%%")
        if f.name == "app":
            parser.add_argument("app", nargs="?", metavar=meta["metavar"], help=help_text)
            continue
        flags = [*meta["flags"], cli_flag(f.name)]
        if kind is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, help=help_text)
        elif kind in (str, int, float, dict):
            parser.add_argument(*flags, dest=f.name, metavar=meta["metavar"] or f.name.upper(), help=help_text)
        else:
            parser.add_argument(
                *flags, dest=f.name, action="append", metavar=meta["metavar"] or f.name.upper(), help=help_text
            )
    group = parser.add_argument_group(
        "gunicorn's other spellings",
        "gunicorn's options that forkserver does not need are accepted too, and named at start with "
        "the reason; docs/gunicorn.md lists every one.")
    actions = {"value": "store", "append": "append", "flag": "store_true", "off": "store_false"}
    for spec in gunicorn.SETTINGS:
        flags = gunicorn_only_flags(spec)
        if not flags:
            continue
        unneeded = spec.disposition() == "ignored"
        options: dict[str, Any] = {"dest": GUNICORN_DEST + spec.name, "action": actions[spec.takes],
                                   "help": argparse.SUPPRESS if unneeded else _gunicorn_help(spec).replace("%", "%%")}
        if spec.takes in ("value", "append"):
            options["metavar"] = spec.name.upper()
        group.add_argument(*flags, **options)
    return parser


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _find_option(parser: argparse.ArgumentParser, flag: str) -> tuple[argparse.Action | None, str, str]:
    """The action a flag names (exactly, or by a unique prefix as argparse allows).

    Without one: the problem to report, and the option the user most likely
    meant (the closest spelling, or the first of an ambiguous prefix's), if any.
    """
    options = parser._option_string_actions
    if flag in options:
        return options[flag], "", ""
    if flag.startswith("--"):
        matches = sorted({o for o in options if o.startswith(flag)})
        if len(matches) == 1:
            return options[matches[0]], "", ""
        if matches:
            return None, f"ambiguous option {flag!r}: it could be {', '.join(matches)}", matches[0]
    close = difflib.get_close_matches(flag, list(options), n=1, cutoff=0.7)
    hint = f" (did you mean '{close[0]}'?)" if close else " (forkserver --help lists the options)"
    return None, f"unknown option {flag!r}{hint}", close[0] if close else ""


def _normalized_argv(parser: argparse.ArgumentParser, argv: Sequence[str], source: str,
                     problems: list[str]) -> list[str]:
    """Check every option at once and give argparse an argv it cannot misread.

    Unknown options are reported (all of them, not the first) and dropped,
    with the value that follows one when its closest known option takes a
    value.  Values are attached (``--flag=VALUE``) so that ``-`` or
    ``-1`` are read as values.  gunicorn's ``--proxy-protocol [MODE]`` becomes
    forkserver's on/off flag.
    """
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            out.extend(argv[i - 1:])
            break
        if not token.startswith("-") or token == "-":
            out.append(token)
            continue
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            attached = bool(eq)
        else:
            flag, value = token[:2], token[2:]
            attached = bool(value)
        action, problem, meant = _find_option(parser, flag)
        if action is None:
            problems.append(f"{source}: {problem}")
            guess = parser._option_string_actions.get(meant)
            if (not attached and i < len(argv) and not argv[i].startswith("-")
                    and guess is not None and _takes_value(guess)):
                i += 1  # its value, not the app
            continue
        if action.dest == "proxy_protocol":
            if not attached and i < len(argv) and argv[i].lower() in gunicorn.PROXY_MODES:
                value, attached = argv[i], True
                i += 1
            mode = gunicorn.proxy_mode(value) if attached else True
            if not isinstance(mode, bool):
                problems.append(f"{source} {flag}: proxy_protocol must be one of "
                                f"{', '.join(gunicorn.PROXY_MODES)}, got {value!r}")
                continue
            out.append("--proxy-protocol" if mode and flag != "--no-proxy-protocol" else "--no-proxy-protocol")
            continue
        if not _takes_value(action) or attached:
            out.append(token)
            continue
        if i >= len(argv):
            problems.append(f"{source}: argument {'/'.join(action.option_strings)}: expected one argument")
            continue
        value = argv[i]
        i += 1
        out.append(f"{flag}={value}" if flag.startswith("--") else f"{flag}{value}")
    return out


def parse_command_line(parser: argparse.ArgumentParser, argv: Sequence[str], source: str,
                       problems: list[str]) -> argparse.Namespace:
    """Parse ``argv``, adding a line to ``problems`` for each bad option rather than stopping at one."""
    cleaned = _normalized_argv(parser, argv, source, problems)
    try:
        namespace, extras = parser.parse_known_args(cleaned)
    except ConfigError as exc:
        problems.append(f"{source}: {exc}")
        return argparse.Namespace()
    for extra in extras:
        problems.append(f"{source}: unexpected argument {extra!r} (only one APP may be given)")
    return namespace


def _cli_source(key: str, source: str = "command line") -> str:
    return source if key == "app" else f"{source} {cli_flag(key)}"


def _from_cli(namespace: argparse.Namespace) -> dict[str, Any]:
    """Turn parsed flags into raw values; repeated list flags may also hold commas."""
    raw = {}
    for f in settings():
        if hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            if isinstance(value, list):
                value = f.metadata["separator"].join(value)
            if value is not None:
                raw[f.name] = value
    return raw


def _gunicorn_from_cli(namespace: argparse.Namespace) -> dict[str, Any]:
    """gunicorn settings given with spellings forkserver's own flags lack, by gunicorn name."""
    return {dest[len(GUNICORN_DEST):]: value for dest, value in vars(namespace).items()
            if dest.startswith(GUNICORN_DEST)}


def _check_combinations(config: Config) -> list[str]:
    """Problems of settings that are fine alone but not together."""
    problems = []
    if config.reload and config.preload:
        problems.append(
            f"{config.source_of('reload')}: reload cannot be combined with preload "
            f"(from {config.source_of('preload')}): preload imports the app once in the master, "
            "so new code would never be loaded; drop one of them")
    prefixes = {entry.partition("=")[0].strip().rstrip("/") or "/" for entry in config.static}
    for entry in config.static_cache_control:
        prefix = entry.partition("=")[0].strip().rstrip("/") or "/"
        if entry.startswith("/") and prefix not in prefixes:
            problems.append(f"{config.source_of('static_cache_control')}: static_cache_control entry "
                            f"{entry!r} names {prefix}, which is not a static prefix")
    return problems


@dataclass(frozen=True, eq=False)
class Invocation:
    """What the command line asked for besides settings: the config and an action."""

    config: Config
    config_path: str
    check_only: bool
    show_version: bool
    print_config: bool = False


@dataclass
class _Layer:
    """One source of raw values: ``where(key)`` names it; ``typed`` False for text, None for either."""

    where: Callable[[str], str]
    typed: bool | None
    raw: dict[str, Any]


@dataclass
class _Sources:
    """Everything read from the sources, before merging: layers, and what to say or refuse."""

    layers: list[_Layer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    hooks: dict[str, Callable[..., Any] | str] = field(default_factory=dict)
    hook_file: str = ""
    proxy_allow_ips: tuple[str, Any] | None = None  # (where, value) of the last one given


def _command_line_layers(sources: _Sources, namespace: argparse.Namespace, source: str) -> None:
    """The layers of one command line (argv, or GUNICORN_CMD_ARGS): gunicorn's spellings, then ours."""
    flags = {spec.name: gunicorn_only_flags(spec) for spec in gunicorn.SETTINGS}
    given = _gunicorn_from_cli(namespace)
    if given:
        # Text as typed, or what a conversion made of it (a dict from --log-config-json).
        _add_gunicorn(sources, given, lambda key: f"{source} {flags[key][0]}", typed=None)
    sources.layers.append(_Layer(lambda key: _cli_source(key, source), False, _from_cli(namespace)))


def _add_gunicorn(sources: _Sources, raw: Mapping[str, Any], where: Callable[[str], str],
                  typed: bool | None, native: Mapping[str, Any] | None = None) -> None:
    """Translate gunicorn-named values into one layer (with ``native`` forkserver-named ones beside)."""
    translation = gunicorn.translate(raw, where)
    sources.problems.extend(translation.problems)
    sources.notices.extend(translation.notices)
    sources.warnings.extend(translation.warnings)
    if "proxy_allow_ips" in translation.extras:
        sources.proxy_allow_ips = (where("proxy_allow_ips"), translation.extras["proxy_allow_ips"])
    values = dict(native or {})
    for name, function in translation.hooks.items():
        sources.hooks[name] = function
        if name in _setting_names():
            values[name] = f"{where(name)}:{name}"
    values.update(translation.values)
    named = translation.named
    sources.layers.append(_Layer(lambda key: where(named.get(key, key)), typed, values))


def _config_file_layer(sources: _Sources, path: str) -> None:
    """Read a TOML file, or run a gunicorn config file, into a layer."""
    try:
        if not path.endswith(".py"):
            raw, problems = read_toml(path)
            sources.problems.extend(problems)
            sources.layers.append(_Layer(lambda key: path, True, raw))
            return
        names = gunicorn.run_python_file(path)
    except ConfigError as exc:
        sources.problems.append(str(exc))
        return
    known, own, near = gunicorn.split_python_names(names, _setting_names())
    sources.warnings.extend(f"{path}: {line}" for line in near)
    own = {key: value for key, value in own.items() if value is not None}
    sources.hook_file = path
    _add_gunicorn(sources, known, lambda key: path, typed=None, native=own)


def _find_config_file(namespace: argparse.Namespace, env_namespace: argparse.Namespace,
                      environ: Mapping[str, str], base: str, sources: _Sources) -> str:
    """The config file: -c, else FORKSERVER_CONFIG, else -c in GUNICORN_CMD_ARGS, else ./gunicorn.conf.py.

    gunicorn's ``file:PATH`` and ``python:MODULE`` forms name a file too; a
    module is found on the path as it is when forkserver starts.
    """
    path = (getattr(namespace, "config", None) or environ.get(ENV_PREFIX + "CONFIG")
            or getattr(env_namespace, "config", None) or "")
    if path.startswith("python:"):  # gunicorn's -c python:package.module
        try:
            return gunicorn.module_file(path)
        except ConfigError as exc:
            sources.problems.append(str(exc))
            return ""
    if path:
        return os.path.join(base, path.removeprefix("file:"))
    candidate = os.path.join(base, gunicorn.DEFAULT_FILE)
    if not os.path.isfile(candidate):
        return ""
    unsafe = gunicorn.unsafe_because(os.stat(candidate))
    if unsafe:
        sources.warnings.append(f"{candidate}: not loaded, although gunicorn would load it: {unsafe}")
        return ""
    sources.notices.append(f"{candidate}: loaded as gunicorn does when no -c is given")
    return candidate


def _settle(values: dict[str, Any], origins: dict[str, str], sources: _Sources) -> None:
    """Decide what depends on several settings at once, and say what a gunicorn user must know."""
    notices = sources.notices
    kind = values.get("worker_class", "sync")
    if kind in ("gevent", "eventlet"):
        if "threads" in values:
            threads = f"{values['threads']} threads per worker (from {origins['threads']})"
        else:
            connections = values.get("worker_connections", 1000)
            values["threads"] = gunicorn.evented_threads(connections)
            origins["threads"] = origins["worker_class"]
            threads = (f"{values['threads']} threads per worker (from worker_connections {connections}, "
                       f"at most {gunicorn.EVENTED_THREAD_CAP})")
        notices.append(f"{origins['worker_class']}: worker_class {kind} runs on forkserver's keep-alive "
                       f"loop with {threads}; the app needs no monkey-patching")
    if sources.proxy_allow_ips is not None:
        where, value = sources.proxy_allow_ips
        if origins.get("forwarded_allow_ips", "default") == "default":
            try:
                values["forwarded_allow_ips"] = _validate(
                    _field("forwarded_allow_ips"), coerce("forwarded_allow_ips", value, where), where)
                origins["forwarded_allow_ips"] = where
            except ConfigError as exc:
                sources.problems.append(str(exc))
    if origins.get("bind") == "environment PORT":
        sources.warnings.append(f"binding all interfaces, {values['bind'][0]}, because PORT is set and "
                                "no bind is given (as gunicorn does)")
    if origins.get("workers") == "environment WEB_CONCURRENCY":
        notices.append(f"workers: {values['workers']} from WEB_CONCURRENCY, as no workers setting is given")
    elif "workers" not in values:
        notices.append("workers: auto, one per CPU the machine or its container allows, forkserver's "
                       "default (gunicorn's is 1; set workers to choose)")


def _field(name: str) -> dataclasses.Field[Any]:
    return next(f for f in settings() if f.name == name)


def load_config(argv: Sequence[str], environ: Mapping[str, str], base_dir: str | None = None) -> Invocation:
    """Merge every source into one checked Config.

    Precedence, lowest first: defaults (which gunicorn's PORT, WEB_CONCURRENCY
    and FORWARDED_ALLOW_IPS change, as in gunicorn) < the config file (TOML, or
    a gunicorn ``*.py``, or ``./gunicorn.conf.py`` found as gunicorn finds it)
    < ``GUNICORN_CMD_ARGS`` < ``FORKSERVER_*`` < the command line.

    Raises:
        ConfigError: naming every problem found, one per line, each with where it came from.
    """
    base = base_dir or os.getcwd()
    sources = _Sources()
    parser = build_arg_parser()
    namespace = parse_command_line(parser, argv, "command line", sources.problems)
    try:
        env_argv = shlex.split(environ.get("GUNICORN_CMD_ARGS", ""))
    except ValueError as exc:
        sources.problems.append(f"environment GUNICORN_CMD_ARGS: cannot split it as a shell would: {exc}")
        env_argv = []
    env_namespace = parse_command_line(parser, env_argv, "environment GUNICORN_CMD_ARGS", sources.problems)
    if env_argv:
        sources.notices.append(f"environment GUNICORN_CMD_ARGS read as command-line options: {shlex.join(env_argv)}")

    for name, value, source in gunicorn.environment_defaults(environ):
        sources.layers.append(_Layer(lambda key, source=source: source, False, {name: value}))
    config_path = _find_config_file(namespace, env_namespace, environ, base, sources)
    if config_path:
        _config_file_layer(sources, config_path)
    _command_line_layers(sources, env_namespace, "environment GUNICORN_CMD_ARGS")
    env_values, env_problems = read_env(environ)
    sources.problems.extend(env_problems)
    sources.layers.append(_Layer(lambda key: f"environment {env_name(key)}", False, env_values))
    _command_line_layers(sources, namespace, "command line")

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    fields = {f.name: f for f in settings()}
    for layer in sources.layers:
        for key, value in layer.raw.items():
            where = layer.where(key)
            typed = layer.typed if layer.typed is not None else not isinstance(value, str)
            try:
                coerced = coerce(key, value, where, typed=typed)
                # A word (workers = "auto") names a value outside the setting's range on purpose.
                values[key] = coerced if _is_word(fields[key], value) else _validate(fields[key], coerced, where)
                origins[key] = where
            except ConfigError as exc:
                sources.problems.append(str(exc))
    _settle(values, origins, sources)
    # Relative directories mean "from where forkserver was started", also when
    # the master, which changed into ``chdir`` long ago, reads them again on HUP.
    if values.get("chdir"):
        values["chdir"] = os.path.join(base, values["chdir"])
    if values.get("pythonpath"):
        values["pythonpath"] = tuple(os.path.join(base, path) for path in values["pythonpath"])
    # A hook function from the gunicorn file counts unless a later source named another hook.
    hooks = {name: function for name, function in sources.hooks.items()
             if name not in fields or origins.get(name) == sources.hook_file}
    problems = sources.problems
    if not problems:
        config = Config(**values, origins=origins, notices=tuple(dict.fromkeys(sources.notices)),
                        warnings=tuple(dict.fromkeys(sources.warnings)),
                        gunicorn_hooks=hooks)
        problems = _check_combinations(config)
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))
    return Invocation(
        config=config,
        config_path=config_path,
        check_only=bool(getattr(namespace, "check_config", False) or getattr(env_namespace, "check_config", False)),
        show_version=bool(getattr(namespace, "version", False)),
        print_config=bool(getattr(namespace, "print_config", False)
                          or getattr(env_namespace, "print_config", False)),
    )
