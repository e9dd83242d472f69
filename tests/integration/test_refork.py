"""Refork on real processes: the mold, its workers under the master, and losing nothing when any of them dies."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest
import requests

from forkserver.tools.top import fetch

from harness import poll, read_all
from test_relay import PROMPTLY, SLOW, clients_of_one_worker

READY = 30.0  # deadline for promotions and rollovers on a shared, loaded machine
MAX_LOAD_REQUESTS = 20000  # the load loop stops here at the latest (or after LOAD_SECONDS)
LOAD_SECONDS = 120.0


class LoadLoop:
    """Sequential requests on fresh connections in a thread, each failure recorded; pausable."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.served = 0
        self.failures: list[str] = []
        self.answers: list[dict] = []
        self.stop = threading.Event()
        self.gate = threading.Lock()  # held by the test: no request is in flight meanwhile
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        deadline = psutil.time.monotonic() + LOAD_SECONDS
        while not self.stop.is_set() and self.served < MAX_LOAD_REQUESTS and psutil.time.monotonic() < deadline:
            with self.gate:
                try:
                    response = requests.get(self.url, headers={"Connection": "close"}, timeout=10)
                    if response.status_code != 200:
                        self.failures.append(f"status {response.status_code}")
                    else:
                        self.answers.append(response.json())
                except requests.RequestException as exc:
                    self.failures.append(repr(exc))
                self.served += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        with self.gate:
            yield


@contextmanager
def load(url: str) -> Iterator[LoadLoop]:
    loop = LoadLoop(url)
    loop.thread.start()
    try:
        yield loop
    finally:
        loop.stop.set()
        loop.thread.join(30)


