"""gunicorn's command lines, config files and environment, served with only the first word changed.

Each command line and gunicorn.conf.py below is written as real projects
write them (Procfiles, Dockerfiles, start scripts); each is started for real
on loopback, must answer a request, and is stopped.  ``{fd}`` stands for the
test's listening socket and ``{tmp}`` for the test's directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import APPS, READY_TIMEOUT, listening_socket, poll, raw_request, stop_process_tree

from forkserver.errors import EXIT_CONFIG

APP = "gunicorn_app:app"


def get(port: int, path: str = "/", headers: str = "") -> tuple[bytes, dict]:
    """GET ``path``; return the status line and the app's JSON answer."""
    answer = raw_request(port, f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n".encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body) if body.startswith(b"{") else {}


def fill(args: list[str], fd: int, tmp: Path) -> list[str]:
    return [arg.format(fd=f"fd://{fd}", tmp=tmp, apps=APPS) for arg in args]


# (command line after "gunicorn", log lines expected, check of the JSON answer)
COMMAND_LINES = [
    (["-w", "1", APP], [], None),
    ([APP, "--workers", "1"], [], None),
    (["--workers=1", APP], [], None),
    (["-w1", APP], [], None),
    (["-b", "{fd}", "-w", "1", APP], [], None),
    (["--bind={fd}", "--workers", "1", APP], [], None),
    (["-k", "sync", "-w", "1", APP], [], lambda a: a["multithread"] is False),
    (["-k", "gthread", "--threads", "4", "-w", "1", APP], [], lambda a: a["multithread"] is True),
    (["--worker-class", "gthread", "--threads=2", "-w", "1", APP], [], lambda a: a["multithread"]),
    (["--worker-class=gevent", "-w", "1", APP], ["worker_class gevent runs on forkserver's keep-alive loop "
                                                 "with 100 threads per worker"], lambda a: a["multithread"]),
    (["-k", "eventlet", "--worker-connections", "20", "-w", "1", APP], ["with 20 threads per worker"], None),
    (["-k", "gevent", "--threads", "8", "-w", "1", APP], ["8 threads per worker (from command line --threads)"],
     None),
    (["-k", "gunicorn.workers.ggevent.GeventWorker", "-w", "1", APP], ["worker_class gevent"], None),
    (["-k", "egg:gunicorn#gthread", "--threads", "2", "-w", "1", APP], [], lambda a: a["multithread"]),
    (["-k", "gunicorn.workers.sync.SyncWorker", "-w", "1", APP], [], None),
    (["--threads", "3", "-w", "1", APP], [], lambda a: a["multithread"]),
    (["--timeout", "120", "--graceful-timeout", "30", "-w", "1", APP], [], None),
    (["-t", "0", "-w", "1", APP], [], None),
    (["--keep-alive", "5", "-w", "1", APP], [], None),
    (["--log-level", "DEBUG", "-w", "1", APP], ["[DEBUG]"], None),
    (["--log-level=Warning", "-w", "1", APP], [], None),
    (["--access-logfile", "-", "--error-logfile", "-", "-w", "1", APP], [], None),
    (["--log-file", "-", "--access-logfile", "-", "-w", "1", APP], [], None),
    (["--log-file={tmp}/gunicorn.log", "-w", "1", APP], [], None),
    (["--access-logfile", "-", "--access-logformat", '%(h)s "%(r)s" %(s)s', "-w", "1", APP], [], None),
    (["--max-requests", "1000", "--max-requests-jitter", "50", "-w", "1", APP], [], None),
    (["--limit-request-line", "0", "--limit-request-fields", "0", "--limit-request-field_size", "0",
      "-w", "1", APP], [], None),
    (["--limit-request-field_size", "16380", "--limit-request-fields", "50", "-w", "1", APP], [], None),
    (["--preload", "-w", "1", APP], [], None),
    (["--chdir", "{apps}", "-w", "1", APP], [], None),
    (["--pythonpath", "{apps}", "-w", "1", APP], [], None),
    (["-p", "{tmp}/app.pid", "-w", "1", APP], [], None),
    (["--pid={tmp}/other.pid", "-w", "1", APP], [], None),
    (["-n", "shop", "-w", "1", APP], [], None),
    (["-e", "GC_A=1", "--env", "GC_B=x,y=z", "-w", "1", APP], [],
     lambda a: a["env"] == {"GC_A": "1", "GC_B": "x,y=z"}),
    (["-m", "007", "-w", "1", APP], [], None),
    (["--umask", "0o22", "-w", "1", APP], [], None),
    (["--forwarded-allow-ips", "*", "-w", "1", APP], [], None),
    (["--forwarded-allow-ips=127.0.0.1,10.0.0.0/8", "-w", "1", APP], [], None),
    (["--proxy-allow-from", "*", "-w", "1", APP], ["proxy_allow_ips accepted but not needed"], None),
    (["--worker-tmp-dir", "/dev/shm", "-w", "1", APP],
     ["worker_tmp_dir accepted but not needed: the worker heartbeat is kept in shared memory"], None),
    (["--no-sendfile", "-w", "1", APP], ["sendfile accepted but not needed"], None),
    (["--reuse-port", "-w", "1", APP], [], None),
    (["--backlog", "512", "--worker-connections", "500", "-w", "1", APP], [], None),
    (["--capture-output", "--enable-stdio-inheritance", "-w", "1", APP], [], None),
    (["-R", "-w", "1", APP], [], None),
    (["--statsd-host", "127.0.0.1:9", "--statsd-prefix", "shop", "-w", "1", APP], [], None),
    (["--log-syslog", "--log-syslog-prefix", "shop", "-w", "1", APP], ["syslog output is not offered"], None),
    (["--initgroups", "--spew", "-w", "1", APP], ["initgroups accepted but not needed",
                                                 "spew accepted but not needed"], None),
    (["--http-protocols", "h1", "--forwarder-headers", "SCRIPT_NAME,PATH_INFO", "-w", "1", APP], [], None),
    (["-u", str(os.getuid()), "-g", str(os.getgid()), "-w", "1", APP], [], None),
    (["--reload", "-w", "1", APP], [], None),
    ([APP, "--workers", "1", "--bind", "{fd}", "--timeout", "90", "--keep-alive", "10", "--log-level", "INFO",
      "--access-logfile", "-", "--error-logfile", "-", "--capture-output", "-k", "gthread", "--threads", "4"],
     [], lambda a: a["multithread"]),
]


def assert_serves(srv, check, expected_log: list[str]) -> dict:
    """The server answers 200, the answer passes ``check``, and the log comes to say each line."""
    status, answer = get(srv.port)
    assert status == b"HTTP/1.1 200 OK"
    if check is not None:
        assert check(answer), answer
    for line in expected_log:
        poll(lambda: line in srv.log(), what=f"{line!r} in the log")
    return answer


@pytest.mark.parametrize("args, expected_log, check", COMMAND_LINES,
                         ids=[" ".join(line[0]) for line in COMMAND_LINES])
def test_gunicorn_command_line_serves(server, tmp_path, args, expected_log, check):
    sock = listening_socket()
    srv = server(*fill(args, sock.fileno(), tmp_path), sock=sock)
    assert_serves(srv, check, expected_log)


def test_pid_file_and_access_log_of_gunicorn_spellings(server, tmp_path):
    srv = server("-p", str(tmp_path / "app.pid"), "--log-file", str(tmp_path / "error.log"),
                 "--access-logfile", str(tmp_path / "access.log"), "-w", "1", APP)
    get(srv.port, "/hello")
    assert (tmp_path / "app.pid").read_text().strip() == str(srv.pid)
    poll(lambda: "GET /hello" in (tmp_path / "access.log").read_text(), what="access line")
    poll(lambda: "listening at" in (tmp_path / "error.log").read_text(), what="error log in --log-file")


def test_gunicorn_cmd_args_alone_configure_the_server(server):
    srv = server(APP, env={"GUNICORN_CMD_ARGS": "--workers 1 -k gthread --threads 3 --log-level DEBUG"},
                 workers=1)
    assert get(srv.port)[1]["multithread"] is True
    assert "[DEBUG]" in srv.log()
    poll(lambda: "GUNICORN_CMD_ARGS read as command-line options: --workers 1 -k gthread --threads 3 "
         "--log-level DEBUG" in srv.log(), what="the start-up log to say GUNICORN_CMD_ARGS was used")


# -- gunicorn.conf.py files -------------------------------------------------------------

CONF_FILES = {
    "django_style": ("""
        import multiprocessing
        import os

        bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
        workers = int(os.environ.get("GUNICORN_WORKERS", multiprocessing.cpu_count() * 2 + 1))
        timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
        keepalive = 5
        errorlog = "-"
        accesslog = "-"
        loglevel = os.environ.get("LOG_LEVEL", "info")
        wsgi_app = "gunicorn_app:application"
        """, {"GUNICORN_WORKERS": "1", "LOG_LEVEL": "WARNING"}, [], None),
    "flask_gthread": ("""
        bind = "{fd}"
        workers = 1
        worker_class = "gthread"
        threads = 4
        accesslog = "-"
        errorlog = "-"
        capture_output = True
        """, {}, [], lambda a: a["multithread"]),
    "env_lookups_strings": ("""
        import os
        workers = os.getenv("WEB_WORKERS", "2")
        timeout = os.getenv("TIMEOUT", "60")
        max_requests = os.getenv("MAX_REQUESTS", "1200")
        max_requests_jitter = os.getenv("MAX_REQUESTS_JITTER", "100")
        preload_app = os.getenv("PRELOAD", "true") == "true"
        """, {"WEB_WORKERS": "1"}, [], None),
    "raw_env": ("""
        raw_env = ["GC_DJANGO_SETTINGS_MODULE=site.settings.production", "GC_EMPTY="]
        workers = 1
        """, {}, [], lambda a: a["env"] == {"GC_DJANGO_SETTINGS_MODULE": "site.settings.production",
                                            "GC_EMPTY": ""}),
    "logconfig_dict": ("""
        workers = 1
        logconfig_dict = {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(message)s"}},
            "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
            "root": {"level": "INFO", "handlers": ["console"]},
            # gunicorn lays this dict over its defaults one key at a time: with
            # "handlers" given, its default loggers' "error_console" is gone, so
            # a working file names the loggers too.
            "loggers": {"gunicorn.error": {"level": "INFO", "handlers": ["console"], "propagate": False},
                        "gunicorn.access": {"level": "INFO", "handlers": ["console"], "propagate": False}},
        }
        """, {}, [], None),
    "hooks_that_log": ("""
        workers = 1

        def on_starting(server):
            server.log.info("Starting %s", server.proc_name)

        def when_ready(server):
            server.log.info("Server is ready. Spawning workers")

        def post_fork(server, worker):
            server.log.info("Worker spawned (pid: %s)", worker.pid)

        def pre_exec(server):
            server.log.info("Forked child, re-executing.")

        def worker_int(worker):
            worker.log.info("worker received INT or QUIT signal")
        """, {}, ["Server is ready. Spawning workers", "Worker spawned (pid: "], None),
    "prometheus_multiproc": ("""
        import os
        workers = 1

        def child_exit(server, worker):
            with open(os.path.join(os.environ["MARKS_DIR"], str(worker.pid)), "w"):
                pass

        def worker_exit(server, worker):
            pass
        """, {}, [], None),
    "gevent_connections": ("""
        worker_class = "gevent"
        worker_connections = 40
        workers = 1
        """, {}, ["with 40 threads per worker (from worker_connections 40"], lambda a: a["multithread"]),
    "proxy_and_limits": ("""
        workers = 1
        keepalive = 75
        graceful_timeout = 30
        limit_request_line = 0
        limit_request_field_size = 0
        limit_request_fields = 200
        forwarded_allow_ips = "*"
        secure_scheme_headers = {"X-FORWARDED-PROTO": "https"}
        """, {}, [], None),
    "unneeded_and_typo": ("""
        import os
        BASE_DIR = os.path.dirname(os.path.abspath(__file__))
        workers = 1
        worker_tmp_dir = "/dev/shm"
        tmp_upload_dir = None
        daemon = False
        pidfile = None
        umask = 0o22
        user = None
        group = None
        worker = 3
        """, {}, ["'worker' is not a setting and is ignored (did you mean 'workers'?)",
                  "worker_tmp_dir accepted but not needed"], None),
    "heroku_port": ("""
        import os
        bind = "127.0.0.1:" + os.environ.get("PORT", "8000")
        workers = int(os.environ.get("WEB_CONCURRENCY", 2))
        """, {"WEB_CONCURRENCY": "1"}, [], None),
    "dotted_hook_and_forkserver_names": ("""
        workers = 1
        health_path = "/healthz"
        when_ready = "gunicorn_hook_module.ready"
        """, {}, ["ready via a dotted name"], None),
}


def write_conf(directory: Path, text: str, fd: int, name: str = "gunicorn.conf.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).replace("{fd}", f"fd://{fd}"))
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module", autouse=True)
def dotted_hook_module():
    """gunicorn also takes a hook as 'module.function' text; this module is that function."""
    path = APPS / "gunicorn_hook_module.py"
    path.write_text("def ready(server):\n    server.log.info('ready via a dotted name')\n")
    yield
    path.unlink()


@pytest.mark.parametrize("name", sorted(CONF_FILES))
def test_gunicorn_conf_py_serves(server, tmp_path, name):
    text, env, expected_log, check = CONF_FILES[name]
    sock = listening_socket()
    marks = tmp_path / "marks"
    marks.mkdir()
    path = write_conf(tmp_path, text, sock.fileno())
    args = ["-c", str(path)] + ([] if "wsgi_app" in text else [APP])
    srv = server(*args, env={**env, "MARKS_DIR": str(marks)}, sock=sock)
    answer = assert_serves(srv, check, expected_log)
    if name == "prometheus_multiproc":
        worker = answer["pid"]
        srv.stop()
        assert (marks / str(worker)).exists(), "child_exit did not run for the worker"


@contextmanager
def serving_without_harness_bind(args: list[str], port: int, cwd: Path, env: dict[str, str]) -> Iterator[Path]:
    """Start forkserver with no -b of the harness (the bind must come from PORT or a file); yield its log."""
    log = cwd / "server.log"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    full_env.update(env)
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "forkserver", "--pythonpath", str(APPS), *args],
                                stdout=err, stderr=err, env=full_env, cwd=cwd)
    try:
        poll(lambda: proc.poll() is None and _answers(port) or _exited(proc, log), READY_TIMEOUT,
             what="server to answer")
        yield log
    finally:
        stop_process_tree(proc, signal.SIGTERM)


def _answers(port: int) -> bool:
    try:
        return get(port)[0] == b"HTTP/1.1 200 OK"
    except OSError:
        return False


def _exited(proc: subprocess.Popen, log: Path) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"server exited with {proc.returncode}: {log.read_text()}")
    return False


