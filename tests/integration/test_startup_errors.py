"""A server that cannot start says why in one line, exits with a meaningful code, and leaves nothing behind.

Each case runs a real ``python -m forkserver`` in a new session (so its
process group holds the master and every worker it forks) and checks:

* it exits non-zero before a deadline (a hang detector, not a speed test);
* stderr is exactly one non-empty line naming the problem, with no traceback;
* the exit code says what kind of problem: 78 config, 5 bind, 4 app import;
* no process of its group is left once it has exited.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from harness import APPS, poll

from forkserver.errors import EXIT_APP_LOAD, EXIT_BIND, EXIT_CONFIG, EXIT_WORKER_BOOT

EXIT_DEADLINE = 10.0  # generous: the machine is shared; a hung start never gets there


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    pid: int

    @property
    def error_line(self) -> str:
        """The one stderr line, after checking there is exactly one and no traceback."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.stderr}"
        assert "Traceback" not in self.stderr
        return lines[0]


class Runner:
    """Starts forkserver processes, each in its own process group, and reaps them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.groups: list[int] = []

    def __call__(self, *args: str, env: dict[str, str] | None = None, pythonpath: bool = True) -> Outcome:
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
        full_env.update(env or {})
        command = [sys.executable, "-m", "forkserver", *(["--pythonpath", str(APPS)] if pythonpath else []), *args]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=self.workdir, env=full_env, start_new_session=True)
        self.groups.append(proc.pid)  # the session's process group id is the master's PID
        try:
            stdout, stderr = proc.communicate(timeout=EXIT_DEADLINE)
        except subprocess.TimeoutExpired:
            self.kill_group(proc.pid)
            stdout, stderr = proc.communicate()
            pytest.fail(f"forkserver {' '.join(args)} still running after {EXIT_DEADLINE}s; stderr:\n{stderr}")
        poll(lambda: not self.group_alive(proc.pid), timeout=EXIT_DEADLINE,
             what=f"every process of the group of {proc.pid} to exit")
        return Outcome(proc.returncode, stdout, stderr, proc.pid)

    @staticmethod
    def group_alive(pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True

    @staticmethod
    def kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cleanup(self) -> None:
        for pgid in self.groups:
            self.kill_group(pgid)


@pytest.fixture
def forkserver(tmp_path: Path) -> Iterator[Runner]:
    runner = Runner(tmp_path)
    yield runner
    runner.cleanup()


def assert_fails(outcome: Outcome, code: int, *fragments: str) -> None:
    assert outcome.code == code, f"exit code {outcome.code}, expected {code}; stderr:\n{outcome.stderr}"
    line = outcome.error_line
    assert line.startswith("forkserver: error: "), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"


@pytest.fixture
def held_port() -> Iterator[socket.socket]:
    """A loopback port bound by this test but not listening: any bind() on it fails."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # no SO_REUSEADDR, so it blocks every bind
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def probe_app(directory: Path, *, raises: bool = False) -> dict[str, str]:
    """Write an app module that records the PID of every process importing it; return the env to use it."""
    (directory / "probe_app.py").write_text(
        "import os\n"
        "with open(os.environ['PROBE_LOG'], 'a') as fh:\n"
        "    fh.write(f'{os.getpid()}\\n')\n"
        + ("raise RuntimeError('probe refuses to load')\n" if raises else "")
        + "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', '0')])\n"
        "    return [b'']\n"
    )
    return {"PROBE_LOG": str(directory / "probe.log")}


def importers(directory: Path) -> list[int]:
    log = directory / "probe.log"
    return [int(line) for line in log.read_text().split()] if log.exists() else []


# -- settings: exit 78 before anything starts ------------------------------------------


