"""Log rotation (USR1) with workers running as ``nobody``, and log lines lost to a full disk.

The log files belong to root in a root-owned directory, as a systemd unit
plus logrotate leave them.  USR1 must never stop the server, kill a worker
or fail a request, also when the log directory is gone or read-only; and
lines a full disk swallows are counted in /stats and /metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from harness import poll
from test_stats_live import fetch, stats
from test_trust import as_nobody

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: workers drop to nobody, tests mount tmpfs")
MAX_REQUESTS = 3000  # the request loop's bound, whatever happens


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    """A root-owned 0755 directory for the logs."""
    directory = tmp_path / "logs"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    return directory


@contextlib.contextmanager
def tmpfs(at: Path, options: str) -> Iterator[Path]:
    """Mount a small tmpfs at ``at`` for the block; always unmounted."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(at)], check=True)
    try:
        yield at
    finally:
        subprocess.run(["umount", "-l", str(at)], check=False)


class RequestLoop:
    """Requests one after another, each on a new connection, in a thread; every failure is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set() and self.done < MAX_REQUESTS:
            try:
                answer = requests.get(self.url, timeout=10, headers={"Connection": "close"})
                if answer.status_code != 200:
                    self.failures.append(f"status {answer.status_code}")
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.done += 1

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def test_rotation_under_load_loses_no_request_and_no_worker(server, logs):
    access, error = logs / "access.log", logs / "error.log"
    srv = server("logging_app:app", "-w", "2", *as_nobody(), "--access-logfile", str(access),
                 "--access-logformat", "%(p)s %(r)s %(s)s", "--error-logfile", str(error), workers=2)
    workers = srv.worker_pids()
    assert all(os.stat(path).st_uid == 0 and os.stat(path).st_mode & 0o777 == 0o644 for path in (access, error))
    slow = threading.Thread(target=lambda: slow_answers.append(requests.get(srv.url + "/slow?1.5", timeout=15)))
    slow_answers: list[requests.Response] = []
    loop = RequestLoop(srv.url + "/")
    try:
        poll(lambda: loop.done >= 50, what="requests before the rotation")
        slow.start()  # in flight across the USR1
        access.rename(logs / "access.log.1")
        error.rename(logs / "error.log.1")
        srv.signal(signal.SIGUSR1)
        poll(lambda: error.exists() and "logs reopened" in error.read_text(), what="the master's line in the new error log")
        done_at_rotation = loop.done
        poll(lambda: loop.done >= done_at_rotation + 100, timeout=30, what="requests after the rotation")
    finally:
        loop.finish()
        slow.join(20)
    assert loop.failures == [], loop.failures[:5]
    assert [answer.status_code for answer in slow_answers] == [200]
    assert srv.worker_pids() == workers, "a worker died on USR1"
    assert srv.proc.poll() is None

    # Both workers write to the new files: access lines, and an error's traceback.
    def pids_in(path: Path, pattern: str) -> set[int]:
        return {int(pid) for pid in re.findall(pattern, path.read_text())}

    def both_wrote() -> bool:
        for _ in range(4):
            requests.get(srv.url + "/boom", timeout=10)
        return pids_in(access, r"<(\d+)> GET /boom") == pids_in(error, r"boom from worker (\d+)") == set(workers)
    poll(both_wrote, timeout=20, what="access lines and tracebacks from both workers in the new files")
    assert pids_in(access, r"<(\d+)> GET / ")  # the request loop's, after the rotation
    old_error = (logs / "error.log.1").read_text()
    assert "logs reopened" not in old_error and "Permission denied" not in old_error + error.read_text()
    assert all(os.stat(path).st_uid == 0 for path in (access, error))


def test_rotating_only_the_error_log_keeps_every_worker(server, logs):
    """The common systemd setup: access log off, error log in a file.  Workers used to reopen it by
    path as nobody and die on every USR1."""
    error = logs / "error.log"
    srv = server("logging_app:app", "-w", "2", *as_nobody(), "--error-logfile", str(error), workers=2)
    workers = srv.worker_pids()
    error.rename(logs / "error.log.1")
    srv.signal(signal.SIGUSR1)
    poll(lambda: error.exists() and "logs reopened" in error.read_text(), what="the reopened error log")

    def tracebacks_from_both() -> bool:
        for _ in range(4):
            requests.get(srv.url + "/boom", timeout=10)
        return all(f"boom from worker {pid}" in error.read_text() for pid in workers)
    poll(tracebacks_from_both, timeout=20, what="both workers' tracebacks in the new error log")
    assert srv.worker_pids() == workers
    assert "worker died" not in error.read_text() + (logs / "error.log.1").read_text()


def _start_and_move_the_logs_away(server, tmp_path: Path, logs: Path):
    """Start as nobody with both logs in ``logs``, then move the files (still open) out of it."""
    access, error = logs / "access.log", logs / "error.log"
    srv = server("logging_app:app", "-w", "2", *as_nobody(), "--access-logfile", str(access),
                 "--error-logfile", str(error), workers=2)
    moved = tmp_path / "moved"
    moved.mkdir()
    access.rename(moved / "access.log")
    error.rename(moved / "error.log")
    return srv, moved


def _usr1_fails_to_reopen(srv, moved: Path, why: str) -> None:
    """USR1, and the master says once per file why it could not reopen it, in the old error log."""
    srv.signal(signal.SIGUSR1)
    old_error = moved / "error.log"
    poll(lambda: "logs reopened" in old_error.read_text(), what="the master to finish the USR1")
    text = old_error.read_text()
    reopen_errors = [line for line in text.splitlines() if "cannot open" in line]
    assert len(reopen_errors) == 2, text  # one line per file
    assert all(why in line and "still writing to the file it had open" in line for line in reopen_errors), text
    assert srv.proc.poll() is None


def test_usr1_with_the_log_directory_gone_keeps_serving_on_the_old_files(server, tmp_path, logs):
    srv, moved = _start_and_move_the_logs_away(server, tmp_path, logs)
    logs.rmdir()
    _usr1_fails_to_reopen(srv, moved, "No such file or directory")
    _serves_and_replaces_a_worker(srv, moved / "access.log")


def test_usr1_with_the_log_directory_read_only_keeps_serving_on_the_old_files(server, tmp_path, logs):
    srv, moved = _start_and_move_the_logs_away(server, tmp_path, logs)
    with tmpfs(logs, "ro,size=16k"):  # the directory's path now leads to a read-only file system
        _usr1_fails_to_reopen(srv, moved, "Read-only file system")
        _serves_and_replaces_a_worker(srv, moved / "access.log")


def _serves_and_replaces_a_worker(srv, old_access: Path) -> None:
    """Requests still succeed and land in the old access file, and a killed worker's replacement boots."""
    workers = srv.worker_pids()
    for _ in range(10):
        assert requests.get(srv.url + "/?after", timeout=10).status_code == 200
    poll(lambda: "/?after" in old_access.read_text(), what="access lines in the old file")
    os.kill(workers[0], signal.SIGKILL)

    def replaced() -> int:
        """The replacement's pid once two workers run again (one look at the process table, not two)."""
        now = set(srv.worker_pids())
        fresh = now - set(workers)
        return len(now) == 2 and workers[0] not in now and len(fresh) == 1 and fresh.pop()

    replacement = poll(replaced, timeout=20, what="a replacement worker")
    poll(lambda: str(replacement) in {requests.get(srv.url + "/?replaced", timeout=10).text.strip()
                                      for _ in range(6)}, timeout=20, what="the replacement to serve")
    assert srv.proc.poll() is None
    poll(lambda: "/?replaced" in old_access.read_text(), what="the replacement's access lines in the old file")


