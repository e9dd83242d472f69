"""The files a root master writes (pid file, logs, UNIX sockets) never follow a link someone planted.

Every case starts a real master as root and points it at paths where a
link to a ``victim`` file (or socket) waits; the victim must come out
untouched, and a start that cannot be made safe stops with exit 78 (5 for
a bind) and a line naming the problem.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import pytest
import requests

from harness import listening_socket, poll
from test_startup_errors import assert_fails, forkserver  # noqa: F401 (a fixture, used by name)

from forkserver.errors import EXIT_CONFIG
from forkserver.reloader import IN_ATTRIB, IN_CREATE, Inotify
from forkserver.safefiles import LINK_REFUSED

VICTIM_TEXT = "root's precious file\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text(VICTIM_TEXT)
    path.chmod(0o600)
    return path


def untouched(victim: Path) -> bool:
    info = victim.stat()
    return victim.read_text() == VICTIM_TEXT and stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == 0


# -- the pid file -------------------------------------------------------------------------------


def test_pid_file_is_not_written_through_a_link_at_the_old_temporary_name(server, tmp_path, victim):
    """The temporary pid file once was PIDFILE.<pid>.tmp, a name anyone could predict and plant.

    The link is planted by the master's own process just before it runs
    forkserver (so under its real PID), the moment an attacker would aim for.
    """
    pidfile = tmp_path / "fs.pid"

    def plant() -> None:
        os.symlink(victim, f"{pidfile}.{os.getpid()}.tmp")
    srv = server("basic:pid", "-w", "1", "--pid", str(pidfile), popen={"preexec_fn": plant})
    planted = Path(f"{pidfile}.{srv.pid}.tmp")
    assert untouched(victim) and planted.is_symlink()
    assert not pidfile.is_symlink() and int(pidfile.read_text()) == srv.pid
    assert stat.S_IMODE(pidfile.stat().st_mode) == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".fs.pid", "fs.pid.")) and p != planted]
    srv.signal(signal.SIGTERM)
    assert srv.wait_exit() == 0
    assert not pidfile.exists() and untouched(victim)


def test_a_link_at_the_pid_path_stops_the_start(forkserver, tmp_path, victim):
    pidfile = tmp_path / "fs.pid"
    pidfile.symlink_to(victim)
    outcome = forkserver("basic:hello", "-b", "127.0.0.1:0", "--pid", str(pidfile))
    assert_fails(outcome, EXIT_CONFIG, f"pid: '{pidfile}'", LINK_REFUSED)
    assert untouched(victim) and pidfile.is_symlink()


def test_a_pid_file_swapped_for_a_link_while_serving_is_left_alone_at_exit(server, tmp_path, victim):
    pidfile = tmp_path / "fs.pid"
    srv = server("basic:pid", "-w", "1", "--pid", str(pidfile))
    pidfile.unlink()
    pidfile.symlink_to(victim)
    victim.write_text(f"{srv.pid}\n")  # names the master, so only not following the link spares it
    srv.signal(signal.SIGTERM)
    assert srv.wait_exit() == 0
    assert pidfile.is_symlink() and victim.read_text() == f"{srv.pid}\n"


def test_usr2_moves_the_pid_file_over_a_planted_oldbin_link(server, tmp_path, victim):
    pidfile = tmp_path / "fs.pid"
    oldbin = Path(f"{pidfile}.oldbin")
    oldbin.symlink_to(victim)
    srv = server("basic:pid", "-w", "1", "--pid", str(pidfile))
    srv.signal(signal.SIGUSR2)
    new_master = poll(lambda: (not oldbin.is_symlink() and oldbin.read_text().strip() == str(srv.pid)
                               and pidfile.exists() and int(pidfile.read_text() or 0) not in (0, srv.pid)
                               and int(pidfile.read_text())), what="the pid file at .oldbin and a new master's")
    try:
        assert untouched(victim)
    finally:
        os.kill(new_master, signal.SIGTERM)
        poll(lambda: srv.worker_pids() and new_master not in srv.worker_pids(), what="the new master to exit")
    poll(lambda: int(pidfile.read_text() or 0) == srv.pid and not oldbin.exists(), what="the pid file back")
    assert untouched(victim)


# -- logs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", ["error_logfile", "access_logfile"])
def test_a_link_at_a_log_path_stops_the_start(forkserver, tmp_path, victim, setting):
    log = tmp_path / "app.log"
    log.symlink_to(victim)
    outcome = forkserver("basic:hello", "-b", "127.0.0.1:0", f"--{setting.replace('_', '-')}", str(log))
    assert_fails(outcome, EXIT_CONFIG, f"{setting}: '{log}'", LINK_REFUSED)
    assert untouched(victim)


# -- directories anybody may write to -------------------------------------------------------------


def test_world_writable_non_sticky_directory_is_refused_with_every_problem_named(forkserver, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o777)
    outcome = forkserver("basic:hello", "-b", f"unix:{run}/fs.sock", "--pid", str(run / "fs.pid"),
                         "--error-logfile", str(run / "error.log"), "--access-logfile", str(run / "access.log"))
    assert outcome.code == EXIT_CONFIG, outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert "Traceback" not in outcome.stderr
    for setting, name in (("error_logfile", "error.log"), ("access_logfile", "access.log"),
                          ("pid", "fs.pid"), ("bind", "fs.sock")):
        assert any(line.startswith((f"{setting}: ", f"forkserver: error: {setting}: ")) and f"{run}/{name}" in line
                   and "not sticky" in line for line in lines), (setting, lines)
    assert len(lines) == 4 and list(run.iterdir()) == []  # nothing was created there


def test_sticky_world_writable_directory_like_tmp_is_fine(server, tmp_path):
    run = tmp_path / "shared"
    run.mkdir()
    run.chmod(0o1777)
    srv = server("basic:pid", "-w", "1", "--pid", str(run / "fs.pid"))
    assert int((run / "fs.pid").read_text()) == srv.pid


# -- UNIX sockets --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode, umask", [("600", "000"), ("666", "077")])
def test_unix_socket_has_its_mode_from_creation_and_is_never_chmodded(server, tmp_path, mode, umask):
    """The mode comes with bind: a chmod afterwards shows as an IN_ATTRIB event (and leaves a window)."""
    run = tmp_path / "run"
    run.mkdir()
    path = run / "fs.sock"
    watcher = Inotify()
    try:
        watcher.add(str(run))
        tcp = listening_socket()
        server("basic:hello", "-w", "1", "-b", f"unix:{path}", "-b", f"fd://{tcp.fileno()}", "--umask", umask,
               "--unix-socket-mode", mode, sock=tcp)
        events = [(mask, name) for _, mask, name in watcher.read() if name == path.name]
    finally:
        watcher.close()
    assert stat.S_ISSOCK(path.lstat().st_mode) and stat.S_IMODE(path.lstat().st_mode) == int(mode, 8)
    assert any(mask & IN_CREATE for mask, _ in events), events
    assert not any(mask & IN_ATTRIB for mask, _ in events), f"the socket file was chmodded after bind: {events}"


def dead_socket(path: Path) -> Path:
    """A socket file nobody listens on any more, as a crashed server leaves."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
    return path


def test_a_link_at_the_unix_socket_path_is_not_followed(forkserver, tmp_path):
    target = dead_socket(tmp_path / "elsewhere.sock")
    path = tmp_path / "fs.sock"
    path.symlink_to(target)
    outcome = forkserver("basic:hello", "-b", f"unix:{path}")
    assert_fails(outcome, EXIT_CONFIG, f"bind: '{path}'", LINK_REFUSED)
    assert path.is_symlink() and stat.S_ISSOCK(target.lstat().st_mode)


def test_stale_socket_file_is_still_replaced(server, tmp_path):
    path = dead_socket(tmp_path / "fs.sock")
    tcp = listening_socket()
    server("basic:hello", "-w", "1", "-b", f"unix:{path}", "-b", f"fd://{tcp.fileno()}", sock=tcp)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(str(path))
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert conn.recv(100).startswith(b"HTTP/1.1 200 ")
    assert requests.get(f"http://127.0.0.1:{tcp.getsockname()[1]}/", timeout=5).status_code == 200
