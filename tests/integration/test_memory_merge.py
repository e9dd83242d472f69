"""memory_merge on real processes: the kernel's same-page merging flag, its warning, its stats field.

The tests that need ksmd in a given state set /sys/kernel/mm/ksm/run
themselves (root, as in CI) and put it back afterwards, even on failure.
No test asserts how much memory merging saves: that depends on the app,
on ksmd's pace and on the machine; scripts/refork_bench.py measures it.
"""

from __future__ import annotations

import ctypes
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from forkserver.memorymerge import PR_SET_MEMORY_MERGE
from forkserver.tools.top import fetch

from harness import APPS, kernel_setting, poll, read_all
from test_refork import load, wait_rolled_over

KSM_RUN = Path("/sys/kernel/mm/ksm/run")
MERGING_TIMEOUT = 90.0  # ksmd at its default pace (100 pages every 20 ms) on a shared, loaded machine


@pytest.fixture
def ksm_run() -> Iterator:
    """Return ``set(value)`` for /sys/kernel/mm/ksm/run; the value found is written back at teardown."""
    yield from kernel_setting(KSM_RUN, "this kernel was built without same-page merging (CONFIG_KSM)",
                              "root on the host")


def merge_flag(pid: int) -> bool:
    """Does the kernel offer every eligible mapping of ``pid`` to ksmd (PR_SET_MEMORY_MERGE)?

    A kernel without KSM has no ksm_stat, and offers nothing.
    """
    stat = Path(f"/proc/{pid}/ksm_stat")
    if not stat.exists():
        return False
    status = stat.read_text()
    return re.search(r"^ksm_merge_any: yes$", status, re.MULTILINE) is not None


def mergeable_heap(pid: int) -> bool:
    """Is ``pid``'s heap marked mergeable in its smaps (VmFlags ``mg``)?"""
    smaps = Path(f"/proc/{pid}/smaps").read_text()
    heap = smaps[smaps.index("[heap]"):]
    flags = re.search(r"^VmFlags:(.*)$", heap, re.MULTILINE).group(1).split()
    return "mg" in flags


def metrics(stats: Path) -> str:
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(stats))
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return read_all(conn).decode()


def test_every_process_of_a_refork_tree_is_offered_to_ksmd_and_shows_what_merged(server, tmp_path, ksm_run):
    ksm_run("1")
    stats = tmp_path / "stats.sock"
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20", "--memory-merge", "--stats-bind",
                 f"unix:{stats}", workers=2)
    with load(srv.url) as loop:
        mold = wait_rolled_over(srv, loop, 2)
    assert loop.failures == []
    tree = [srv.pid, *srv.worker_pids()]
    assert mold in tree and len(tree) == 4  # the master, the mold and the two workers it forked
    for pid in tree:
        assert merge_flag(pid), f"pid {pid} is not offered to ksmd"
        assert mergeable_heap(pid), f"pid {pid}'s heap is not marked mergeable"
    assert "memory_merge" not in srv.log(), "no warning while ksmd runs"

    def merged_rows() -> dict | None:
        document = fetch(f"unix:{stats}")
        rows = [document["master"], *document["workers"]]
        return document if all(row["memory_merged_bytes"] is not None for row in rows) and any(
            row["memory_merged_bytes"] for row in rows) else None

    # Some page of the tree merges once ksmd has scanned it twice: the field reads the kernel's count.
    document = poll(merged_rows, timeout=MERGING_TIMEOUT, interval=1.0, what="ksmd to merge a page of the tree")
    assert {row["pid"] for row in document["workers"]} == set(tree[1:])
    text = metrics(stats)
    assert re.search(r"^forkserver_master_memory_merged_bytes \d+$", text, re.MULTILINE)
    assert re.search(rf'^forkserver_worker_memory_merged_bytes{{worker="\d",pid="{mold}"}} \d+$', text, re.MULTILINE)


def test_without_memory_merge_no_process_is_offered(server, tmp_path):
    stats = tmp_path / "stats.sock"
    srv = server("basic:hello", "-w", "1", "--stats-bind", f"unix:{stats}", workers=1)
    for pid in [srv.pid, *srv.worker_pids()]:
        assert not merge_flag(pid)
    document = fetch(f"unix:{stats}")
    assert document["workers"][0]["memory_merged_bytes"] in (0, None)


