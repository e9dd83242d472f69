"""Lifecycle and signals on real processes, under load where it matters.

These extend test_supervision.py (which checks each signal on an idle
server) with what an operator relies on in production: reloads and upgrades
that lose no request while clients hammer the server, graceful stops that
answer everything already queued, hung and bloated workers found and
replaced, crash loops that back off, privilege dropping, daemon mode, and
every server hook called at its moment.

Client load is bounded (a few threads, a deadline and a request cap) and is
judged only by its failures, never by its speed.  Every process is stopped
by PID, even when a test fails; a daemonized or upgraded master, which the
harness does not track, is found through its PID file and stopped the same way.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import psutil
import pytest
import requests
from harness import APPS, listening_socket, poll, raw_request, read_all

from forkserver.errors import EXIT_WORKER_BOOT

NO_BYTECODE = {"PYTHONDONTWRITEBYTECODE": "1"}  # an app rewritten within a second must not come from a stale .pyc
READY = 20.0  # deadline for a generation or master to come up on a shared, loaded machine
REQUEST_TIMEOUT = (5, 20)


# -- a bounded client load ------------------------------------------------------


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a UNIX socket."""

    def __init__(self, path: str, timeout: float = 20.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def _peer_closed(sock: socket.socket) -> bool:
    """An idle keep-alive connection that is readable was closed by the server (urllib3 checks the same)."""
    return bool(select.select([sock], [], [], 0)[0])


Getter = Callable[[], tuple[int, dict]]


def tcp_client(url: str, *, keepalive: bool) -> tuple[Getter, Callable[[], None]]:
    """A requests client: one Session kept alive, or a fresh connection per request."""
    if keepalive:
        session = requests.Session()

        def get() -> tuple[int, dict]:
            response = session.get(url, timeout=REQUEST_TIMEOUT)
            return response.status_code, response.json() if response.status_code == 200 else {}
        return get, session.close

    def get_fresh() -> tuple[int, dict]:
        response = requests.get(url, headers={"Connection": "close"}, timeout=REQUEST_TIMEOUT)
        return response.status_code, response.json() if response.status_code == 200 else {}
    return get_fresh, lambda: None


def unix_client(path: str, target: str = "/", *, keepalive: bool) -> tuple[Getter, Callable[[], None]]:
    """The same two kinds of client, over a UNIX socket."""
    holder: list[UnixHTTPConnection] = []

    def get() -> tuple[int, dict]:
        if keepalive and holder and holder[0].sock is not None and _peer_closed(holder[0].sock):
            holder[0].close()
        if not keepalive or not holder:
            if holder:
                holder[0].close()
            holder[:] = [UnixHTTPConnection(path)]
        conn = holder[0]
        try:
            conn.request("GET", target, headers={} if keepalive else {"Connection": "close"})
            response = conn.getresponse()
            body = response.read()
        except Exception:
            conn.close()
            raise
        return response.status, json.loads(body) if response.status == 200 else {}

    def close() -> None:
        for conn in holder:
            conn.close()
    return get, close


class Load:
    """Two keep-alive clients and two new-connection clients, each bounded by count and time."""

    def __init__(self, make_client: Callable[..., tuple[Getter, Callable[[], None]]], *,
                 max_per_thread: int = 5000, max_seconds: float = 60.0, pause: float = 0.002) -> None:
        self.make_client = make_client
        self.max_per_thread = max_per_thread
        self.t0 = time.monotonic()
        self.deadline = self.t0 + max_seconds
        self.pause = pause
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.ok = 0
        self.failures: list[str] = []
        self.answered_by: dict[int, int] = {}
        self.threads = [threading.Thread(target=self._run, args=(keepalive,), daemon=True)
                        for keepalive in (True, True, False, False)]

    def _run(self, keepalive: bool) -> None:
        get, close = self.make_client(keepalive=keepalive)
        try:
            for _ in range(self.max_per_thread):
                if self.stop.is_set() or time.monotonic() > self.deadline:
                    return
                started = time.monotonic()
                try:
                    status, data = get()
                except Exception as exc:  # noqa: BLE001 - every failure is counted, whatever it is
                    self._fail(keepalive, started, f"{type(exc).__name__}: {exc}")
                else:
                    if status == 200:
                        with self.lock:
                            self.ok += 1
                            self.answered_by[data["pid"]] = self.answered_by.get(data["pid"], 0) + 1
                    else:
                        self._fail(keepalive, started, f"HTTP {status}")
                time.sleep(self.pause)
        finally:
            close()

    def _fail(self, keepalive: bool, started: float, what: str) -> None:
        with self.lock:
            self.failures.append(f"{'keep-alive' if keepalive else 'new-connection'} request "
                                 f"at +{started - self.t0:.2f}s: {what}")

    def more(self, count: int, seconds: float = 0.5, timeout: float = 20.0) -> None:
        """Keep the load on for at least ``seconds`` and ``count`` more successful requests."""
        start, until = self.ok, time.monotonic() + seconds
        poll(lambda: self.ok >= start + count and time.monotonic() >= until, timeout=timeout,
             what=f"{count} more successful requests")

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)

    def assert_no_failures(self) -> None:
        assert self.ok > 0
        assert not self.failures, f"{len(self.failures)} of {self.ok + len(self.failures)} requests failed:\n" + \
            "\n".join(self.failures[:20])


