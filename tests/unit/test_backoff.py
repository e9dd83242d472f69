"""AcceptPause: how pauses grow, end and are logged, driven by real OSErrors and a settable clock."""

from __future__ import annotations

import errno
import logging
import os

from forkserver.backoff import FIRST_PAUSE, MAX_PAUSE, REPORT_INTERVAL, AcceptPause


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def emfile() -> OSError:
    return OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_pauses_double_up_to_the_maximum_and_a_success_starts_again_short():
    clock = Clock()
    pause = AcceptPause("accept", clock=clock)
    lengths = []
    for _ in range(6):
        assert pause.failed(emfile())
        lengths.append(pause.length)
        assert not pause.due()
        clock.now = pause.resume_at
        assert pause.due() and pause.resume_at == 0.0
    assert lengths == [FIRST_PAUSE, 0.2, 0.4, 0.8, MAX_PAUSE, MAX_PAUSE]
    pause.succeeded()
    assert pause.failed(emfile()) and pause.length == FIRST_PAUSE


def test_a_failure_during_a_pause_does_not_lengthen_it():
    clock = Clock()
    pause = AcceptPause("accept", clock=clock)
    pause.failed(emfile())
    resume_at = pause.resume_at
    assert pause.failed(emfile()) and pause.resume_at == resume_at


def test_other_errors_are_not_a_shortage():
    pause = AcceptPause("accept", clock=Clock())
    assert not pause.failed(OSError(errno.EINVAL, "Invalid argument"))
    assert pause.resume_at == 0.0 and not pause.streak


def test_lines_are_one_per_interval_with_a_count_and_recovery_answers_them(caplog):
    clock = Clock()
    pause = AcceptPause("accept", clock=clock)
    with caplog.at_level(logging.INFO, logger="forkserver"):
        for _ in range(1000):
            pause.failed(emfile())
            clock.now += 0.01  # 10 s in all
        pause.succeeded()
        pause.succeeded()
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0] == "accept failed: Too many open files (EMFILE); pausing accepts for 0.1s"
    assert lines[1].startswith(f"accept failed: Too many open files (EMFILE), 500 times in the last "
                               f"{REPORT_INTERVAL:.0f}s; pausing accepts for")
    assert lines[2:] == ["accept works again after 1000 failure(s) over 10.0s"]
    assert len(lines) == 3


def test_flapping_near_the_limit_stays_quiet_between_reports(caplog):
    clock = Clock()
    pause = AcceptPause("stats accept", clock=clock)
    with caplog.at_level(logging.INFO, logger="forkserver"):
        for _ in range(4):  # 4 s of fail, succeed, fail, succeed...
            pause.failed(emfile())
            pause.succeeded()
            clock.now += 1.0
    assert [record.getMessage() for record in caplog.records] == [
        "stats accept failed: Too many open files (EMFILE); pausing accepts for 0.1s",
        "stats accept works again after 1 failure(s) over 0.0s",
    ]
