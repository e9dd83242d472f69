"""capture_output and enable_stdio_inheritance: where an app's print() and stdio writes end up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import requests

from harness import APPS, poll
from test_lifecycle import read_pid, stop_master

STDIO_LINES = ("printed {tag} pid=", "raw fd1 {tag}", "stderr {tag}")


def stdio_lines(tag: str) -> list[str]:
    return [line.format(tag=tag) for line in STDIO_LINES]


def contains_all(path: Path, starts: list[str]) -> bool:
    """Does ``path`` have a line starting with each of ``starts``?"""
    lines = path.read_text().splitlines() if path.exists() else []
    return all(any(line.startswith(start) for line in lines) for start in starts)


def printers(path: Path) -> set[int]:
    """The PIDs of the workers whose print() reached ``path``."""
    return {int(line.rpartition("pid=")[2]) for line in path.read_text().splitlines() if line.startswith("printed")}


def test_prints_and_stdio_writes_go_to_the_error_log_file_and_follow_a_reopen(server, tmp_path):
    error_log, rotated = tmp_path / "error.log", tmp_path / "error.log.1"
    srv = server("printing:app", "--capture-output", "--error-logfile", str(error_log), "-w", "2", workers=2)
    assert requests.get(f"{srv.url}/?first").status_code == 200
    poll(lambda: contains_all(error_log, ["printing: imported", *stdio_lines("first")]),
         what="the app's output in the error log")
    assert "first" not in srv.stdout() and "first" not in srv.log()
    assert "master started" in error_log.read_text(), "the server's own lines share the file"

    error_log.rename(rotated)  # as logrotate does, then USR1
    srv.signal(signal.SIGUSR1)
    workers = set(srv.worker_pids())
    close = {"Connection": "close"}  # a connection each, so that both workers get requests
    # Each worker reopens when it next wakes; ask until both have printed into the new file.
    poll(lambda: requests.get(f"{srv.url}/?second", headers=close) and error_log.exists()
         and printers(error_log) == workers, what="both workers' output in the new file")
    for number in range(6):
        assert requests.get(f"{srv.url}/?third{number}", headers=close).status_code == 200
        poll(lambda n=number: contains_all(error_log, stdio_lines(f"third{n}")), what=f"request third{number}")
    assert "third" not in rotated.read_text()


def test_without_capture_output_prints_stay_on_stdout(server, tmp_path):
    error_log = tmp_path / "error.log"
    srv = server("printing:app", "--error-logfile", str(error_log))
    assert requests.get(f"{srv.url}/?plain").status_code == 200
    requests.get(srv.url)  # the second request, and the worker's stop, push out a block-buffered print
    srv.stop()
    assert "raw fd1 plain" in srv.stdout()
    assert "plain" not in error_log.read_text()


def test_with_the_error_log_on_stderr_capture_output_changes_nothing(server):
    srv = server("printing:app", "--capture-output")
    assert requests.get(f"{srv.url}/?same").status_code == 200
    poll(lambda: "raw fd1 same" in srv.stdout() and "stderr same" in srv.log(), what="stdout and stderr as they were")


def start_daemon(tmp_path: Path, *args: str) -> tuple[int, Path]:
    """Start ``printing:app`` daemonized with stdout and stderr redirected to a file, as a shell would."""
    pidfile, output = tmp_path / "daemon.pid", tmp_path / "shell-redirect.log"
    with open(output, "wb") as out:
        launcher = subprocess.run(
            [sys.executable, "-m", "forkserver", "printing:app", "-b", "127.0.0.1:0", "--pythonpath", str(APPS),
             "--daemon", "--pid", str(pidfile), "--error-logfile", str(tmp_path / "error.log"), *args],
            stdout=out, stderr=out, stdin=subprocess.DEVNULL, cwd=tmp_path, timeout=30,
            env={k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")})
    assert launcher.returncode == 0
    return poll(lambda: read_pid(pidfile), what="the daemon's pid file"), output


def port_of(directory: Path) -> int:
    """The port a daemon bound, from the start-up line of its error log; 0 until it is there."""
    match = re.search(r"listening at http://127\.0\.0\.1:(\d+)", (directory / "error.log").read_text())
    return int(match.group(1)) if match else 0


def test_stdio_inheritance_keeps_a_daemons_redirected_output(tmp_path):
    inheriting, plain = tmp_path / "inheriting", tmp_path / "plain"
    inheriting.mkdir()
    plain.mkdir()
    daemons = []
    try:
        for directory, args in ((inheriting, ["--enable-stdio-inheritance"]), (plain, [])):
            pid, output = start_daemon(directory, *args)
            daemons.append(pid)
            port = poll(lambda d=directory: port_of(d), what="the daemon to listen")
            assert requests.get(f"http://127.0.0.1:{port}/?daemon").status_code == 200
        poll(lambda: contains_all(inheriting / "shell-redirect.log", ["raw fd1 daemon", "stderr daemon"]),
             what="the inheriting daemon's output in the shell's file")
        assert "daemon" not in (plain / "shell-redirect.log").read_text()
    finally:
        for pid in daemons:
            stop_master(pid)
