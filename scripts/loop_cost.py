#!/usr/bin/env python3
"""The Python work a real worker's loop does per request: bytecodes, counted, not timed.

    python3 scripts/loop_cost.py                          # this checkout, keep-alive and Connection: close
    python3 scripts/loop_cost.py /tmp/before .            # two checkouts, and where they differ
    python3 scripts/loop_cost.py --connection close --clients 8 --top 30

A real server (``python -m forkserver scripts/bench_apps.py``, one worker,
default settings) is started for each checkout and mode.  This module is
its ``post_worker_init`` hook: in the worker, after the app is loaded, it
starts counting every bytecode the worker's thread runs (``sys.settrace``
with ``f_trace_opcodes``) and the calls into C (``sys.setprofile``), and it
hands the worker an epoll object whose ``poll`` is the real one with a
client in front of it.  When the loop is about to wait, the client reads
the answers to its last requests and sends the next ones (``--clients``
of them, over kept-alive connections or over new connections saying
``Connection: close``); then the real ``poll`` reports them.  So the
counted work is everything the worker does from one wake to the next,
boot, signals, master and relay included as they are in production, and
the client runs in lockstep with it: the same bytecodes run on every
cycle however busy the machine is, and a change of one bytecode per
request shows.

What is not counted: the client's own work (its frames are skipped), the
C work below Python (llhttp, the kernel) and the periodic sweep of idle
connections, which runs a few times a second whatever the load (the
lockstep would make it depend on the machine's speed, so it is put off
until the count ends).

Everything is bounded: ``--requests`` cycles after ``--warmup`` ones, and a
deadline on each server; every server is stopped by its PID on exit.
This module uses no part of forkserver's own code, so it measures older
checkouts too.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from stopping import stop, tree

SCRIPTS = Path(__file__).resolve().parent
HOST = "127.0.0.1"
SETTINGS = "LOOP_COST_SETTINGS"  # the environment variable that hands the hook its settings
DEADLINE = 300.0  # seconds for one measurement, boot included; tracing runs Python about 20x slower
HARNESS = __file__  # frames of this file are the client's: never counted


def where(code: Any) -> str:
    """``file:Class.function`` (a dataclass's generated ``__init__`` is ``<string>:__init__``)."""
    name = code.co_name if code.co_filename == "<string>" else code.co_qualname
    return f"{Path(code.co_filename).name}:{name}"


class Counter:
    """Counts the bytecodes (by code object and line) and the calls into C (by caller) of the thread it traces."""

    def __init__(self) -> None:
        self.bytecodes: collections.Counter[Any] = collections.Counter()
        self.c_calls: collections.Counter[tuple[Any, str]] = collections.Counter()

    def start(self) -> None:
        sys.settrace(self._trace)
        sys.setprofile(self._profile)

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        if code.co_filename == HARNESS:
            return None
        if event == "call":
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        elif event == "opcode":
            self.bytecodes[(code, frame.f_lineno)] += 1
        return self._trace

    def _profile(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and frame.f_code.co_filename != HARNESS:
            owner = getattr(arg, "__self__", None)
            kind = "" if owner is None or isinstance(owner, type(sys)) else type(owner).__name__ + "."
            self.c_calls[(frame.f_code, kind + arg.__name__)] += 1

    def snapshot(self) -> tuple[dict[Any, int], dict[tuple[Any, str], int]]:
        return dict(self.bytecodes), dict(self.c_calls)


class Client:
    """``clients`` HTTP clients in lockstep with the worker: each step reads the last answers, sends anew."""

    def __init__(self, port: int, path: str, close: bool, clients: int) -> None:
        self.port, self.close, self.clients = port, close, clients
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                        + ("Connection: close\r\n" if close else "") + "\r\n").encode()
        self.socks: list[socket.SocketType] = []
        self.buffer = bytearray(1 << 18)

    def step(self) -> None:
        """Read every answer to the last step's requests, then send the next ones."""
        for sock in self.socks:
            self._read_answer(sock)
        if self.close or not self.socks:
            for sock in self.socks:
                sock.close()
            self.socks = []
            for _ in range(self.clients):
                sock = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)
                sock.connect((HOST, self.port))
                self.socks.append(sock)
        for sock in self.socks:
            sock.sendall(self.request)

    def _read_answer(self, sock: socket.SocketType) -> None:
        """One whole response (Content-Length framed), or up to the server's close."""
        got = bytearray()
        while True:
            size = sock.recv_into(self.buffer)
            if not size:
                if self.close:
                    return
                raise RuntimeError("the server closed a kept-alive connection")
            got += memoryview(self.buffer)[:size]
            end = got.find(b"\r\n\r\n")
            if end < 0 or self.close:
                continue
            length = 0
            for line in bytes(got[:end]).split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(got) >= end + 4 + length:
                return


