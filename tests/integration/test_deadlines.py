"""Per-request deadlines an app moves, and worker_abort with the stuck requests, on a real server.

One server (one worker, two threads, timeout 1 s, deadline_limit 5 s) goes
through three acts: an extended request outlives the timeout; a hung
request gets the worker aborted, with the hook seeing both requests in
flight and their stacks, and a hook that never returns cannot save the
worker from the kill; a request asking for an endless deadline is cut
off at the limit.
"""

from __future__ import annotations

import json
import re
import socket
import textwrap

import psutil
import requests
from harness import poll

HOOKS = """
import json, os, time

workers = 1
threads = 2
timeout = 1

def worker_abort(worker):
    with open(os.environ["ABORT_RECORD"], "a") as record:
        stuck = [{"path": request.environ["PATH_INFO"], "elapsed": request.elapsed, "stack": request.stack}
                 for request in worker.requests]
        record.write(json.dumps({"pid": worker.pid, "requests": stuck}) + "\\n")
    time.sleep(60)  # a hook that never returns must not keep the worker alive
"""
LIMIT = 5.0


def send(srv, target: str) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
    conn.sendall(f"GET {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    return conn


def replaced(srv, victim: int) -> int:
    """Wait for the worker that replaced ``victim`` (long before the hook's 60 s sleep ends); its pid."""
    poll(lambda: srv.worker_pids() and victim not in srv.worker_pids(), timeout=15, what="a replacement worker")
    (worker,) = srv.worker_pids()
    return worker


def timeout_lines(srv) -> list[str]:
    return [line for line in srv.log().splitlines() if "worker timeout slot=0" in line]


def test_deadlines_an_app_moves_and_worker_abort_with_the_stuck_requests(server, tmp_path):
    record = tmp_path / "abort.jsonl"
    conf = tmp_path / "deadline.conf.py"
    conf.write_text(textwrap.dedent(HOOKS))
    srv = server("-c", str(conf), "--deadline-limit", str(LIMIT), "deadline_app:app",
                 env={"ABORT_RECORD": str(record)}, workers=1)
    (worker,) = srv.worker_pids()

    # 1. Extended, a request runs well past timeout; the grant is cut to the limit.
    answer = requests.get(srv.url + "/report?allow=30&sleep=2", timeout=30).json()
    assert answer["pid"] == worker and 0 < answer["granted"] <= LIMIT  # asked for 30
    assert answer["remaining"] < LIMIT - 2.0
    assert srv.worker_pids() == [worker] and not timeout_lines(srv)

    # 2. Next to an extended request, one without a deadline hangs: the worker is aborted.
    export = send(srv, "/export?allow=30&sleep=30")
    poll(lambda: "busy GET /export" in " ".join(psutil.Process(worker).cmdline()), what="the export to run")
    hang = send(srv, "/hang?sleep=30")
    try:
        lines = poll(lambda: record.exists() and record.read_text().splitlines(), timeout=20, what="worker_abort")
        aborted = json.loads(lines[0])
        assert aborted["pid"] == worker
        stuck = {request["path"]: request for request in aborted["requests"]}
        assert set(stuck) == {"/export", "/hang"}
        assert stuck["/hang"]["elapsed"] >= 1.0
        for request in stuck.values():
            assert "in wait_in_app" in request["stack"] and "deadline_app.py" in request["stack"]
        new_worker = replaced(srv, worker)
    finally:
        export.close()
        hang.close()
    (line,) = timeout_lines(srv)
    assert f"pid={worker}: no progress for" in line and "GET /hang" in line
    assert re.search(r"GET /export client=127\.0\.0\.1 elapsed=[\d.]+s deadline=[\d.]+s", line), line
    log = srv.log()
    assert f"worker abort pid={worker}: stuck in GET '/hang?sleep=30' elapsed=" in log
    assert "in wait_in_app" in log  # the stack, in the error log before the hook ran
    assert requests.get(srv.url + "/?sleep=0", timeout=10).json()["pid"] == new_worker

    # 3. An endless deadline asked for ends at the limit after the request's start.
    forever = send(srv, "/forever?allow=inf&sleep=60")
    try:
        poll(lambda: len(timeout_lines(srv)) == 2, timeout=20, what="the endless request to be cut off")
        replaced(srv, new_worker)
    finally:
        forever.close()
    line = timeout_lines(srv)[1]
    assert "past the deadline its app set" in line and "GET /forever" in line, line
    elapsed = float(re.search(r"elapsed=([\d.]+)s", line).group(1))
    assert elapsed >= LIMIT - 0.1  # the master never cut it before the limit (it may, loaded, after)


def test_a_native_worker_abort_hook_gets_the_request_the_single_threaded_worker_hung_in(server, tmp_path):
    record = tmp_path / "abort.jsonl"
    srv = server("deadline_app:app", "-w", "1", "--timeout", "1", "--worker-abort", "deadline_app:record_abort",
                 env={"ABORT_RECORD": str(record)}, workers=1)
    (worker,) = srv.worker_pids()
    with send(srv, "/stuck?sleep=30") as stuck:
        lines = poll(lambda: record.exists() and record.read_text().splitlines(), timeout=20, what="worker_abort")
        assert stuck.recv(1) == b""  # the worker is gone mid-request
    (request,) = [json.loads(line) for line in lines]
    assert (request["pid"], request["path"]) == (worker, "/stuck") and request["elapsed"] >= 1.0
    assert "in wait_in_app" in request["stack"] and "in record_abort" not in request["stack"]
    assert requests.get(srv.url + "/?sleep=0", timeout=10).json()["pid"] == replaced(srv, worker)