def test_unknown_toml_key(forkserver, tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text('app = "basic:hello"\nbind = "127.0.0.1:0"\nworkres = 2\n')
    assert_fails(forkserver("-c", str(conf)), EXIT_CONFIG, str(conf), "workres", "did you mean 'workers'")


@pytest.mark.parametrize("args, env, fragments", [
    (["-w", "two"], {}, ["command line --workers", "an integer", "'two'"]),
    ([], {"FORKSERVER_PRELOAD": "maybe"}, ["FORKSERVER_PRELOAD", "true or false"]),
    ([], {"FORKSERVER_TIMEOUT": "soon"}, ["FORKSERVER_TIMEOUT", "a number"]),
], ids=["cli-int", "env-bool", "env-float"])
def test_wrong_type(forkserver, args, env, fragments):
    assert_fails(forkserver("basic:hello", "-b", "127.0.0.1:0", *args, env=env), EXIT_CONFIG, *fragments)


def test_wrong_type_in_toml(forkserver, tmp_path):
    conf = tmp_path / "bad.toml"
    conf.write_text('app = "basic:hello"\nworkers = "2"\n')
    assert_fails(forkserver("-c", str(conf)), EXIT_CONFIG, str(conf), "workers", "an integer")


@pytest.mark.parametrize("args, env, fragments", [
    (["-w", "0"], {}, ["command line --workers", "at least 1"]),
    ([], {"FORKSERVER_TIMEOUT": "-1"}, ["FORKSERVER_TIMEOUT", "at least 0"]),
    (["--log-level", "loud"], {}, ["--log-level", "one of debug"]),
], ids=["workers-0", "negative-timeout", "log-level"])
def test_out_of_range(forkserver, args, env, fragments):
    assert_fails(forkserver("basic:hello", "-b", "127.0.0.1:0", *args, env=env), EXIT_CONFIG, *fragments)


def test_missing_config_file(forkserver, tmp_path):
    missing = str(tmp_path / "missing.toml")
    assert_fails(forkserver("-c", missing), EXIT_CONFIG, missing, "not found")


# -- addresses: exit 5, and the master forks nothing ---------------------------------


def test_address_in_use(forkserver):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        assert_fails(forkserver("basic:hello", "-b", address), EXIT_BIND, address, "address already in use")


def test_second_address_in_use_releases_the_first(forkserver, held_port, tmp_path):
    first = tmp_path / "first.sock"
    taken = "127.0.0.1:%d" % held_port.getsockname()[1]
    outcome = forkserver("basic:hello", "-b", f"unix:{first}", "-b", taken)
    assert_fails(outcome, EXIT_BIND, taken)
    assert not first.exists(), "the socket file bound before the failure was left behind"


@pytest.mark.parametrize("address, fragment", [
    ("127.0.0.1:http", "port must be a number"),
    ("127.0.0.1:70000", "between 0 and 65535"),
    ("[::1:8000", "expected [IPV6]:PORT"),
    ("fd://three", "fd:// needs a descriptor number"),
    ("unix:", "unix: needs a path"),
])
def test_bad_address_format(forkserver, address, fragment):
    assert_fails(forkserver("basic:hello", "-b", address), EXIT_BIND, repr(address), fragment)


def test_unix_socket_in_missing_directory(forkserver, tmp_path):
    path = tmp_path / "no" / "such" / "dir" / "app.sock"
    assert_fails(forkserver("basic:hello", "-b", f"unix:{path}"), EXIT_BIND, str(path), "does not exist")


# -- the app: workers fail to import it, the master exits 4 with one line ---------------

APP_ERRORS = [
    ("no_such_module:app", ["no module named 'no_such_module'"]),
    ("bad_import", ["'bad_import'", "RuntimeError: database not configured", "bad_import.py:3"]),
    ("basic:no_such_app", ["module 'basic' has no attribute 'no_such_app'"]),
    ("factory:not_callable", ["'factory:not_callable'", "int object is not callable"]),
    ("factory:no_factory()", ["has no attribute 'no_factory'"]),
]
APP_IDS = ["missing-module", "raises-at-import", "missing-attribute", "not-callable", "missing-factory"]


@pytest.mark.parametrize("spec, fragments", APP_ERRORS, ids=APP_IDS)
def test_bad_app_fails_in_workers_and_master_exits_with_one_line(forkserver, spec, fragments):
    # --log-level warning: any error a worker or the master logs about the
    # failure would still show; the default level is checked below.
    outcome = forkserver(spec, "-b", "127.0.0.1:0", "-w", "2", "--log-level", "warning")
    assert_fails(outcome, EXIT_APP_LOAD, *fragments)


def test_bad_app_is_one_line_at_the_default_log_level(forkserver):
    assert_fails(forkserver("bad_import", "-b", "127.0.0.1:0", "-w", "2"), EXIT_APP_LOAD, "database not configured")


def test_bad_app_with_preload_fails_in_the_master(forkserver, tmp_path):
    env = probe_app(tmp_path, raises=True)
    outcome = forkserver("probe_app", "--pythonpath", str(tmp_path), "-b", "127.0.0.1:0", "--preload", env=env)
    assert_fails(outcome, EXIT_APP_LOAD, "probe refuses to load")
    assert importers(tmp_path) == [outcome.pid]


def test_bad_app_is_imported_by_each_worker_then_all_are_gone(forkserver, tmp_path):
    env = probe_app(tmp_path, raises=True)
    outcome = forkserver("probe_app", "--pythonpath", str(tmp_path), "-b", "127.0.0.1:0", "-w", "3",
                         "--log-level", "warning", env=env)
    assert_fails(outcome, EXIT_APP_LOAD, "probe refuses to load")
    workers = importers(tmp_path)
    assert workers and outcome.pid not in workers  # workers, not the master, imported it
    for pid in workers:  # the runner saw the group empty; say so per worker, too
        try:
            assert os.getpgid(pid) != outcome.pid, f"worker {pid} left behind"
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("spec, greeting", [
    ("factory:create_app()", "hello from a factory\n"),
    ("factory:create_app('hi')", "hi from a factory\n"),
    ("factory:create_app(greeting=\"hey\")", "hey from a factory\n"),
])
def test_factory_spec_serves(server, spec, greeting):
    srv = server(spec, "-w", "1")
    response = requests.get(srv.url + "/", timeout=10)
    assert response.status_code == 200
    assert response.text == greeting


# -- --check-config: validate and import, but bind nothing and fork nothing ---------------


def test_check_config_ok_binds_nothing_and_forks_nothing(forkserver, held_port, tmp_path):
    env = probe_app(tmp_path)
    address = "127.0.0.1:%d" % held_port.getsockname()[1]
    outcome = forkserver("probe_app", "--pythonpath", str(tmp_path), "-b", address, "-w", "4", "--check-config",
                         env=env)
    assert outcome.code == 0, outcome.stderr
    assert outcome.stderr == ""
    lines = outcome.stdout.splitlines()
    assert len(lines) == 1 and "OK" in lines[0] and "probe_app" in lines[0], outcome.stdout
    # Binding the held port would have failed (exit 5): it was not bound; and only the
    # master itself imported the app, so no worker was forked.
    assert importers(tmp_path) == [outcome.pid]
    held_port.listen()  # and nothing else listens on it now


def test_held_port_really_blocks_a_bind(forkserver, held_port):
    """The control for the test above: without --check-config the same command fails to bind."""
    address = "127.0.0.1:%d" % held_port.getsockname()[1]
    assert_fails(forkserver("basic:hello", "-b", address), EXIT_BIND, "address already in use")


def test_check_config_factory(forkserver):
    outcome = forkserver("factory:create_app()", "--check-config")
    assert outcome.code == 0, outcome.stderr
    assert "config OK" in outcome.stdout


@pytest.mark.parametrize("spec, fragments", APP_ERRORS, ids=APP_IDS)
def test_check_config_bad_app(forkserver, held_port, spec, fragments):
    address = "127.0.0.1:%d" % held_port.getsockname()[1]
    outcome = forkserver(spec, "-b", address, "--check-config")
    assert_fails(outcome, EXIT_APP_LOAD, *fragments)
    assert outcome.stdout == ""


def test_check_config_bad_setting(forkserver):
    assert_fails(forkserver("basic:hello", "-w", "0", "--check-config"), EXIT_CONFIG, "--workers")


def test_check_config_bad_address_format(forkserver):
    assert_fails(forkserver("basic:hello", "-b", "127.0.0.1:http", "--check-config"), EXIT_BIND,
                 "port must be a number")


def test_check_config_names_every_problem_a_start_refuses_on_and_writes_nothing(forkserver, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)  # anybody could plant a link in it, sticky bit missing
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    (tmp_path / "error.log").symlink_to(victim)
    settings = ["basic:hello", "-b", f"unix:{run}/fs.sock", "--pid", str(run / "fs.pid"),
                "--access-logfile", str(run / "access.log"), "--error-logfile", str(tmp_path / "error.log"),
                "--stats-bind", "0.0.0.0:0", "--user", "forkserver-no-such-user", "--static", "/s=no-such-dir"]
    checked = forkserver(*settings, "--check-config")
    assert checked.code == EXIT_CONFIG and checked.stdout == "" and "Traceback" not in checked.stderr, checked
    lines = [line.removeprefix("forkserver: error: ") for line in checked.stderr.splitlines()]
    for start in ("pid: ", "access_logfile: ", "bind: ", "error_logfile: ", "stats_bind '0.0.0.0:0' binds 0.0.0.0",
                  "user: no such user", "command line --static: static directory 'no-such-dir'"):
        assert [line for line in lines if line.startswith(start)], (start, lines)
    assert len(lines) == 7, lines
    # A real start refuses on the same lines, which the check therefore must not pass.
    started = forkserver(*settings)
    assert started.code == EXIT_CONFIG, started
    assert set(started.stderr.splitlines()) <= set(checked.stderr.splitlines()), (started.stderr, checked.stderr)
    assert list(run.iterdir()) == [] and victim.read_text() == "untouched\n"


@pytest.mark.parametrize("stats", [["--stats-bind", "127.0.0.1:0"], ["--stats-bind", "localhost:0"],
                                   ["--stats-bind", "0.0.0.0:0", "--stats-allow-ips", "10.0.0.0/8"]],
                         ids=["loopback", "localhost", "allowed"])
def test_check_config_passes_a_stats_endpoint_a_start_accepts(forkserver, stats):
    outcome = forkserver("basic:hello", *stats, "--check-config")
    assert outcome.code == 0 and "config OK" in outcome.stdout, outcome.stderr


# -- ASGI apps: refused at import, exit 4, one line ------------------------------------


@pytest.mark.parametrize("spec, shape", [
    ("asgi_apps:app", "a coroutine function"),
    ("asgi_apps:router", "Router object whose __call__ is a coroutine function"),
    ("asgi_apps:LegacyApp", "class LegacyApp, whose instances are called as coroutines"),
    ("asgi_apps:Handler", "it takes (scope, receive, send)"),
    ("asgi_apps:create_app()", "Router object"),
], ids=["async-def", "async-call-object", "asgi2-class", "awaitable-class", "factory"])
@pytest.mark.parametrize("mode", [["--check-config"], [], ["--preload"]], ids=["check", "start", "preload"])
def test_asgi_app_is_refused_with_one_line(forkserver, spec, shape, mode):
    outcome = forkserver(spec, "-b", "127.0.0.1:0", "-w", "2", *mode)
    assert_fails(outcome, EXIT_APP_LOAD, spec, "is an ASGI application", shape, "WSGI only", "uvicorn")


def test_a_class_taking_environ_and_start_response_is_still_served(server):
    srv = server("asgi_apps:WsgiClassApp")
    assert requests.get(srv.url).text == "class\n"


def test_a_boot_longer_than_timeout_is_not_killed_as_hung(server):
    """``timeout`` judges requests; an import that takes longer is a slow boot, not a hang."""
    srv = server("slow_boot:app", "-w", "1", "--timeout", "1", env={"SLOW_BOOT_SECONDS": "2.5"}, workers=1)
    response = requests.get(srv.url, timeout=10)
    assert response.status_code == 200 and response.text == "booted\n"
    assert "worker timeout" not in srv.log() and "boot timeout" not in srv.log(), srv.log()


def test_a_boot_past_boot_timeout_fails_the_start_with_the_stack_and_the_setting_named(forkserver):
    outcome = forkserver("slow_boot:app", "-b", "127.0.0.1:0", "-w", "1", "--timeout", "1", "--boot-timeout", "1",
                         env={"SLOW_BOOT_SECONDS": "60"})
    assert outcome.code == EXIT_WORKER_BOOT, f"exit code {outcome.code}; stderr:\n{outcome.stderr}"
    last = outcome.stderr.strip().splitlines()[-1]
    assert last.startswith("forkserver: error: ") and "boot_timeout" in last, last
    assert "slow_boot.py" in outcome.stderr, "the stack of the stuck import is dumped: " + outcome.stderr
