"""The logs: compiled formats, batched writing, reopening, handing over and counting losses, on real files."""

from __future__ import annotations

import os
import re
import struct

from forkserver.config import DEFAULT_ACCESS_LOG_FORMAT
from forkserver.logs import BATCH_REQUESTS, LOSS_REPORT_INTERVAL, AccessLog, LogFile, compile_access_format

ENVIRON = {
    "REMOTE_ADDR": "192.0.2.7", "REQUEST_METHOD": "GET", "RAW_URI": "/a?b=1", "PATH_INFO": "/a",
    "QUERY_STRING": "b=1", "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_USER_AGENT": "tester",
    "HTTP_X_FORWARDED_FOR": "203.0.113.9", "CONTENT_TYPE": "text/plain", "REMOTE_USER": "ada",
}
STARTED = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


class Finished:
    code = 201
    body_bytes = 13
    headers = [("Content-Type", "application/json"), ("X-Id", "7")]


def test_default_format_is_gunicorns_common_log_format():
    line = compile_access_format(DEFAULT_ACCESS_LOG_FORMAT)(ENVIRON, Finished(), STARTED, 0.25)
    assert re.fullmatch(r'192\.0\.2\.7 - ada \[\d\d/Nov/2023:\d\d:\d\d:\d\d [+-]\d{4}\] '
                        r'"GET /a\?b=1 HTTP/1\.1" 201 13 "-" "tester"\n', line), line


def test_header_environ_pid_and_duration_atoms():
    fmt = "%({x-forwarded-for}i)s %({content-type}i)s %({x-id}o)s %({x-missing}o)s %({REMOTE_USER}e)s %(p)s %(D)s %%(h)s"
    line = compile_access_format(fmt, pid=4242)(ENVIRON, Finished(), STARTED, 0.25)
    assert line == "203.0.113.9 text/plain 7 - ada <4242> 250000 %(h)s\n"


def test_batched_lines_are_all_written_in_order_when_flushed(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(LogFile(str(path), "access_logfile", 1), "%(U)s %(s)s", batched=True)
    count = BATCH_REQUESTS * 2 + 5
    for i in range(count):
        log.log({**ENVIRON, "PATH_INFO": f"/{i}-" + "x" * 200}, Finished(), STARTED, 0.0)
    assert len(path.read_text().splitlines()) == BATCH_REQUESTS * 2  # full batches went out on their own
    log.flush()
    lines = path.read_text().splitlines()
    assert [line.split("-")[0] for line in lines] == [f"/{i}" for i in range(count)]
    assert all(line.endswith(" 201") for line in lines)
    os.close(log.target.fd)


def test_unencodable_text_is_escaped_not_lost(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(LogFile(str(path), "access_logfile", 1), "%(U)s", batched=False)
    log.log({**ENVIRON, "PATH_INFO": "/caf\udce9"}, Finished(), STARTED, 0.0)  # a lone surrogate
    assert path.read_bytes() == b"/caf\\udce9\n"
    os.close(log.target.fd)


def test_the_master_sends_its_log_descriptors_under_their_own_numbers(tmp_path):
    import socket

    from forkserver.handover import LogHandover

    handover = LogHandover()
    ends = handover.prepare()
    worker_end = socket.socket(fileno=os.dup(ends[1].fileno()))
    handover.attach(4242, ends)
    log_file = LogFile(str(tmp_path / "a.log"), "access_logfile", 1)
    try:
        assert handover.send(4242, [LogFile("-", "error_logfile", 2), log_file])  # a standard stream is not sent
        data, fds, _, _ = socket.recv_fds(worker_end, 64, 8)
        assert data == struct.pack("<i", log_file.fd) and len(fds) == 1
        assert os.path.samestat(os.fstat(fds[0]), os.fstat(log_file.fd))
        os.close(fds[0])
        assert not handover.send(5151, [log_file])  # no such worker
    finally:
        handover.close()
        worker_end.close()
        os.close(log_file.fd)


def test_a_handed_over_descriptor_replaces_only_a_log_descriptor(tmp_path):
    """The worker's side of USR1: each received descriptor goes onto the log number it names, nothing else."""
    import socket

    from forkserver.handover import receive

    old, fresh, bystander = tmp_path / "old.log", tmp_path / "fresh.log", tmp_path / "other"
    target = LogFile(str(old), "error_logfile", 2)
    other = os.open(bystander, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    fresh_fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        socket.send_fds(master_end, [struct.pack("<i", target.fd)], [fresh_fd])
        socket.send_fds(master_end, [struct.pack("<i", other)], [fresh_fd])  # not a log of ours: ignored
        assert receive(worker_end, [target]) == 1
        target.write(b"after\n")
        os.write(other, b"untouched\n")
        assert fresh.read_text() == "after\n" and bystander.read_text() == "untouched\n" and old.read_text() == ""
        assert receive(worker_end, [target]) == 0  # nothing waiting: returns at once
    finally:
        for sock in (master_end, worker_end):
            sock.close()
        for fd in (other, fresh_fd, target.fd):
            os.close(fd)


def test_a_failed_reopen_keeps_the_old_file_and_says_why(tmp_path, caplog):
    directory = tmp_path / "d"
    directory.mkdir()
    target = LogFile(str(directory / "x.log"), "error_logfile", 2)
    try:
        (directory / "x.log").rename(tmp_path / "x.log.1")
        directory.rmdir()
        assert target.reopen() is False
        target.write(b"still here\n")
        assert (tmp_path / "x.log.1").read_text() == "still here\n"
        assert [r.getMessage() for r in caplog.records] == [
            f"reopen: cannot open '{directory / 'x.log'}': No such file or directory; "
            "still writing to the file it had open"]
    finally:
        os.close(target.fd)


def test_lines_that_cannot_be_written_are_counted_and_reported_once_per_interval(caplog):
    target = LogFile("/dev/full", "access_logfile", 1)
    try:
        target.write(b"one\ntwo\n")
        target.write(b"three\n")
        assert target.dropped == 3
        target.report_losses(100.0)
        target.report_losses(101.0)  # within the interval: nothing more
        target.write(b"four\n")
        target.report_losses(120.0)
        target.report_losses(100.0 + LOSS_REPORT_INTERVAL)
        assert [r.getMessage() for r in caplog.records] == [
            "3 log line(s) could not be written to /dev/full (No space left on device); 3 lost in all",
            "1 log line(s) could not be written to /dev/full (No space left on device); 4 lost in all"]
    finally:
        os.close(target.fd)