# -- processes the harness does not track (daemons, upgraded masters) ----------------


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def live_children(pid: int) -> list[int]:
    """The children of ``pid`` that have not exited; [] if ``pid`` itself is gone.

    A child that exits between the listing and the look at its status is
    left out, not taken for the parent's absence: right after a reload the
    old generation exits while the new one serves.
    """
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                alive.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return sorted(alive)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants, by PID."""
    if not pid:
        return
    try:
        process = psutil.Process(pid)
        victims = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass


def stop_master(pid: int, timeout: float = 20.0) -> bool:
    """TERM a master we do not own a Popen for; KILL it and its workers if it lingers. True if it left by itself."""
    if not pid or not alive(pid):
        return True
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        os.kill(pid, signal.SIGTERM)
        poll(lambda: not alive(pid), timeout=timeout, what=f"master {pid} to exit")
        return True
    except AssertionError:
        return False
    finally:
        kill_tree(pid)
        for child in descendants:
            kill_tree(child.pid)


def run_to_exit(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                timeout: float = 20.0) -> tuple[int, str]:
    """Run forkserver in its own session until it exits; return (code, stderr). No process may stay behind."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    full_env.update(env or {})
    proc = subprocess.Popen([sys.executable, "-m", "forkserver", "--pythonpath", str(APPS), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=full_env, start_new_session=True)

    def group_alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        _, stderr = proc.communicate(timeout=timeout)
        poll(lambda: not group_alive(), timeout=10, what="every process of the server's group to exit")
    finally:
        if group_alive():
            os.killpg(proc.pid, signal.SIGKILL)  # the session we created: its id is our child's PID
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


def versioned_source(version: str) -> str:
    return f'''
import json, os
VERSION = {version!r}
IMPORTED_BY = os.getpid()

def app(environ, start_response):
    body = json.dumps({{"version": VERSION, "pid": os.getpid(), "imported_by": IMPORTED_BY}}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
'''


@pytest.fixture
def app_module(tmp_path: Path) -> Path:
    """A versioned app module ``lc_versioned`` in its own directory, at version v0."""
    directory = tmp_path / "app"
    directory.mkdir()
    module = directory / "lc_versioned.py"
    module.write_text(versioned_source("v0"))
    return module


def new_generation(srv, previous: set[int], count: int) -> set[int]:
    """Wait until exactly ``count`` workers run and none is from ``previous``."""
    def check() -> set[int] | None:
        pids = set(live_children(srv.pid))
        return pids if len(pids) == count and not pids & previous else None
    return poll(check, timeout=READY, what=f"{count} workers, all new (previous {sorted(previous)})")


def unix_get(path: Path, target: str = "/") -> tuple[int, dict]:
    return unix_client(str(path), target, keepalive=False)[0]()


def try_unix_get(path: Path) -> tuple[int, dict] | None:
    try:
        return unix_get(path)
    except OSError:
        return None


# -- 1. HUP under load ------------------------------------------------------------


@pytest.mark.parametrize("preload", [False, True], ids=["import-in-workers", "preload"])
def test_three_hups_under_load_lose_no_request(server, app_module, preload):
    extra = ["--preload"] if preload else []
    srv = server("lc_versioned:app", "-w", "2", "--pythonpath", str(app_module.parent), *extra,
                 env=NO_BYTECODE, workers=2)
    original = current = set(srv.worker_pids())
    with Load(lambda keepalive: tcp_client(srv.url, keepalive=keepalive)) as load:
        load.more(20)
        for version in ("v1", "v2", "v3"):
            app_module.write_text(versioned_source(version))
            srv.signal(signal.SIGHUP)
            current = new_generation(srv, current, 2)
            load.more(20)  # the new generation carries the load before the next HUP
            assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["version"] == version
    load.assert_no_failures()
    assert not original & set(srv.worker_pids())
    answer = requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()
    assert answer["version"] == "v3" and answer["pid"] in current
    assert (answer["imported_by"] == srv.pid) == preload  # with --preload the master re-imported it
    assert srv.log().count("reload complete") == 3


def test_hup_answers_a_connection_opened_just_before_the_reload(server):
    """The new-connection race of the test above, made deterministic.

    A client connects, the old worker accepts, the client's request arrives
    a moment later (well within header_timeout), after the new generation
    is up and the old worker has been told to go: HUP must not turn that
    into a connection closed without an answer.  The old worker holds the
    connection until the request comes, answers it, and only then leaves.
    """
    srv = server("lifecycle_app:app", "-w", "1", workers=1)
    old = set(srv.worker_pids())
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as conn:
        time.sleep(0.2)  # the old worker has accepted it by now
        srv.signal(signal.SIGHUP)
        poll(lambda: "reload complete" in srv.log(), timeout=READY, what="the old worker to be retired")
        time.sleep(0.5)  # the retired worker has begun its graceful stop
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_all(conn)
    assert answer.startswith(b"HTTP/1.1 200 OK"), f"answered {answer[:60]!r}"
    assert b"Connection: close" in answer
    new_generation(srv, old, 1)  # and then it is gone


def test_hup_answers_a_request_already_sent_on_a_kept_alive_connection(server):
    """The keep-alive race of the three-HUPs test, made deterministic.

    The old worker is busy when it is told to retire; meanwhile a client
    sends its next request on a kept-alive connection.  That request is
    whole in the kernel before the worker gets round to stopping, so it
    must be answered (with Connection: close), not dropped with the
    connection as if it were idle.
    """
    srv = server("lifecycle_app:app", "-w", "1", workers=1)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as kept, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=20) as busy:
        kept.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        first = b""
        while b"}" not in first:
            chunk = kept.recv(65536)
            assert chunk, f"the first answer was cut short: {first!r}"
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" not in first
        busy.sendall(b"GET /slow?2 HTTP/1.1\r\nHost: t\r\n\r\n")  # keeps the old worker in the app
        time.sleep(0.2)
        srv.signal(signal.SIGHUP)
        poll(lambda: "reload complete" in srv.log(), timeout=READY, what="the new generation")
        kept.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_all(busy).startswith(b"HTTP/1.1 200 OK")
        # One answer, not the connection's end: the old worker may answer it and close,
        # or (the relay) have handed the idle connection to another worker, which keeps it.
        second = b""
        while b"}" not in second:
            chunk = kept.recv(65536)
            if not chunk:
                break
            second += chunk
    assert second.startswith(b"HTTP/1.1 200 OK"), f"the request sent on the kept-alive connection got {second[:60]!r}"