def test_gunicorn_conf_py_found_in_the_working_directory_as_gunicorn_does(tmp_path):
    port = free_port()
    write_conf(tmp_path, f'bind = "127.0.0.1:{port}"\nworkers = 1\nthreads = 2\n', 0)
    with serving_without_harness_bind([APP], port, tmp_path, {}) as log:
        assert get(port)[1]["multithread"] is True
        # A notice of the settings: logged once the master has read the first worker's ready line.
        poll(lambda: "gunicorn.conf.py: loaded as gunicorn does when no -c is given" in log.read_text(),
             what="the config file's notice in the log")


# -- hooks ------------------------------------------------------------------------------

def hook_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_hook_fires_at_its_moment_with_gunicorns_arguments(server, tmp_path):
    record = tmp_path / "hooks.jsonl"
    conf = tmp_path / "hooks.conf.py"
    shutil.copy(APPS / "gunicorn_hooks.conf.py", conf)
    conf.chmod(0o644)
    srv = server("-c", str(conf), APP, env={"GC_HOOK_LOG": str(record)}, workers=1)
    master = srv.pid
    status, answer = get(srv.port, "/orders?page=2", headers="X-Request-Id: abc\r\n")
    assert status == b"HTTP/1.1 200 OK"
    worker = answer["pid"]
    poll(lambda: any(h["hook"] == "post_request" for h in hook_lines(record)), what="post_request")
    srv.signal(signal.SIGTTIN)
    poll(lambda: any(h["hook"] == "nworkers_changed" and h["new"] == 2 for h in hook_lines(record)),
         what="nworkers_changed on TTIN")
    srv.wait_ready(workers=2)
    srv.signal(signal.SIGHUP)
    poll(lambda: any(h["hook"] == "on_reload" for h in hook_lines(record)), what="on_reload")
    poll(lambda: any(h["hook"] == "child_exit" and h["worker_pid"] == worker for h in hook_lines(record)),
         what="child_exit of the first worker after the reload retired it")
    srv.signal(signal.SIGINT)  # a fast stop: workers run worker_int
    assert srv.wait_exit() == 0
    hooks = hook_lines(record)
    by_name: dict[str, list[dict]] = {}
    for line in hooks:
        by_name.setdefault(line["hook"], []).append(line)
    names = [h["hook"] for h in hooks]
    assert names[:2] == ["nworkers_changed", "on_starting"]
    assert by_name["nworkers_changed"][0] == {"hook": "nworkers_changed", "os_pid": master, "server_pid": master,
                                              "new": 1, "old": None}
    starting = by_name["on_starting"][0]
    assert (starting["workers"], starting["worker_class"], starting["keepalive"]) == (1, "gthread", 5.0)
    first_fork = by_name["pre_fork"][0]
    assert first_fork["server_pid"] == master and first_fork["worker_pid"] == "[booting]" and first_fork["age"] == 1
    post_fork = next(h for h in by_name["post_fork"] if h["worker_pid"] == worker)
    assert post_fork["os_pid"] == worker and post_fork["server_pid"] == master and post_fork["ppid"] == master
    assert post_fork["age"] == 1
    assert any(h["worker_pid"] == worker and h["os_pid"] == worker for h in by_name["post_worker_init"])
    assert names.index("post_worker_init") < names.index("when_ready")
    pre = next(h for h in by_name["pre_request"] if h["path"] == "/orders")  # not the harness's ready probe
    assert (pre["worker_pid"], pre["method"], pre["path"], pre["query"]) == (worker, "GET", "/orders", "page=2")
    assert pre["headers"]["X-REQUEST-ID"] == "abc"
    post = next(h for h in by_name["post_request"] if h["path"] == "/orders")
    assert (post["status"], post["status_code"], post["environ_path"]) == ("200 OK", 200, "/orders")
    assert hooks.index(pre) < hooks.index(post)
    assert [h["new"] for h in by_name["nworkers_changed"]][:2] == [1, 2]
    assert by_name["on_reload"][0]["server_pid"] == master
    assert any(h["worker_pid"] == worker and h["os_pid"] == worker for h in by_name["worker_exit"])
    assert all(h["server_pid"] == master and h["os_pid"] == master for h in by_name["child_exit"])
    assert by_name["worker_int"] and all(h["os_pid"] != master for h in by_name["worker_int"])
    assert names[-1] == "on_exit" and by_name["on_exit"][0]["os_pid"] == master
    assert max(h["age"] for h in by_name["pre_fork"]) >= 3  # TTIN and the reload forked more
    log = srv.log()
    assert "Server is ready. Spawning workers" in log and f"Worker spawned (pid: {worker})" in log