class DrivenEpoll:
    """The worker's real epoll, with the client stepping before each wait (and every poll, with ``busy``).

    After ``warmup`` steps the count starts; after ``requests`` more, the
    results are written to ``output`` and the worker leaves.  The sweep is
    put off on every step (see the module docstring).
    """

    def __init__(self, real: Any, settings: dict[str, Any], counter: Counter) -> None:
        self.real, self.counter = real, counter
        self.client = Client(settings["port"], settings["path"], settings["close"], settings["clients"])
        self.warmup, self.requests = settings["warmup"], settings["requests"]
        self.output = settings["output"]
        self.steps = 0
        self.start: tuple[dict[Any, int], dict[tuple[Any, str], int]] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def poll(self, timeout: float = -1.0, maxevents: int = -1) -> list[tuple[int, int]]:
        if timeout == 0:
            return self.real.poll(0)
        loop = sys._getframe(1).f_locals.get("self")
        if loop is not None and hasattr(loop, "next_sweep"):
            loop.next_sweep = float("inf")
        if self.steps == self.warmup:
            self.start = self.counter.snapshot()
        elif self.steps == self.warmup + self.requests:
            self._finish()
        self.steps += 1
        self.client.step()
        # On loopback the requests are in by now; waiting for them keeps a
        # scheduler hiccup from splitting one step's events over two wakes.
        events = self.real.poll(timeout)
        want = 1 if self.client.close else self.client.clients
        deadline = time.monotonic() + 5.0
        while len(events) < want and time.monotonic() < deadline:
            time.sleep(0.001)
            events = self.real.poll(0)
        return events

    def _finish(self) -> None:
        end = self.counter.snapshot()
        sys.settrace(None)
        sys.setprofile(None)
        assert self.start is not None
        per_request = self.requests * self.client.clients
        bytecodes: collections.Counter[str] = collections.Counter()
        lines: collections.Counter[str] = collections.Counter()
        for (code, line), count in end[0].items():
            count -= self.start[0].get((code, line), 0)
            bytecodes[where(code)] += count
            lines[f"{Path(code.co_filename).name}:{line} ({code.co_name})"] += count
        c_calls: collections.Counter[str] = collections.Counter()
        for (code, name), count in end[1].items():
            c_calls[f"{where(code)} -> {name}"] += count - self.start[1].get((code, name), 0)
        result = {
            "requests": per_request,
            "bytecodes": {name: count / per_request for name, count in bytecodes.items() if count},
            "lines": {name: count / per_request for name, count in lines.items() if count},
            "c_calls": {name: count / per_request for name, count in c_calls.items() if count},
        }
        Path(self.output + ".part").write_text(json.dumps(result))
        os.rename(self.output + ".part", self.output)
        os._exit(0)