@pytest.mark.parametrize("broken", ["code", "code-preload", "config"])
def test_failed_hup_under_load_keeps_the_old_generation_serving(server, app_module, tmp_path, broken):
    config = tmp_path / "fs.toml"
    config.write_text('app = "lc_versioned:app"\nworkers = 2\n' + ("preload = true\n" if broken == "code-preload" else ""))
    srv = server("-c", str(config), "--pythonpath", str(app_module.parent), env=NO_BYTECODE, workers=2)
    old = set(srv.worker_pids())
    with Load(lambda keepalive: tcp_client(srv.url, keepalive=keepalive)) as load:
        load.more(20)
        if broken == "config":
            config.write_text(config.read_text().replace("workers = 2", 'workers = "many"'))
        else:
            app_module.write_text("raise ImportError('half-deployed on purpose')\n")
        srv.signal(signal.SIGHUP)
        poll(lambda: "reload failed" in srv.log(), timeout=READY, what="the reload failure to be logged")
        load.more(30)
        poll(lambda: set(live_children(srv.pid)) == old, timeout=READY, what="only the old workers to remain")
        load.more(20)
    load.assert_no_failures()
    assert set(load.answered_by) <= old
    assert ("workers must be an integer" if broken == "config" else "half-deployed on purpose") in srv.log()
    assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["version"] == "v0"


# -- 2. TERM answers everything already queued ------------------------------------------


def test_term_answers_50_queued_connections_on_each_listener_and_cleans_up(server, tmp_path):
    pidfile, sock_path = tmp_path / "fs.pid", tmp_path / "fs.sock"
    tcp = listening_socket()
    srv = server("lifecycle_app:app", "-w", "1", "-b", f"fd://{tcp.fileno()}", "-b", f"unix:{sock_path}",
                 "--pid", str(pidfile), sock=tcp, workers=1)
    assert read_pid(pidfile) == srv.pid
    busy = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    queued: list[socket.socket] = []
    try:
        busy.sendall(b"GET /slow?1.5 HTTP/1.1\r\nHost: t\r\n\r\n")  # occupies the only worker
        time.sleep(0.3)
        for _ in range(50):
            conn = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            queued.append(conn)
            conn.sendall(b"GET /slow?0 HTTP/1.1\r\nHost: t\r\n\r\n")
            unix = socket.socket(socket.AF_UNIX)
            unix.settimeout(30)
            queued.append(unix)
            unix.connect(str(sock_path))
            unix.sendall(b"GET /slow?0 HTTP/1.1\r\nHost: t\r\n\r\n")
        srv.signal(signal.SIGTERM)
        answers = [read_all(conn) for conn in queued]
        busy_answer = read_all(busy)
    finally:
        busy.close()
        for conn in queued:
            conn.close()
    assert busy_answer.startswith(b"HTTP/1.1 200 OK")
    bad = [answer[:60] for answer in answers if not answer.startswith(b"HTTP/1.1 200 OK")]
    assert not bad, f"{len(bad)} of {len(answers)} queued connections got no 200: {bad[:5]}"
    assert srv.wait_exit(30) == 0
    assert not pidfile.exists() and not sock_path.exists()


# -- 3. USR2 binary upgrade -------------------------------------------------------------


def test_usr2_upgrade_under_load_loses_no_request(server, tmp_path):
    pidfile, sock_path = tmp_path / "fs.pid", tmp_path / "fs.sock"
    oldbin = Path(f"{pidfile}.oldbin")
    srv = server("lifecycle_app:app", "-w", "2", "-b", f"unix:{sock_path}", "--pid", str(pidfile), wait=False)
    poll(lambda: try_unix_get(sock_path), timeout=READY, what="the unix socket to answer")
    poll(lambda: len(live_children(srv.pid)) == 2, timeout=READY, what="two workers")
    old_workers = set(live_children(srv.pid))
    new_master = 0
    try:
        with Load(lambda keepalive: unix_client(str(sock_path), keepalive=keepalive)) as load:
            load.more(20)
            srv.signal(signal.SIGUSR2)

            def upgraded() -> int:
                pid = read_pid(pidfile)
                return pid if oldbin.exists() and read_pid(oldbin) == srv.pid and pid not in (0, srv.pid) else 0
            new_master = poll(upgraded, timeout=READY, what="PIDFILE.oldbin and a PIDFILE naming a new master")
            poll(lambda: len(live_children(new_master)) == 2
                 and srv.log().count(f"[{new_master}] [INFO] worker ready") >= 2
                 and f"master started pid={new_master}" in srv.log(),
                 timeout=READY, what="the new master's two workers to be ready")
            new_workers = set(live_children(new_master))
            load.more(20)
            srv.signal(signal.SIGTERM)  # retire the old master
            assert srv.wait_exit(30) == 0
            load.more(40, seconds=1.0)
        load.assert_no_failures()
        assert alive(new_master)
        assert read_pid(pidfile) == new_master and not oldbin.exists()
        assert not any(alive(pid) for pid in old_workers)
        answered = {unix_get(sock_path)[1]["pid"] for _ in range(10)}
        assert answered <= new_workers, "only the new master's workers may answer now"
        assert stop_master(new_master), "the new master did not stop on TERM"
        assert not pidfile.exists() and not sock_path.exists()
    finally:
        stop_master(new_master)


