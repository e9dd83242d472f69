"""The primitives the master writes its files with, on real files: links are refused or replaced, never followed."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest

from forkserver.errors import BindError, ConfigError
from forkserver.logs import LogFile
from forkserver.master.pidfile import Pidfile
from forkserver.safefiles import (
    FIFO_REFUSED,
    LINK_REFUSED,
    location_problems,
    is_socket_file,
    open_nofollow,
    read_nofollow,
    reason,
    replace_file,
    unsafe_directory,
)
from forkserver.sockets import bind, parse_address


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file a planted link points at; its content must survive every test."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


def test_open_nofollow_refuses_a_link_and_says_so(tmp_path, victim):
    link = tmp_path / "app.log"
    link.symlink_to(victim)
    with pytest.raises(OSError) as raised:
        open_nofollow(str(link), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert raised.value.errno == errno.ELOOP and reason(raised.value) == LINK_REFUSED
    assert victim.read_text() == "precious\n"


def test_open_nofollow_creates_a_missing_file(tmp_path):
    fd = open_nofollow(str(tmp_path / "new.log"), os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        assert not os.get_inheritable(fd) and os.get_blocking(fd)
    finally:
        os.close(fd)
    assert (tmp_path / "new.log").exists()


def test_read_nofollow(tmp_path, victim):
    assert read_nofollow(str(tmp_path / "missing")) is None
    assert read_nofollow(str(victim)) == b"precious\n"
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(OSError) as raised:
        read_nofollow(str(link))
    assert raised.value.errno == errno.ELOOP


def test_a_fifo_nobody_reads_fails_the_open_instead_of_hanging_it(tmp_path):
    fifo = tmp_path / "error.log"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=f"error_logfile: cannot open '{fifo}': {FIFO_REFUSED}"):
        LogFile(str(fifo), "error_logfile", 2)  # a plain open would wait for a reader forever


def test_read_nofollow_does_not_block_on_a_fifo(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert read_nofollow(str(fifo)) == b""  # no writer: EOF at once, where a plain open would wait forever


def test_replace_file_replaces_a_link_instead_of_writing_through_it(tmp_path, victim):
    path = tmp_path / "fs.pid"
    path.symlink_to(victim)
    replace_file(str(path), b"123\n")
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and path.read_text() == "123\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fs.pid", "victim"]  # no temporary left


def test_replace_file_gives_the_mode_less_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        replace_file(str(tmp_path / "fs.pid"), b"1\n", 0o644)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "fs.pid").stat().st_mode) == 0o640


def test_replace_file_into_a_missing_directory_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        replace_file(str(tmp_path / "nowhere" / "fs.pid"), b"1\n")
    assert list(tmp_path.iterdir()) == []


def test_is_socket_file_looks_at_the_path_itself(tmp_path):
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        link = tmp_path / "link.sock"
        link.symlink_to(path)
        assert is_socket_file(str(path)) is True
        assert is_socket_file(str(link)) is False
    assert is_socket_file(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("mode, unsafe", [(0o777, True), (0o1777, False), (0o775, False), (0o755, False)])
def test_only_world_writable_directories_without_the_sticky_bit_are_unsafe(tmp_path, mode, unsafe):
    directory = tmp_path / "run"
    directory.mkdir()
    directory.chmod(mode)
    assert unsafe_directory(str(directory / "fs.pid")) == (str(directory) if unsafe else None)


def test_an_unsafe_ancestor_counts_too(tmp_path):
    outer = tmp_path / "srv"
    (outer / "app").mkdir(parents=True)
    outer.chmod(0o777)  # anybody may rename app/ away and put their own in its place
    assert unsafe_directory(str(outer / "app" / "fs.pid")) == str(outer)


def test_location_problems_names_every_problem_on_its_own_line(tmp_path, victim):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    (tmp_path / "error.log").symlink_to(victim)
    assert location_problems([("pid", str(tmp_path / "fine.pid"))]) == []
    lines = location_problems([("pid", str(open_dir / "fs.pid")), ("error_logfile", str(tmp_path / "error.log")),
                               ("access_logfile", str(tmp_path / "access.log"))])
    assert len(lines) == 2
    assert lines[0].startswith("pid: ") and "anybody may write to and is not sticky" in lines[0]
    assert lines[1].startswith("error_logfile: ") and LINK_REFUSED in lines[1]


# -- the master's writers, each on its own: they refuse a link even after the start-up check ------


def test_log_file_refuses_a_link_at_open_and_at_reopen(tmp_path, victim):
    path = tmp_path / "error.log"
    path.symlink_to(victim)
    with pytest.raises(ConfigError, match=f"error_logfile: cannot open '{path}': {LINK_REFUSED}"):
        LogFile(str(path), "error_logfile", 2)
    path.unlink()
    log = LogFile(str(path), "error_logfile", 2)
    try:
        path.rename(tmp_path / "error.log.1")  # logrotate moves it away; someone plants a link in its place
        path.symlink_to(victim)
        assert log.reopen() is False  # refused, logged, and the old file kept
        log.write(b"still here\n")
    finally:
        os.close(log.fd)
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "error.log.1").read_text() == "still here\n"


def test_pidfile_refuses_a_link_and_writes_under_an_unpredictable_name(tmp_path, victim):
    path = tmp_path / "fs.pid"
    path.symlink_to(victim)
    with pytest.raises(ConfigError, match=f"pid: cannot read '{path}': {LINK_REFUSED}"):
        Pidfile(str(path)).create(os.getpid())
    path.unlink()
    (tmp_path / f"fs.pid.{os.getpid()}.tmp").symlink_to(victim)
    pidfile = Pidfile(str(path))
    pidfile.create(os.getpid())
    assert path.read_text() == f"{os.getpid()}\n" and victim.read_text() == "precious\n"
    pidfile.remove()
    assert not path.exists()


def test_bind_refuses_a_link_at_the_socket_path(tmp_path):
    target = tmp_path / "elsewhere.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(target))  # closed without unlink: a crashed server's leftover
    path = tmp_path / "fs.sock"
    path.symlink_to(target)
    with pytest.raises(BindError, match="is a symbolic link"):
        bind(parse_address(f"unix:{path}"), backlog=8, reuse_port=False, unix_mode=0o600)
    assert path.is_symlink() and stat.S_ISSOCK(target.lstat().st_mode)


def test_bind_leaves_the_umask_as_it_found_it(tmp_path):
    previous = os.umask(0o022)
    try:
        listener = bind(parse_address(f"unix:{tmp_path}/fs.sock"), backlog=8, reuse_port=False, unix_mode=0o660)
        listener.close(remove=True)
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(previous)
