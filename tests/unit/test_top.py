"""``forkserver stats`` and ``forkserver top``: pure layout, real fetches, and a real pseudo-terminal."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import termios
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import Terminal, serving_in_thread

from forkserver.master.aggregator import Aggregator
from forkserver.errors import ForkserverError
from forkserver.stats import HISTOGRAM_BUCKETS, CountersFlushed
from forkserver.master.status import StatusServer
from forkserver.tools.top import fetch, render

DEADLINE = 20.0
REPO = Path(__file__).resolve().parents[2]


def fixture_snapshot(workers: int = 4, requests: int = 100, uptime: float = 10.0,
                     queued: dict[int, tuple[int, int, float]] | None = None) -> dict:
    """A snapshot as the master would build it, with ``workers`` live workers.

    ``queued`` maps a slot to its queue times so far: (bucket index, count, sum of seconds).
    """
    clock = [0.0]
    agg = Aggregator(clock=lambda: clock[0])
    for slot in range(workers):
        pid = 31000 + slot
        agg.add_worker(pid, pid=pid, slot=slot, generation=2)
        histogram = [0] * len(HISTOGRAM_BUCKETS)
        histogram[3] = requests
        queue_histogram = [0] * len(HISTOGRAM_BUCKETS)
        bucket, count, queue_sum = (queued or {}).get(slot, (0, 0, 0.0))
        queue_histogram[bucket] = count
        agg.ingest(pid, CountersFlushed(pid, requests * (slot + 1), (0, requests * (slot + 1), 0, 0, 0), 1000,
                                        250_000, tuple(h * (slot + 1) for h in histogram), 0.5, 1.0, 0,
                                        queue_histogram=tuple(queue_histogram), queue_sum=queue_sum))
        agg.set_state(pid, "busy" if slot == 0 else "idle")
    agg.note_reload()
    clock[0] = uptime
    extra = {31000: {"current_request": {"method": "GET", "path": "/slow/" + "x" * 200, "elapsed_seconds": 2.25},
                     "memory_uss_bytes": 45 * 1024 * 1024, "requests_in_flight": 3, "in_flight_seconds": 6.0}}
    for pid in range(31000, 31000 + workers):
        extra.setdefault(pid, {})["threads"] = 4
    return agg.snapshot(extra, [{"address": "http://127.0.0.1:8000", "accept_queue": 3}])


def test_render_fits_a_plain_80x24_terminal():
    lines = render(fixture_snapshot())
    assert len(lines) <= 24 and all(len(line) <= 80 for line in lines)
    text = "\n".join(lines)
    for slot in range(4):
        assert str(31000 + slot) in text
    assert "SLOT" in text and "REQ/S" in text
    assert "2.2s GET /slow/x" in text
    assert "45.0M" in text
    assert "accept queue 3" in text
    assert "reloads 1" in text
    assert "workers 4 (1 busy)" in text
    assert "threads busy 3/16 (19%)" in text


def test_render_shows_the_master_and_the_mold_and_which_mold_forked_each_worker():
    clock = [0.0]
    agg = Aggregator(clock=lambda: clock[0])
    agg.add_worker(41000, pid=41000, slot=0, generation=1)
    agg.set_state(41000, "mold")
    agg.add_worker(41001, pid=41001, slot=1, generation=1)
    snapshot = agg.snapshot({41001: {"forked_by": 41000, "memory_uss_bytes": 3 << 20}},
                            master={"memory_uss_bytes": 12 << 20})
    lines = render(snapshot)
    header = next(line for line in lines if line.lstrip().startswith("SLOT"))
    assert header.split()[:4] == ["SLOT", "PID", "FROM", "GEN"]
    rows = {line.split()[1]: line.split() for line in lines[lines.index(header) + 1:]}
    assert rows[str(os.getpid())][:5] == ["-", str(os.getpid()), "-", "-", "master"]
    assert "12.0M" in rows[str(os.getpid())]
    assert rows["41000"][2:5] == ["-", "1", "mold"]
    assert rows["41001"][2] == "41000" and "3.0M" in rows["41001"]


def test_render_shows_merged_memory_only_while_the_kernel_merges_some():
    agg = Aggregator(clock=lambda: 0.0)
    agg.add_worker(41001, pid=41001, slot=1, generation=1)
    plain = render(agg.snapshot({41001: {"memory_uss_bytes": 3 << 20, "memory_merged_bytes": 0}},
                                master={"memory_merged_bytes": 0}))
    assert not any("MERGED" in line for line in plain)  # memory_merge off: no column to spend width on
    lines = render(agg.snapshot({41001: {"memory_uss_bytes": 3 << 20, "memory_merged_bytes": 5 << 20}},
                                master={"memory_uss_bytes": 12 << 20, "memory_merged_bytes": 1 << 20}))
    header = next(line for line in lines if line.lstrip().startswith("SLOT"))
    assert header.split()[8:10] == ["USS", "MERGED"]
    rows = {line.split()[1]: line.split() for line in lines[lines.index(header) + 1:]}
    assert rows["41001"][8:10] == ["3.0M", "5.0M"]
    assert rows[str(os.getpid())][8:10] == ["12.0M", "1.0M"]


def test_render_computes_rates_from_the_previous_snapshot():
    before = fixture_snapshot(requests=100, uptime=10.0)
    after = fixture_snapshot(requests=120, uptime=12.0)  # each slot did 20*(slot+1) more in 2 s
    lines = render(after, previous=before)
    rows = {line.split()[1]: line for line in lines if re.match(r"\s+\d+\s+310\d\d ", line)}
    assert rows["31000"].split()[6] == "10.0"
    assert rows["31003"].split()[6] == "40.0"
    assert "(100.0/s)" in lines[1]  # 200 more requests in all, over 2 s
    # Without a previous snapshot there is no rate to show.
    assert all(line.split()[6] == "-" for line in render(after) if re.match(r"\s+\d+\s+310\d\d ", line))


def worker_rows(lines: list[str]) -> dict[str, list[str]]:
    header = next(line for line in lines if line.lstrip().startswith("SLOT"))
    return {line.split()[1]: dict(zip(header.split(), line.split()))
            for line in lines if re.match(r"\s+\d+\s+310\d\d ", line)}


def test_render_shows_queue_time_over_the_interval_per_worker_and_in_all():
    one_second = HISTOGRAM_BUCKETS.index(1.0)
    before = fixture_snapshot(uptime=10.0, queued={0: (0, 50, 0.02), 1: (0, 10, 0.005)})
    # In 2 s slot 0 started 4 requests that waited 1.5 s each; slot 1 none.
    after = fixture_snapshot(uptime=12.0, queued={0: (0, 50, 0.02), 1: (0, 10, 0.005)})
    after["workers"][0]["queue_time"]["histogram"][one_second + 1] = 4
    after["workers"][0]["queue_time"]["sum_seconds"] += 6.0
    after["totals"]["queue_time"]["histogram"][one_second + 1] = 4
    after["totals"]["queue_time"]["sum_seconds"] += 6.0
    lines = render(after, previous=before)
    rows = worker_rows(lines)
    assert rows["31000"]["QUEUE"] == "1.5s" and rows["31001"]["QUEUE"] == "-"
    summary = next(line for line in lines if line.startswith("queue time"))
    assert summary.startswith("queue time mean 1.5s p50 1.") and "(4 request(s) in 2.0s)" in summary
    # The first frame (and ``forkserver stats``) has nothing to compare with: since start.
    lines = render(before)
    assert worker_rows(lines)["31000"]["QUEUE"] == "0.40ms"
    assert "queue time mean 0.42ms" in "\n".join(lines) and "(60 request(s) since start)" in "\n".join(lines)
    # A master restarted at the same address has fewer: no window, rather than a negative one.
    assert "queue time -" in "\n".join(render(before, previous=after))


def test_render_falls_back_to_the_interval_when_uptime_did_not_move():
    before = fixture_snapshot(requests=100, uptime=10.0)
    after = fixture_snapshot(requests=110, uptime=10.0)
    assert "(50.0/s)" in render(after, previous=before, interval=2.0)[1]  # 10+20+30+40 more in 2 s


def test_render_shows_what_fits_and_says_how_many_are_hidden():
    lines = render(fixture_snapshot(workers=50))
    assert len(lines) == 24 and all(len(line) <= 80 for line in lines)
    hidden = re.search(r"\.\.\. (\d+) more worker", lines[-1])
    shown = sum(1 for line in lines if re.match(r"\s+\d+\s+3\d{4} ", line))
    assert hidden and shown + int(hidden.group(1)) == 50


def test_render_uses_a_wider_terminal_and_survives_a_tiny_one():
    wide = render(fixture_snapshot(), width=200)
    assert any(len(line) > 80 for line in wide) and all(len(line) <= 200 for line in wide)
    tiny = render(fixture_snapshot(), width=20, height=3)
    assert len(tiny) == 3 and all(len(line) <= 20 for line in tiny)


def test_render_handles_a_server_with_no_workers_and_no_requests():
    snapshot = Aggregator().snapshot({}, [])
    lines = render(snapshot)
    assert "p50 -" in "\n".join(lines) and "accept queue -" in "\n".join(lines)


# -- against a real StatusServer ---------------------------------------------------------------


@contextmanager
def stats_server(address: str, snapshot):
    """A StatusServer in a background thread, looping like the master does."""
    server = StatusServer(address, snapshot)
    try:
        with serving_in_thread(server, DEADLINE):
            yield server.address
    finally:
        server.close()


def test_fetch_over_tcp_and_unix(tmp_path):
    snapshot = fixture_snapshot()
    for address in ("127.0.0.1:0", f"unix:{tmp_path / 'stats.sock'}"):
        with stats_server(address, lambda reader: snapshot) as real:
            assert fetch(real)["workers"][0]["pid"] == 31000
            if not real.startswith("unix:"):
                assert fetch(f"http://{real}/")["counters"]["reloads"] == 1  # pasted from a browser


def test_fetch_errors_are_one_line(tmp_path):
    with pytest.raises(ForkserverError, match=r"^stats unix:.*nope\.sock: "):
        fetch(f"unix:{tmp_path / 'nope.sock'}")
    with pytest.raises(ForkserverError, match="stats address"):
        fetch("127.0.0.1:notaport")
    with stats_server("127.0.0.1:0", lambda reader: {"not": "stats"}) as real:
        with pytest.raises(ForkserverError, match="not a forkserver stats document"):
            fetch(real)
        with pytest.raises(ForkserverError, match="HTTP 404"):
            fetch(real, path="/nope")


def forkserver_cli(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    return subprocess.run([sys.executable, "-m", "forkserver", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=60, check=False, **kw)


def test_stats_command_prints_a_table_and_json(tmp_path):
    snapshot = fixture_snapshot()
    with stats_server(f"unix:{tmp_path / 's.sock'}", lambda reader: snapshot) as real:
        table = forkserver_cli("stats", real)
        raw = forkserver_cli("stats", "--json", real)
    assert table.returncode == 0, table.stderr
    assert "SLOT" in table.stdout and all(str(31000 + s) in table.stdout for s in range(4))
    assert raw.returncode == 0 and json.loads(raw.stdout)["workers"][3]["pid"] == 31003


def test_stats_into_a_pipe_whose_reader_left_is_quiet(tmp_path):
    # forkserver stats ADDR --json | head -1: head exits before the document is written.
    snapshot = fixture_snapshot()
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        with stats_server(f"unix:{tmp_path / 's.sock'}", lambda reader: snapshot) as real:
            env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
            result = subprocess.run([sys.executable, "-m", "forkserver", "stats", "--json", real], stdout=write_end,
                                    stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert result.stderr == ""


def test_stats_command_reports_an_unreachable_server_in_one_line(tmp_path):
    result = forkserver_cli("stats", f"unix:{tmp_path / 'gone.sock'}")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("forkserver: error: stats unix:") and result.stderr.count("\n") == 1


def test_viewer_commands_need_an_address():
    for command in ("stats", "top"):
        result = forkserver_cli(command)
        assert result.returncode == 2 and "ADDR" in result.stderr


def test_top_without_a_terminal_says_so():
    result = forkserver_cli("top", "127.0.0.1:1", stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "top needs a terminal" in result.stderr


# -- in a real pseudo-terminal ---------------------------------------------------------------------


@pytest.fixture
def live_server(tmp_path):
    state = {"calls": 0}

    def snapshot(reader):
        state["calls"] += 1
        return fixture_snapshot(requests=100 + 10 * state["calls"], uptime=10.0 + state["calls"])

    with stats_server(f"unix:{tmp_path / 'top.sock'}", snapshot) as address:
        yield address


def refreshes(output: bytes) -> int:
    return output.count(b"\x1b[H")


@pytest.mark.parametrize("quit_key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_refreshes_in_a_terminal_and_quits_cleanly(live_server, quit_key):
    terminal = Terminal(live_server)
    try:
        output = terminal.read_until(lambda out: refreshes(out) >= 2 and out.rstrip().endswith(b"\x1b[K"))
        assert refreshes(output) >= 2, output[-2000:]
        screen = terminal.screen_text()
        assert "SLOT" in screen and "GET /slow" in screen
        assert all(str(31000 + slot) in screen for slot in range(4))
        # slot 0 did 10 more requests per second of uptime; the rate shows from the second frame on
        output = terminal.read_until(lambda out: re.search(rb"\s10\.0\s", out) is not None)
        assert re.search(rb"\s10\.0\s", output)
        assert b"\x1b[?1049h" in output  # the alternate screen...
        os.write(terminal.master, quit_key)
        assert terminal.wait_exit() == 0
        assert terminal.output.endswith(b"\x1b[?25h\x1b[?1049l")  # ...is left, and the cursor shown again
        restored = termios.tcgetattr(terminal.slave)
        assert restored[3] & (termios.ICANON | termios.ECHO) == terminal.cooked[3] & (termios.ICANON | termios.ECHO)
        assert "Traceback" not in terminal.screen_text()
    finally:
        terminal.close()


def test_top_keeps_running_while_the_server_is_unreachable(tmp_path):
    terminal = Terminal(f"unix:{tmp_path / 'absent.sock'}")
    try:
        terminal.read_until(lambda out: b"retrying" in out)
        assert "stats unix:" in terminal.screen_text() and "retrying" in terminal.screen_text()
        os.write(terminal.master, b"q")
        assert terminal.wait_exit() == 0
    finally:
        terminal.close()


def test_render_does_not_modify_its_inputs():
    before, after = fixture_snapshot(uptime=1.0), fixture_snapshot(requests=150, uptime=2.0)
    copies = copy.deepcopy((before, after))
    render(after, previous=before)
    assert (before, after) == copies