def test_usr2_with_a_broken_app_leaves_the_old_master_in_charge(server, app_module, tmp_path):
    pidfile, sock_path = tmp_path / "fs.pid", tmp_path / "fs.sock"
    oldbin = Path(f"{pidfile}.oldbin")
    srv = server("lc_versioned:app", "-w", "2", "--pythonpath", str(app_module.parent), "-b", f"unix:{sock_path}",
                 "--pid", str(pidfile), env=NO_BYTECODE, wait=False)
    poll(lambda: try_unix_get(sock_path), timeout=READY, what="the unix socket to answer")
    # Both booted: a worker still importing would import the broken code written next.
    poll(lambda: len(live_children(srv.pid)) == 2 and not srv.booting_pids(), timeout=READY, what="two workers")
    old_workers = set(live_children(srv.pid))
    app_module.write_text("raise RuntimeError('deploy broke the app on purpose')\n")
    new_master = 0
    try:
        with Load(lambda keepalive: unix_client(str(sock_path), keepalive=keepalive)) as load:
            load.more(20)
            srv.signal(signal.SIGUSR2)
            found = poll(lambda: re.search(r"new master pid=(\d+) exited", srv.log()), timeout=READY,
                         what="the old master to see the new one fail")
            new_master = int(found.group(1))
            load.more(30)
        load.assert_no_failures()
        assert set(load.answered_by) <= old_workers
        assert "deploy broke the app on purpose" in srv.log()
        poll(lambda: read_pid(pidfile) == srv.pid and not oldbin.exists(), what="PIDFILE restored from .oldbin")
        assert sock_path.exists(), "the failed new master removed the old master's socket file"
        status, data = unix_get(sock_path)
        assert status == 200 and data["version"] == "v0" and data["pid"] in old_workers
        assert set(live_children(srv.pid)) == old_workers
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(30) == 0
        assert not pidfile.exists() and not sock_path.exists()
    finally:
        stop_master(new_master)


def test_usr2_upgrade_with_an_inherited_fd_listener(server, tmp_path):
    """--bind fd://N (how the harness, and many supervisors, pass sockets): the new master must come up too."""
    pidfile = tmp_path / "fs.pid"
    sock = listening_socket()
    if sock.fileno() == 3:  # the interesting case is a descriptor that is not where the upgrade puts it
        moved = socket.socket(fileno=os.dup(sock.fileno()))
        sock.close()
        sock = moved
        sock.set_inheritable(True)
    srv = server("lifecycle_app:app", "-w", "1", "--pid", str(pidfile), sock=sock, workers=1)
    new_master = 0
    try:
        srv.signal(signal.SIGUSR2)

        def outcome() -> str:
            log = srv.log()
            pid = read_pid(pidfile)
            if pid not in (0, srv.pid) and f"master started pid={pid}" in log:
                return "started"
            return "failed" if "new master pid=" in log and "exited" in log else ""
        result = poll(outcome, timeout=READY, what="the new master to start or fail")
        new_master = read_pid(pidfile) if result == "started" else 0
        assert result == "started", f"the new master failed:\n{srv.log()}"
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(30) == 0
        poll(lambda: requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["pid"] in live_children(new_master),
             what="the new master's worker to answer on the inherited socket")
    finally:
        stop_master(new_master or (read_pid(pidfile) if read_pid(pidfile) != srv.pid else 0))



def test_usr2_upgrade_under_reuse_port_answers_every_connection_before_during_and_after(server, tmp_path, migrate_req):
    """With reuse_port the master holds the port without listening; each worker listens on its own socket.

    The kernel spreads connections over every listening socket of the
    port, so one that nobody accepts from would leave its share unanswered.
    A USR2 hands the new master that non-listening holder, and both masters'
    workers then share the port until the old one stops.
    """
    migrate_req("1")  # the old workers' sockets close while connections arrive (see sockets.reuse_port_handover_problem)
    pidfile = tmp_path / "fs.pid"
    holder = socket.socket()  # keeps the port ours between choosing it and the server binding it
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    srv = server("lifecycle_app:app", "-w", "2", "--reuse-port", "-b", f"127.0.0.1:{port}", "--pid", str(pidfile),
                 wait=False)
    srv.port = port
    new_master = 0

    def answering(count: int = 60) -> set[int]:
        """The workers that answered ``count`` fresh connections; every one must be answered, and promptly."""
        pids = set()
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
                conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                answer = read_all(conn)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            pids.add(json.loads(answer.partition(b"\r\n\r\n")[2])["pid"])
        return pids
    try:
        srv.wait_ready(workers=2)
        holder.close()
        old_workers = set(live_children(srv.pid))
        assert answering() <= old_workers
        srv.signal(signal.SIGUSR2)

        def upgraded() -> str:
            pid = read_pid(pidfile)
            if pid not in (0, srv.pid) and f"master started pid={pid}" in srv.log():
                return "started"
            return "failed" if re.search(r"new master pid=\d+ exited", srv.log()) else ""
        assert poll(upgraded, timeout=READY, what="the new master to start or fail") == "started", srv.log()
        new_master = read_pid(pidfile)
        poll(lambda: srv.log().count(f"[{new_master}] [INFO] worker ready") >= 2, timeout=READY,
             what="the new master's two workers to be ready")
        new_workers = set(live_children(new_master))
        assert answering() <= old_workers | new_workers
        srv.signal(signal.SIGTERM)  # retire the old master
        assert srv.wait_exit(30) == 0
        assert answering() <= new_workers
        assert stop_master(new_master), "the new master did not stop on TERM"
    finally:
        holder.close()
        stop_master(new_master)

