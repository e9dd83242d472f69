"""gunicorn's settings table: every spelling accepted, every value read as gunicorn reads it.

These run ``load_config`` in-process (no server): the served behaviour is in
tests/integration/test_gunicorn_dropin.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from forkserver import gunicorn
from forkserver.config import HEADER_FIELD_CEILING, HEADER_FIELDS_CEILING, REQUEST_LINE_CEILING, settings
from forkserver.sources import load_config
from forkserver.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
NATIVE = {f.name for f in settings()}


def load(*argv: str, env: dict[str, str] | None = None):
    return load_config(list(argv), env or {}, base_dir=os.getcwd()).config


def problems(*argv: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(*argv, env=env)
    return str(info.value).splitlines()


def python_conf(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gunicorn.conf.py"
    path.write_text(textwrap.dedent(text))
    path.chmod(0o644)
    return str(path)


def test_generated_guide_table_is_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_gunicorn_table.py"), "--check"],
                            capture_output=True, text=True, cwd=ROOT, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr


def test_every_gunicorn_setting_is_listed_once_and_maps_onto_a_real_setting():
    names = [spec.name for spec in gunicorn.SETTINGS]
    assert len(names) == len(set(names))
    flags = [flag for spec in gunicorn.SETTINGS for flag in spec.flags]
    assert len(flags) == len(set(flags))
    for spec in gunicorn.SETTINGS:
        assert spec.native in NATIVE | {""}, spec.name
        assert sum(bool(x) for x in (spec.native, spec.ignored, spec.refused)) <= 1, spec.name
    assert set(gunicorn.HOOK_ARITY) <= set(names)


# (gunicorn's flag and value, forkserver setting, what it must hold)
CLI_SPELLINGS = [
    (["-b", "127.0.0.1:1"], "bind", ("127.0.0.1:1",)),
    (["-b", "tcp://127.0.0.1:2", "--bind", ":3"], "bind", ("127.0.0.1:2", ":3")),
    (["-w", "3"], "workers", 3),
    (["-k", "gthread"], "worker_class", "gthread"),
    (["--worker-class", "gunicorn.workers.ggevent.GeventWorker"], "worker_class", "gevent"),
    (["-k", "egg:gunicorn#eventlet"], "worker_class", "eventlet"),
    (["--worker-connections", "64"], "worker_connections", 64),
    (["-t", "5"], "timeout", 5.0),
    (["--keep-alive", "7"], "keepalive", 7.0),
    (["--limit-request-field_size", "100"], "limit_request_field_size", 100),
    (["--limit-request-line", "0"], "limit_request_line", REQUEST_LINE_CEILING),
    (["--limit-request-fields", "0"], "limit_request_fields", HEADER_FIELDS_CEILING),
    (["--limit-request-field_size", "0"], "limit_request_field_size", HEADER_FIELD_CEILING),
    (["--log-file", "/var/log/app.log"], "error_logfile", "/var/log/app.log"),
    (["--log-level", "WARNING"], "log_level", "warning"),
    (["-p", "/run/app.pid"], "pid", "/run/app.pid"),
    (["-n", "shop"], "name", "shop"),
    (["-u", "1000"], "user", "1000"),
    (["-g", "1000"], "group", "1000"),
    (["-m", "007"], "umask", "007"),
    (["-m", "0o27"], "umask", "027"),
    (["-m", "18"], "umask", "022"),  # gunicorn reads a number without a leading 0 as decimal
    (["-e", "A=1", "--env", "B=2,3"], "env", ("A=1", "B=2,3")),
    (["--reload-extra-file", "a.txt"], "reload_extra_file", ("a.txt",)),
    (["--preload"], "preload", True),
    (["-D"], "daemon", True),
    (["--proxy-protocol"], "proxy_protocol", True),
    (["--proxy-protocol", "v2"], "proxy_protocol", True),
    (["--proxy-protocol=off"], "proxy_protocol", False),
    (["--proxy-allow-from", "10.0.0.1"], "forwarded_allow_ips", ("10.0.0.1",)),
    (["--access-logfile", "-", "--access-logformat", "%(h)s %(s)s"], "access_logformat", "%(h)s %(s)s"),
]


@pytest.mark.parametrize("argv, name, expected", CLI_SPELLINGS, ids=[" ".join(c[0]) for c in CLI_SPELLINGS])
def test_gunicorn_spellings_set_forkservers_settings(argv, name, expected):
    config = load("app:app", *argv)
    assert getattr(config, name) == expected
    assert config.source_of(name).startswith("command line -")


def test_proxy_protocol_mode_does_not_swallow_the_app():
    config = load("--proxy-protocol", "v1", "app:app")
    assert (config.proxy_protocol, config.app) == (True, "app:app")
    config = load("--proxy-protocol", "app:app")
    assert (config.proxy_protocol, config.app) == (True, "app:app")


def test_request_limits_above_their_ceiling_are_refused():
    assert problems("--limit-request-line", str(REQUEST_LINE_CEILING + 1)) == [
        f"command line --limit-request-line: limit_request_line must be at most {REQUEST_LINE_CEILING} "
        f"(0 also means {REQUEST_LINE_CEILING}), got {REQUEST_LINE_CEILING + 1}"]


@pytest.mark.parametrize("argv", [[spec_flag] for spec in gunicorn.SETTINGS for spec_flag in spec.flags[:1]
                                  if spec.takes in ("flag", "off") and not spec.refused])
def test_every_gunicorn_switch_is_accepted(argv):
    load("app:app", *argv)


@pytest.mark.parametrize("spec", [s for s in gunicorn.SETTINGS if s.ignored and s.takes in ("value", "append")
                                  and s.flags], ids=lambda s: s.name)
def test_every_unneeded_gunicorn_option_is_accepted_and_named_once(spec):
    config = load("app:app", spec.flags[-1], "10.0.0.1")
    said = [line for line in config.notices if f"{spec.name} accepted but not needed" in line]
    assert len(said) == 1 and spec.ignored in said[0]


@pytest.mark.parametrize("spec", [s for s in gunicorn.SETTINGS if s.refused and s.flags], ids=lambda s: s.name)
def test_every_refused_gunicorn_option_says_why(spec):
    assert problems("app:app", spec.flags[0], "something") == [
        f"command line {spec.flags[0]}: {spec.name} is not supported: {spec.refused}"]


@pytest.mark.parametrize("typo, hint", [
    ("--worker-calss", "--worker-class"),
    ("--worker-tmpdir", "--worker-tmp-dir"),
    ("--keep-alve", "--keep-alive"),
    ("--acces-logfile", "--access-logfile"),
])
def test_hints_point_a_gunicorn_user_to_the_right_option(typo, hint):
    assert problems("app:app", typo, "1") == [f"command line: unknown option '{typo}' (did you mean '{hint}'?)"]


def test_an_abbreviation_argparse_would_take_is_taken_and_an_ambiguous_one_named():
    assert load("app:app", "--graceful", "3").graceful_timeout == 3.0
    [line] = problems("app:app", "--max", "3")
    assert line.startswith("command line: ambiguous option '--max': it could be --max-requests, ")


def test_gunicorn_names_in_a_toml_file_point_to_forkservers_names(tmp_path):
    path = tmp_path / "app.toml"
    path.write_text('preload_app = true\naccesslog = "-"\n')
    assert problems("-c", str(path)) == [
        f"{path}: unknown setting 'preload_app' (that is gunicorn's name; forkserver's is 'preload')",
        f"{path}: unknown setting 'accesslog' (that is gunicorn's name; forkserver's is 'access_logfile')",
    ]


# (config-file line, forkserver setting, what it must hold)
PYTHON_VALUES = [
    ('bind = "127.0.0.1:1"', "bind", ("127.0.0.1:1",)),
    ('bind = ["127.0.0.1:1", "unix:/tmp/a.sock"]', "bind", ("127.0.0.1:1", "unix:/tmp/a.sock")),
    ("workers = 2 * 2 + 1", "workers", 5),
    ('workers = "3"', "workers", 3),
    ("threads = 8", "threads", 8),
    ('worker_class = "gthread"', "worker_class", "gthread"),
    ("timeout = 120", "timeout", 120.0),
    ('timeout = "90"', "timeout", 90.0),
    ("graceful_timeout = 5", "graceful_timeout", 5.0),
    ("keepalive = 75", "keepalive", 75.0),
    ('accesslog = "-"', "access_logfile", "-"),
    ('errorlog = "/tmp/e.log"', "error_logfile", "/tmp/e.log"),
    ('loglevel = "DEBUG"', "log_level", "debug"),
    ('access_log_format = "%(h)s %(r)s"', "access_logformat", "%(h)s %(r)s"),
    ("preload_app = True", "preload", True),
    ('preload_app = "true"', "preload", True),
    ("max_requests = 1000", "max_requests", 1000),
    ("max_requests_jitter = 50", "max_requests_jitter", 50),
    ("limit_request_line = 0", "limit_request_line", REQUEST_LINE_CEILING),
    ("limit_request_fields = 200", "limit_request_fields", 200),
    ('forwarded_allow_ips = "10.0.0.1,10.0.0.2"', "forwarded_allow_ips", ("10.0.0.1", "10.0.0.2")),
    ("proxy_protocol = True", "proxy_protocol", True),
    ('proxy_protocol = "v2"', "proxy_protocol", True),
    ('proxy_allow_ips = "10.1.1.1"', "forwarded_allow_ips", ("10.1.1.1",)),
    ('raw_env = ["A=1", "B=x=y"]', "env", ("A=1", "B=x=y")),
    ('raw_env = "A=1"', "env", ("A=1",)),
    ("daemon = False", "daemon", False),
    ('pidfile = "/run/a.pid"', "pid", "/run/a.pid"),
    ("pidfile = None", "pid", ""),
    ("user = 1000", "user", "1000"),
    ('group = "www-data"', "group", "www-data"),
    ("umask = 0o22", "umask", "022"),
    ("umask = 18", "umask", "022"),
    ('proc_name = "shop"', "name", "shop"),
    ('pythonpath = "/srv/lib"', "pythonpath", ("/srv/lib",)),
    ("reload = True", "reload", True),
    ('reload_extra_files = ["templates/base.html"]', "reload_extra_file", ("templates/base.html",)),
    ("reuse_port = True", "reuse_port", True),
    ("backlog = 64", "backlog", 64),
    ('wsgi_app = "project.wsgi:application"', "app", "project.wsgi:application"),
    ("worker_connections = 50", "worker_connections", 50),
    ('health_path = "/healthz"', "health_path", "/healthz"),  # forkserver's own names work too
]


@pytest.mark.parametrize("line, name, expected", PYTHON_VALUES, ids=[c[0] for c in PYTHON_VALUES])
def test_python_config_names_read_with_gunicorns_meaning(tmp_path, line, name, expected):
    path = python_conf(tmp_path, line + "\n")
    config = load("-c", path, *([] if name == "app" else ["app:app"]))
    assert getattr(config, name) == expected
    assert config.source_of(name) == (path if expected != "" else "default")


def test_python_config_problems_are_all_reported(tmp_path):
    path = python_conf(tmp_path, """
        workers = 0
        timeout = "soon"
        paste = "app.ini"
        worker_class = "uvicorn.workers.UvicornWorker"
        def post_fork(server):
            pass
        """)
    assert problems("-c", path, "app:app") == [
        f"{path}: paste is not supported: {gunicorn.BY_NAME['paste'].refused}",
        f"{path}: post_fork must take 2 arguments (server, worker), as gunicorn calls it; it takes 1",
        f"{path}: workers must be at least 1, got 0",
        f"{path}: timeout must be a number, got 'soon'",
        f"{path}: worker_class 'uvicorn.workers.UvicornWorker' is not served: it runs ASGI apps, which "
        f"forkserver does not serve (run those with uvicorn or hypercorn); {gunicorn.USE_INSTEAD}",
    ]


def test_python_config_ignores_helpers_and_warns_of_near_misses(tmp_path):
    path = python_conf(tmp_path, """
        import os
        import multiprocessing as mp
        BASE_DIR = os.path.dirname(__file__)
        cores = mp.cpu_count()
        worker = 3
        accesslogs = "-"
        def helper():
            return 1
        """)
    config = load("-c", path, "app:app")
    assert config.warnings == (
        f"{path}: 'worker' is not a setting and is ignored (did you mean 'workers'?)",
        f"{path}: 'accesslogs' is not a setting and is ignored (did you mean 'accesslog'?)",
    )


def test_hook_functions_keep_gunicorns_convention_unless_a_later_source_names_a_hook(tmp_path):
    path = python_conf(tmp_path, """
        def when_ready(server):
            pass

        def child_exit(server, worker):
            pass
        """)
    config = load("-c", path, "app:app")
    assert set(config.gunicorn_hooks) == {"when_ready", "child_exit"}
    overridden = load("-c", path, "app:app", "--when-ready", "mymodule:ready")
    assert set(overridden.gunicorn_hooks) == {"child_exit"}
    assert overridden.when_ready == "mymodule:ready"


def test_forkservers_own_hook_as_a_function_takes_server_and_worker(tmp_path):
    path = python_conf(tmp_path, """
        def on_mold(server, worker):
            pass
        """)
    config = load("-c", path, "app:app")
    assert set(config.gunicorn_hooks) == {"on_mold"} and config.source_of("on_mold") == path
    overridden = load("-c", path, "app:app", "--on-mold", "mymodule:close")
    assert overridden.gunicorn_hooks == {} and overridden.on_mold == "mymodule:close"
    wrong = python_conf(tmp_path, """
        def on_mold(worker):
            pass
        """)
    with pytest.raises(ConfigError, match=r"on_mold must take 2 arguments \(server, worker\), as forkserver calls"):
        load("-c", wrong, "app:app")


@pytest.mark.parametrize("a, b, expected", [
    ("worker", "workers", True), ("wrokers", "workers", True), ("bnd", "bind", True),
    ("timeot", "timeout", True), ("workers", "workers", False), ("work", "workers", False),
    ("os", "bind", False), ("bindx", "bind", True), ("xbind", "bind", True),
])
def test_one_edit_apart(a, b, expected):
    assert gunicorn.one_edit_apart(a, b) is expected


def test_gunicorn_cmd_args_sits_between_the_file_and_forkservers_own_variables(tmp_path):
    path = python_conf(tmp_path, "workers = 2\ntimeout = 10\nkeepalive = 3\n")
    env = {"GUNICORN_CMD_ARGS": "--workers 4 --timeout 20 --keep-alive 4", "FORKSERVER_TIMEOUT": "30"}
    config = load("-c", path, "app:app", "--keep-alive", "6", env=env)
    assert (config.workers, config.timeout, config.keepalive) == (4, 30.0, 6.0)
    assert config.source_of("workers") == "environment GUNICORN_CMD_ARGS --workers"
    assert config.source_of("keepalive") == "command line --keep-alive"


def test_gunicorn_cmd_args_that_do_not_split_are_named():
    assert problems("app:app", env={"GUNICORN_CMD_ARGS": "--name 'unclosed"}) == [
        "environment GUNICORN_CMD_ARGS: cannot split it as a shell would: No closing quotation"]


def test_forwarded_allow_ips_from_the_environment_as_gunicorn_reads_it():
    config = load("app:app", env={"FORWARDED_ALLOW_IPS": "10.0.0.0/8"})
    assert config.forwarded_allow_ips == ("10.0.0.0/8",)
    assert config.source_of("forwarded_allow_ips") == "environment FORWARDED_ALLOW_IPS"


def test_evented_worker_classes_get_threads_within_the_cap():
    assert load("app:app", "-k", "gevent").threads == gunicorn.EVENTED_THREAD_CAP
    assert load("app:app", "-k", "gevent", "--worker-connections", "12").threads == 12
    assert load("app:app", "-k", "eventlet", "--threads", "3").threads == 3
    assert load("app:app", "-k", "gthread").threads == 1
    assert load("app:app", "-k", "sync", "--worker-connections", "12").threads == 1


def test_the_default_worker_count_is_named_for_a_gunicorn_user():
    notices = load("app:app").notices
    assert "workers: auto, one per CPU the machine or its container allows, forkserver's default " \
           "(gunicorn's is 1; set workers to choose)" in notices
    assert not any(line.startswith("workers:") for line in load("app:app", "-w", "2").notices)


def test_gunicorns_file_and_python_forms_of_the_config_option(tmp_path, monkeypatch):
    python_conf(tmp_path, "workers = 6\n")
    (tmp_path / "deploy_settings.py").write_text("workers = 7\n")
    (tmp_path / "deploy_settings.py").chmod(0o644)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load("-c", f"file:{tmp_path}/gunicorn.conf.py", "app:app").workers == 6
    assert load("-c", "python:deploy_settings", "app:app").workers == 7
    assert problems("-c", "python:no_such_settings_module", "app:app") == [
        "python:no_such_settings_module: no Python module 'no_such_settings_module' on the path"]


def test_a_python_config_file_without_the_py_name_gets_a_hint(tmp_path):
    path = tmp_path / "gunicorn.conf"
    path.write_text("import multiprocessing\nworkers = multiprocessing.cpu_count()\n")
    [line] = problems("-c", str(path), "app:app")
    assert line.startswith(f"{path}: invalid TOML: ")
    assert line.endswith("; a gunicorn config file must be named *.py")


def test_gunicorn_tls_settings_are_honoured_with_their_values_mapped(tmp_path):
    path = python_conf(tmp_path, """
        import ssl
        certfile = "/etc/ssl/app.pem"
        keyfile = "/etc/ssl/app.key"
        ca_certs = "/etc/ssl/ca.pem"
        cert_reqs = ssl.CERT_REQUIRED
        ssl_version = ssl.PROTOCOL_TLS_SERVER
        ciphers = "ECDHE+AESGCM"
        do_handshake_on_connect = True
        """)
    config = load("-c", path, "app:app")
    assert (config.certfile, config.keyfile, config.ca_certs) == ("/etc/ssl/app.pem", "/etc/ssl/app.key",
                                                                    "/etc/ssl/ca.pem")
    assert (config.cert_reqs, config.tls_min_version, config.ciphers) == ("required", "1.2", "ECDHE+AESGCM")
    assert any("do_handshake_on_connect accepted but not needed" in line for line in config.notices)


@pytest.mark.parametrize("argv, name, expected", [
    (["--cert-reqs", "1"], "cert_reqs", "optional"),
    (["--cert-reqs", "CERT_REQUIRED"], "cert_reqs", "required"),
    (["--ssl-version", "TLSv1_3"], "tls_min_version", "1.3"),
    (["--ssl-version", "TLS"], "tls_min_version", "1.2"),
    (["--tls-min-version", "TLSv1.3"], "tls_min_version", "1.3"),
])
def test_gunicorn_tls_spellings(argv, name, expected):
    config = load("app:app", "--certfile", "/c.pem", "--ca-certs", "/ca.pem", *argv)
    assert getattr(config, name) == expected


def test_tls_1_0_is_refused_and_tls_settings_need_a_certificate():
    assert problems("app:app", "--certfile", "/c.pem", "--ssl-version", "TLSv1") == [
        "command line --ssl-version: tls_min_version must be one of 1.2, 1.3, got '1'"]
    assert problems("app:app", "--keyfile", "/k.pem") == [
        "command line --keyfile: keyfile is set but certfile is not; TLS needs a certificate"]
    assert problems("app:app", "--certfile", "/c.pem", "--cert-reqs", "required") == [
        "command line --cert-reqs: cert_reqs required needs ca_certs, the CAs client certificates are checked against"]
