"""The master's reading of worker notices, on a real non-blocking pipe: torn, overlong and hostile lines."""

from __future__ import annotations

import os

import pytest

from forkserver.master.notices import MAX_LINE_BYTES, Notice, NoticeReader, parse


@pytest.fixture
def pipe():
    r, w = os.pipe2(os.O_NONBLOCK)
    yield NoticeReader(r), w
    os.close(r)
    os.close(w)


def test_real_notices_parse():
    assert parse(b"ready 123") == Notice("ready", 123, "")
    assert parse(b"failed 9 4 cannot import app: No module") == Notice("failed", 9, "cannot import app: No module", 4)
    assert parse(b"recycle 7 max_requests=100") == Notice("recycle", 7, "max_requests=100")


@pytest.mark.parametrize("line", [b"ready \xd9\xa1\xd9\xa2", b"ready", b"ready -1", b"ready 12345678901",
                                  b"hello 1", b"\x80\x03cbuiltins\nopen", b"ready 1x"])
def test_anything_else_is_not_a_notice(line):
    assert parse(line) is None


def test_a_failed_notice_without_a_code_still_fails_with_code_1_and_text_stays_printable():
    assert parse(b"failed 5 \x1b[31mboom\r") == Notice("failed", 5, "?[31mboom?", 1)
    assert parse(b"failed 5 \xff\xfe") == Notice("failed", 5, "\ufffd\ufffd", 1)


def test_a_line_torn_across_reads_is_joined(pipe):
    reader, w = pipe
    os.write(w, b"ready 1\nrecy")
    assert reader.read() == [Notice("ready", 1, "")]
    assert reader.read() == []  # nothing new: no wait
    os.write(w, b"cle 2 why\n")
    assert reader.read() == [Notice("recycle", 2, "why")]


def test_an_overlong_line_is_dropped_up_to_its_newline_and_counted(pipe, caplog):
    reader, w = pipe
    os.write(w, b"failed 1 2 " + b"x" * MAX_LINE_BYTES)
    assert reader.read() == []
    os.write(w, b"y" * 1000 + b"ready 3\nready 4\n")  # the end of the long line, then a real one
    assert reader.read() == [Notice("ready", 4, "")]
    os.write(w, b"garbage\nready 5\n")
    assert reader.read() == [Notice("ready", 5, "")]
    assert reader.malformed == 2
    assert len([r for r in caplog.records if "malformed worker notice" in r.getMessage()]) == 1
