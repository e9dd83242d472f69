"""The settings schema: every setting, its type, default, checks and help, and how a raw value becomes one.

Each setting is declared once, as a field of the frozen ``Config`` class:
its name, type, default, validation and help text.  The CLI parser, the TOML
keys, the ``FORKSERVER_*`` environment variables, ``--help`` and the option
table of docs/options.md are all derived from these fields (the reading of
those sources is ``forkserver.sources``), so they cannot drift apart.
This module never prints and never exits; it raises ``ConfigError``.

Unlike the rest of the package it does not postpone its annotations
(``from __future__ import annotations``): ``coerce`` needs each setting's
type, and evaluating 84 annotation strings with ``typing.get_type_hints``
compiled each one, 0.9 ms of every start; evaluated where they are
declared they cost a start 0.2 ms.
"""

import functools
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import gunicorn
from .errors import ConfigError
from .proxy import check_trust_entries
from .sockets import parse_statsd_address

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


class Setting:
    """One field of ``Config``: its name, its default, and the metadata that drives every source.

    Config was a dataclass; these fields are the part of one it used,
    without the methods a dataclass generates, which every start compiled
    (see ``forkserver.records``).  A field without ``help`` in its metadata
    is bookkeeping, not a setting.
    """

    __slots__ = ("name", "default", "default_factory", "metadata")

    def __init__(self, default: Any = None, *, default_factory: Callable[[], Any] | None = None,
                 metadata: Mapping[str, Any] | None = None) -> None:
        self.name = ""  # set when Config's body assigns it to a name
        self.default = default
        self.default_factory = default_factory
        self.metadata = metadata or {}

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name


