#!/usr/bin/env python3
"""Did a change make forkserver faster?  Two checkouts, side by side, interleaved.

    git worktree add /tmp/before HEAD~1
    python3 scripts/compare_checkouts.py /tmp/before .                  # hello keep-alive
    python3 scripts/compare_checkouts.py /tmp/before . --close          # a connection per request
    python3 scripts/compare_checkouts.py /tmp/before . --path /64k --rounds 6
    python3 scripts/compare_checkouts.py /tmp/before . --post 1048576  # 1 MiB POSTs to /echo
    python3 scripts/compare_checkouts.py /tmp/before . --server-arg=--access-logfile=/tmp/access.log

Each checkout's forkserver (found through PYTHONPATH, ahead of any installed
copy) serves ``scripts/bench_apps.py`` on its own loopback port; wrk loads
them in turns (A B, then B A, ...) for ``--rounds`` rounds, and it prints
the median req/s and the workers' user and system CPU per request.  On a
shared or virtual machine a single run of either swings by 10% or more;
taking turns puts both under the same swings, which a ratio against
gunicorn (``bench.py``) cannot do between two versions of forkserver.
Every run is bounded by ``--duration``; both servers are stopped on exit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

SCRIPTS = Path(__file__).resolve().parent
HOST = "127.0.0.1"
READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {proc.returncode}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server on port {port} not ready within {READY_TIMEOUT:.0f}s")


def workers_cpu(master: int) -> tuple[float, float]:
    """User and system CPU seconds of a master's workers so far."""
    times = [child.cpu_times() for child in psutil.Process(master).children()]
    return sum(t.user for t in times), sum(t.system for t in times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkouts", nargs=2, help="two directories holding a forkserver/ package")
    parser.add_argument("--path", default="/", help="path to load from scripts/bench_apps.py (default /)")
    parser.add_argument("--close", action="store_true", help="send Connection: close (a connection per request)")
    parser.add_argument("--post", type=int, default=0, metavar="BYTES",
                        help="POST a body of this many bytes to --path (default /echo then), as bench.py's upload")
    parser.add_argument("--rounds", type=int, default=4, help="turns per checkout (default 4)")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default 5)")
    parser.add_argument("--workers", "-w", type=int, default=2, help="workers per server (default 2)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more forkserver argument for both, e.g. --server-arg=--access-logfile=/tmp/a.log")
    args = parser.parse_args()
    wrk = shutil.which("wrk")
    if wrk is None:
        parser.error("wrk is missing: apt-get install -y wrk")
    checkouts = [str(Path(c).resolve()) for c in args.checkouts]
    for checkout in checkouts:
        if not (Path(checkout) / "forkserver" / "__init__.py").is_file():
            parser.error(f"{checkout} holds no forkserver package")

    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        wrk_args = ["-H", "Connection: close"] if args.close else []
        path = args.path
        if args.post:
            script.write(f'wrk.method = "POST"\nwrk.body = string.rep("a", {args.post})\n')
            script.flush()
            wrk_args += ["-s", script.name]
            path = "/echo" if path == "/" else path
        compare(args, [wrk, "-t1", "-c50", f"-d{args.duration}", *wrk_args], path, checkouts)
    return 0


def compare(args: argparse.Namespace, wrk: list[str], path: str, checkouts: list[str]) -> None:
    """Start a server per checkout, load them in turns with the ``wrk`` command, print the medians."""
    servers: list[tuple[str, int, subprocess.Popen[bytes]]] = []
    try:
        for checkout in checkouts:
            port = free_port()
            env = dict(os.environ, PYTHONPATH=checkout)
            proc = subprocess.Popen(
                [sys.executable, "-m", "forkserver", "bench_apps:app", "-w", str(args.workers),
                 "-b", f"{HOST}:{port}", "--keepalive", "30", "--log-level", "warning", *args.server_arg],
                cwd=SCRIPTS, env=env, stdin=subprocess.DEVNULL)
            servers.append((checkout, port, proc))
        for _, port, proc in servers:
            wait_ready(port, proc)
        results: dict[str, list[tuple[float, float, float]]] = {checkout: [] for checkout in checkouts}
        for rnd in range(args.rounds):
            for checkout, port, proc in (servers if rnd % 2 == 0 else servers[::-1]):  # A B, then B A
                user0, system0 = workers_cpu(proc.pid)
                out = subprocess.run([*wrk, f"http://{HOST}:{port}{path}"],
                                     capture_output=True, text=True, timeout=args.duration + 30).stdout
                user1, system1 = workers_cpu(proc.pid)
                found = re.search(r"(\d+) requests in", out)
                if found is None or "Non-2xx" in out or "Socket errors" in out:
                    raise RuntimeError(f"wrk against {checkout} went wrong:\n{out}")
                count = int(found.group(1))
                results[checkout].append((count / args.duration, 1e6 * (user1 - user0) / count,
                                          1e6 * (system1 - system0) / count))
        for checkout, runs in results.items():
            print(f"{checkout}: {statistics.median(r[0] for r in runs):,.0f} req/s, "
                  f"worker CPU {statistics.median(r[1] for r in runs):.1f} us user + "
                  f"{statistics.median(r[2] for r in runs):.1f} us system per request "
                  f"(runs: {', '.join(f'{r[0]:,.0f}' for r in runs)})")
    finally:
        for _, _, proc in servers:
            proc.terminate()
        for _, _, proc in servers:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


if __name__ == "__main__":
    sys.exit(main())