def title(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return ""


def the_mold(srv) -> int | None:
    return next((pid for pid in srv.worker_pids() if "forkserver: mold" in title(pid)), None)


def serving(srv) -> list[int]:
    """The master's children that serve: not the mold, not booting."""
    return [pid for pid in srv.worker_pids() if "forkserver: worker" in title(pid) and "booting" not in title(pid)]


def all_forked_by(srv, mold: int, count: int) -> bool:
    """``count`` workers serve, and every one of them is the master's child and was forked by ``mold``."""
    workers = serving(srv)
    return len(workers) == count and all(worker_came_from(srv, pid) == mold for pid in workers)


def worker_came_from(srv, pid: int) -> int | None:
    """Where the app a worker runs was imported: its own pid if the master forked it, the mold's if the mold did.

    Read from the process itself (its parent, and the mold's title on its
    ancestry is gone), so the master's bookkeeping is not what is tested:
    /proc tells who the parent is, the app tells which process imported it.
    """
    try:
        process = psutil.Process(pid)
        if process.ppid() != srv.pid:
            return None
    except psutil.NoSuchProcess:
        return None
    return IMPORTED.get(pid)


IMPORTED: dict[int, int] = {}  # worker pid -> where it imported the app, from the load loop's answers


def learn(loop: LoadLoop) -> None:
    for answer in list(loop.answers):
        IMPORTED[answer["pid"]] = answer["imported_in"]


def wait_rolled_over(srv, loop: LoadLoop, workers: int) -> int:
    """Wait for a mold and for every serving worker to be one it forked; return the mold's pid."""
    mold = poll(lambda: the_mold(srv), timeout=READY, what="a worker to become the mold")

    def rolled() -> bool:
        learn(loop)
        return all_forked_by(srv, mold, workers)

    poll(rolled, timeout=READY, what="every worker to be forked from the mold")
    return mold


@pytest.mark.parametrize("options", [(), ("--threads", "4"), ("--reuse-port",), ("--static",)],
                         ids=["plain", "threads", "reuse-port", "static"])
def test_mold_is_promoted_at_the_count_and_its_workers_are_the_masters_children(server, tmp_path, options, request):
    stats = tmp_path / "stats.sock"
    if options == ("--reuse-port",):
        # Without it the kernel resets a connection queued on the mold's own
        # socket as the mold closes it, and the load below sees the reset.
        request.getfixturevalue("migrate_req")("1")
    if options == ("--static",):
        (tmp_path / "public").mkdir()
        (tmp_path / "public" / "hello.txt").write_text("static hello")
        options = ("--static", f"/files={tmp_path / 'public'}")
    # Under reuse_port each worker binds the address itself: hold a port with
    # SO_REUSEPORT (bound, never listening) so nobody takes it meanwhile.
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    bind = ("-b", f"127.0.0.1:{holder.getsockname()[1]}") if "--reuse-port" in options else ()
    try:
        srv = server("refork_app:app", "-w", "2", "--refork-after", "20", "--stats-bind", f"unix:{stats}",
                     *options, *bind, wait=False)
        if bind:
            srv.port = holder.getsockname()[1]
        srv.wait_ready(workers=2)
    finally:
        holder.close()
    originals = set(srv.worker_pids())
    with load(srv.url) as loop:
        mold = wait_rolled_over(srv, loop, 2)
    assert loop.failures == []
    assert mold in originals, "the mold is a worker that served, not a fresh process"
    assert title(mold).startswith("forkserver: mold [refork_app:app]")
    assert re.search(rf"promoting worker slot=\d pid={mold} gen=1 to mold after 20 requests", srv.log())
    workers = serving(srv)
    assert not set(workers) & originals
    assert all(psutil.Process(pid).ppid() == srv.pid for pid in workers)
    document = fetch(f"unix:{stats}")
    rows = {row["pid"]: row for row in document["workers"]}
    assert rows[mold]["state"] == "mold" and rows[mold]["forked_by"] is None
    assert all(rows[pid]["forked_by"] == mold for pid in workers), rows
    assert document["master"]["pid"] == srv.pid and document["master"]["memory_uss_bytes"] > 0
    assert all(rows[pid]["memory_shared_bytes"] > 0 for pid in workers)
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(10)
        conn.connect(str(stats))
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        metrics = read_all(conn).decode()
    assert re.search(rf'forkserver_worker_info{{[^}}]*pid="{mold}"[^}}]*state="mold",forked_by=""}} 1', metrics)
    for pid in workers:
        assert re.search(rf'forkserver_worker_info{{[^}}]*pid="{pid}"[^}}]*forked_by="{mold}"}} 1', metrics)
    assert re.search(r"forkserver_master_memory_uss_bytes \d+", metrics)
    assert re.search(rf'forkserver_worker_memory_shared_bytes{{worker="\d",pid="{workers[0]}"}} \d+', metrics)
    assert "about to fork" not in srv.log(), "a plain app opens nothing a fork would share"
    if "--static" in options:
        assert requests.get(f"{srv.url}/files/hello.txt", timeout=10).text == "static hello"
        assert requests.get(srv.url, timeout=10).json()["pid"] in workers


def test_refork_is_off_under_reload(server):
    srv = server("refork_app:app", "-w", "1", "--refork-after", "5", "--reload", workers=1)
    (worker,) = srv.worker_pids()
    for _ in range(30):
        assert requests.get(srv.url, headers={"Connection": "close"}, timeout=10).json()["pid"] == worker
    assert "refork_after is off under reload" in srv.log()
    # With refork on, the promotion would follow within a second (the worker
    # reports its count at its next sweep); give it three, then look.
    with pytest.raises(AssertionError, match="timed out"):
        poll(lambda: "promoting" in srv.log(), timeout=3.0, what="a promotion")
    assert srv.worker_pids() == [worker]


def test_each_further_count_promotes_a_worker_of_the_mold_and_retires_the_old_mold(server, tmp_path):
    stats = tmp_path / "stats.sock"
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20,60", "--stats-bind", f"unix:{stats}", workers=2)
    with load(srv.url) as loop:
        first = wait_rolled_over(srv, loop, 2)
        second = poll(lambda: (pid := the_mold(srv)) not in (None, first) and pid, timeout=READY,
                      what="a second mold at 60 requests")
        assert re.search(rf"promoting worker slot=\d pid={second} gen=1 to mold after 60 requests", srv.log())
        learn(loop)
        assert IMPORTED.get(second) == first, "the second mold is a worker the first one forked"
        poll(lambda: first not in srv.worker_pids(), timeout=READY, what="the first mold to leave")

        def forked_by_second() -> bool:
            rows = fetch(f"unix:{stats}")["workers"]
            workers = [row for row in rows if row["state"] != "mold"]
            return len(workers) == 2 and all(row["forked_by"] == second for row in workers) and \
                all(psutil.Process(row["pid"]).ppid() == srv.pid for row in workers)

        poll(forked_by_second, timeout=READY, what="the pool forked from the second mold")
    assert loop.failures == []


def test_killing_a_worker_the_mold_forked_loses_nothing(server):
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20", workers=2)
    with load(srv.url) as loop:
        mold = wait_rolled_over(srv, loop, 2)
        with loop.paused():  # between two requests: the victim holds none
            victim = serving(srv)[0]
            os.kill(victim, signal.SIGKILL)
        before = loop.served

        def replaced() -> bool:
            learn(loop)
            return victim not in srv.worker_pids() and all_forked_by(srv, mold, 2) and loop.served > before + 20

        poll(replaced, timeout=READY, what="the killed worker to be replaced from the mold")
    assert loop.failures == []
    assert the_mold(srv) == mold


def test_killing_the_mold_loses_nothing_and_a_warm_worker_takes_over(server):
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20", workers=2)
    with load(srv.url) as loop:
        mold = wait_rolled_over(srv, loop, 2)
        before = set(serving(srv))
        os.kill(mold, signal.SIGKILL)
        poll(lambda: f"dropping mold pid={mold}" in srv.log(), timeout=READY, what="the master to drop the mold")
        successor = poll(lambda: (pid := the_mold(srv)) not in (None, mold) and pid, timeout=READY,
                         what="a warmed worker to become the new mold")
        assert successor in before, "the new mold is a worker that served"

        def rolled_again() -> bool:
            # The app was imported once, in the first mold's process, and
            # inherited since: new workers that report it came from a mold.
            learn(loop)
            return all_forked_by(srv, mold, 2) and not set(serving(srv)) & before

        poll(rolled_again, timeout=READY, what="the pool to be forked from the new mold")
    assert loop.failures == []
    assert psutil.Process(successor).ppid() == srv.pid


def test_a_hung_mold_is_killed_and_the_master_forks_instead(server):
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20", workers=2)
    with load(srv.url) as loop:
        mold = wait_rolled_over(srv, loop, 2)
        os.kill(mold, signal.SIGSTOP)  # alive, but answers nothing
        with loop.paused():
            victim = serving(srv)[0]
            os.kill(victim, signal.SIGKILL)
        poll(lambda: f"dropping mold pid={mold}: no answer to a fork request" in srv.log(), timeout=READY,
             what="the master to give up on the hung mold")

        served = loop.served
        # The killed slot is forked by the master (the other worker, warm, may become the next mold).
        poll(lambda: mold not in srv.worker_pids() and len(serving(srv)) == 2 and victim not in serving(srv)
             and loop.served > served + 20, timeout=READY, what="the hung mold gone and two workers serving")
    assert loop.failures == []


def test_hup_starts_again_from_the_master_and_a_new_mold_forms(server):
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20", workers=2)
    with load(srv.url) as loop:
        mold = wait_rolled_over(srv, loop, 2)
        srv.signal(signal.SIGHUP)
        poll(lambda: "reload complete gen=2" in srv.log(), timeout=READY, what="generation 2")
        poll(lambda: mold not in srv.worker_pids(), timeout=READY, what="the old mold to leave")
        successor = poll(lambda: the_mold(srv), timeout=READY, what="a mold of generation 2")
        assert re.search(rf"promoting worker slot=\d pid={successor} gen=2 ", srv.log())

        def generation_two_rolled() -> bool:
            learn(loop)
            # Generation 2 was forked from the master, so each of its first
            # workers imported the app itself: the new mold's workers report it.
            return all_forked_by(srv, IMPORTED.get(successor, -1), 2)

        poll(generation_two_rolled, timeout=READY, what="generation 2 to roll over to its own mold")
    assert loop.failures == []
    assert IMPORTED[successor] == successor


def test_a_worker_the_mold_forked_that_fails_to_boot_falls_back_to_the_master(server):
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20", "--on-mold", "refork_app:on_mold",
                 "--post-worker-init", "refork_app:refuse_after_mold", workers=2)
    with load(srv.url) as loop:
        poll(lambda: "refork is off for generation 1" in srv.log(), timeout=READY,
             what="the master to turn refork off")

        def from_the_master() -> bool:
            learn(loop)
            workers = serving(srv)
            # The hooks live in the app's module, so the master imported it
            # to resolve them: a worker it forks reports the master's pid.
            return the_mold(srv) is None and len(workers) == 2 and all(
                worker_came_from(srv, pid) == srv.pid for pid in workers)

        poll(from_the_master, timeout=READY, what="two workers forked from the master, and no mold")
    assert loop.failures == []
    assert "this worker was forked from the mold" in srv.log()


