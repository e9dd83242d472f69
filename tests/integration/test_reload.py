"""Development mode: ``--reload`` restarts the workers when the app's code changes.

Each server test writes a small project into a temp directory, serves it
with ``--reload`` (and static files beside it), edits the files the way an
editor would, and waits for the new answer against a deadline.  The
watcher itself (both the inotify and the polling backend) is also driven
in-process at the end, over real files.
"""

from __future__ import annotations

import os
import socket
import textwrap
import threading
import time
from pathlib import Path
from typing import Self

import psutil
import pytest

from harness import ServerProcess, poll, read_all

from forkserver.reloader import Reloader, reporting

DEADLINE = 15.0  # seconds for a change to be served; generous for a loaded 2-core machine

APP = '''
import helper

def app(environ, start_response):
    body = (helper.MESSAGE + "\\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''


def write(path: Path, text: str) -> None:
    """Save like an editor that writes in place (a close-after-write)."""
    path.write_text(textwrap.dedent(text))


def save_by_rename(path: Path, text: str) -> None:
    """Save like vim or an IDE: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".swp~")
    tmp.write_text(textwrap.dedent(text))
    os.replace(tmp, path)


@pytest.fixture
def project(tmp_path) -> Path:
    proj = tmp_path / "proj"
    (proj / "public").mkdir(parents=True)
    write(proj / "devapp.py", APP)
    write(proj / "helper.py", 'MESSAGE = "v1"\n')
    (proj / "public" / "style.css").write_text("body { color: red }\n")
    return proj


def start(server, project: Path, *args: str) -> ServerProcess:
    return server("devapp:app", "--reload", "-w", "2", "--threads", "2", "--pythonpath", str(project),
                  "--static", "/static=./public", *args, cwd=project, workers=2)


def get(srv: ServerProcess, path: str = "/") -> str:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        answer = read_all(conn)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    return body.decode()


def serves(srv: ServerProcess, text: str) -> None:
    poll(lambda: get(srv) == text + "\n", DEADLINE, what=f"the server to answer {text!r}")


class Hammer:
    """A client making fresh connections in a loop; any failure is kept."""

    def __init__(self, srv: ServerProcess) -> None:
        self.srv, self.failures, self.answers = srv, [], set()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.answers.add(get(self.srv))
            except (OSError, AssertionError) as exc:
                self.failures.append(repr(exc))
            time.sleep(0.02)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(10)


def test_edit_break_and_fix(server, project):
    srv = start(server, project)
    assert get(srv) == "v1\n"
    master = srv.pid
    with Hammer(srv) as hammer:
        # An edit of the same size, right away: no stale bytecode may be served.
        write(project / "helper.py", 'MESSAGE = "v2"\n')
        serves(srv, "v2")
    assert not hammer.failures, hammer.failures[:5]
    assert hammer.answers <= {"v1\n", "v2\n"}
    assert "reload: " in srv.log() and "helper.py changed" in srv.log()
    poll(lambda: len(srv.worker_pids()) == 2, DEADLINE, what="the old generation to retire")

    # Break it: the error is logged, the last good code keeps serving.
    log_size = len(srv.log())
    write(project / "helper.py", 'MESSAGE = "v3"\nthis is not python(\n')
    poll(lambda: "reload failed" in srv.log()[log_size:], DEADLINE, what="the failed reload in the log")
    failure = srv.log()[log_size:]
    assert "SyntaxError" in failure and "helper.py" in failure, failure
    for _ in range(10):
        assert get(srv) == "v2\n"
        time.sleep(0.1)

    # Fix it (saved by rename this time): the fix is served.
    with Hammer(srv) as hammer:
        save_by_rename(project / "helper.py", 'MESSAGE = "v4"\n')
        serves(srv, "v4")
    assert not hammer.failures, hammer.failures[:5]
    assert srv.pid == master and srv.proc.poll() is None  # the master never restarted
    poll(lambda: len(srv.worker_pids()) == 2, DEADLINE, what="two workers again")


def test_static_files_change_without_a_reload(server, project):
    srv = start(server, project)
    assert get(srv, "/static/style.css") == "body { color: red }\n"
    (project / "public" / "style.css").write_text("body { color: blue }\n")
    assert get(srv, "/static/style.css") == "body { color: blue }\n"
    time.sleep(1.5)  # a reload would have been logged by now
    assert "reload: " not in srv.log()


def test_a_missing_module_is_noticed_when_created(server, project):
    srv = start(server, project)
    log_size = len(srv.log())
    write(project / "helper.py", 'from later import MESSAGE\n')
    poll(lambda: "reload failed" in srv.log()[log_size:], DEADLINE, what="the failed reload")
    assert "later" in srv.log()[log_size:]
    assert get(srv) == "v1\n"
    write(project / "later.py", 'MESSAGE = "from a new module"\n')
    serves(srv, "from a new module")


def test_extra_files_and_directories(server, project):
    (project / "templates").mkdir()
    (project / "templates" / "page.html").write_text("page one")
    (project / ".env").write_text("GREETING=hello")
    write(project / "helper.py", '''
        import pathlib
        MESSAGE = pathlib.Path(".env").read_text() + " " + pathlib.Path("templates/page.html").read_text()
        ''')
    srv = start(server, project, "--reload-extra-file", ".env", "--reload-extra-file", "templates")
    assert get(srv) == "GREETING=hello page one\n"
    (project / ".env").write_text("GREETING=bonjour")
    serves(srv, "GREETING=bonjour page one")
    (project / "templates" / "page.html").write_text("page two")
    serves(srv, "GREETING=bonjour page two")


def test_the_master_does_not_spin_while_watching(server, project):
    srv = start(server, project)
    master = psutil.Process(srv.pid)
    time.sleep(0.5)
    before = sum(master.cpu_times()[:2])
    time.sleep(3)
    used = sum(master.cpu_times()[:2]) - before
    assert used < 0.5, f"master used {used:.2f}s of CPU in 3s while idle"


def test_reload_with_preload_is_refused(server, project):
    srv = server("devapp:app", "--reload", "--preload", "--pythonpath", str(project), cwd=project, wait=False)
    assert srv.wait_exit() == 78
    lines = srv.log().strip().splitlines()
    assert len(lines) == 1 and "reload cannot be combined with preload" in lines[0], lines


# -- the watcher in-process, over real files ------------------------------------------------


@pytest.fixture(params=["inotify", "polling"])
def watcher(request, tmp_path):
    reloader = Reloader(use_inotify=request.param == "inotify")
    if request.param == "inotify":
        assert reloader.inotify is not None, "inotify should work on this Linux machine"
    yield reloader
    reloader.close()


def import_under_report(reloader: Reloader, directory: Path, module: str) -> None:
    """Import ``module`` from ``directory`` the way a worker does, then forget it again."""
    import sys
    sys.path.insert(0, str(directory))
    try:
        with reporting(reloader.report_dir):
            __import__(module)
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop(module, None)
        sys.dont_write_bytecode = False


def wait_changed(reloader: Reloader, timeout: float = 5.0) -> bool:
    return poll(lambda: reloader.changed(), timeout, interval=0.05, what="a change to be seen")


def quiet(reloader: Reloader, seconds: float = 1.3) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if reloader.changed():
            return False
        time.sleep(0.05)
    return True


def test_watcher_sees_edits_new_modules_and_ignores_the_rest(watcher, tmp_path):
    (tmp_path / "wmod_a.py").write_text("X = 1\n")
    import_under_report(watcher, tmp_path, "wmod_a")
    assert quiet(watcher)
    (tmp_path / "wmod_a.py").write_text("X = 2\n")
    assert wait_changed(watcher)
    assert quiet(watcher)  # one change, reported once
    (tmp_path / "notes.txt").write_text("not code")
    (tmp_path / "wmod_a.py.swp").write_text("editor junk")
    assert quiet(watcher)
    (tmp_path / "brand_new.py").write_text("")
    assert wait_changed(watcher)
    os.utime(tmp_path / "wmod_a.py")  # touch forces a reload
    assert wait_changed(watcher)


def test_a_burst_of_saves_is_one_change(watcher, tmp_path):
    (tmp_path / "wmod_b.py").write_text("X = 0\n")
    import_under_report(watcher, tmp_path, "wmod_b")
    assert quiet(watcher)
    for i in range(5):
        (tmp_path / "wmod_b.py").write_text(f"X = {i + 1}\n")
        time.sleep(0.03)
    assert wait_changed(watcher)
    assert quiet(watcher)


def test_an_edit_between_import_and_report_reading_counts(watcher, tmp_path):
    (tmp_path / "wmod_c.py").write_text("X = 1\n")
    import_under_report(watcher, tmp_path, "wmod_c")
    (tmp_path / "wmod_c.py").write_text("X = 22\n")  # before the master read the report
    assert wait_changed(watcher)


def test_a_failed_import_reports_the_broken_file(watcher, tmp_path):
    (tmp_path / "wmod_d.py").write_text("import wmod_e\n")
    (tmp_path / "wmod_e.py").write_text("this is ( not python\n")
    with pytest.raises(SyntaxError):
        import_under_report(watcher, tmp_path, "wmod_d")
    assert quiet(watcher, 0.3)
    (tmp_path / "wmod_e.py").write_text("fixed = True\n")
    assert wait_changed(watcher)


def test_hold_keeps_a_change_for_later(tmp_path):
    reloader = Reloader()
    try:
        (tmp_path / "wmod_f.py").write_text("X = 1\n")
        import_under_report(reloader, tmp_path, "wmod_f")
        assert quiet(reloader, 0.3)
        (tmp_path / "wmod_f.py").write_text("X = 2\n")
        time.sleep(0.3)
        assert not reloader.changed(hold=True)
        assert reloader.changed()
        assert not reloader.changed()
    finally:
        reloader.close()


def test_a_directory_that_comes_back_is_watched_again(tmp_path):
    reloader = Reloader()
    try:
        package = tmp_path / "pkgdir"
        package.mkdir()
        (package / "wmod_g.py").write_text("X = 1\n")
        import_under_report(reloader, package, "wmod_g")
        assert quiet(reloader, 0.3)
        package.rename(tmp_path / "elsewhere")
        assert wait_changed(reloader)  # the code is gone: that is a change too
        (tmp_path / "elsewhere").rename(package)
        assert wait_changed(reloader)
        (package / "wmod_g.py").write_text("X = 3\n")
        assert wait_changed(reloader)
    finally:
        reloader.close()


def test_close_removes_the_report_directory():
    reloader = Reloader()
    path = reloader.report_dir
    assert os.path.isdir(path)
    reloader.close()
    assert not os.path.exists(path)


def test_hostile_reports_are_refused_without_blocking_or_following_links(tmp_path, caplog):
    """Workers own the report directory and run app code: nothing they put there stalls or misleads the master."""
    from forkserver.reloader import MAX_REPORT_BYTES

    reloader = Reloader(use_inotify=False)
    try:
        outside = tmp_path / "outside"
        outside.mkdir()
        secret = outside / "keep.json"
        secret.write_text('{"files": {}}')
        reports = Path(reloader.report_dir)
        os.mkfifo(reports / "1.json")  # opened with a plain open(), this waits for a writer forever
        (reports / "2.json").symlink_to(secret)
        (reports / "3.json").write_bytes(b'{"files": {"/a": [1, 2]}, "pad": "' + b"x" * MAX_REPORT_BYTES + b'"}')
        (reports / "4.json").write_text('{"files": {"relative/path.py": [1, 2]}}')
        (reports / "5.json").write_text('{"files": {"/x.py": ["1", 2]}}')
        (reports / "6.json").write_text('[1, 2]')
        done = threading.Event()
        thread = threading.Thread(target=lambda: (reloader.changed(), done.set()), daemon=True)
        thread.start()
        assert done.wait(10), "the master blocked on a worker's report"
        assert sorted(os.listdir(reports)) == []  # each refused report is removed
        assert secret.exists()
        refused = [r.getMessage() for r in caplog.records if "unreadable worker report" in r.getMessage()]
        assert len(refused) == 6, refused

        # The directory's path swapped for a link to another directory: the master keeps
        # reading (and deleting in) the directory it made, never the link's target.
        moved = tmp_path / "moved"
        os.rename(reports, moved)
        reports.symlink_to(outside)
        reloader.changed()
        assert secret.exists()
        os.unlink(reports)
        os.rename(moved, reports)
    finally:
        reloader.close()
