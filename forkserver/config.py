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
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .proxy import check_trust_entries

ENV_PREFIX = "FORKSERVER_"
DEFAULT_ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
FIELD_VALUE_BAD = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})
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
) -> Any:
    """Declare one setting: a dataclass field whose metadata drives every source.

    ``check`` returns None for a good value or a short description of what was
    expected.  ``flags`` adds short CLI spellings beside ``--name-with-dashes``.
    A list setting's items are split on ``separator`` in text sources; with
    ``table`` a TOML table ``{KEY = "VALUE"}`` is also taken, as ``KEY=VALUE`` items.
    ``words`` names values by a word (any case, from any source), such as
    ``auto`` for ``workers``.
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
    }
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _check_octal(value: str) -> str | None:
    try:
        mode = int(value, 8)
    except ValueError:
        return "an octal number such as 022"
    return None if 0 <= mode <= 0o777 else "an octal number between 000 and 777"


def _check_octal_or_empty(value: str) -> str | None:
    return None if value == "" else _check_octal(value)


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
    keepalive: float = setting(
        5.0,
        minimum=0,
        help="Seconds an idle keep-alive connection is kept open; 0 closes after each response.",
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
        8190, minimum=1, help="Longest request line accepted, in bytes; longer gets 414."
    )
    limit_request_fields: int = setting(
        100, minimum=1, help="Most header fields in a request; more gets 431."
    )
    limit_request_field_size: int = setting(
        8190, minimum=1, help="Longest header field (name and value) in bytes; longer gets 431."
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
    log_level: str = setting("info", choices=LOG_LEVELS, help="Lowest level the error log records.")
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
    on_starting: str = setting("", help="Hook 'module:function' called in the master before binding.")
    when_ready: str = setting("", help="Hook called in the master once the first workers serve.")
    pre_fork: str = setting("", help="Hook called in the master before each worker is forked.")
    post_fork: str = setting("", help="Hook called in each worker right after fork.")
    post_worker_init: str = setting("", help="Hook called in each worker after it loaded the app.")
    worker_int: str = setting("", help="Hook called in a worker on INT or QUIT, before it exits.")
    worker_exit: str = setting("", help="Hook called in a worker as it exits normally.")
    on_mold: str = setting(
        "",
        help="Hook called in a worker that becomes the refork mold, before it freezes its heap: close "
        "database connections and other sockets the workers forked from it must not share.",
    )
    on_reload: str = setting("", help="Hook called in the master on HUP, before the new workers start.")
    on_exit: str = setting("", help="Hook called in the master just before it exits.")
    daemon: bool = setting(False, flags=("-D",), help="Detach from the terminal and run in the background.")
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def proc_name(self) -> str:
        """The name in process titles and logs: ``name`` or else the app spec."""
        return self.name or self.app or "forkserver"

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
    kind = _kinds()[name]
    meta = next(f.metadata for f in settings() if f.name == name)
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


def _validate(f: dataclasses.Field[Any], value: Any, where: str) -> None:
    meta = f.metadata
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ConfigError(f"{where}: {f.name} must be at least {meta['minimum']:g}, got {value!r}")
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{where}: {f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
    if meta["check"] is not None:
        expected = meta["check"](value)
        if expected:
            raise ConfigError(f"{where}: {f.name} must be {expected}, got {value!r}")


def _unknown(key: str, where: str) -> ConfigError:
    names = [f.name for f in settings()]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else " (forkserver --help lists the settings)"
    return ConfigError(f"{where}: unknown setting '{key}'{hint}")


def read_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file into raw values, rejecting unknown keys."""
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
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    known = {f.name for f in settings()}
    for key in data:
        if key not in known:
            raise _unknown(key, path)
    return data