def test_worker_abort_runs_when_the_master_aborts_a_hung_worker(server, tmp_path):
    record = tmp_path / "hooks.jsonl"
    conf = tmp_path / "abort.conf.py"
    conf.write_text(textwrap.dedent("""
        import json, os
        workers = 1
        timeout = 1

        def worker_abort(worker):
            worker.log.info("worker received SIGABRT signal")
            with open(os.environ["GC_HOOK_LOG"], "a") as fh:
                fh.write(json.dumps({"pid": worker.pid, "os_pid": os.getpid()}) + "\\n")
        """))
    conf.chmod(0o644)
    srv = server("-c", str(conf), "basic:slow", env={"GC_HOOK_LOG": str(record)}, ready_path="/?0")
    hung = socket.create_connection(("127.0.0.1", srv.port))
    hung.sendall(b"GET /?30 HTTP/1.1\r\nHost: t\r\n\r\n")
    try:
        lines = poll(lambda: record.exists() and record.read_text().splitlines(), timeout=20, what="worker_abort")
    finally:
        hung.close()
    aborted = json.loads(lines[0])
    assert aborted["pid"] == aborted["os_pid"] != srv.pid
    poll(lambda: "worker received SIGABRT signal" in srv.log(), what="the hook's log line")
    poll(lambda: "Thread" in srv.log() or "Current thread" in srv.log(), what="stacks still dumped")