def test_on_mold_as_a_function_in_a_gunicorn_config_file_runs_in_the_mold(server, tmp_path):
    record = tmp_path / "on_mold.json"
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("import json, os\n"
                    "refork_after = [20]\n"
                    "def on_mold(server, worker):\n"
                    f"    with open({str(record)!r}, 'w') as out:\n"
                    "        json.dump({'in': os.getpid(), 'server': server.pid, 'worker': worker.pid}, out)\n")
    conf.chmod(0o644)
    srv = server("-c", str(conf), "refork_app:app", "-w", "2", workers=2)
    with load(srv.url) as loop:
        mold = wait_rolled_over(srv, loop, 2)
    assert loop.failures == []
    assert json.loads(record.read_text()) == {"in": mold, "server": srv.pid, "worker": mold}


def test_the_relay_works_in_a_reforked_pool_and_the_mold_forks_without_its_thread(server):
    srv = server("relay_apps:app", "-w", "2", "--keep-alive", "30", "--refork-after", "10", workers=2)
    originals = set(srv.worker_pids())

    def rolled_over() -> bool:
        requests.get(srv.url, headers={"Connection": "close"}, timeout=10)
        workers = serving(srv)
        return the_mold(srv) is not None and len(workers) == 2 and not set(workers) & originals

    poll(rolled_over, timeout=READY, what="a mold, and two workers it forked")
    mold = the_mold(srv)
    assert psutil.Process(mold).num_threads() == 1, "the relay's watcher ended before the mold forked"
    for pid in serving(srv):
        assert psutil.Process(pid).ppid() == srv.pid
        assert psutil.Process(pid).num_threads() == 2, "its own relay watcher runs"
    busy, clients = clients_of_one_worker(srv.port, 2)
    slow, quick = clients
    slow.send(f"/slow/{SLOW}/")
    time.sleep(0.3)  # well past the relay's threshold, and the slow request is surely running
    quick.send("/quick")
    answer = poll(lambda: quick.answered() and quick.receive(), PROMPTLY, interval=0.01,
                  what="the quick request's answer while the slow one runs")
    assert answer["pid"] != busy and answer["pid"] in serving(srv), "the other mold-forked worker answers"
    assert not slow.answered(), "the slow request ended first: the test proves nothing"
    assert slow.receive()["pid"] == busy
    assert "about to fork" not in srv.log(), "the relay's channel is the server's, not the app's"


