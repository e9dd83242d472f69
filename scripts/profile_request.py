#!/usr/bin/env python3
"""Where one request's time goes inside forkserver, without wrk or a kernel TCP stack.

    python3 scripts/profile_request.py              # hello world: per-request cost and its parts
    python3 scripts/profile_request.py --path /json # the Flask view of scripts/bench_apps.py
    python3 scripts/profile_request.py --profile    # plus cProfile's top functions
    python3 scripts/profile_request.py --bytecodes  # bytecodes and calls per request: exact, no timing

A real ``forkserver.connection.Connection``, served by ``forkserver.serving.serve``, answers ``scripts/bench_apps.py``
over a UNIX socketpair in this one process: the client side writes a request
(what wrk sends), the connection reads, parses and answers it, the client
reads the answer.  What is left once the socketpair's own send/recv pairs
(measured alone, "floor") are taken away is the Python cost of a request:
parsing, the environ, the app, the response head, the scoreboard, stats and
the access log when asked for.  Everything is bounded by ``--requests``.

Timings on a shared machine move by 10% or more between runs; the count of
bytecodes (and calls) the interpreter runs per request does not, so
``--bytecodes`` shows whether a change made the Python path shorter.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dis
import io
import os
import pstats
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_apps  # noqa: E402

from forkserver.config import DEFAULT_ACCESS_LOG_FORMAT  # noqa: E402
from forkserver.connection import Connection  # noqa: E402
from forkserver.http.exchange import Closing, Exchange  # noqa: E402
from forkserver.http.parser import Limits, RequestParser  # noqa: E402
from forkserver.http.response import DateHeader  # noqa: E402
from forkserver.logs import open_access_log  # noqa: E402
from forkserver.scoreboard import Scoreboard  # noqa: E402
from forkserver.serving import Service, serve  # noqa: E402
from forkserver.stats import Reporter, new_queue  # noqa: E402
from forkserver.wsgi import Codec, Response, base_environ, build_environ, run_app  # noqa: E402

ROUNDS = 5  # the best of this many rounds is reported: the least disturbed by the rest of the machine


def bytecodes_per_call(action, count: int) -> tuple[collections.Counter[str], int]:
    """Bytecodes run per call of ``action`` by function, and the calls among them (``action``'s own excluded)."""
    per_function: collections.Counter[str] = collections.Counter()
    calls = 0
    harness = action.__code__

    def trace(frame, event, arg):
        nonlocal calls
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        if event == "opcode" and code is not harness:
            per_function[f"{Path(code.co_filename).name}:{code.co_name}"] += 1
            if dis.opname[code.co_code[frame.f_lasti]] == "CALL":
                calls += 1
        return trace

    sys.settrace(trace)
    try:
        for _ in range(count):
            action()
    finally:
        sys.settrace(None)
    return collections.Counter({name: run / count for name, run in per_function.items()}), calls // count


def best_per_call(action, count: int) -> float:
    """Seconds per call of ``action``, the best of ROUNDS rounds of ``count`` calls."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(count):
            action()
        best = min(best, (time.perf_counter() - started) / count)
    return best


class NullOutput:
    """A response output that sends nothing: the response's own cost, alone."""

    def send(self, data: bytes) -> None:
        pass

    def send_pair(self, head: bytes, body: bytes, last: bool = False) -> None:
        pass

    def sendfile(self, in_fd: int, offset: int, count: int) -> int:
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default="/", help="path to request from scripts/bench_apps.py (default /)")
    parser.add_argument("--requests", type=int, default=20000, help="requests per round (default 20000)")
    parser.add_argument("--stats", action="store_true", help="count requests in a stats Reporter, as --stats-bind does")
    parser.add_argument("--access-log", action="store_true", help="write the default access log (to a temporary file)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions by own time")
    parser.add_argument("--bytecodes", action="store_true",
                        help="print the bytecodes and calls the interpreter runs per request, by function")
    args = parser.parse_args()

    request = (f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n").encode()
    answer = bytearray(1 << 18)  # the client's read buffer, reused: a 64 KiB response and its head fit
    server_side, client = socket.socketpair()
    server_side.setblocking(False)
    with tempfile.TemporaryDirectory() as tmp:
        access_log = open_access_log(os.path.join(tmp, "access.log"), DEFAULT_ACCESS_LOG_FORMAT,
                                     batched=True) if args.access_log else None
        service = Service(app=bench_apps.app, limits=Limits(), date=DateHeader(), access_log=access_log,
                          io_timeout=None, closing=Closing(), board=Scoreboard(1),
                          stats=Reporter(new_queue(), pid=os.getpid(), slot=0, generation=1) if args.stats else None,
                          show=lambda method, path: None)
        connection = Connection(server_side, ("127.0.0.1", "40000"), base_environ("127.0.0.1", "8000", False),
                                service)

        def one_request() -> None:
            client.send(request)
            connection.receive()
            serve(connection, 0)
            client.recv_into(answer)

        def floor() -> None:
            client.send(request)
            server_side.recv(65536)
            server_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\nHello, World!")
            client.recv_into(answer)

        count = args.requests
        one_request()  # the first request warms up the caches
        total = best_per_call(one_request, count)
        socket_floor = best_per_call(floor, count)

        # The parts, each alone (warm caches: an upper bound on what they add).
        request_parser = RequestParser(service.limits)
        parsed = request_parser.feed(request)[0]
        base = base_environ("127.0.0.1", "8000", False)
        codec = Codec()
        environ = build_environ(parsed, base, ("127.0.0.1", "40000"), codec)
        environ["wsgi.input"] = io.BytesIO()
        output = NullOutput()
        exchange = Exchange(service.limits, service.date, service.closing)

        def respond_once() -> None:
            exchange.receive(request)
            exchange.start()
            run_app(bench_apps.app, dict(environ), Response(exchange, output, codec))
            exchange.reuse()

        parse = best_per_call(lambda: request_parser.feed(request), count)
        build = best_per_call(lambda: build_environ(parsed, base, ("127.0.0.1", "40000"), codec), count)
        respond = best_per_call(respond_once, count)

        print(f"GET {args.path}: {total * 1e6:.1f} us per request, of which {socket_floor * 1e6:.1f} us "
              f"socketpair send/recv (floor): {(total - socket_floor) * 1e6:.1f} us of forkserver and app")
        print(f"  alone: parse {parse * 1e6:.1f} us, environ {build * 1e6:.1f} us (built once per connection), "
              f"parse + app + start_response + head {respond * 1e6:.1f} us")
        if args.bytecodes:
            per_function, calls = bytecodes_per_call(one_request, 100)
            print(f"{sum(per_function.values()):.0f} bytecodes and {calls} calls per request; by function:")
            for name, run in per_function.most_common(15):
                print(f"  {run:5.0f}  {name}")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [one_request() for _ in range(count)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        if access_log is not None:
            access_log.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