def test_pre_exec_runs_in_the_old_master_before_a_usr2_upgrade(server, tmp_path):
    record = tmp_path / "pre_exec.txt"
    conf = write_conf(tmp_path, """
        import os
        workers = 1

        def pre_exec(server):
            server.log.info("Forked child, re-executing.")
            with open(os.environ["PRE_EXEC_LOG"], "a") as fh:
                fh.write(f"{server.pid} {os.getpid()}\\n")
        """, 0)
    srv = server("-c", str(conf), APP, env={"PRE_EXEC_LOG": str(record)})
    srv.signal(signal.SIGUSR2)
    found = poll(lambda: re.search(r"upgrading: new master pid=(\d+)", srv.log()), what="the upgrade")
    new_master = int(found.group(1))  # the old master's child: the fixture's stop ends it by PID too
    assert record.read_text().split() == [str(srv.pid), str(srv.pid)]
    assert "Forked child, re-executing." in srv.log()
    poll(lambda: f"master started pid={new_master}" in srv.log(), what="the new master to serve")


def test_hook_with_the_wrong_arguments_is_refused_before_start(tmp_path):
    conf = write_conf(tmp_path, "def post_fork(worker):\n    pass\n", 0)
    result = run_forkserver("-c", str(conf), APP)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr == (f"forkserver: error: {conf}: post_fork must take 2 arguments (server, worker), "
                             "as gunicorn calls it; it takes 1\n")


