"""systemd integration on real processes: sd_notify messages and socket activation.

The test plays systemd: it binds the notify datagram socket (a path, or an
abstract name) and reads what the master sends, with deadlines; for socket
activation it binds and listens itself and hands the socket over as fd 3
with LISTEN_FDS/LISTEN_PID, through a one-line wrapper that sets LISTEN_PID
to its own PID and execs forkserver (so the PID stays the same).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import psutil
import pytest
import requests
from harness import APPS, listening_socket, poll, read_all
from test_lifecycle import live_children, read_pid, stop_master, try_unix_get

DEADLINE = 20.0


class Notifications:
    """The receiving end of NOTIFY_SOCKET: every datagram, parsed, in arrival order."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"forkserver-test-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
            self.directory = None
        else:
            # A short path: sun_path holds 108 bytes and pytest's tmp paths can be long.
            self.directory = tempfile.TemporaryDirectory(prefix="fsn-")
            self.address = os.path.join(self.directory.name, "notify")
            self.sock.bind(self.address)
        self.received: list[dict[str, str]] = []

    def next(self, timeout: float = DEADLINE) -> dict[str, str]:
        """The next message (KEY=VALUE lines as a dict, plus its raw text under ``_raw``)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no sd_notify message within {timeout}s; so far: {self.received}") from None
        text = data.decode()
        message = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
        message["_raw"] = text
        self.received.append(message)
        return message

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float = DEADLINE) -> dict[str, str]:
        """Read messages until one matches ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.next(max(0.01, deadline - time.monotonic()))
            if predicate(message):
                return message

    def close(self) -> None:
        self.sock.close()
        if self.directory is not None:
            self.directory.cleanup()


@pytest.fixture
def notifications() -> Iterator[Notifications]:
    receiver = Notifications()
    yield receiver
    receiver.close()


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- 12. sd_notify ------------------------------------------------------------------------


def test_ready_reloading_and_stopping_are_notified_at_the_right_moments(server, notifications):
    srv = server("lifecycle_app:app", "-w", "2", env={"NOTIFY_SOCKET": notifications.address}, wait=False)
    ready = notifications.next()
    # Checked the moment READY=1 arrives: a worker is ready and the server answers.
    log_at_ready = srv.log()
    answer = requests.get(srv.url, timeout=(2, 5))
    assert ready.get("READY") == "1", ready
    assert "worker ready slot=" in log_at_ready, "READY=1 came before any worker was ready"
    assert answer.status_code == 200
    assert ready.get("MAINPID") == str(srv.pid), ready
    assert ready.get("STATUS"), ready
    srv.wait_ready(workers=2)
    old = set(srv.worker_pids())

    before = monotonic_usec()
    srv.signal(signal.SIGHUP)
    reloading = notifications.wait_for(lambda m: "RELOADING" in m or "READY" in m)
    after = monotonic_usec()
    assert reloading.get("RELOADING") == "1", f"the first message after HUP must be RELOADING=1: {reloading}"
    assert re.fullmatch(r"\d+", reloading.get("MONOTONIC_USEC", "")), reloading
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after, (before, reloading, after)
    reloaded = notifications.wait_for(lambda m: "READY" in m or "RELOADING" in m)
    assert reloaded.get("READY") == "1", reloaded
    # READY=1 again only once the new generation serves.
    assert "reload complete" in srv.log()
    assert any(pid not in old for pid in live_children(srv.pid))
    # An old worker may still take a connection in the moment between its
    # USR2 and closing its listeners (it then serves it, gracefully); the new
    # generation answers from then on.
    poll(lambda: requests.get(srv.url, timeout=(2, 5)).json()["pid"] not in old,
         what="an answer from the new generation")

    srv.signal(signal.SIGTERM)
    stopping = notifications.wait_for(lambda m: "STOPPING" in m or "READY" in m)
    assert stopping.get("STOPPING") == "1", stopping
    assert srv.wait_exit(30) == 0