def setting(
    default: Any = None,
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
    """Declare one setting: a ``Config`` field whose metadata drives every source.

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
    return Setting(default, default_factory=default_factory, metadata=metadata)


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


CERT_REQS_WORDS = {"none": "none", "optional": "optional", "required": "required",
                   "0": "none", "1": "optional", "2": "required",
                   "cert_none": "none", "cert_optional": "optional", "cert_required": "required"}
TLS_VERSIONS = ("1.2", "1.3")


def _cert_reqs(value: str) -> str:
    """none/optional/required in any case, gunicorn's 0/1/2, or ssl's CERT_* names."""
    text = value.strip().lower()
    return CERT_REQS_WORDS.get(text, text)


def _tls_version(value: str) -> str:
    """1.2 or 1.3, also written TLSv1.2, TLSv1_3 or tls1.3."""
    text = value.strip().lower().replace("_", ".")
    for prefix in ("tlsv", "tls"):
        text = text.removeprefix(prefix)
    return text


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


def _check_refork_after(value: tuple[int, ...]) -> str | None:
    if any(count < 1 for count in value):
        return "request counts of at least 1"
    if list(value) != sorted(set(value)):
        return "increasing request counts, such as 1000,20000"
    return None


def _check_statsd_host(value: str) -> str | None:
    if value == "":
        return None
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


class Config:
    """Every setting forkserver has.  Field order is the order of ``--help``.

    Frozen: built once per start and once per reload, then only read (by
    the master and by every worker); ``replace`` makes a changed copy.
    """

    def __init__(self, **values: Any) -> None:
        """Set each field from ``values`` by name, the others to their defaults."""
        own = self.__dict__
        for f in config_fields():
            own[f.name] = values.pop(f.name) if f.name in values else default_of(f)
        if values:
            raise TypeError(f"Config has no field {', '.join(values)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Config is frozen: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Config is frozen: cannot delete {name!r}")

    def replace(self, **changes: Any) -> "Config":
        """A copy with ``changes`` (for the fields a reload may not change)."""
        return Config(**{**self.__dict__, **changes})

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
    boot_timeout: float = setting(
        120.0,
        minimum=0,
        help="Seconds a new worker may take to import the app and become ready (at least "
        "timeout, which judges requests, not boots); past it the worker's stack is dumped "
        "and it is killed as a failed boot; 0 disables.",
    )
    deadline_limit: float = setting(
        3600.0,
        minimum=1,
        help="Latest a request's app may move its deadline to with environ['forkserver.deadline'], "
        "in seconds after the request started; later deadlines are cut to this.",
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
    body_buffer_size: int = setting(
        1 << 20,
        minimum=0,
        help="Bytes of a request body the worker reads in its event loop before the app runs, "
        "so a slow upload holds a descriptor, not a worker or thread; 0 hands every body to the app at once.",
    )
    body_buffer_total: int = setting(
        32 << 20,
        minimum=1,
        help="Bytes of request bodies one worker holds in memory that way, in all; once reached "
        "it stops reading bodies until some are freed.",
    )
    body_min_rate: int = setting(
        500,
        minimum=0,
        help="Bytes a second a request body must arrive at, averaged over each body_rate_window "
        "seconds spent waiting for it; slower gets 408. 0 disables.",
    )
    body_rate_window: float = setting(
        10.0, minimum=0.1, help="Seconds over which body_min_rate is averaged."
    )
    body_deadline: float = setting(
        600.0,
        minimum=0,
        help="Seconds from the end of a request head to the end of its body; later gets 408. "
        "0 disables.",
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
    certfile: str = setting(
        "",
        help="Serve TLS with this PEM certificate (chain); every bind address becomes HTTPS, or only "
        "the tls_bind ones when those are given. HUP reads it again. See docs/tls.md.",
        metavar="FILE",
    )
    keyfile: str = setting(
        "", help="PEM private key of certfile (unencrypted); empty if certfile holds it.", metavar="FILE"
    )
    tls_bind: tuple[str, ...] = setting(
        (),
        normalize=_without_tcp_scheme,
        help="Addresses served over TLS while bind stays plain HTTP (HOST:PORT, unix:PATH, fd://N); "
        "empty makes every bind address TLS when certfile is set.",
        metavar="ADDRESS",
    )
    ca_certs: str = setting(
        "", help="PEM file of the CAs a client certificate must be signed by (with cert_reqs).", metavar="FILE"
    )
    cert_reqs: str = setting(
        "none",
        choices=("none", "optional", "required"),
        normalize=_cert_reqs,
        help="Client certificates: none (not asked for), optional (checked if sent) or required; "
        "gunicorn's 0, 1, 2 too. The subject reaches the app as SSL_CLIENT_S_DN.",
    )
    ciphers: str = setting(
        "", help="OpenSSL cipher list for TLS 1.2; empty keeps Python's secure default.", metavar="LIST"
    )
    tls_min_version: str = setting(
        "1.2",
        choices=tuple(TLS_VERSIONS),
        normalize=_tls_version,
        help="Oldest TLS version accepted: 1.2 or 1.3 (TLS 1.0 and 1.1 are not offered).",
        metavar="VERSION",
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
        "exceeds this many MiB in three samples in a row (five seconds apart); 0 never.",
        metavar="MIB",
    )
    refork_after: tuple[int, ...] = setting(
        (),
        check=_check_refork_after,
        help="Refork: once a worker has served this many requests it stops serving and becomes the "
        "mold every new worker is forked from, so they share what it loaded lazily; a list "
        "(1000,20000) promotes a new mold at each count. Empty disables it; off under reload.",
        metavar="COUNTS",
    )
    memory_merge: bool = setting(
        False,
        help="Offer the server's memory to the kernel's same-page merging (Linux KSM, 6.4 or later): "
        "ksmd merges the pages workers copied but left as in the master's, the mold's or a sibling's. "
        "Works only while the host runs ksmd (/sys/kernel/mm/ksm/run is 1); costs ksmd's CPU.",
    )
    on_starting: str = setting("", help="Hook 'module:function' called in the master before binding.")
    when_ready: str = setting("", help="Hook called in the master once the first workers serve.")
    pre_fork: str = setting("", help="Hook called in the master before each worker is forked.")
    post_fork: str = setting("", help="Hook called in each worker right after fork.")
    post_worker_init: str = setting("", help="Hook called in each worker after it loaded the app.")
    worker_int: str = setting("", help="Hook called in a worker on INT or QUIT, before it exits.")
    worker_abort: str = setting(
        "",
        help="Hook called in a worker the master aborts as hung, before it is killed; "
        "its context's requests are the stuck requests (environ, elapsed, stack).",
    )
    worker_exit: str = setting("", help="Hook called in a worker as it exits normally.")
    on_mold: str = setting(
        "",
        help="Hook called in a worker that becomes the refork mold, before it freezes its heap: close "
        "database connections and other sockets the workers forked from it must not share.",
    )
    on_reload: str = setting("", help="Hook called in the master on HUP, before the new workers start.")
    on_exit: str = setting("", help="Hook called in the master just before it exits.")
    daemon: bool = setting(False, flags=("-D",), help="Detach from the terminal and run in the background.")
    origins: Mapping[str, str] = Setting(default_factory=dict)
    # Lines the master logs once at start: gunicorn settings accepted but not
    # needed, defaults a gunicorn user might not expect, where values came from.
    notices: tuple[str, ...] = Setting(())
    warnings: tuple[str, ...] = Setting(())  # the same, worth a look
    # Hooks defined as functions in a gunicorn config file, called with gunicorn's arguments.
    gunicorn_hooks: Mapping[str, Callable[..., Any] | str] = Setting(default_factory=dict)

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


@functools.cache
def config_fields() -> tuple[Setting, ...]:
    """Every field of ``Config``, settings and bookkeeping, in the order declared."""
    return tuple(value for value in vars(Config).values() if isinstance(value, Setting))


def settings() -> list[Setting]:
    """Return the declared settings, in order (``origins`` is bookkeeping, not one)."""
    return [f for f in config_fields() if "help" in f.metadata]


@functools.cache
def setting_types() -> dict[str, Any]:
    """Each setting's type, read from the annotations once per process.

    ``coerce`` needs it for every value given; ``get_type_hints`` walks every
    annotation on each call.
    """
    return typing.get_type_hints(Config)


def cli_flag(name: str) -> str:
    """Return the long CLI option of a setting, e.g. ``--graceful-timeout``."""
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    """Return the environment variable of a setting, e.g. ``FORKSERVER_WORKERS``."""
    return ENV_PREFIX + name.upper()


def default_of(f: Setting) -> Any:
    """Return a setting's default value, calling its factory if it has one."""
    if f.default_factory is not None:
        return f.default_factory()
    return f.default


def is_word(f: Setting, raw: Any) -> bool:
    """Whether ``raw`` names a value by one of the setting's words (exempt from its range check)."""
    return isinstance(raw, str) and raw.strip().lower() in f.metadata["words"]


def _describe(kind: Any, table: bool = False) -> str:
    if table:
        return "a table of strings, a string or a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a table (a JSON object in text)", tuple[int, ...]: "a list of integers"}.get(
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
    kind = setting_types()[name]
    meta = setting_field(name).metadata
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
    if kind == tuple[int, ...]:
        # A TOML list of integers, or comma-separated numbers in text.
        items = value.split(meta["separator"]) if text else value
        if not isinstance(items, list | tuple):
            raise bad
        try:
            return tuple(coerce_item(item, text) for item in items if not isinstance(item, str) or item.strip())
        except ValueError:
            raise bad from None
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


def coerce_item(item: Any, text: bool) -> int:
    """One item of an integer list: its digits in a text source, an int (not a bool) in a file; else ValueError."""
    if text:
        return int(item.strip())
    if isinstance(item, bool) or not isinstance(item, int):
        raise ValueError(item)
    return item


def validate(f: Setting, value: Any, where: str) -> Any:
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


def combination_problems(config: Config) -> list[str]:
    """Problems of settings that are fine alone but not together."""
    problems = []
    if config.reload and config.preload:
        problems.append(
            f"{config.source_of('reload')}: reload cannot be combined with preload "
            f"(from {config.source_of('preload')}): preload imports the app once in the master, "
            "so new code would never be loaded; drop one of them")
    problems += _tls_combinations(config)
    prefixes = {entry.partition("=")[0].strip().rstrip("/") or "/" for entry in config.static}
    for entry in config.static_cache_control:
        prefix = entry.partition("=")[0].strip().rstrip("/") or "/"
        if entry.startswith("/") and prefix not in prefixes:
            problems.append(f"{config.source_of('static_cache_control')}: static_cache_control entry "
                            f"{entry!r} names {prefix}, which is not a static prefix")
    return problems


def _tls_combinations(config: Config) -> list[str]:
    """TLS settings that need one another (the files themselves are read at start: forkserver.worker.tls)."""
    problems = []
    need_cert = [name for name in ("keyfile", "tls_bind", "ca_certs") if getattr(config, name)]
    if config.cert_reqs != "none":
        need_cert.append("cert_reqs")
    if need_cert and not config.certfile:
        problems.append(f"{config.source_of(need_cert[0])}: {need_cert[0]} is set but certfile is not; "
                        "TLS needs a certificate")
    if config.certfile and config.cert_reqs != "none" and not config.ca_certs:
        problems.append(f"{config.source_of('cert_reqs')}: cert_reqs {config.cert_reqs} needs ca_certs, "
                        "the CAs client certificates are checked against")
    if config.certfile and config.proxy_protocol:
        problems.append(f"{config.source_of('proxy_protocol')}: proxy_protocol cannot be combined with TLS "
                        f"(certfile from {config.source_of('certfile')}): the PROXY header would arrive "
                        "before the handshake; terminate TLS in the proxy, or drop one of them")
    return problems


def setting_field(name: str) -> Setting:
    return next(f for f in settings() if f.name == name)
