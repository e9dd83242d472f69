"""A burst of HUPs reloads at most twice: once at once, once more for everything that came meanwhile.

The app reads a version file when it is imported and takes a moment to
import, so the burst (50 HUPs, each after a new version is written) lands
while the first new generation boots.  Every worker pid the master ever had
is counted, from its children (polled) and from its "worker ready" lines.
"""

from __future__ import annotations

import re
import signal
import threading

import psutil
import requests
from harness import poll

HUPS = 50
WORKERS = 2
IMPORT_SECONDS = 1.0  # the app's import time: the burst takes a few milliseconds

APP = f'''
import time
from pathlib import Path

VERSION = (Path(__file__).parent / "version.txt").read_text()
time.sleep({IMPORT_SECONDS})


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [VERSION.encode()]
'''


class PidWatcher:
    """Polls a process's children in a thread and remembers every pid seen."""

    def __init__(self, pid: int) -> None:
        self.master = psutil.Process(pid)
        self.seen: set[int] = set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped.wait(0.01):
            try:
                self.seen.update(child.pid for child in self.master.children())
            except psutil.NoSuchProcess:
                return

    def stop(self) -> set[int]:
        self.stopped.set()
        self.thread.join(5)
        return self.seen


def version(url: str) -> str:
    try:
        return requests.get(url, timeout=2).text
    except requests.RequestException:
        return ""


def test_a_burst_of_hups_is_one_reload_plus_one_follow_up_that_serves_the_last_version(server, tmp_path):
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    (app_dir / "hupapp.py").write_text(APP)
    version_file = app_dir / "version.txt"
    version_file.write_text("v0")
    srv = server("hupapp:app", "-w", str(WORKERS), "--pythonpath", str(app_dir), workers=WORKERS)
    watcher = PidWatcher(srv.pid)
    try:
        for number in range(1, HUPS + 1):
            version_file.write_text(f"v{number}")
            srv.signal(signal.SIGHUP)
        last = f"v{HUPS}"
        poll(lambda: all(version(srv.url) == last for _ in range(4)) and len(srv.worker_pids()) == WORKERS,
             timeout=60, what=f"every worker to serve {last}")
    finally:
        seen = watcher.stop()
    log = srv.log()
    seen |= {int(pid) for pid in re.findall(r"worker ready slot=\d+ pid=(\d+)", log)}
    assert len(seen) <= WORKERS * 3, f"{len(seen)} workers for {HUPS} HUPs; {log.count('reloading (HUP)')} reloads"
    assert log.count("reloading (HUP)") == 2, log
    assert "reloading again once it is ready" in log
    assert version(srv.url) == last