# -- 4. WINCH ----------------------------------------------------------------------------


def start_daemon(server, tmp_path: Path, *args: str) -> tuple[object, int, Path]:
    """Start a daemonized master; return (the launcher's ServerProcess, the daemon's PID, its pid file)."""
    pidfile = tmp_path / "daemon.pid"
    launcher = server("lifecycle_app:app", "--daemon", "--pid", str(pidfile), *args, wait=False)
    assert launcher.proc.wait(15) == 0, launcher.log()  # the process we started returns at once
    daemon = poll(lambda: read_pid(pidfile), timeout=READY, what="the daemon's pid file")
    return launcher, daemon, pidfile


def test_winch_stops_a_daemons_workers_and_ttin_brings_one_back(server, tmp_path):
    launcher, daemon, _ = start_daemon(server, tmp_path, "-w", "2")
    try:
        poll(lambda: len(live_children(daemon)) == 2, timeout=READY, what="the daemon's two workers")
        assert requests.get(launcher.url, timeout=REQUEST_TIMEOUT).status_code == 200
        os.kill(daemon, signal.SIGWINCH)
        poll(lambda: not live_children(daemon), timeout=READY, what="every worker to stop on WINCH")
        time.sleep(1.5)  # a few master ticks: nobody respawns them
        assert alive(daemon) and not live_children(daemon)
        assert "stopping all workers (WINCH)" in launcher.log()
        os.kill(daemon, signal.SIGTTIN)
        worker = poll(lambda: live_children(daemon), timeout=READY, what="one worker after TTIN")
        assert len(worker) == 1
        assert requests.get(launcher.url, timeout=REQUEST_TIMEOUT).json()["pid"] == worker[0]
        time.sleep(1.5)
        assert live_children(daemon) == worker
        assert stop_master(daemon), "the daemon did not stop on TERM"
    finally:
        stop_master(daemon)


def test_winch_is_ignored_without_daemon(server):
    srv = server("lifecycle_app:app", "-w", "2", workers=2)
    workers = srv.worker_pids()
    srv.signal(signal.SIGWINCH)
    poll(lambda: "WINCH ignored" in srv.log(), what="the WINCH to be logged as ignored")
    time.sleep(1.5)
    assert srv.worker_pids() == workers
    assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).status_code == 200


# -- 5. hung workers ------------------------------------------------------------------


def assert_stack_dump(log: str, victim: int) -> None:
    line = next((ln for ln in log.splitlines() if f"worker timeout slot=0 pid={victim}" in ln), None)
    assert line is not None, log
    assert re.search(r"in flight: GET /hang client=127\.0\.0\.1 elapsed=\d+\.\ds", line), line
    assert "Current thread 0x" in log or "Thread 0x" in log, f"no faulthandler stack dump in:\n{log}"
    assert "lifecycle_app.py" in log, "the dump shows the app frame the worker hung in"


