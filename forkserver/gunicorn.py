"""gunicorn compatibility: its settings, spellings, config file and environment.

A gunicorn user switches by changing the first word of the command, so every
gunicorn setting is listed here once, with its command-line spellings and what
forkserver does with it: sets one of forkserver's own settings (``native``),
accepts it and says at start why it is not needed (``ignored``), or refuses
it with the reason (``refused``).  ``forkserver.sources`` merges the values
this module translates through the one settings schema; this module never
decides precedence, never prints and never exits.

gunicorn's Python config file is run here as gunicorn runs it (a module
namespace), after checking that nobody but the master's user or root can have
written it: it is code, and the master often runs as root.
"""

from __future__ import annotations

import os
import stat
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

from .errors import ConfigError

DEFAULT_FILE = "gunicorn.conf.py"

# gunicorn's server hooks, with the arguments gunicorn passes each.
HOOK_PARAMETERS = {
    "on_starting": "server", "on_reload": "server", "when_ready": "server", "pre_fork": "server, worker",
    "post_fork": "server, worker", "post_worker_init": "worker", "worker_int": "worker",
    "worker_abort": "worker", "pre_exec": "server", "pre_request": "worker, req",
    "post_request": "worker, req, environ, resp", "child_exit": "server, worker",
    "worker_exit": "server, worker", "nworkers_changed": "server, new_value, old_value", "on_exit": "server",
}
HOOK_ARITY = {name: len(parameters.split(", ")) for name, parameters in HOOK_PARAMETERS.items()}
# forkserver's own hooks that gunicorn lacks: a gunicorn config file may define
# them as functions too, called in the same style (on_mold runs in the mold).
OWN_HOOK_PARAMETERS = {"on_mold": "server, worker"}

# Threads a gevent or eventlet worker gets from worker_connections: enough
# for many concurrent I/O-bound requests, few enough that each worker's
# stacks and GIL hand-offs stay cheap.
EVENTED_THREAD_CAP = 100

WORKER_CLASSES = {
    "sync": "sync", "gunicorn.workers.sync.SyncWorker": "sync",
    "gthread": "gthread", "gunicorn.workers.gthread.ThreadWorker": "gthread",
    "gevent": "gevent", "gunicorn.workers.ggevent.GeventWorker": "gevent",
    "gevent_wsgi": "gevent", "gevent_pywsgi": "gevent",
    "gunicorn.workers.ggevent.GeventPyWSGIWorker": "gevent",
    "eventlet": "eventlet", "gunicorn.workers.geventlet.EventletWorker": "eventlet",
}
USE_INSTEAD = "use sync, or gthread with --threads N, for a WSGI app"


def normalize_worker_class(value: str) -> str:
    """Return ``sync``, ``gthread``, ``gevent`` or ``eventlet`` for any of their spellings."""
    text = value.strip()
    if text.startswith("egg:gunicorn#"):
        text = text[len("egg:gunicorn#"):]
    return WORKER_CLASSES.get(text, WORKER_CLASSES.get(text.lower(), text))


def worker_class_refusal(value: str) -> str | None:
    """Say why a worker class cannot serve here, or None if forkserver runs it."""
    name = normalize_worker_class(value)
    if name in WORKER_CLASSES.values():
        return None
    lowered = name.lower()
    if "websocket" in lowered:
        why = "WebSocket apps are not served by forkserver"
    elif lowered.startswith("uvicorn") or "asgi" in lowered:
        why = "it runs ASGI apps, which forkserver does not serve (run those with uvicorn or hypercorn)"
    elif lowered.startswith("tornado") or "tornado" in lowered:
        why = "it runs Tornado apps, which are not WSGI"
    else:
        why = "a custom worker class is gunicorn code; forkserver has its own workers"
    return f"{why}; {USE_INSTEAD}"


# -- value conversions: gunicorn's value -> the raw value forkserver's setting takes --