def test_stopping_is_announced_at_term_while_the_shutdown_delay_still_serves(server, notifications):
    srv = server("lifecycle_app:app", "-w", "1", "--health-path", "/healthz", "--shutdown-delay", "3",
                 env={"NOTIFY_SOCKET": notifications.address}, wait=False)
    notifications.wait_for(lambda m: "READY" in m)
    srv.signal(signal.SIGTERM)
    stopping = notifications.wait_for(lambda m: "STOPPING" in m)
    assert stopping.get("STOPPING") == "1", stopping
    # Told at TERM, not at the end of the delay: the server still answers, out of rotation
    # (as soon as the worker has taken the TERM the master passed on).
    poll(lambda: requests.get(srv.url + "/healthz", timeout=(2, 5)).status_code == 503, timeout=2.5,
         what="the health check to answer 503 during the delay")
    assert srv.wait_exit(30) == 0


def test_abstract_notify_socket(server):
    receiver = Notifications(abstract=True)
    try:
        srv = server("lifecycle_app:app", "-w", "1", env={"NOTIFY_SOCKET": receiver.address}, wait=False)
        ready = receiver.wait_for(lambda m: "READY" in m)
        assert ready["READY"] == "1" and ready.get("MAINPID") == str(srv.pid), ready
        assert requests.get(srv.url, timeout=(2, 5)).status_code == 200
    finally:
        receiver.close()


def test_failed_reload_is_notified_as_ready_again(server, notifications, tmp_path):
    config = tmp_path / "fs.toml"
    config.write_text('app = "lifecycle_app:app"\nworkers = 1\n')
    srv = server("-c", str(config), env={"NOTIFY_SOCKET": notifications.address}, workers=1)
    notifications.wait_for(lambda m: "READY" in m)
    config.write_text('app = "lifecycle_app:app"\nworkers = "many"\n')
    srv.signal(signal.SIGHUP)
    reloading = notifications.wait_for(lambda m: "RELOADING" in m)
    assert "MONOTONIC_USEC" in reloading
    again = notifications.wait_for(lambda m: "READY" in m or "STOPPING" in m)
    assert again.get("READY") == "1", "systemd must not be left in 'reloading' after a failed reload"


def test_new_master_after_usr2_announces_its_mainpid(server, notifications, tmp_path):
    pidfile, sock_path = tmp_path / "fs.pid", tmp_path / "fs.sock"
    srv = server("lifecycle_app:app", "-w", "1", "-b", f"unix:{sock_path}", "--pid", str(pidfile),
                 env={"NOTIFY_SOCKET": notifications.address}, wait=False)
    first = notifications.wait_for(lambda m: "READY" in m)
    assert first.get("MAINPID") == str(srv.pid)
    poll(lambda: try_unix_get(sock_path), timeout=DEADLINE, what="the unix socket to answer")
    new_master = 0
    try:
        srv.signal(signal.SIGUSR2)
        announced = notifications.wait_for(lambda m: "MAINPID" in m and m["MAINPID"] != str(srv.pid))
        new_master = int(announced["MAINPID"])
        assert announced.get("READY") == "1", announced
        assert new_master == read_pid(pidfile) and psutil.Process(new_master).ppid() == srv.pid
        assert live_children(new_master), "the new master announced itself before it had a worker"
        srv.signal(signal.SIGTERM)
        assert srv.wait_exit(30) == 0
        assert try_unix_get(sock_path), "the new master serves the socket alone"
        assert stop_master(new_master), "the new master did not stop on TERM"
    finally:
        stop_master(new_master)


def test_the_master_feeds_the_watchdog_and_workers_cannot_reach_systemd(server, notifications):
    srv = server("lifecycle_app:app", "-w", "1", wait=False,
                 env={"NOTIFY_SOCKET": notifications.address, "WATCHDOG_USEC": "400000"})
    notifications.wait_for(lambda m: "READY" in m)
    for _ in range(5):
        notifications.wait_for(lambda m: m.get("WATCHDOG") == "1")
    # The app cannot send READY=1, STOPPING=1 or MAINPID= in the master's name.
    assert requests.get(srv.url, timeout=(2, 5)).json()["systemd_env"] == []