def measure(context: Any = None) -> None:
    """The ``post_worker_init`` hook: count from here, and give the worker's next epoll a client."""
    settings = json.loads(os.environ[SETTINGS])
    if os.path.exists(settings["output"]):
        return  # a worker started after the measured one
    counter = Counter()
    real_epoll = select.epoll

    def driven_epoll(*args: Any) -> DrivenEpoll:
        select.epoll = real_epoll  # only the worker loop's own epoll is driven
        return DrivenEpoll(real_epoll(*args), settings, counter)

    select.epoll = driven_epoll
    counter.start()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def run_checkout(checkout: Path, close: bool, args: argparse.Namespace) -> dict[str, Any]:
    """Start a server from ``checkout`` with this module as its hook, and return what the worker counted."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        output = os.path.join(tmp, "result.json")
        settings = {"port": port, "path": args.path, "close": close, "clients": args.clients,
                    "warmup": args.warmup, "requests": args.requests, "output": output}
        env = dict(os.environ, PYTHONPATH=f"{checkout}{os.pathsep}{SCRIPTS}", **{SETTINGS: json.dumps(settings)})
        server = subprocess.Popen(
            [sys.executable, "-m", "forkserver", "bench_apps:app", "--bind", f"{HOST}:{port}", "--workers", "1",
             "--post-worker-init", "loop_cost:measure"],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "server.log"), "wb"))
        try:
            deadline = time.monotonic() + DEADLINE
            while not os.path.exists(output):
                if server.poll() is not None or time.monotonic() > deadline:
                    log = Path(tmp, "server.log").read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"no count from {checkout} (server exit {server.returncode}):\n{log}")
                time.sleep(0.1)
            return json.loads(Path(output).read_text())
        finally:
            stop_tree(server)


def stop_tree(server: subprocess.Popen[bytes]) -> None:
    """Stop the master (INT: at once), then KILL whatever of its tree is left, by PID.

    A measured worker puts its sweep off, so it would not notice a master that died.
    """
    stop(server, tree(server))


def print_result(label: str, result: dict[str, Any], top: int, by_line: bool) -> None:
    bytecodes, c_calls = result["bytecodes"], result["c_calls"]
    print(f"{label}: {sum(bytecodes.values()):.1f} bytecodes and {sum(c_calls.values()):.1f} calls into C "
          f"per request ({result['requests']} requests); by function:")
    for name, count in sorted(bytecodes.items(), key=lambda item: -item[1])[:top]:
        print(f"  {count:7.1f}  {name}")
    if by_line:
        print("  by line:")
        for name, count in sorted(result["lines"].items(), key=lambda item: -item[1])[:top]:
            print(f"  {count:7.1f}  {name}")
    print("  calls into C, by caller:")
    for name, count in sorted(c_calls.items(), key=lambda item: -item[1])[:top]:
        print(f"  {count:7.1f}  {name}")


def largest_changes(before: dict[str, float], after: dict[str, float], top: int) -> list[tuple[str, float]]:
    """The ``top`` functions whose per-request count moved most from ``before`` to ``after``, and by how much."""
    change = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in before.keys() | after.keys()}
    return sorted(change.items(), key=lambda item: -abs(item[1]))[:top]


def print_difference(labels: list[str], results: list[dict[str, Any]], top: int) -> None:
    before, after = results[0]["bytecodes"], results[1]["bytecodes"]
    print(f"{labels[1]} minus {labels[0]}: {sum(after.values()) - sum(before.values()):+.1f} bytecodes per request;"
          " the largest changes by function:")
    for name, delta in largest_changes(before, after, top):
        if abs(delta) >= 0.05:
            print(f"  {delta:+7.1f}  {name}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkouts", nargs="*", default=["."], help="directories holding a forkserver/ package")
    parser.add_argument("--connection", choices=("keep-alive", "close"), action="append",
                        help="which kind of connection (default: both, in turn)")
    parser.add_argument("--clients", type=int, default=1, help="requests per wake of the loop (default 1)")
    parser.add_argument("--path", default="/", help="path to request from scripts/bench_apps.py (default /)")
    parser.add_argument("--requests", type=int, default=1000, help="counted wakes (default 1000)")
    parser.add_argument("--warmup", type=int, default=100, help="wakes before the count starts (default 100)")
    parser.add_argument("--lines", action="store_true", help="also list the source lines that run the most bytecodes")
    parser.add_argument("--top", type=int, default=15, help="functions to list (default 15)")
    args = parser.parse_args()
    checkouts = [Path(checkout).resolve() for checkout in args.checkouts]
    for checkout in checkouts:
        if not (checkout / "forkserver" / "__init__.py").exists():
            parser.error(f"{checkout} holds no forkserver package")
    for mode in args.connection or ["keep-alive", "close"]:
        results = [run_checkout(checkout, mode == "close", args) for checkout in checkouts]
        labels = [str(checkout) for checkout in checkouts]
        for label, result in zip(labels, results):
            print_result(f"{mode}, {label}", result, args.top, args.lines)
        if len(results) == 2:
            print_difference(labels, results, args.top)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