def test_ksm_off_is_one_warning_naming_the_switch_and_the_server_serves(server, ksm_run):
    ksm_run("0")
    srv = server("basic:hello", "-w", "1", "--memory-merge", workers=1)
    (worker,) = srv.worker_pids()
    assert merge_flag(worker), "the flag is set anyway, so turning ksmd on later merges this server"
    warnings = [line for line in srv.log().splitlines() if "memory_merge" in line]
    assert len(warnings) == 1, srv.log()
    assert "/sys/kernel/mm/ksm/run is 0" in warnings[0] and "echo 1 > /sys/kernel/mm/ksm/run" in warnings[0]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert read_all(conn).startswith(b"HTTP/1.1 200")


def test_check_config_reports_ksm_off_and_passes(ksm_run, tmp_path):
    ksm_run("0")
    command = [sys.executable, "-m", "forkserver", "--check-config", "--pythonpath", str(APPS), "basic:hello",
               "--memory-merge"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "forkserver: warning: memory_merge: " in result.stderr
    assert "echo 1 > /sys/kernel/mm/ksm/run" in result.stderr
    ksm_run("1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 0 and "memory_merge" not in result.stderr, result.stderr


@pytest.fixture
def merge_config(tmp_path) -> Path:
    """A config file for one hello worker, memory_merge = false, on a kernel that has the flag to set."""
    if not Path("/proc/self/ksm_stat").exists():
        pytest.skip("this kernel has no same-page merging to offer (no /proc/PID/ksm_stat)")
    config = tmp_path / "fs.toml"
    config.write_text('app = "basic:hello"\nworkers = 1\nmemory_merge = false\n')
    return config


def set_merging(config: Path, merge: bool) -> None:
    config.write_text(re.sub(r"memory_merge = \w+", f"memory_merge = {str(merge).lower()}", config.read_text()))


def reload_merging(srv, config: Path, merge: bool) -> int:
    """Set memory_merge in ``config``, HUP, and return the one worker of the new generation."""
    old = set(srv.worker_pids())
    set_merging(config, merge)
    srv.signal(signal.SIGHUP)
    (worker,) = poll(lambda: (pids := srv.worker_pids()) and not old & set(pids) and not srv.booting_pids() and pids,
                     timeout=30, what="the new generation after HUP")
    return worker


def test_hup_turns_merging_on_and_off_for_the_new_generation(server, merge_config):
    srv = server("-c", str(merge_config), workers=1)
    worker = reload_merging(srv, merge_config, True)
    assert merge_flag(srv.pid) and merge_flag(worker), "a reload that turns memory_merge on offers the new workers"
    worker = reload_merging(srv, merge_config, False)
    assert not merge_flag(srv.pid) and not merge_flag(worker), "a reload that turns it off stops offering them"


def test_a_flag_set_before_the_server_is_left_to_whoever_set_it(server, merge_config):
    """As systemd's MemoryKSM=yes sets it: memory_merge off never clears what the master did not set."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    srv = server("-c", str(merge_config), workers=1,
                 popen={"preexec_fn": lambda: prctl(PR_SET_MEMORY_MERGE, 1, 0, 0, 0)})  # kept across exec (6.7)
    if not merge_flag(srv.pid):
        pytest.skip("this kernel does not keep the flag across exec (before Linux 6.7)")
    reload_merging(srv, merge_config, True)
    worker = reload_merging(srv, merge_config, False)
    assert merge_flag(srv.pid) and merge_flag(worker), "turned off, the master leaves the flag as it found it"


def test_usr2_to_a_config_without_memory_merge_starts_a_master_that_does_not_merge(server, merge_config):
    """Linux 6.7 and later keep the flag across exec: the old master must not hand it to the new one."""
    set_merging(merge_config, True)
    srv = server("-c", str(merge_config), workers=1)
    assert merge_flag(srv.pid)
    set_merging(merge_config, False)
    srv.signal(signal.SIGUSR2)
    found = poll(lambda: re.search(r"upgrading: new master pid=(\d+)", srv.log()), timeout=30,
                 what="the old master to start a new one")
    new_master = psutil.Process(int(found.group(1)))
    (worker,) = poll(lambda: (workers := new_master.children()) and f"master started pid={new_master.pid}" in srv.log()
                     and [child.pid for child in workers], timeout=30, what="the new master's worker")
    assert not merge_flag(new_master.pid) and not merge_flag(worker), "the new master follows its own config"
    assert merge_flag(srv.pid), "the old master keeps merging until it is stopped"