def fork_warnings(srv, who: str) -> list[str]:
    return [line for line in srv.log().splitlines() if f"{who} is about to fork" in line]


def test_fork_safety_names_a_thread_and_a_socket_the_preloaded_app_opened(server):
    srv = server("refork_app:app", "-w", "2", "--preload", workers=2,
                 env={"REFORK_APP_THREAD": "1", "REFORK_APP_SOCKET": "1"})
    warnings = fork_warnings(srv, "master")
    assert len(warnings) == 2, "each problem once, not once per fork: " + srv.log()
    assert "1 other thread(s) running: import-time-poller" in warnings[0]
    assert re.search(r"descriptor\(s\) the app opened: \d+ \(socket:\[\d+\]\), \d+ \(socket:\[\d+\]\);", warnings[1])


def test_fork_safety_in_the_mold_names_what_the_app_opened_in_the_worker(server):
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20", workers=2,
                 env={"REFORK_APP_THREAD": "1", "REFORK_APP_SOCKET": "1"})
    with load(srv.url) as loop:
        wait_rolled_over(srv, loop, 2)
    warnings = fork_warnings(srv, "mold")
    assert len(warnings) == 2, srv.log()
    assert "import-time-poller" in warnings[0]
    assert "socket:[" in warnings[1] and "on_mold hook" in warnings[1]
    assert not fork_warnings(srv, "master"), "nothing of the app runs in the master without preload"


