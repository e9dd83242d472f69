#!/usr/bin/env python3
"""The machine instructions a real worker runs per request, C included: counted by callgrind, not timed.

    python3 scripts/instruction_cost.py                   # this checkout, keep-alive
    python3 scripts/instruction_cost.py /tmp/before .     # two checkouts, and where they differ
    python3 scripts/instruction_cost.py --connection close --clients 8 --top 30
    python3 scripts/instruction_cost.py . --bjoern --path /json  # and bjoern, as the difference's "before"

``loop_cost.py`` counts bytecodes: it sees none of the work below Python
(the interpreter's own, llhttp, dict and object machinery, libc).  Here a
real server (one worker, default settings) runs under ``valgrind
--tool=callgrind``, which counts every instruction each thread of each
process executes, and a client in another process sends requests in
lockstep with it (``loop_cost.Client``).  The same server serves
``--requests`` steps after a warm-up in one run and three times as many in
another; the difference in the worker's main thread, divided by the
requests that make it, is what one request costs: boot, warm-up and exit
cancel out.  The relay's watcher thread is left out (it wakes on a timer,
so under valgrind's slowdown it would look far dearer per request than it
is).  str hashes are seeded alike in every run.  Two runs of the same
code back to back agree to 0.1%; timers (the idle sweep, the heartbeat)
still fire by the clock, and a run made while the machine was busy with
other work came out 1.7% lower: compare runs made together, and repeat a
small difference.

``--bjoern`` counts bjoern too (``scripts/bjoern_server.py`` with one
worker, the app imported before the fork as bench.py runs it; run this with
the Python that has bjoern): what a request costs a server written in C,
for the same app and the same client.

valgrind must be installed.  Everything is bounded: a deadline on each
server, every server stopped by its PID on exit.  Uses no part of
forkserver's own code, so it measures older checkouts too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from loop_cost import HOST, Client, free_port, largest_changes
from stopping import stop, tree

SCRIPTS = Path(__file__).resolve().parent
DEADLINE = 300.0  # seconds for one run, boot included; callgrind runs Python about 50x slower
STOP_GRACE = 60.0  # seconds for a server to exit (and callgrind to write its counts) after INT
# One line of callgrind_annotate's listing: "  1,234 ( 0.05%)  /path/to/file.c:function [/path/lib.so]".
LISTING_LINE = re.compile(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+?):(\S+)(?: \[.*\])?$")


def run_server(checkout: Path | None, args: argparse.Namespace, steps: int, output: str) -> Path:
    """Serve ``args.warmup`` then ``steps`` lockstep steps under callgrind; the worker main thread's counts.

    ``checkout`` None: bjoern serves instead of forkserver.
    """
    # One hash seed for every run: with str hashes salted afresh, how often
    # dict lookups collide, and so their cost, moved by 700 instructions a request.
    env = dict(os.environ, PYTHONPATH=f"{checkout or ''}{os.pathsep}{SCRIPTS}", PYTHONHASHSEED="0")
    listener = None
    if checkout is None:
        listener = socket.create_server((HOST, 0), backlog=1024)  # bjoern_server.py serves an inherited socket
        port = listener.getsockname()[1]
        command = [str(SCRIPTS / "bjoern_server.py"), str(listener.fileno()), "1", "bench_apps:app"]
    else:
        port = free_port()
        command = ["-m", "forkserver", "bench_apps:app", "--bind", f"{HOST}:{port}", "--workers", "1"]
    with listener or contextlib.nullcontext():
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--trace-children=yes", "--separate-threads=yes",
             f"--callgrind-out-file={output}/callgrind.%p", sys.executable, *command],
            cwd=output, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(output, "server.log"), "wb"),
            pass_fds=(listener.fileno(),) if listener else ())
    leftovers: dict[int, float] = {}
    try:
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                socket.create_connection((HOST, port), timeout=1.0).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    log = Path(output, "server.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{checkout}: no server (exit {server.returncode}):\n{log}") from None
                time.sleep(0.2)
        while not (leftovers := tree(server)):  # (the master listens before it forks its worker)
            if time.monotonic() > deadline:
                raise RuntimeError(f"{checkout}: no worker started")
            time.sleep(0.2)
        workers = list(leftovers)
        if len(workers) != 1:
            raise RuntimeError(f"{checkout}: expected one worker process, found {len(workers)}")
        client = Client(port, args.path, args.connection == "close", args.clients)
        for _ in range(args.warmup + steps):
            client.step()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{checkout}: {steps} steps did not end within {DEADLINE:g}s")
        client.step()  # reads the last answers
        if checkout is None:
            # bjoern's launcher SIGKILLs its workers on INT, which would lose
            # the counts: TERM lets valgrind write them as the worker dies.
            os.kill(workers[0], signal.SIGTERM)
            psutil.Process(workers[0]).wait(STOP_GRACE)
    finally:
        stop(server, leftovers, grace=STOP_GRACE)
    return Path(output, f"callgrind.{workers[0]}-01")  # thread 1: the loop's


def by_function(counts: Path) -> collections.Counter[str]:
    """Instructions by function (``file.c:function``, its own, not its callees') in a callgrind output file."""
    listing = subprocess.run(["callgrind_annotate", "--threshold=100", str(counts)],
                             capture_output=True, text=True, check=True).stdout
    functions: collections.Counter[str] = collections.Counter()
    for line in listing.splitlines():
        match = LISTING_LINE.match(line)
        if match and "PROGRAM TOTALS" not in line:
            name = re.sub(r"'\d+$", "", match.group(3))  # callgrind marks recursion depth as 'N
            functions[f"{Path(match.group(2)).name}:{name}"] += int(match.group(1).replace(",", ""))
    return functions


def measure(checkout: Path | None, args: argparse.Namespace) -> dict[str, float]:
    """Instructions per request by function: the difference between a run of 3N steps and one of N."""
    runs = []
    for steps in (args.requests, 3 * args.requests):
        with tempfile.TemporaryDirectory() as output:
            runs.append(by_function(run_server(checkout, args, steps, output)))
    requests = 2 * args.requests * args.clients
    short, long = runs
    return {name: (long[name] - short[name]) / requests for name in short.keys() | long.keys()}


def print_result(label: str, result: dict[str, float], top: int) -> None:
    print(f"{label}: {sum(result.values()):,.0f} instructions per request; by function (own instructions):")
    for name, count in sorted(result.items(), key=lambda item: -item[1])[:top]:
        print(f"  {count:9,.0f}  {name}")


def print_difference(labels: list[str], results: list[dict[str, float]], top: int) -> None:
    before, after = results
    total_before, total_after = sum(before.values()), sum(after.values())
    print(f"{labels[1]} minus {labels[0]}: {total_after - total_before:+,.0f} instructions per request "
          f"({(total_after / total_before - 1) * 100:+.1f}%); the largest changes by function:")
    for name, delta in largest_changes(before, after, top):
        print(f"  {delta:+9,.0f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkouts", nargs="*", default=["."], help="directories holding a forkserver/ package")
    parser.add_argument("--connection", choices=("keep-alive", "close"), default="keep-alive",
                        help="which kind of connection (default keep-alive)")
    parser.add_argument("--clients", type=int, default=1, help="requests per step (default 1)")
    parser.add_argument("--path", default="/", help="path to request from scripts/bench_apps.py (default /)")
    parser.add_argument("--requests", type=int, default=1000,
                        help="steps in the shorter run; the longer has three times as many (default 1000)")
    parser.add_argument("--warmup", type=int, default=100, help="steps before either run's count (default 100)")
    parser.add_argument("--top", type=int, default=15, help="functions to list (default 15)")
    parser.add_argument("--bjoern", action="store_true",
                        help="count bjoern too, first: with one checkout, the 'before' of the difference")
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_annotate") is None:
        parser.error("valgrind (with callgrind_annotate) is not installed")
    checkouts = [Path(checkout).resolve() for checkout in args.checkouts]
    for checkout in checkouts:
        if not (checkout / "forkserver" / "__init__.py").exists():
            parser.error(f"{checkout} holds no forkserver package")
    if args.bjoern and importlib.util.find_spec("bjoern") is None:
        parser.error(f"bjoern is not installed for {sys.executable}")
    servers: list[Path | None] = ([None] if args.bjoern else []) + checkouts
    results = [measure(server, args) for server in servers]
    labels = [f"{args.connection}, {server or 'bjoern'}" for server in servers]
    for label, result in zip(labels, results):
        print_result(label, result, args.top)
    if len(results) == 2:
        print_difference(labels, results, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