def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _umask(value: Any) -> Any:
    """gunicorn reads 022 and 0o22 as octal and 18 as decimal; forkserver's umask is octal text."""
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int("0o" + text[1:] if len(text) > 1 and text[0] == "0" and text[1].isdigit() else text, 0)
        except ValueError:
            return text  # the schema names the problem
    if isinstance(value, int) and not isinstance(value, bool):
        return format(value, "03o")
    return value


def _identity_name(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


PROXY_MODES = {"off": False, "false": False, "0": False, "none": False,
               "true": True, "auto": True, "1": True, "v1": True, "v2": True}


def proxy_mode(value: Any) -> Any:
    """gunicorn's off/v1/v2/auto (or a bool) as forkserver's on/off; other text is left to fail."""
    if isinstance(value, str) and value.strip().lower() in PROXY_MODES:
        return PROXY_MODES[value.strip().lower()]
    return value


# gunicorn's ssl_version: a name or number of Python's ssl.PROTOCOL_* (its
# default is PROTOCOL_TLS_SERVER, 17).  Each means "this version or newer"
# here; TLS 1.0 and 1.1 stay refused, by the setting's own check.
SSL_VERSIONS = {"tls": "1.2", "sslv23": "1.2", "tls_server": "1.2", "tlsv1_2": "1.2", "tlsv1_3": "1.3",
                "protocol_tls": "1.2", "protocol_sslv23": "1.2", "protocol_tls_server": "1.2",
                "protocol_tlsv1_2": "1.2", 2: "1.2", 5: "1.2", 17: "1.2"}
CERT_REQS = {0: "none", 1: "optional", 2: "required"}


def tls_minimum(value: Any) -> Any:
    """gunicorn's ssl_version as forkserver's tls_min_version; anything else is left for the schema to refuse."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, str) and key.isdigit():
        key = int(key)
    if isinstance(key, bool):
        return value
    return SSL_VERSIONS.get(key, value if isinstance(value, str) else str(value))


def _cert_reqs_text(value: Any) -> Any:
    """gunicorn's cert_reqs, a number (ssl.CERT_*) or text, as forkserver's word."""
    if isinstance(value, int) and not isinstance(value, bool):
        return CERT_REQS.get(int(value), str(value))
    return value


def _env_entries(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _json_logconfig(value: Any) -> Any:
    if not isinstance(value, str) or not value:
        return value
    import json  # deferred, as this option is rare

    try:
        with open(value, encoding="utf-8") as fh:
            return json.load(fh)
    except OSError as exc:
        raise ConfigError(f"log_config_json: cannot read {value!r}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"log_config_json: {value!r} is not JSON: {exc}") from None


# Plain classes, not dataclasses: see forkserver.records.
class GunicornSetting:
    """One gunicorn setting: its spellings and what forkserver does with it.

    ``takes`` is how the command line gives it: ``value``, ``append``,
    ``flag`` (store true), ``off`` (a flag storing false), ``optional`` (a
    flag with an optional value) or ``file`` (config file only).
    """

    __slots__ = ("name", "flags", "takes", "native", "convert", "ignored", "refused", "default")

    def __init__(self, name: str, flags: tuple[str, ...] = (), takes: str = "value", native: str = "",
                 convert: Callable[[Any], Any] | None = None, ignored: str = "", refused: str = "",
                 default: Any = None) -> None:
        self.name = name
        self.flags = flags
        self.takes = takes
        self.native = native
        self.convert = convert
        self.ignored = ignored
        self.refused = refused
        self.default = default

    def disposition(self) -> str:
        """``native``, ``ignored``, ``refused``, ``hook`` or ``action``."""
        if self.native:
            return "native"
        if self.name in HOOK_ARITY:
            return "hook"
        if self.refused:
            return "refused"
        return "ignored" if self.ignored else "action"

    def reason(self) -> str:
        return self.refused or self.ignored


def _s(name: str, *flags: str, **kw: Any) -> GunicornSetting:
    return GunicornSetting(name, tuple(flags), **kw)


HANDSHAKE = ("the handshake always runs in the worker's event loop without blocking, under header_timeout, "
             "whatever this says")
ASGI = "ASGI apps are not served by forkserver"
HTTP2 = "forkserver speaks HTTP/1.1 to the proxy in front of it, which speaks HTTP/2 to clients"
STRICT = "forkserver's HTTP parser stays strict; requests it cannot read get a 400"
SYSLOG = ("syslog output is not offered: the error log goes to error_logfile (stderr by default, "
          "which systemd and container runtimes collect)")
DIRTY = "dirty workers are not offered; run that work in a separate service"
CONTROL = "forkserver is controlled by signals and reports through stats_bind"

# Every documented gunicorn setting, in gunicorn's order of sections.
SETTINGS: tuple[GunicornSetting, ...] = (
    _s("config", "-c", "--config"),
    _s("wsgi_app", takes="file", native="app"),
    _s("bind", "-b", "--bind", takes="append", native="bind"),
    _s("backlog", "--backlog", native="backlog"),
    _s("workers", "-w", "--workers", native="workers"),
    _s("worker_class", "-k", "--worker-class", native="worker_class"),
    _s("threads", "--threads", native="threads"),
    _s("worker_connections", "--worker-connections", native="worker_connections"),
    _s("max_requests", "--max-requests", native="max_requests"),
    _s("max_requests_jitter", "--max-requests-jitter", native="max_requests_jitter"),
    _s("timeout", "-t", "--timeout", native="timeout"),
    _s("graceful_timeout", "--graceful-timeout", native="graceful_timeout"),
    _s("keepalive", "--keep-alive", native="keepalive"),
    _s("limit_request_line", "--limit-request-line", native="limit_request_line"),
    _s("limit_request_fields", "--limit-request-fields", native="limit_request_fields"),
    _s("limit_request_field_size", "--limit-request-field_size", native="limit_request_field_size"),
    _s("reload", "--reload", takes="flag", native="reload"),
    _s("reload_engine", "--reload-engine", default="auto",
       ignored="forkserver's reloader chooses how to watch files itself (inotify, else polling)"),
    _s("reload_extra_files", "--reload-extra-file", takes="append", native="reload_extra_file"),
    _s("spew", "--spew", takes="flag", default=False,
       ignored="tracing every executed line is not offered; use a debugger"),
    _s("check_config", "--check-config", takes="flag"),
    _s("print_config", "--print-config", takes="flag"),
    _s("preload_app", "--preload", takes="flag", native="preload"),
    _s("sendfile", "--no-sendfile", "--sendfile", takes="off",
       ignored="forkserver uses sendfile where it helps (static files, wsgi.file_wrapper) by itself"),
    _s("reuse_port", "--reuse-port", takes="flag", native="reuse_port"),
    _s("chdir", "--chdir", native="chdir"),
    _s("daemon", "-D", "--daemon", takes="flag", native="daemon"),
    _s("raw_env", "-e", "--env", takes="append", native="env", convert=_env_entries),
    _s("pidfile", "-p", "--pid", native="pid"),
    _s("worker_tmp_dir", "--worker-tmp-dir",
       ignored="the worker heartbeat is kept in shared memory, not in a temporary file"),
    _s("user", "-u", "--user", native="user", convert=_identity_name),
    _s("group", "-g", "--group", native="group", convert=_identity_name),
    _s("umask", "-m", "--umask", native="umask", convert=_umask),
    _s("initgroups", "--initgroups", takes="flag", default=False,
       ignored="workers keep only the configured user and group, no supplementary groups"),
    _s("tmp_upload_dir", takes="file", ignored="gunicorn does not use it either"),
    _s("secure_scheme_headers", takes="file",
       default={"X-FORWARDED-PROTOCOL": "ssl", "X-FORWARDED-PROTO": "https", "X-FORWARDED-SSL": "on"},
       ignored="the scheme comes from Forwarded or X-Forwarded-Proto sent by forwarded_allow_ips peers"),
    _s("forwarded_allow_ips", "--forwarded-allow-ips", native="forwarded_allow_ips"),
    _s("accesslog", "--access-logfile", native="access_logfile"),
    _s("disable_redirect_access_to_syslog", "--disable-redirect-access-to-syslog", takes="flag",
       default=False, ignored=SYSLOG),
    _s("access_log_format", "--access-logformat", native="access_logformat"),
    _s("errorlog", "--error-logfile", "--log-file", native="error_logfile"),
    _s("loglevel", "--log-level", native="log_level", convert=_lower),
    _s("capture_output", "--capture-output", takes="flag", native="capture_output"),
    _s("logger_class", "--logger-class", default="gunicorn.glogging.Logger",
       ignored="forkserver writes its own logs; shape them with access_logformat or logconfig_dict"),
    _s("logconfig", "--log-config", native="logconfig"),
    _s("logconfig_dict", takes="file", native="logconfig_dict", default={}),
    _s("logconfig_json", "--log-config-json", native="logconfig_dict", convert=_json_logconfig),
    _s("syslog_addr", "--log-syslog-to", ignored=SYSLOG),
    _s("syslog", "--log-syslog", takes="flag", default=False, ignored=SYSLOG),
    _s("syslog_prefix", "--log-syslog-prefix", ignored=SYSLOG),
    _s("syslog_facility", "--log-syslog-facility", default="user", ignored=SYSLOG),
    _s("enable_stdio_inheritance", "-R", "--enable-stdio-inheritance", takes="flag",
       native="enable_stdio_inheritance"),
    _s("statsd_host", "--statsd-host", native="statsd_host"),
    _s("dogstatsd_tags", "--dogstatsd-tags", default="", ignored="StatsD metrics are sent without tags"),
    _s("statsd_prefix", "--statsd-prefix", native="statsd_prefix"),
    _s("enable_backlog_metric", "--enable-backlog-metric", takes="flag", default=False,
       ignored="each listener's queue is reported by /stats (stats_bind)"),
    _s("proc_name", "-n", "--name", native="name"),
    _s("default_proc_name", takes="file", default="gunicorn",
       ignored="process titles show name, else the app"),
    _s("pythonpath", "--pythonpath", native="pythonpath"),
    _s("paste", "--paste", "--paster",
       refused="PasteDeploy .ini apps are not loaded; name the WSGI callable as APP "
       "(a factory works too: 'module:make_app()')"),
    *(_s(name, takes="file") for name in HOOK_ARITY),
    _s("ssl_context", takes="file",
       refused="a Python hook building the SSL context is not called; set certfile, keyfile, ca_certs, "
       "cert_reqs, ciphers and ssl_version (see docs/tls.md)"),
    _s("proxy_protocol", "--proxy-protocol", takes="optional", native="proxy_protocol", convert=proxy_mode),
    _s("proxy_allow_ips", "--proxy-allow-from", default="127.0.0.1,::1",
       ignored="forkserver takes PROXY headers from forwarded_allow_ips peers; it is set from this "
       "when not given itself"),
    _s("protocol", "--protocol", default="http", refused="only HTTP is served (not the uwsgi protocol)"),
    _s("uwsgi_allow_ips", "--uwsgi-allow-from", default="127.0.0.1,::1",
       ignored="the uwsgi protocol is not served"),
    _s("keyfile", "--keyfile", native="keyfile"),
    _s("certfile", "--certfile", native="certfile"),
    _s("ssl_version", "--ssl-version", native="tls_min_version", convert=tls_minimum),
    _s("cert_reqs", "--cert-reqs", native="cert_reqs", convert=_cert_reqs_text),
    _s("ca_certs", "--ca-certs", native="ca_certs"),
    _s("suppress_ragged_eofs", "--suppress-ragged-eofs", takes="flag", default=True,
       ignored="a client that closes without a TLS close_notify simply ends its connection"),
    _s("do_handshake_on_connect", "--do-handshake-on-connect", takes="flag", default=False, ignored=HANDSHAKE),
    _s("ciphers", "--ciphers", native="ciphers"),
    _s("http_protocols", "--http-protocols", default="h1", ignored=HTTP2),
    _s("http2_cleartext", "--http2-cleartext", default="off", ignored=HTTP2),
    _s("http2_max_concurrent_streams", "--http2-max-concurrent-streams", default=100, ignored=HTTP2),
    _s("http2_initial_window_size", "--http2-initial-window-size", default=65535, ignored=HTTP2),
    _s("http2_max_frame_size", "--http2-max-frame-size", default=16384, ignored=HTTP2),
    _s("http2_max_header_list_size", "--http2-max-header-list-size", default=65536, ignored=HTTP2),
    _s("raw_paste_global_conf", "--paste-global", takes="append", default=[],
       refused="PasteDeploy .ini apps are not loaded; name the WSGI callable as APP"),
    _s("permit_obsolete_folding", "--permit-obsolete-folding", takes="flag", default=False, ignored=STRICT),
    _s("strip_header_spaces", "--strip-header-spaces", takes="flag", default=False, ignored=STRICT),
    _s("permit_unconventional_http_method", "--permit-unconventional-http-method", takes="flag",
       default=False, ignored=STRICT),
    _s("permit_unconventional_http_version", "--permit-unconventional-http-version", takes="flag",
       default=False, ignored=STRICT),
    _s("casefold_http_method", "--casefold-http-method", takes="flag", default=False, ignored=STRICT),
    _s("forwarder_headers", "--forwarder-headers", default="SCRIPT_NAME,PATH_INFO",
       ignored="forkserver takes only Forwarded and X-Forwarded-For/-Proto/-Host from trusted peers"),
    _s("header_map", "--header-map", default="drop",
       ignored="forkserver applies its own rule to header names it cannot map unambiguously"),
    _s("asgi_loop", "--asgi-loop", default="auto", ignored=ASGI),
    _s("asgi_lifespan", "--asgi-lifespan", default="auto", ignored=ASGI),
    _s("asgi_disconnect_grace_period", "--asgi-disconnect-grace-period", default=3, ignored=ASGI),
    _s("http_parser", "--http-parser", default="auto", ignored="forkserver has one HTTP parser"),
    _s("root_path", "--root-path", default="", ignored=ASGI),
    _s("dirty_apps", "--dirty-app", takes="append", default=[], refused=DIRTY),
    _s("dirty_workers", "--dirty-workers", default=0, ignored=DIRTY),
    _s("dirty_timeout", "--dirty-timeout", default=300, ignored=DIRTY),
    _s("dirty_threads", "--dirty-threads", default=1, ignored=DIRTY),
    _s("dirty_graceful_timeout", "--dirty-graceful-timeout", default=30, ignored=DIRTY),
    *(_s(name, takes="file", ignored=DIRTY) for name in
      ("on_dirty_starting", "dirty_post_fork", "dirty_worker_init", "dirty_worker_exit")),
    _s("control_socket", "--control-socket", ignored=CONTROL),
    _s("control_socket_mode", "--control-socket-mode", default=0o600, ignored=CONTROL),
    _s("control_socket_disable", "--no-control-socket", takes="flag", default=False, ignored=CONTROL),
)
BY_NAME = {s.name: s for s in SETTINGS}


def is_default(setting: GunicornSetting, value: Any) -> bool:
    """Does ``value`` leave the setting as gunicorn would have it anyway (nothing to say)?"""
    return value is None or value == setting.default or (setting.takes == "off" and value is True)


class Translation:
    """What gunicorn-named values mean for forkserver: its raw settings, and what to say."""

    __slots__ = ("values", "named", "notices", "warnings", "problems", "hooks", "extras")

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.named: dict[str, str] = {}  # forkserver setting -> the gunicorn name that set it
        self.notices: list[str] = []
        self.warnings: list[str] = []
        self.problems: list[str] = []
        self.hooks: dict[str, Callable[..., Any] | str] = {}
        self.extras: dict[str, Any] = {}  # gunicorn values settled after the merge (proxy_allow_ips)


def translate(raw: Mapping[str, Any], where: Callable[[str], str],
              own_hooks: Mapping[str, Callable[..., Any]] | None = None) -> Translation:
    """Turn gunicorn setting names and values into forkserver's raw settings.

    ``own_hooks`` are functions a config file defined for forkserver's own
    hooks (``OWN_HOOK_PARAMETERS``); they are checked like gunicorn's.
    ``where(name)`` names the source for messages.  Problems are collected,
    not raised, so one run reports them all.
    """
    out = Translation()
    for name, value in {**raw, **(own_hooks or {})}.items():
        spec = BY_NAME.get(name)
        kind = "hook" if spec is None else spec.disposition()
        if kind == "hook":
            if isinstance(value, str) and value.strip():
                out.hooks[name] = value.strip()  # imported at start, once pythonpath applies
            elif value is not None:
                try:
                    out.hooks[name] = check_hook(name, value)
                except ConfigError as exc:
                    out.problems.append(f"{where(name)}: {exc}")
        elif kind == "native":
            try:
                converted = spec.convert(value) if spec.convert else value
            except ConfigError as exc:
                out.problems.append(f"{where(name)}: {exc}")
                continue
            if converted is not None:
                out.values[spec.native] = converted
                out.named[spec.native] = name
        elif kind == "refused":
            if not is_default(spec, value):
                out.problems.append(f"{where(name)}: {name} is not supported: {spec.reason()}")
        elif kind == "ignored":
            if name == "proxy_allow_ips" and not is_default(spec, value):
                out.extras[name] = value
            if is_default(spec, value):
                continue
            out.notices.append(f"{where(name)}: {name} accepted but not needed: {spec.ignored}")
    return out


def as_spec(dotted: str) -> str:
    """gunicorn's 'package.module.function' as forkserver's 'package.module:function'."""
    module_name, _, attribute = dotted.rpartition(".")
    return f"{module_name}:{attribute}"


def check_hook(name: str, value: Any) -> Callable[..., Any]:
    """A gunicorn hook function, checked to take what gunicorn passes it.

    Raises:
        ConfigError: it is not callable, or takes other arguments than gunicorn passes.
    """
    if not callable(value):
        raise ConfigError(f"{name} must be a function, got {value!r}")
    count = positional_count(value)
    caller = "gunicorn" if name in HOOK_PARAMETERS else "forkserver"
    parameters = HOOK_PARAMETERS.get(name) or OWN_HOOK_PARAMETERS[name]
    wanted = len(parameters.split(", "))
    if name == "post_request" and count in (2, 3):
        # gunicorn also takes post_request(worker, req) and (worker, req, environ).
        short = value

        def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> Any:
            return short(*(worker, req, environ)[:count])

        return post_request
    if count is not None and count != wanted:
        raise ConfigError(f"{name} must take {wanted} argument{'s' if wanted > 1 else ''} "
                          f"({parameters}), as {caller} calls it; it takes {count}")
    return value


def positional_count(function: Callable[..., Any]) -> int | None:
    """How many positional arguments ``function`` takes; None if it takes any number."""
    import inspect  # deferred: only a gunicorn config file with hooks needs it, and it is slow to import

    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    return sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               and p.default is p.empty)


# -- the Python config file --------------------------------------------------------------

def unsafe_because(info: os.stat_result) -> str | None:
    """Why the master must not run a file with this status as code; None if only root or we can write it."""
    if info.st_uid not in (0, os.geteuid()):
        return f"it is owned by uid {info.st_uid}, not by this user ({os.geteuid()}) or root"
    writers = [who for who, bit in (("group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if info.st_mode & bit]
    if writers:
        return f"it is writable by {' and '.join(writers)} (mode {stat.S_IMODE(info.st_mode):03o})"
    return None


def module_file(location: str) -> str:
    """The file of gunicorn's ``-c python:package.module``, found without running it.

    Raises:
        ConfigError: no such module on the path.
    """
    import importlib.util  # deferred: this form of -c is rare

    name = location[len("python:"):]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"{location}: cannot find the module: {exc}") from None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise ConfigError(f"{location}: no Python module {name!r} on the path")
    return spec.origin


def run_python_file(path: str) -> dict[str, Any]:
    """Execute a gunicorn config file as gunicorn does, as module ``__config__``; return its names.

    Raises:
        ConfigError: it is unsafe to run, cannot be read, or raised; one line with the file and line.
    """
    try:
        with open(path, "rb") as fh:
            # Judged on the file opened, so it cannot be swapped between the check and the read.
            unsafe = unsafe_because(os.fstat(fh.fileno()))
            if unsafe:
                raise ConfigError(f"{path}: refusing to run this config file: {unsafe}; make it owned by "
                                  "this user or root and not writable by others (chmod go-w)")
            source = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: cannot read config file: it is a directory") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    module = types.ModuleType("__config__")
    module.__file__ = os.path.abspath(path)
    sys.modules["__config__"] = module  # as gunicorn does, so code in it can find itself
    try:
        exec(compile(source, path, "exec"), module.__dict__)
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: invalid Python: {exc.msg}") from None
    except BaseException as exc:  # exit() in the file, too: it must not end the master
        if isinstance(exc, KeyboardInterrupt):
            raise
        import traceback  # deferred: needed only to name the line that failed

        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
        line = f":{frames[-1].lineno}" if frames else ""
        raise ConfigError(f"{path}{line}: config file raised {type(exc).__name__}: {exc}") from None
    return dict(vars(module))


def one_edit_apart(a: str, b: str) -> bool:
    """Is ``a`` one insertion, deletion, substitution or swap away from ``b``?"""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diffs = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        return len(diffs) == 1 or (len(diffs) == 2 and diffs[1] == diffs[0] + 1
                                   and a[diffs[0]] == b[diffs[1]] and a[diffs[1]] == b[diffs[0]])
    short, long = sorted((a, b), key=len)
    i = next((i for i, (x, y) in enumerate(zip(short, long)) if x != y), len(short))
    return short[i:] == long[i + 1:]


def split_python_names(names: Mapping[str, Any], native: set[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Sort a config file's module names into gunicorn settings, forkserver settings and near misses.

    Other names (imports, helpers) are ignored as gunicorn ignores them; a
    name one edit away from a setting is probably a typo and gets a warning.
    """
    gunicorn, own, near = {}, {}, []
    for name, value in names.items():
        if name in BY_NAME:
            gunicorn[name] = value
        elif name in native:
            own[name] = value
        elif not name.startswith("_") and not isinstance(value, types.ModuleType):
            close = next((known for known in (*BY_NAME, *sorted(native)) if one_edit_apart(name, known)), None)
            if close:
                near.append(f"'{name}' is not a setting and is ignored (did you mean '{close}'?)")
    return gunicorn, own, near


def evented_threads(connections: int) -> int:
    """Threads per worker that stand in for a gevent/eventlet worker's connections."""
    return max(1, min(connections, EVENTED_THREAD_CAP))


def environment_defaults(environ: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """(setting, raw value, source) for what gunicorn's environment changes in the defaults.

    As in gunicorn, these apply only where no config file, GUNICORN_CMD_ARGS,
    or command line sets the setting: PORT makes the default bind
    0.0.0.0:$PORT, WEB_CONCURRENCY the default worker count, and
    FORWARDED_ALLOW_IPS the default trusted proxies.
    """
    found = []
    if "PORT" in environ:
        found.append(("bind", f"0.0.0.0:{environ['PORT'].strip()}", "environment PORT"))
    if "WEB_CONCURRENCY" in environ:
        found.append(("workers", environ["WEB_CONCURRENCY"], "environment WEB_CONCURRENCY"))
    if "FORWARDED_ALLOW_IPS" in environ:
        found.append(("forwarded_allow_ips", environ["FORWARDED_ALLOW_IPS"], "environment FORWARDED_ALLOW_IPS"))
    return found