def test_hung_worker_has_its_stacks_dumped_and_is_replaced(server):
    srv = server("lifecycle_app:app", "-w", "1", "--timeout", "1", workers=1)
    (victim,) = srv.worker_pids()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as conn:
        conn.sendall(b"GET /hang?60 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert read_all(conn) == b""  # the worker was killed mid-request
    poll(lambda: live_children(srv.pid) and victim not in live_children(srv.pid), timeout=READY,
         what="a replacement worker")
    poll(lambda: "lifecycle_app.py" in srv.log(), what="the stack dump to reach the log")
    assert_stack_dump(srv.log(), victim)
    assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["pid"] != victim


def test_one_hung_thread_is_detected_while_the_other_threads_serve(server):
    srv = server("lifecycle_app:app", "-w", "1", "--threads", "4", "--timeout", "3", workers=1)
    (victim,) = srv.worker_pids()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as hung:
        hung.sendall(b"GET /hang?60 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
        with requests.Session() as session:  # the other threads keep serving meanwhile
            for _ in range(10):
                assert session.get(srv.url + "/", timeout=REQUEST_TIMEOUT).json()["pid"] == victim
        assert read_all(hung) == b""  # then the hung request's worker is killed
    poll(lambda: live_children(srv.pid) and victim not in live_children(srv.pid), timeout=READY,
         what="a replacement worker")
    poll(lambda: "lifecycle_app.py" in srv.log(), what="the stack dump to reach the log")
    assert_stack_dump(srv.log(), victim)
    assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["pid"] != victim


# -- 6. max_requests ---------------------------------------------------------------------


def test_max_requests_with_jitter_recycles_without_failing_a_request(server):
    n, jitter = 4, 3
    srv = server("lifecycle_app:app", "-w", "1", "--max-requests", str(n), "--max-requests-jitter", str(jitter),
                 wait=False)
    poll(lambda: "master started" in srv.log(), timeout=READY, what="the server to start")  # no probe request
    served_by: list[int] = []
    closing: list[bool] = []  # did the response say Connection: close
    failures: list[str] = []
    with requests.Session() as session:
        for _ in range(4 * (n + jitter) + 4):
            try:
                response = session.get(srv.url, timeout=REQUEST_TIMEOUT)
                served_by.append(response.json()["pid"])
                closing.append(response.headers.get("Connection", "").lower() == "close")
            except requests.RequestException as exc:
                failures.append(f"request {len(served_by) + len(failures) + 1}: {type(exc).__name__}: {exc}")
            if len(set(served_by)) == 4:
                break
    assert not failures, f"requests failed while workers recycled: {failures}"
    runs = [len(list(group)) for group in _runs(served_by)]
    assert len(runs) == 4, runs
    assert all(n <= run <= n + jitter for run in runs[:-1]), f"requests per worker {runs}, expected {n}..{n + jitter}"
    # A keep-alive client loses no request only if a recycling worker's last
    # response says Connection: close (else it may send the next request on a
    # connection the worker is closing); no earlier response may say it.
    ends = [sum(runs[:i + 1]) - 1 for i in range(len(runs) - 1)]
    assert [i for i, close in enumerate(closing) if close] == ends, \
        f"responses with Connection: close at {[i for i, c in enumerate(closing) if c]}, expected at {ends}"
    recycled = [ln for ln in srv.log().splitlines() if "worker recycling" in ln]
    assert len(recycled) >= 3 and all("max_requests=" in ln for ln in recycled), recycled


def test_a_request_pipelined_behind_the_last_before_recycling_is_not_served(server):
    """The response that reaches max_requests says Connection: close, so nothing after it may be answered.

    RFC 9112 §9.6: a server that sent close must not process further
    requests on that connection.  A client that saw the close re-sends what
    was pipelined behind it, so answering it too would run it twice.
    """
    srv = server("lifecycle_app:app", "-w", "1", "--max-requests", "3", "--max-requests-jitter", "0",
                 wait=False)
    poll(lambda: "master started" in srv.log(), timeout=READY, what="the server to start")  # no probe request
    (worker,) = poll(lambda: srv.worker_pids() or None, timeout=READY, what="the worker")
    request = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as conn:
        conn.sendall(request)  # the first: afterwards the connection waits in the worker's loop
        first = conn.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b"Connection: close" not in first, first
        conn.sendall(request * 3)  # the second, the third (the last), and one more behind it
        answers = read_all(conn)
    heads = [part.split(b"\r\n\r\n", 1)[0] for part in answers.split(b"HTTP/1.1 ")[1:]]
    assert len(heads) == 2, f"expected answers to the second and third requests only, got:\n{answers!r}"
    assert b"Connection: close" not in heads[0] and b"Connection: close" in heads[1], heads
    poll(lambda: worker not in srv.worker_pids(), timeout=READY, what="the recycled worker to exit")
    assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["pid"] != worker
    assert "Traceback" not in srv.log(), srv.log()


def test_recycling_on_a_request_served_as_it_was_accepted_logs_no_error(server):
    """The stop that the last request begins closes the listeners while the worker is still accepting.

    A request that arrives with its connection is served inside the accept
    loop; the loop must notice the stop instead of accepting on a closed
    socket and logging "accept failed: Bad file descriptor" at every recycle.
    """
    srv = server("lifecycle_app:app", "-w", "1", "--max-requests", "2", "--max-requests-jitter", "0",
                 wait=False)
    poll(lambda: "master started" in srv.log(), timeout=READY, what="the server to start")  # no probe request
    request = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    deadline = time.monotonic() + READY
    while srv.log().count("worker recycling") < 3 and time.monotonic() < deadline:
        answer = raw_request(srv.port, request, timeout=20)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    assert srv.log().count("worker recycling") >= 3, srv.log()
    assert "accept failed" not in srv.log(), srv.log()


def _runs(items: list[int]) -> Iterator[list[int]]:
    current: list[int] = []
    for item in items:
        if current and item != current[-1]:
            yield current
            current = []
        current.append(item)
    if current:
        yield current


# -- 7. max_worker_memory -----------------------------------------------------------------


def test_worker_over_memory_is_retired_after_its_request(server, tmp_path):
    release = tmp_path / "release"
    srv = server("lifecycle_app:app", "-w", "1", "--max-worker-memory", "50", workers=1)
    (victim,) = srv.worker_pids()
    result: dict[str, object] = {}

    def grow() -> None:
        try:
            result["response"] = requests.get(f"{srv.url}/grow?{release}", timeout=(5, 60))
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc
    client = threading.Thread(target=grow, daemon=True)
    client.start()
    try:
        line = poll(lambda: next((ln for ln in srv.log().splitlines() if "worker over memory" in ln), None),
                    timeout=READY, what="the master to find the worker over its memory limit")
        assert f"pid={victim}" in line and re.search(r"uss=\d+(\.\d+)?MiB", line), line
        poll(lambda: len(set(live_children(srv.pid)) - {victim}) == 1, timeout=READY,
             what="a replacement worker while the old one finishes")
        assert "response" not in result and "error" not in result, "the request was still in flight"
    finally:
        release.touch()
        client.join(30)
    assert "error" not in result, f"the in-flight request failed: {result.get('error')}"
    response = result["response"]
    assert response.status_code == 200 and response.json()["pid"] == victim and response.json()["kept_mib"] == 80
    poll(lambda: not alive(victim), timeout=READY, what="the retired worker to exit")
    assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["pid"] != victim


# -- 8. crash loops --------------------------------------------------------------------------


def test_worker_dying_during_boot_at_startup_stops_the_master(tmp_path):
    code, stderr = run_to_exit(tmp_path, "lifecycle_dies_at_boot:app", "-b", "127.0.0.1:0", "-w", "2")
    assert code == EXIT_WORKER_BOOT, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("forkserver: error: "), stderr
    assert "died during boot" in lines[0] and "exit code 7" in lines[0], lines[0]


def test_crash_loop_after_startup_backs_off_and_recovers(server, app_module):
    srv = server("lc_versioned:app", "-w", "1", "--pythonpath", str(app_module.parent), env=NO_BYTECODE, workers=1)
    (victim,) = srv.worker_pids()
    app_module.write_text("raise RuntimeError('crash loop on purpose')\n")
    os.kill(victim, signal.SIGKILL)
    poll(lambda: "retry in 1s" in srv.log(), timeout=READY, what="the first back-off")
    poll(lambda: "retry in 2s" in srv.log(), timeout=READY, what="the second, longer back-off")
    failed_boots = srv.log().count("worker failed to boot")
    assert failed_boots <= 3, f"{failed_boots} boots in a few seconds: a tight loop, not a back-off"
    assert "crash loop on purpose" in srv.log()
    assert srv.proc.poll() is None, "the master must outlive a crash loop after startup"
    app_module.write_text(versioned_source("fixed"))

    def fixed() -> bool:
        try:
            return requests.get(srv.url, timeout=(2, 5)).json()["version"] == "fixed"
        except requests.RequestException:
            return False
    poll(fixed, timeout=READY, what="the fixed app to serve")
    assert srv.log().count("worker failed to boot") <= 4


# -- 9. user and group ------------------------------------------------------------------------


def test_workers_run_as_user_and_group_while_the_master_stays_root(server):
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    import grp
    import pwd

    group = "nogroup" if _group_exists("nogroup") else "nobody"
    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam(group).gr_gid
    srv = server("lifecycle_app:app", "-w", "2", "--user", "nobody", "--group", group, workers=2)
    for pid in srv.worker_pids():
        process = psutil.Process(pid)
        assert tuple(process.uids()) == (uid, uid, uid), pid
        assert tuple(process.gids()) == (gid, gid, gid), pid
    assert tuple(psutil.Process(srv.pid).uids()) == (0, 0, 0)
    data = requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()
    assert (data["uid"], data["euid"], data["gid"], data["egid"]) == (uid, uid, gid, gid)


def _group_exists(name: str) -> bool:
    import grp

    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


# -- 10. hooks ----------------------------------------------------------------------------------

HOOKS = ("on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init",
         "worker_int", "worker_exit", "on_reload", "on_exit")
MASTER_HOOKS = {"on_starting", "when_ready", "pre_fork", "on_reload", "on_exit"}


def hook_args() -> list[str]:
    return [arg for name in HOOKS for arg in (f"--{name.replace('_', '-')}", f"lifecycle_hooks:{name}")]


def hook_env(**extra: str) -> dict[str, str]:
    """Make lifecycle_hooks importable however the server resolves hooks (see the --pythonpath test below)."""
    return {"PYTHONPATH": os.pathsep.join([str(APPS), *filter(None, [os.environ.get("PYTHONPATH")])]), **extra}


def test_hook_module_is_found_through_pythonpath(server, tmp_path):
    """Hooks live next to the app: --pythonpath, which finds the app, must find them too."""
    hook_log = tmp_path / "hooks.jsonl"
    srv = server("lifecycle_app:app", "-w", "1", "--on-starting", "lifecycle_hooks:on_starting",
                 "--post-fork", "lifecycle_hooks:post_fork", env={"LIFECYCLE_HOOK_LOG": str(hook_log)}, workers=1)
    names = [json.loads(line)["hook"] for line in hook_log.read_text().splitlines()]
    assert names == ["on_starting", "post_fork"]
    assert srv.proc.poll() is None


def test_all_nine_hooks_run_at_their_moment_with_a_context(server, tmp_path):
    hook_log = tmp_path / "hooks.jsonl"
    srv = server("lifecycle_app:app", "-w", "2", *hook_args(), env=hook_env(LIFECYCLE_HOOK_LOG=str(hook_log)),
                 workers=2)
    first = set(srv.worker_pids())
    srv.signal(signal.SIGHUP)
    second = new_generation(srv, first, 2)

    def records() -> list[dict]:
        return [json.loads(line) for line in hook_log.read_text().splitlines()]
    poll(lambda: sum(r["hook"] == "worker_exit" for r in records()) == 2, what="the old workers' worker_exit")
    srv.signal(signal.SIGINT)  # fast stop: workers get QUIT and run worker_int
    assert srv.wait_exit(20) == 0
    got = records()
    names = [r["hook"] for r in got]
    assert set(names) == set(HOOKS), names
    for record in got:
        assert record["context_type"] == "HookContext" and record["workers"] == 2, record
        if record["hook"] in MASTER_HOOKS:
            assert record["os_pid"] == record["pid"] == srv.pid, record
        else:
            assert record["os_ppid"] == srv.pid and record["os_pid"] == record["pid"] != srv.pid, record
            assert record["slot"] in (0, 1) and record["generation"] in (1, 2), record

    def where(name: str) -> list[int]:
        return [i for i, r in enumerate(got) if r["hook"] == name]

    def pids(name: str, generation: int | None = None) -> set[int]:
        return {r["pid"] for r in got if r["hook"] == name and generation in (None, r["generation"])}
    assert where("on_starting") == [0] and where("on_exit") == [len(got) - 1]
    assert sorted((r["slot"], r["generation"]) for r in got if r["hook"] == "pre_fork") == \
        [(0, 1), (0, 2), (1, 1), (1, 2)]
    # The master does not import the worker itself (cli hands it the entry), yet has its code before forking.
    assert all(r["worker_code_loaded"] for r in got if r["hook"] == "pre_fork"), got
    assert pids("post_fork", 1) == pids("post_worker_init", 1) == first
    assert pids("post_fork", 2) == pids("post_worker_init", 2) == second
    for pid in first | second:  # post_fork, then post_worker_init, in each worker
        mine = [r["hook"] for r in got if r["pid"] == pid and r["hook"] in ("post_fork", "post_worker_init")]
        assert mine == ["post_fork", "post_worker_init"], (pid, mine)
    (ready,) = where("when_ready")
    assert any(i < ready for i in where("post_worker_init")), "when_ready before any worker was ready"
    (reload_at,) = where("on_reload")
    assert ready < reload_at
    assert all(i < reload_at for i, r in enumerate(got) if r["hook"] == "pre_fork" and r["generation"] == 1)
    assert all(i > reload_at for i, r in enumerate(got) if r["hook"] == "pre_fork" and r["generation"] == 2)
    assert pids("worker_exit") == pids("worker_exit", 1) == first  # retired gracefully by the reload
    assert all(i > reload_at for i in where("worker_exit"))
    assert pids("worker_int") == pids("worker_int", 2) == second  # stopped fast by INT
    for name in ("on_starting", "when_ready", "on_reload", "on_exit"):
        assert all(r["slot"] is None for r in got if r["hook"] == name), name


def test_static_file_code_is_loaded_before_the_fork_only_when_configured(server, tmp_path):
    """With --static the workers share the master's copy of the static-file code; without it nobody loads it."""
    (tmp_path / "assets").mkdir()
    for static, expected in ((["--static", f"/static={tmp_path / 'assets'}"], True), ([], False)):
        hook_log = tmp_path / f"hooks-{expected}.jsonl"
        srv = server("lifecycle_app:app", "-w", "1", "--pre-fork", "lifecycle_hooks:pre_fork", *static,
                     env=hook_env(LIFECYCLE_HOOK_LOG=str(hook_log)), workers=1)
        (record,) = [json.loads(line) for line in hook_log.read_text().splitlines()]
        assert record["hook"] == "pre_fork" and record["static_code_loaded"] is expected, record
        srv.stop()


@pytest.mark.parametrize("hook", ["on_starting", "when_ready"])
def test_a_raising_startup_hook_fails_the_start_with_one_line(tmp_path, hook):
    code, stderr = run_to_exit(tmp_path, "lifecycle_app:app", "-b", "127.0.0.1:0", "-w", "1", *hook_args(),
                               env=hook_env(LIFECYCLE_HOOK_RAISE=hook))
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("forkserver: error: "), stderr
    assert hook in lines[-1] and "refuses on purpose" in lines[-1], lines[-1]
    noisy = [ln for ln in lines[:-1] if "[ERROR]" in ln or "[CRITICAL]" in ln or "error" in ln.lower()]
    assert not noisy, f"the failure should be one line, also got: {noisy}"
    if hook == "on_starting":
        assert len(lines) == 1, stderr  # nothing was started, so nothing else to say


def test_a_raising_post_worker_init_is_a_boot_failure(tmp_path):
    code, stderr = run_to_exit(tmp_path, "lifecycle_app:app", "-b", "127.0.0.1:0", "-w", "2", *hook_args(),
                               env=hook_env(LIFECYCLE_HOOK_RAISE="post_worker_init"))
    assert code == EXIT_WORKER_BOOT, stderr
    last = [ln for ln in stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("forkserver: error: ") and "post_worker_init" in last, stderr


# -- 11. umask, chdir, daemon and pid file -------------------------------------------------------


def proc_umask(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc status")


def test_umask_applies_to_master_and_workers(server, tmp_path):
    pidfile = tmp_path / "fs.pid"
    srv = server("lifecycle_app:app", "-w", "2", "--umask", "027", "--pid", str(pidfile), workers=2)
    assert proc_umask(srv.pid) == 0o027
    assert all(proc_umask(pid) == 0o027 for pid in srv.worker_pids())
    assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["umask"] == 0o027
    assert pidfile.stat().st_mode & 0o777 == 0o640


def test_chdir_is_where_workers_load_and_run_the_app(server, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "lc_chdir_app.py").write_text("from lifecycle_app import app\n")  # found only through --chdir
    srv = server("lc_chdir_app:app", "-w", "1", "--chdir", str(site), workers=1)
    assert requests.get(srv.url, timeout=REQUEST_TIMEOUT).json()["cwd"] == str(site)
    assert psutil.Process(srv.worker_pids()[0]).cwd() == str(site)


def test_daemon_writes_its_own_pid_and_removes_the_file_at_exit(server, tmp_path):
    launcher, daemon, pidfile = start_daemon(server, tmp_path, "-w", "1")
    try:
        assert daemon != launcher.pid and alive(daemon)
        assert psutil.Process(daemon).cmdline()[0].startswith("forkserver: master")
        assert os.getsid(daemon) != os.getsid(0), "a daemon has its own session"
        poll(lambda: len(live_children(daemon)) == 1, timeout=READY, what="the daemon's worker")
        assert requests.get(launcher.url, timeout=REQUEST_TIMEOUT).json()["pid"] in live_children(daemon)
        os.kill(daemon, signal.SIGTERM)
        poll(lambda: not alive(daemon), timeout=READY, what="the daemon to exit on TERM")
        poll(lambda: not pidfile.exists(), what="the pid file to be removed")
    finally:
        stop_master(daemon)
