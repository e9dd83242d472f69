"""Workers started as root with ``user``/``group`` keep nothing of root: not its uid, gid or groups.

Each case starts a real master as root, reads the kernel's view of every
worker's credentials in /proc/PID/status, and asks the app to read a
``root:root 0640`` file, which only root's group may read.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from harness import poll
from test_startup_errors import assert_fails, forkserver  # noqa: F401 (a fixture, used by name)

from forkserver.errors import EXIT_CONFIG

NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrnam("nogroup").gr_gid


@pytest.fixture
def secret() -> Iterator[Path]:
    """A ``root:root 0640`` file in a directory anybody may enter (pytest's own are root-only)."""
    directory = Path(tempfile.mkdtemp(prefix="forkserver-secret-"))
    try:
        directory.chmod(0o755)
        path = directory / "secret.txt"
        path.write_text("root's eyes only")
        os.chown(path, 0, 0)
        path.chmod(0o640)
        yield path
    finally:
        shutil.rmtree(directory)


def credentials(pid: int) -> dict[str, list[int]]:
    """The Uid, Gid (real, effective, saved, filesystem) and Groups lines of /proc/PID/status."""
    wanted = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            wanted[key] = [int(number) for number in value.split()]
    return wanted


def serve_as(server, secret: Path, *identity: str):
    """Start two workers as ``identity`` and wait until both have booted (and so dropped privileges)."""
    srv = server("privileges:application", "-w", "2", "--log-level", "debug", *identity,
                 env={"FS_TEST_SECRET": str(secret)}, workers=2)
    poll(lambda: all(re.search(rf"worker ready slot=\d+ pid={pid} ", srv.log()) for pid in srv.worker_pids()),
         what="both workers to finish booting")
    assert os.geteuid() == 0 and credentials(srv.pid)["Uid"] == [0, 0, 0, 0]  # the master stays root
    return srv


@pytest.mark.parametrize("identity", [("--user", "nobody"), ("--user", "nobody", "--group", "nogroup")],
                         ids=["user-only", "user-and-group"])
def test_workers_have_only_the_users_groups(server, secret, identity):
    srv = serve_as(server, secret, *identity)
    expected_groups = sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid)))
    for pid in srv.worker_pids():
        seen = credentials(pid)
        assert seen["Uid"] == [NOBODY.pw_uid] * 4
        assert seen["Gid"] == [NOGROUP] * 4
        assert sorted(seen["Groups"]) == expected_groups and 0 not in seen["Groups"]
    answer = requests.get(srv.url, timeout=5)
    assert answer.status_code == 403, answer.text  # root's group 0 would have let it read the file
    report = answer.json()
    assert report["error"] == "Permission denied" and 0 not in report["groups"]
    assert report["uid"] == NOBODY.pw_uid and report["gid"] == NOGROUP


def test_group_alone_clears_the_supplementary_groups(server, secret):
    srv = serve_as(server, secret, "--group", "nogroup")
    for pid in srv.worker_pids():
        seen = credentials(pid)
        assert seen["Gid"] == [NOGROUP] * 4 and seen["Groups"] == []


def test_uid_without_a_passwd_entry_gets_no_groups(server, secret):
    uid = next(candidate for candidate in range(54321, 54421) if not _has_passwd_entry(candidate))
    srv = serve_as(server, secret, "--user", str(uid), "--group", "nogroup")
    for pid in srv.worker_pids():
        seen = credentials(pid)
        assert seen["Uid"] == [uid] * 4 and seen["Gid"] == [NOGROUP] * 4 and seen["Groups"] == []
    assert requests.get(srv.url, timeout=5).status_code == 403


def test_uid_without_a_passwd_entry_needs_a_group(forkserver):
    uid = next(candidate for candidate in range(54321, 54421) if not _has_passwd_entry(candidate))
    outcome = forkserver("privileges:application", "--user", str(uid), "-b", "127.0.0.1:0")
    assert_fails(outcome, EXIT_CONFIG, f"user: uid {uid} has no passwd entry", "set group")


def _has_passwd_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_reload_still_sees_the_imports_of_workers_running_as_nobody(server):
    """The workers report the files they imported into the master's directory, which they can still write."""
    project = Path(tempfile.mkdtemp(prefix="forkserver-reload-project-"))
    try:
        project.chmod(0o755)
        (project / "helper.py").write_text('MESSAGE = "v1"\n')
        (project / "devapp.py").write_text(
            "import helper\n"
            "def app(environ, start_response):\n"
            "    body = helper.MESSAGE.encode()\n"
            "    start_response('200 OK', [('Content-Length', str(len(body)))])\n"
            "    return [body]\n")
        srv = server("devapp:app", "--reload", "-w", "1", "--user", "nobody", "--pythonpath", str(project),
                     workers=1)
        assert requests.get(srv.url, timeout=5).text == "v1"
        (project / "helper.py").write_text('MESSAGE = "v2"\n')  # imported by the app, seen only through the report
        poll(lambda: requests.get(srv.url, timeout=5).text == "v2", 15.0, what="the edit to be served")
        assert "unreadable worker report" not in srv.log() and "cannot write the import report" not in srv.log()
    finally:
        shutil.rmtree(project)
