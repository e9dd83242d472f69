"""The access log: compiled formats and batched writing, against real files."""

from __future__ import annotations

import os
import re

from forkserver.config import DEFAULT_ACCESS_LOG_FORMAT
from forkserver.logs import BATCH_REQUESTS, AccessLog, LogFile, compile_access_format

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