# -- environment: GUNICORN_CMD_ARGS, PORT, WEB_CONCURRENCY ------------------------------

def run_forkserver(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                   timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run a forkserver command that must end by itself; if it serves instead, end it and its workers."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("FORKSERVER_") and k not in ("PORT", "WEB_CONCURRENCY", "GUNICORN_CMD_ARGS")}
    full_env.update(env or {})
    command = [sys.executable, "-m", "forkserver", "--pythonpath", str(APPS), *args]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
                            cwd=cwd or APPS)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_tree(proc, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_port_binds_all_interfaces_and_says_so_and_web_concurrency_sets_workers(tmp_path):
    port = free_port()
    with serving_without_harness_bind([APP], port, tmp_path, {"PORT": str(port), "WEB_CONCURRENCY": "3"}) as log:
        poll(lambda: "master started" in log.read_text(), what="start-up log")
        text = log.read_text()
        assert f"binding all interfaces, 0.0.0.0:{port}, because PORT is set" in text
        assert "workers: 3 from WEB_CONCURRENCY" in text
        assert f"listening at http://0.0.0.0:{port}" in text
        assert "master started pid=" in text and " workers=3 " in text


def test_print_config_shows_each_source_with_gunicorns_precedence(tmp_path):
    """Defaults (changed by PORT, WEB_CONCURRENCY) < gunicorn.conf.py < GUNICORN_CMD_ARGS < FORKSERVER_* < CLI."""
    conf = write_conf(tmp_path, """
        bind = "127.0.0.1:7001"
        workers = 2
        threads = 2
        timeout = 10
        keepalive = 3
        graceful_timeout = 11
        """, 0)
    env = {"PORT": "7000", "WEB_CONCURRENCY": "5", "GUNICORN_CMD_ARGS": "--threads 3 --timeout 20 --keep-alive 4",
           "FORKSERVER_TIMEOUT": "30"}
    result = run_forkserver("-c", str(conf), "--keep-alive", "6", APP, "--print-config", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 'bind = ["127.0.0.1:7001"]  # from ' + str(conf) in lines  # the file beats PORT
    assert "workers = 2  # from " + str(conf) in lines  # and WEB_CONCURRENCY
    assert "threads = 3  # from environment GUNICORN_CMD_ARGS --threads" in lines
    assert "timeout = 30.0  # from environment FORKSERVER_TIMEOUT" in lines
    assert "keepalive = 6.0  # from command line --keep-alive" in lines
    assert "graceful_timeout = 11.0  # from " + str(conf) in lines
    assert "# backlog = 2048" in lines
    # What it prints is a config file forkserver reads back to the same settings.
    toml = tmp_path / "converted.toml"
    toml.write_text(result.stdout)
    again = run_forkserver("-c", str(toml), "--print-config")
    assert again.returncode == 0, again.stderr
    assert "threads = 3  # from " + str(toml) in again.stdout.splitlines()


def test_port_and_web_concurrency_apply_only_as_defaults(tmp_path):
    env = {"PORT": "7000", "WEB_CONCURRENCY": "4"}
    alone = run_forkserver(APP, "--print-config", env=env).stdout.splitlines()
    assert 'bind = ["0.0.0.0:7000"]  # from environment PORT' in alone
    assert "workers = 4  # from environment WEB_CONCURRENCY" in alone
    overridden = run_forkserver(APP, "-b", "127.0.0.1:7002", "--print-config",
                                env={**env, "GUNICORN_CMD_ARGS": "-w 2"}).stdout.splitlines()
    assert 'bind = ["127.0.0.1:7002"]  # from command line --bind' in overridden
    assert "workers = 2  # from environment GUNICORN_CMD_ARGS --workers" in overridden
    bad = run_forkserver(APP, "--print-config", env={"WEB_CONCURRENCY": "many"})
    assert bad.returncode == EXIT_CONFIG
    assert bad.stderr == "forkserver: error: environment WEB_CONCURRENCY: workers must be an integer or auto, got 'many'\n"


def test_config_file_named_in_gunicorn_cmd_args(tmp_path):
    conf = write_conf(tmp_path, "workers = 7\n", 0)
    result = run_forkserver(APP, "--print-config", env={"GUNICORN_CMD_ARGS": f"-c {conf}"})
    assert "workers = 7  # from " + str(conf) in result.stdout.splitlines(), result.stderr


# -- what is refused, all at once ---------------------------------------------------------

def test_every_bad_option_is_reported_at_once_with_hints_for_a_gunicorn_user(tmp_path):
    port = free_port()
    result = run_forkserver(
        "-b", f"127.0.0.1:{port}", APP, "--workrs", "3", "--worker-class", "tornado", "--cert-reqs",
        "sometimes", "--timeout", "soon", "--log-level", "loud", "--bogus-flag", "--paste", "x.ini",
        env={"GUNICORN_CMD_ARGS": "--threads=0", "FORKSERVER_WORKERZ": "2"})
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert all(line.startswith("forkserver: error: ") for line in lines)
    expected = [
        "command line: unknown option '--workrs' (did you mean '--workers'?)",
        "command line: unknown option '--bogus-flag' (forkserver --help lists the options)",
        "environment FORKSERVER_WORKERZ: unknown setting 'workerz' (did you mean 'workers'?)",
        "command line --cert-reqs: cert_reqs must be one of none, optional, required, got 'sometimes'",
        "command line --paste: paste is not supported: PasteDeploy .ini apps are not loaded",
        "environment GUNICORN_CMD_ARGS --threads: threads must be at least 1, got 0",
        "command line --worker-class: worker_class 'tornado' is not served: it runs Tornado apps",
        "command line --timeout: timeout must be a number, got 'soon'",
        "command line --log-level: log_level must be one of debug, info, warning, error, critical, got 'loud'",
    ]
    for fragment in expected:
        assert sum(fragment in line for line in lines) == 1, f"{fragment!r} not once in {lines}"
    assert len(lines) == len(expected), lines
    with pytest.raises(ConnectionRefusedError):  # nothing was bound
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize("worker_class, why", [
    ("tornado", "it runs Tornado apps, which are not WSGI"),
    ("uvicorn.workers.UvicornWorker", "it runs ASGI apps, which forkserver does not serve"),
    ("uvicorn_worker.UvicornWorker", "it runs ASGI apps"),
    ("geventwebsocket.gunicorn.workers.GeventWebSocketWorker", "WebSocket apps are not served by forkserver"),
    ("myproject.workers.CustomWorker", "a custom worker class is gunicorn code"),
])
def test_worker_classes_that_cannot_serve_exit_78_with_one_line(tmp_path, worker_class, why):
    port = free_port()
    result = run_forkserver("-k", worker_class, "-b", f"127.0.0.1:{port}", APP)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.startswith(f"forkserver: error: command line --worker-class: worker_class "
                                    f"{worker_class!r} is not served: {why}")
    assert result.stderr.endswith("; use sync, or gthread with --threads N, for a WSGI app\n")
    assert result.stderr.count("\n") == 1


def test_check_config_imports_hooks_given_as_gunicorns_dotted_text(tmp_path):
    conf = write_conf(tmp_path, 'when_ready = "no_such_hook_module.ready"\n', 0)
    result = run_forkserver("-c", str(conf), APP, "--check-config")
    assert result.returncode == EXIT_CONFIG
    assert result.stderr == ("forkserver: error: when_ready: cannot load 'no_such_hook_module:ready': "
                             "ModuleNotFoundError: No module named 'no_such_hook_module'\n")


def test_check_config_accepts_gunicorn_lines(tmp_path):
    result = run_forkserver("--check-config", "-k", "gevent", "--keep-alive", "2", "-w", "2", APP)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout


# -- the config file is code the master runs ---------------------------------------------

def test_config_file_others_can_write_is_refused(tmp_path):
    conf = write_conf(tmp_path, "workers = 1\n", 0)
    conf.chmod(0o664)
    result = run_forkserver("-c", str(conf), APP)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr == (f"forkserver: error: {conf}: refusing to run this config file: it is writable by "
                             "group (mode 664); make it owned by this user or root and not writable by others "
                             "(chmod go-w)\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_config_file_owned_by_another_user_is_refused(tmp_path):
    conf = write_conf(tmp_path, "workers = 1\n", 0)
    os.chown(conf, 65534, 65534)
    result = run_forkserver("-c", str(conf), APP)
    assert result.returncode == EXIT_CONFIG
    assert "it is owned by uid 65534, not by this user (0) or root" in result.stderr
    assert result.stderr.count("\n") == 1


def test_unsafe_gunicorn_conf_py_in_the_working_directory_is_skipped_and_said(server, tmp_path):
    conf = write_conf(tmp_path, "raise SystemExit('this must never run')\n", 0)
    conf.chmod(0o666)
    srv = server("-w", "1", APP, cwd=tmp_path)
    assert get(srv.port)[0] == b"HTTP/1.1 200 OK"
    poll(lambda: "gunicorn.conf.py: not loaded, although gunicorn would load it: it is writable by group and "
         "others (mode 666)" in srv.log(), what="the skip said")


def test_config_file_that_raises_is_one_line_with_its_line_number(tmp_path):
    conf = write_conf(tmp_path, "import os\nworkers = int(os.environ['NOT_SET_ANYWHERE'])\n", 0)
    result = run_forkserver("-c", str(conf), APP)
    assert result.returncode == EXIT_CONFIG
    assert result.stderr == f"forkserver: error: {conf}:2: config file raised KeyError: 'NOT_SET_ANYWHERE'\n"