def test_lines_lost_to_a_full_disk_are_counted_and_reported(server, tmp_path, logs):
    sock = tmp_path / "stats.sock"
    error = tmp_path / "error.log"  # on a disk with room, to read the report
    with tmpfs(logs, "size=64k"):
        access = logs / "access.log"
        srv = server("logging_app:app", "-w", "1", *as_nobody(), "--access-logfile", str(access),
                     "--error-logfile", str(error), "--stats-bind", f"unix:{sock}", workers=1)
        filler = os.open(logs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while True:
                    os.write(filler, b"\0" * 512)
        finally:
            os.close(filler)
        assert stats(str(sock))["counters"]["log_lines_dropped"] == 0
        # Lines of 2 KB: the few that still fit in the access log's last page go first.
        lost = srv.url + "/?lost=" + "x" * 2000
        for _ in range(30):
            assert requests.get(lost, timeout=10).status_code == 200
        doc = poll(lambda: (d := stats(str(sock)))["counters"]["log_lines_dropped"] >= 25 and d,
                   what="the lost lines to be counted")
        assert doc["workers"][0]["dropped_log_lines"] >= 25
        metrics = fetch(str(sock), "/metrics").decode()
        counted = re.search(r"^forkserver_log_lines_dropped_total (\d+)", metrics, re.M)
        assert counted and int(counted.group(1)) >= 25, metrics
        reports = poll(lambda: [ln for ln in error.read_text().splitlines() if "could not be written" in ln],
                       what="the report of lost lines")
        assert "access.log (No space left on device)" in reports[0]
        before = doc["counters"]["log_lines_dropped"]
        for _ in range(30):  # more losses within the minute: counted, not reported again
            requests.get(lost, timeout=10)
        poll(lambda: stats(str(sock))["counters"]["log_lines_dropped"] >= before + 30, what="more lost lines counted")
        assert len([ln for ln in error.read_text().splitlines() if "could not be written" in ln]) == 1
        assert srv.proc.poll() is None
        json.dumps(doc)
        srv.stop()


def test_a_reload_that_names_another_access_log_has_the_master_open_it(server, tmp_path, logs):
    """HUP with a new access_logfile: the master opens it (workers as nobody could not) and the new
    generation writes there; a path the master cannot open keeps the running config."""
    first, second = logs / "first.log", logs / "second.log"
    config = tmp_path / "forkserver.toml"
    config.write_text(f'app = "logging_app:app"\nworkers = 2\naccess_logfile = "{first}"\n')
    srv = server("-c", str(config), *as_nobody(), workers=2)
    old_workers = srv.worker_pids()
    config.write_text(config.read_text().replace(str(first), str(second)))
    srv.signal(signal.SIGHUP)
    poll(lambda: "reload complete" in srv.log(), timeout=20, what="the reload")
    poll(lambda: not set(old_workers) & set(srv.worker_pids()), timeout=20, what="the old generation to leave")

    def lands_in_second() -> bool:
        requests.get(srv.url + "/?second", timeout=10)
        return second.exists() and "/?second" in second.read_text()
    poll(lambda: lands_in_second(), what="the new generation's lines in the new access log")
    assert os.stat(second).st_uid == 0

    config.write_text(config.read_text().replace(str(second), str(tmp_path / "no-such-dir" / "x.log")))
    srv.signal(signal.SIGHUP)
    poll(lambda: "reload failed, keeping the running config" in srv.log(), what="the refused reload")
    assert "access_logfile: cannot open" in srv.log()
    assert requests.get(srv.url + "/?still", timeout=10).status_code == 200
    poll(lambda: "/?still" in second.read_text(), what="lines still in the running access log")
