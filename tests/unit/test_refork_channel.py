"""The refork channel's messages and the master's bookkeeping of notices that come early."""

from __future__ import annotations

import os
import socket
import time

import pytest

from forkserver import refork
from forkserver.master import refork as supervision
from forkserver.sources import load_config
from forkserver.errors import ConfigError
from forkserver.master.notices import Notice


@pytest.mark.parametrize("message, expected", [
    (b"warm 1000", ("warm", "1000")),
    (b"molded", ("molded",)),
    (b"forked 7 4242", ("forked", "7", "4242")),
    (b"unforked 7 fork failed: \x1b[31mno", ("unforked", "7", "fork failed: ?[31mno")),
    (b"warm -1", None),
    (b"forked 7 4242 9", None),
    (b"forked 7 12345678901", None),
    (b"molded\n", None),
    (b"", None),
])
def test_messages_from_a_worker_are_parsed_strictly(message, expected):
    assert refork.parse(message) == expected


def test_fork_requests_round_trip_and_reject_anything_else():
    assert refork.parse_fork(refork.encode_fork(3, 1, 2, 5)) == (3, 1, 2, 5)
    assert refork.parse_fork(b"fork 3 1 2") is None
    assert refork.parse_fork(b"fork 3 1 2 5 6") is None


def test_a_fork_request_carries_descriptors_over_the_channel():
    ours, theirs = refork.new_channel()
    read_end, write_end = os.pipe()
    try:
        assert refork.send(ours, refork.encode_fork(1, 0, 1, 0), [write_end])
        data, ancillary, _flags, _address = theirs.recvmsg(refork.MAX_MESSAGE, socket.CMSG_SPACE(16))
        assert refork.parse_fork(data) == (1, 0, 1, 0)
        (level, kind, payload), = ancillary
        passed = int.from_bytes(payload[:4], "little" if socket.htonl(1) != 1 else "big")
        os.write(passed, b"x")
        assert os.read(read_end, 1) == b"x"
        os.close(passed)
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        ours.close()
        theirs.close()


def test_parent_of_tells_the_real_parent_and_nothing_for_a_missing_process():
    assert supervision.parent_of(os.getpid()) == os.getppid()
    assert supervision.parent_of(2 ** 22 + 1) == 0


def test_early_notices_are_bounded_and_turn_into_strays_after_the_answer_timeout(monkeypatch):
    state = supervision.ReforkState((10,))
    for pid in range(supervision.MAX_EARLY + 10):
        state.hold_early(Notice("ready", 100000 + pid, ""))
    assert sum(map(len, state.early.values())) == supervision.MAX_EARLY
    assert state.claim_early(100000) == [Notice("ready", 100000, "")]
    assert state.strays() == []  # not late yet
    later = time.monotonic() + supervision.ANSWER_TIMEOUT + 1
    monkeypatch.setattr(supervision.time, "monotonic", lambda: later)
    strays = state.strays()
    assert len(strays) == supervision.MAX_EARLY - 1 and 100000 not in strays
    assert not state.early and not state.early_since


def test_refork_after_takes_a_toml_list_or_commas_and_rejects_bad_counts(tmp_path):
    config_file = tmp_path / "forkserver.toml"
    config_file.write_text("refork_after = [1000, 20000]\n")
    assert load_config(["app:x", "-c", str(config_file)], {}).config.refork_after == (1000, 20000)
    assert load_config(["app:x", "--refork-after", "5,50"], {}).config.refork_after == (5, 50)
    assert load_config(["app:x"], {"FORKSERVER_REFORK_AFTER": "7"}).config.refork_after == (7,)
    assert load_config(["app:x"], {}).config.refork_after == ()
    for bad, expected in ((["--refork-after", "ten"], "a list of integers"),
                          (["--refork-after", "50,5"], "increasing request counts"),
                          (["--refork-after", "0"], "at least 1")):
        with pytest.raises(ConfigError, match=expected):
            load_config(["app:x", *bad], {})
    for typed in ('["1000"]', "[true]", "1000", "[1.5]"):  # a file has real types: numbers are numbers
        config_file.write_text(f"refork_after = {typed}\n")
        with pytest.raises(ConfigError, match="a list of integers"):
            load_config(["app:x", "-c", str(config_file)], {})