def test_memory_limit_recycles_only_after_consecutive_samples(server):
    srv = server("refork_app:app", "-w", "1", "--max-worker-memory", "60", workers=1)
    (worker,) = srv.worker_pids()
    assert requests.get(f"{srv.url}/grow?80", timeout=30).json()["pid"] == worker
    poll(lambda: "(sample 1 of 3)" in srv.log(), timeout=READY, what="one sample over the limit")
    requests.get(f"{srv.url}/shrink", timeout=30)
    poll(lambda: "back under the memory limit" in srv.log(), timeout=READY, what="a sample under the limit")
    assert srv.worker_pids() == [worker] and "recycling" not in srv.log(), "one sample over is a spike, not a leak"
    requests.get(f"{srv.url}/grow?80", timeout=30)
    line = poll(lambda: next((ln for ln in srv.log().splitlines() if "for 3 samples; recycling" in ln), None),
                timeout=READY, what="three samples in a row over the limit")
    assert f"pid={worker}" in line
    over = [ln for ln in srv.log().splitlines() if "worker over memory" in ln]
    assert [re.search(r"sample (\d) of 3|for 3 samples", ln).group(0) for ln in over] == \
        ["sample 1 of 3", "sample 1 of 3", "sample 2 of 3", "for 3 samples"]
    poll(lambda: requests.get(srv.url, timeout=10).json()["pid"] != worker, timeout=READY,
         what="a new worker to serve")


def test_after_log_rotation_the_molds_new_workers_write_to_the_new_file(server, tmp_path):
    error_log = tmp_path / "error.log"
    srv = server("refork_app:app", "-w", "2", "--refork-after", "20", "--log-level", "debug",
                 "--error-logfile", str(error_log), workers=2)
    srv.log = lambda: error_log.read_text(errors="replace")  # the harness reads stderr otherwise
    with load(srv.url) as loop:
        mold = wait_rolled_over(srv, loop, 2)
    assert loop.failures == []
    error_log.rename(tmp_path / "error.log.1")
    srv.signal(signal.SIGUSR1)
    poll(lambda: error_log.exists() and "logs reopened" in error_log.read_text(), timeout=READY,
         what="the master to reopen its log")
    before = set(srv.worker_pids())
    srv.signal(signal.SIGTTIN)
    new = poll(lambda: next(iter(set(serving(srv)) - before), None), timeout=READY, what="a third worker")
    poll(lambda: f"[{new}] [DEBUG] worker ready" in error_log.read_text(), timeout=READY,
         what="the new worker's own line in the new file")
    assert psutil.Process(new).ppid() == srv.pid and the_mold(srv) == mold
    assert "about to fork" not in error_log.read_text(), "a reopened log is the server's, not the app's"


def test_a_worker_promoted_by_a_stray_winch_is_replaced(server):
    srv = server("refork_app:app", "-w", "2", "--refork-after", "100000", workers=2)
    victim = srv.worker_pids()[0]
    with load(srv.url) as loop:
        os.kill(victim, signal.SIGWINCH)  # an operator's, not the master's
        poll(lambda: f"pid={victim} became a mold unasked" in srv.log(), timeout=READY,
             what="the master to notice the unasked mold")
        poll(lambda: victim not in srv.worker_pids() and len(serving(srv)) == 2, timeout=READY,
             what="the unasked mold replaced by a serving worker")
    assert loop.failures == []
