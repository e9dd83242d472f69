#!/usr/bin/env python3
"""The system calls one worker makes per new connection, for forkserver and the Python floor.

    apt-get install -y strace wrk
    python3 scripts/connection_syscalls.py                  # forkserver, then scripts/floor_server.py
    python3 scripts/connection_syscalls.py --server floor   # one of them

Each server is started with one worker on a pre-bound loopback socket,
serving ``scripts/bench_apps.py`` (the floor answers with its canned reply).
strace is attached to the worker, and:

1. three ``Connection: close`` requests are sent one at a time, and the
   worker's calls for the last one are printed in order: what one
   connection costs when it arrives alone;
2. strace counts (``-c``) the worker's calls over a bounded wrk run
   (``-c 10``, Connection: close), divided by wrk's request count: what a
   connection costs when they queue up and the loop batches them.

strace slows every call down, so its times are not the server's; the counts
are. Every process started is stopped by its PID.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from stopping import stop, tree

SCRIPTS = Path(__file__).resolve().parent
REQUEST = b"GET / HTTP/1.1\r\nHost: syscalls\r\nConnection: close\r\n\r\n"
TIMEOUT = 30.0


def request_once(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        conn.sendall(REQUEST)
        while conn.recv(65536):
            pass


def measure(server: str, seconds: int, tmp: Path) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    port, fd = listener.getsockname()[1], listener.fileno()
    if server == "forkserver":
        cmd = [sys.executable, "-m", "forkserver", "bench_apps:app", "-w", "1", "-b", f"fd://{fd}",
               "--log-level", "warning"]
    else:
        cmd = [sys.executable, str(SCRIPTS / "floor_server.py"), str(fd), "1"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, pass_fds=[fd], env=env, cwd=str(SCRIPTS), stdin=subprocess.DEVNULL)
    tracer: subprocess.Popen[bytes] | None = None
    try:
        request_once(port)  # answered once the worker is up
        deadline = time.monotonic() + TIMEOUT
        while not (workers := psutil.Process(proc.pid).children()) and time.monotonic() < deadline:
            time.sleep(0.05)
        worker = str(workers[0].pid)
        sequence = tmp / f"{server}.seq"
        tracer = subprocess.Popen(["strace", "-p", worker, "-o", str(sequence)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # attached
        for _ in range(3):
            request_once(port)
            time.sleep(0.2)  # the worker goes back to waiting: each connection arrives alone
        stop(tracer)
        lines = [line for line in sequence.read_text().splitlines() if not line.startswith(("strace", "---"))]
        starts = [i for i, line in enumerate(lines) if line.startswith("accept4(") and "EAGAIN" not in line]
        # From its accept to the wait for the next one (cut short by the detach).
        last = [line for line in lines[starts[-1]:] if "<detached" not in line]
        print(f"{server}: the worker's calls for one connection arriving alone (after epoll_wait reported it):")
        for line in last:
            print("  " + re.sub(r'"[^"]*"(\.\.\.)?', '"..."', line)[:110])
        counts = tmp / f"{server}.count"
        tracer = subprocess.Popen(["strace", "-c", "-p", worker, "-o", str(counts)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        wrk = subprocess.run(["wrk", "-t1", "-c10", f"-d{seconds}s", "-H", "Connection: close",
                              f"http://127.0.0.1:{port}/"], capture_output=True, text=True, timeout=seconds + 30)
        stop(tracer)
        tracer = None
        match = re.search(r"(\d+) requests in", wrk.stdout)
        requests = int(match.group(1)) if match else 0
        print(f"{server}: calls per connection under wrk -c10 Connection: close ({requests} requests, strace -c):")
        total = 0.0
        for line in counts.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 5 and fields[0][0].isdigit() and fields[-1] != "total" and requests:
                calls, errors = int(fields[3]), int(fields[4]) if len(fields) == 6 else 0
                total += calls / requests
                failed = f" ({errors} failed in all)" if errors else ""
                print(f"  {calls / requests:5.2f}  {fields[-1]}{failed}")
        print(f"  {total:5.2f}  in all\n")
    finally:
        if tracer is not None:
            stop(tracer)
        stop(proc, tree(proc))
        listener.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", choices=("forkserver", "floor"), action="append",
                        help="forkserver or floor (default: both)")
    parser.add_argument("--seconds", type=int, default=2, help="length of the wrk run (default 2)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="forkserver-syscalls-") as tmp:
        for server in args.server or ["forkserver", "floor"]:
            measure(server, args.seconds, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
