"""The command line: --help, --version, gunicorn's flag spellings, and the one-line error contract."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import forkserver
from forkserver.config import cli_flag, settings
from forkserver.sources import load_config
from forkserver.errors import EXIT_APP_LOAD, EXIT_CONFIG


def forkserver_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m forkserver`` with a clean FORKSERVER_* environment plus ``env``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "forkserver", *args], capture_output=True, text=True,
                          env=full_env, timeout=60)


@pytest.fixture(scope="module")
def help_text() -> str:
    result = forkserver_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_help_lists_every_setting_flag(help_text):
    for f in settings():
        if f.name == "app":
            assert "APP" in help_text
            continue
        assert cli_flag(f.name) in help_text, f"{cli_flag(f.name)} missing from --help"
        for short in f.metadata["flags"]:
            assert short in help_text


def test_help_lists_the_actions_and_renders_percent_signs(help_text):
    for flag in ("-c", "--config", "--check-config", "--version", "--no-preload"):
        assert flag in help_text
    assert "%(x)s" in help_text  # argparse would choke on a raw %; the schema's help escapes it


def test_help_names_the_stats_and_top_commands_and_gunicorns_spellings(help_text):
    assert "forkserver stats ADDR" in help_text and "forkserver top ADDR" in help_text
    for flag in ("--keep-alive", "--log-file", "--limit-request-field_size", "--certfile", "--print-config",
                 "--worker-class", "docs/gunicorn.md"):
        assert flag in help_text


def test_short_help_flag_too():
    result = forkserver_cli("-h")
    assert result.returncode == 0
    assert "--workers" in result.stdout


def test_version():
    result = forkserver_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"forkserver {forkserver.__version__}"
    assert result.stderr == ""


def test_version_works_even_with_a_broken_config():
    result = forkserver_cli("--version", env={"FORKSERVER_WORKERS": "0"})
    assert result.returncode == 0
    assert result.stdout.strip() == f"forkserver {forkserver.__version__}"


# Flags a gunicorn user types, and the setting each must set.
GUNICORN_FLAGS = [
    (["--bind", "127.0.0.1:1"], "bind", ("127.0.0.1:1",)),
    (["-b", "127.0.0.1:1", "-b", "127.0.0.1:2"], "bind", ("127.0.0.1:1", "127.0.0.1:2")),
    (["--bind=127.0.0.1:3"], "bind", ("127.0.0.1:3",)),
    (["--workers", "3"], "workers", 3),
    (["-w", "4"], "workers", 4),
    (["--threads", "8"], "threads", 8),
    (["--timeout", "60"], "timeout", 60.0),
    (["-t", "61"], "timeout", 61.0),
    (["--graceful-timeout", "5"], "graceful_timeout", 5.0),
    (["--keepalive", "2"], "keepalive", 2.0),
    (["--backlog", "64"], "backlog", 64),
    (["--preload"], "preload", True),
    (["--chdir", "/srv/app"], "chdir", "/srv/app"),
    (["--pythonpath", "/srv/lib,/srv/app"], "pythonpath", ("/srv/lib", "/srv/app")),
    (["--pid", "/run/app.pid"], "pid", "/run/app.pid"),
    (["--access-logfile", "-"], "access_logfile", "-"),
    (["--access-logformat", "%(h)s %(s)s"], "access_logformat", "%(h)s %(s)s"),
    (["--error-logfile", "/var/log/app.log"], "error_logfile", "/var/log/app.log"),
    (["--log-level", "debug"], "log_level", "debug"),
    (["--name", "shop"], "name", "shop"),
    (["--umask", "027"], "umask", "027"),
    (["--daemon"], "daemon", True),
    (["-D"], "daemon", True),
]


@pytest.mark.parametrize("argv, name, expected", GUNICORN_FLAGS, ids=[" ".join(c[0]) for c in GUNICORN_FLAGS])
def test_gunicorn_compatible_flags(argv, name, expected):
    config = load_config(["myapp:app", *argv], {}).config
    assert getattr(config, name) == expected
    assert config.source_of(name) == f"command line {cli_flag(name)}"


def test_check_config_and_config_file_flags(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text("workers = 3\n")
    for flag in ("-c", "--config"):
        invocation = load_config([flag, str(path), "--check-config"], {})
        assert invocation.check_only is True
        assert invocation.config_path == str(path)
        assert invocation.config.workers == 3
    assert load_config([], {}).check_only is False


def test_bad_flag_is_one_error_line_and_exit_78():
    result = forkserver_cli("myapp:app", "--workers", "0")
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    assert result.stderr == "forkserver: error: command line --workers: workers must be at least 1, got 0\n"


@pytest.mark.parametrize("argv, fragment", [
    (["myapp:create_app(", "-b", "127.0.0.1:0"], "'myapp:create_app('"),
    (["myapp:app.attr", "-b", "127.0.0.1:0"], "is not a name or a call"),
])
def test_missing_or_malformed_app_spec_fails_before_starting(argv, fragment):
    result = forkserver_cli(*argv)
    assert result.returncode == EXIT_APP_LOAD
    assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert result.stderr.startswith("forkserver: error: ")  # the master never started, so it never logged


def test_no_app_is_a_config_error():
    """Nothing to serve is a configuration problem (78), as a process supervisor should see it."""
    result = forkserver_cli("-b", "127.0.0.1:0")
    assert result.returncode == EXIT_CONFIG
    assert result.stderr == ("forkserver: error: no app given: pass MODULE:CALLABLE, or set 'app' in the "
                             "config file (wsgi_app in a gunicorn config file)\n")
