"""The master trusts nothing a worker sends: a worker running app code as ``nobody`` cannot run
code as root in the master, nor stop it, through anything the master reads from it."""

from __future__ import annotations

import os
import re

import pytest
import requests

from harness import poll
from test_stats_live import fetch, start_with_stats, stats

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges to nobody needs root")


def as_nobody() -> list[str]:
    """The options that make workers run as nobody (group nogroup where it exists, else nobody)."""
    import grp

    try:
        grp.getgrnam("nogroup")
    except KeyError:
        return ["--user", "nobody", "--group", "nobody"]
    return ["--user", "nobody", "--group", "nogroup"]


def test_a_hostile_worker_cannot_run_code_in_the_master(server, tmp_path):
    marker = tmp_path / "created-by-the-master"  # tmp_path is root's 0700: the worker cannot create it
    srv, sock = start_with_stats(server, tmp_path, "-w", "2", *as_nobody(),
                                 workers=2, app="hostile_worker:app")
    workers = srv.worker_pids()
    answer = requests.get(f"{srv.url}/attack?{marker}", timeout=10)
    assert answer.status_code == 200 and "written" in answer.text, answer.text

    # The master reads what was written within a tick; give it a few, then look.
    poll(lambda: marker.exists() or stats(sock)["counters"].get("stats_messages_rejected", 0) >= 1,
         what="the rejected stats messages to be counted")
    assert not marker.exists(), "code from a worker ran in the master"
    doc = stats(sock)
    assert doc["master_pid"] == srv.pid
    # Still serving, with the same workers: nothing they wrote made the master stop or replace them.
    for _ in range(20):
        assert requests.get(srv.url, timeout=10).text.startswith("ok ")
    assert srv.worker_pids() == workers
    assert srv.proc.poll() is None
    # Requests still count: every worker's last good totals (and the unharmed worker's new ones) remain.
    before = stats(sock)["totals"]["requests"]
    for _ in range(5):
        requests.get(srv.url, timeout=10)
    poll(lambda: stats(sock)["totals"]["requests"] > before, what="stats to keep counting")
    assert doc["counters"]["stats_messages_rejected"] >= 3, doc["counters"]  # the pickle and two garbage frames
    metrics = fetch(sock, "/metrics").decode()
    assert re.search(r"^forkserver_stats_messages_rejected_total [3-9]", metrics, re.M), metrics
    log = srv.log()
    assert log.count("dropped a malformed message") == 1, log  # once per worker, not once per message
    assert log.count("a frame of 1073741824 bytes") == 1, log  # the channel is closed at the false length
    assert "master loop error" not in log, log
    assert not marker.exists()


def test_notices_in_another_workers_name_cannot_leave_extra_workers_running(server, tmp_path):
    """The notice pipe is shared: a worker can name a sibling.  The named worker is retired and
    replaced, as if it had recycled; it never keeps running uncounted beside its replacement."""
    srv = server("hostile_worker:app", "-w", "2", *as_nobody(), workers=2)
    first = srv.worker_pids()
    answer = requests.get(f"{srv.url}/impersonate?{','.join(map(str, first))}", timeout=10)
    assert "written" in answer.text, answer.text
    poll(lambda: not set(first) & set(srv.worker_pids()) and len(srv.worker_pids()) == 2, timeout=20,
         what="both named workers to be replaced")
    for _ in range(10):
        assert requests.get(srv.url, timeout=10).text.startswith("ok ")
    assert len(srv.worker_pids()) == 2