def read_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Collect ``FORKSERVER_<NAME>`` variables, rejecting ones that name no setting."""
    known = {f.name for f in settings()}
    found = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX) or var == ENV_PREFIX + "CONFIG":
            continue
        key = var[len(ENV_PREFIX) :].lower()
        if key not in known:
            raise _unknown(key, f"environment {var}")
        found[key] = value
    return found


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"command line: {message}")

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Parse, naming the first unknown option with the closest known one."""
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            first = extras[0]
            if not first.startswith("-"):
                raise ConfigError(f"command line: unexpected argument {first!r} (only one APP may be given)")
            flag = first.partition("=")[0]
            close = difflib.get_close_matches(flag, list(self._option_string_actions), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"command line: unknown option {flag!r}{hint}")
        return namespace


def build_arg_parser() -> argparse.ArgumentParser:
    """Build the CLI from the schema; flags left out are absent from the namespace."""
    parser = _ArgumentParser(
        prog="forkserver",
        description="Serve a WSGI application from a supervised pool of pre-forked workers.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="Read settings from this TOML file.")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="Validate the settings and import the app, then exit: 0 if all is well.",
    )
    parser.add_argument("--version", action="store_true", help="Print the version and exit.")
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
    return parser


def _cli_source(key: str) -> str:
    return "command line" if key == "app" else f"command line {cli_flag(key)}"


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


def _check_combinations(config: Config) -> None:
    """Raise ConfigError for settings that are fine alone but not together."""
    if config.reload and config.preload:
        raise ConfigError(
            f"{config.source_of('reload')}: reload cannot be combined with preload "
            f"(from {config.source_of('preload')}): preload imports the app once in the master, "
            "so new code would never be loaded; drop one of them")
    prefixes = {entry.partition("=")[0].strip().rstrip("/") or "/" for entry in config.static}
    for entry in config.static_cache_control:
        prefix = entry.partition("=")[0].strip().rstrip("/") or "/"
        if entry.startswith("/") and prefix not in prefixes:
            raise ConfigError(f"{config.source_of('static_cache_control')}: static_cache_control entry "
                              f"{entry!r} names {prefix}, which is not a static prefix")


@dataclass(frozen=True, eq=False)
class Invocation:
    """What the command line asked for besides settings: the config and an action."""

    config: Config
    config_path: str
    check_only: bool
    show_version: bool


def load_config(argv: Sequence[str], environ: Mapping[str, str], base_dir: str | None = None) -> Invocation:
    """Merge default < TOML file < ``FORKSERVER_*`` env < CLI into one checked Config.

    Raises:
        ConfigError: for the first problem found, naming where it came from.
    """
    namespace = build_arg_parser().parse_args(list(argv))
    config_path = getattr(namespace, "config", None) or environ.get(ENV_PREFIX + "CONFIG", "")
    # (where a key's value came from, whether the source is typed, raw values)
    layers: list[tuple[Callable[[str], str], bool, dict[str, Any]]] = []
    if config_path:
        layers.append((lambda key: config_path, True, read_toml(config_path)))
    layers.append((lambda key: f"environment {env_name(key)}", False, read_env(environ)))
    layers.append((_cli_source, False, _from_cli(namespace)))

    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    fields = {f.name: f for f in settings()}
    for where_of, typed, raw in layers:
        for key, value in raw.items():
            where = where_of(key)
            coerced = coerce(key, value, where, typed=typed)
            if not _is_word(fields[key], value):
                _validate(fields[key], coerced, where)
            values[key], origins[key] = coerced, where
    for name, f in fields.items():
        default = default_of(f)
        if name not in values and default not in f.metadata["words"].values():
            _validate(f, default, "default")
    # Relative directories mean "from where forkserver was started", also when
    # the master, which changed into ``chdir`` long ago, reads them again on HUP.
    base = base_dir or os.getcwd()
    if values.get("chdir"):
        values["chdir"] = os.path.join(base, values["chdir"])
    if values.get("pythonpath"):
        values["pythonpath"] = tuple(os.path.join(base, path) for path in values["pythonpath"])
    config = Config(**values, origins=origins)
    _check_combinations(config)
    return Invocation(
        config=config,
        config_path=config_path,
        check_only=bool(getattr(namespace, "check_config", False)),
        show_version=bool(getattr(namespace, "version", False)),
    )