def test_a_watchdog_meant_for_another_process_is_not_fed(server, notifications):
    srv = server("lifecycle_app:app", "-w", "1", wait=False,
                 env={"NOTIFY_SOCKET": notifications.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"})
    notifications.wait_for(lambda m: "READY" in m)
    assert requests.get(srv.url, timeout=(2, 5)).status_code == 200
    time.sleep(1.0)  # five watchdog intervals
    srv.signal(signal.SIGTERM)
    notifications.wait_for(lambda m: "STOPPING" in m)
    assert not any("WATCHDOG" in m for m in notifications.received), notifications.received


SLOW_IMPORT = (
    "import os, time\n"
    "if os.path.exists(os.path.join(os.path.dirname(__file__), 'slow')):\n"
    "    time.sleep(4)\n"
    "def app(environ, start_response):\n"
    "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
    "    return [b'ok']\n"
)


def test_the_watchdog_is_fed_while_a_preloaded_app_reimports_slowly(server, notifications, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "slowimport.py").write_text(SLOW_IMPORT)
    srv = server("slowimport:app", "--preload", "-w", "1", "--pythonpath", str(app_dir), wait=False,
                 env={"NOTIFY_SOCKET": notifications.address, "WATCHDOG_USEC": "2000000"})
    notifications.wait_for(lambda m: "READY" in m)
    (app_dir / "slow").write_text("")
    srv.signal(signal.SIGHUP)
    notifications.wait_for(lambda m: "RELOADING" in m)
    pings = [time.monotonic()]
    while True:
        message = notifications.wait_for(lambda m: "WATCHDOG" in m or "READY" in m)
        if "READY" in message:
            break
        pings.append(time.monotonic())
    assert "reload complete" in srv.log()
    gaps = [later - earlier for earlier, later in zip(pings, pings[1:])]
    # Pings every second; without them the 4 s import would leave one gap of
    # 4 s, past a 2 s watchdog.  3 s leaves room for a loaded machine.
    assert len(pings) >= 3 and max(gaps) < 3.0, gaps


# -- 13. socket activation -----------------------------------------------------------------

ACTIVATE = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ['LISTEN_FDS'] = '1'\n"
    "os.environ['LISTEN_PID'] = str(os.getpid())\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'forkserver', *sys.argv[2:]])\n"
)


def test_socket_activation_serves_the_inherited_socket_and_binds_nothing_else(tmp_path):
    sock = listening_socket()
    port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FORKSERVER_", "LISTEN_"))}
    error_log = tmp_path / "error.log"
    with open(error_log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", ACTIVATE, str(sock.fileno()), "--pythonpath", str(APPS),
                                 "lifecycle_app:app", "-w", "1"], stdout=err, stderr=err, env=env, cwd=tmp_path,
                                pass_fds=(sock.fileno(),))
    try:
        def answer() -> dict | None:
            if proc.poll() is not None:
                raise AssertionError(f"forkserver exited {proc.returncode}: {error_log.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
                    conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    raw = read_all(conn)
            except OSError:
                return None
            return json.loads(raw.partition(b"\r\n\r\n")[2]) if raw.startswith(b"HTTP/1.1 200") else None
        data = poll(answer, timeout=DEADLINE, what="the activated socket to answer")
        assert data["pid"] in live_children(proc.pid)
        assert data["listen_env"] == [], "LISTEN_* must not leak to the app (or to anything the app starts)"
        listening = {conn.laddr for conn in psutil.Process(proc.pid).net_connections("all")
                     if conn.status == psutil.CONN_LISTEN}
        assert listening == {("127.0.0.1", port)}, f"the master listens on {listening}, not only the activated socket"
        # Logged when the master reads the worker's ready notice, which the worker
        # sends as it starts to serve: not before the first answer, but soon.
        poll(lambda: "listening at fd://3" in error_log.read_text(), what="the listener in the start-up log")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            stop_master(proc.pid)
            proc.wait(10)
        sock.close()
