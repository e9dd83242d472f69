#!/usr/bin/env python3
"""Where one request's time goes inside forkserver, without wrk or a kernel TCP stack.

    python3 scripts/profile_request.py              # hello world: per-request cost and its parts
    python3 scripts/profile_request.py --path /json # the Flask view of scripts/bench_apps.py
    python3 scripts/profile_request.py --profile    # plus cProfile's top functions
    python3 scripts/profile_request.py --bytecodes  # bytecodes and calls per request: exact, no timing
    python3 scripts/profile_request.py --connection close       # a new connection per request, as
    python3 scripts/profile_request.py --connection keep-alive  # nginx without upstream keepalive opens

A real ``forkserver.worker.connection.Connection``, served by ``forkserver.worker.serving.serve``, answers ``scripts/bench_apps.py``
over a UNIX socketpair in this one process: the client side writes a request
(what wrk sends), the connection reads, parses and answers it, the client
reads the answer.  What is left once the socketpair's own send/recv pairs
(measured alone, "floor") are taken away is the Python cost of a request:
parsing, the environ, the app, the response head, the scoreboard, stats and
the access log when asked for.  Everything is bounded by ``--requests``.

Timings on a shared machine move by 10% or more between runs; the count of
bytecodes (and calls) the interpreter runs per request does not, so
``--bytecodes`` shows whether a change made the Python path shorter.

``--connection`` measures a whole connection instead: a real
``forkserver.worker.process.Worker`` (default settings, built as its ``run`` builds
it, without the master, signals or the event loop) accepts on a loopback TCP
listener, and each cycle is a client connecting, sending one GET, reading the
answer and closing. ``close``: the request says ``Connection: close``, so the
worker accepts, reads, serves and closes inside one ``_accept`` call (with
its look for a second connection at the end). ``keep-alive``: the connection
stays open, is registered with epoll, and is closed when the client's EOF is
read. Printed: time per cycle against a floor (the same client, and a server
side that only accepts, reads, sends a canned reply and closes, with no
Python in between), the bytecodes per cycle by function, and the C-level
calls per cycle by caller (accept, setblocking, recv, send, close,
epoll.register: what reaches the kernel). The client's own calls, made from
the harness, are not counted. The loop's per-wakeup work (epoll.poll, the
scoreboard beat, the accept board) is not in the cycle either.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import dis
import io
import os
import pstats
import select
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_apps  # noqa: E402

from forkserver.config import DEFAULT_ACCESS_LOG_FORMAT, Config  # noqa: E402
from forkserver.worker.connection import Connection  # noqa: E402
from forkserver.hooks import Hooks  # noqa: E402
from forkserver.http.exchange import Closing, Exchange  # noqa: E402
from forkserver.http.parser import Limits, RequestParser  # noqa: E402
from forkserver.http.response import DateHeader  # noqa: E402
from forkserver.logs import open_access_log  # noqa: E402
from forkserver.scoreboard import Scoreboard  # noqa: E402
from forkserver.worker.serving import Service, serve  # noqa: E402
from forkserver.sockets import bind, parse_address  # noqa: E402
from forkserver.stats import Reporter, new_channel  # noqa: E402
from forkserver.worker.process import Entrance, Worker, WorkerSpec  # noqa: E402
from forkserver.worker.wsgi import Codec, Response, base_environ, build_environ, run_app  # noqa: E402

ROUNDS = 5  # the best of this many rounds is reported: the least disturbed by the rest of the machine


def where(code) -> str:
    """``file:Class.function`` (a dataclass's generated ``__init__`` is ``<string>:__init__``)."""
    name = code.co_name if code.co_filename == "<string>" else code.co_qualname
    return f"{Path(code.co_filename).name}:{name}"


def bytecodes_per_call(action, count: int) -> tuple[collections.Counter[str], int, collections.Counter[str]]:
    """Per call of ``action`` (its own frame excluded): bytecodes run by function, the CALLs among
    them, and the calls into C functions by caller (``caller -> function``)."""
    per_function: collections.Counter[str] = collections.Counter()
    c_calls: collections.Counter[str] = collections.Counter()
    calls = 0
    harness = action.__code__

    def trace(frame, event, arg):
        nonlocal calls
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        code = frame.f_code
        if event == "opcode" and code is not harness:
            per_function[where(code)] += 1
            if dis.opname[code.co_code[frame.f_lasti]] == "CALL":
                calls += 1
        return trace

    def profile(frame, event, arg):
        if event == "c_call" and frame.f_code is not harness:
            owner = getattr(arg, "__self__", None)
            kind = "" if owner is None or isinstance(owner, type(sys)) else type(owner).__name__ + "."
            c_calls[f"{where(frame.f_code)} -> {kind}{arg.__name__}"] += 1

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        for _ in range(count):
            action()
    finally:
        sys.setprofile(None)
        sys.settrace(None)
    return (collections.Counter({name: run / count for name, run in per_function.items()}), calls // count,
            collections.Counter({name: run / count for name, run in c_calls.items()}))


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


def print_bytecodes(action: Callable[[], None], what: str, top: int, c_calls: bool = False) -> None:
    per_function, calls, by_c = bytecodes_per_call(action, 100)
    print(f"{sum(per_function.values()):.0f} bytecodes and {calls} calls per {what}; by function:")
    for name, run in per_function.most_common(top):
        print(f"  {run:5.0f}  {name}")
    if c_calls:
        print(f"{sum(by_c.values()):.0f} calls into C per {what}; by caller:")
        for name, run in by_c.most_common():
            print(f"  {run:5.1f}  {name}")


def profile_connection(mode: str, path: str, count: int, show_profile: bool) -> None:
    """``--connection``: one accept, request, response and close per cycle, through a real Worker."""
    config = Config(app="bench_apps:app")
    listener = bind(parse_address("127.0.0.1:0"), backlog=1024, reuse_port=False, unix_mode=0o600)
    board = Scoreboard(1)
    worker = Worker(WorkerSpec(config=config, listeners=[listener], slot=0, generation=1, board=board,
                               notify_fd=-1, master_pid=os.getppid(), log_files=[], access_logfile=None,
                               log_channel=socket.socketpair()[1], app=bench_apps.app,
                               hooks=Hooks(config), uid=None, gid=None, stats_channel=None))
    # What Worker.run does between the fork and the loop, less signals and hooks.
    worker.title = "forkserver: worker [profile]"
    worker.service = worker._build_service(bench_apps.app)
    worker.epoll = select.epoll()
    entrance = Entrance(listener, base_environ(*listener.name, multithread=False))
    worker.listening[entrance.sock.fileno()] = entrance
    address = listener.sock.getsockname()

    close = mode == "close"
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
               + ("Connection: close\r\n" if close else "") + "\r\n").encode()
    answer = bytearray(1 << 18)
    canned = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!"
    # The client uses the C socket type alone, so none of its work runs Python code that would be counted.
    new_client = socket.SocketType
    family, stream = socket.AF_INET, socket.SOCK_STREAM
    expected = 0  # bytes of one keep-alive response, learned on the first cycle

    def cycle() -> None:
        client = new_client(family, stream)
        client.connect(address)
        client.send(request)
        worker._accept(entrance)
        if close:
            while client.recv_into(answer):
                pass
            client.close()
            return
        got = client.recv_into(answer)
        while got < expected:
            got += client.recv_into(memoryview(answer)[got:])
        client.close()
        for connection in list(worker.connections.values()):
            worker._on_readable(connection)  # the EOF: closed and unregistered

    def floor() -> None:
        client = new_client(family, stream)
        client.connect(address)
        client.send(request)
        fd, _ = entrance.sock._accept()
        server = new_client(family, stream, 0, fd)
        server.setblocking(False)
        server.recv(65536)
        server.send(canned)
        server.close()
        client.recv_into(answer)
        client.close()

    if not close:  # learn the response's size from a first, blocking read of the whole answer
        probe = new_client(family, stream)
        probe.connect(address)
        probe.send(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        worker._accept(entrance)
        expected = len(b"".join(iter(lambda: probe.recv(65536), b""))) - len("Connection: close\r\n")
        probe.close()
    for _ in range(200):  # warm up, and let TIME_WAIT sockets pile up as they do under load
        cycle()
    rounds = max(1, min(count, 5000))  # every cycle leaves a socket in TIME_WAIT: bounded
    total = best_per_call(cycle, rounds)
    socket_floor = best_per_call(floor, rounds)
    print(f"new connection ({mode}), GET {path}: {total * 1e6:.1f} us per cycle, of which {socket_floor * 1e6:.1f} us "
          f"connect/accept/recv/send/close with no Python in between (floor): "
          f"{(total - socket_floor) * 1e6:.1f} us of forkserver and app")
    if close:
        print_phases(worker, entrance, address, request, rounds)
    print_bytecodes(cycle, "connection", 25, c_calls=True)
    if show_profile:
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [cycle() for _ in range(rounds)])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
    listener.close()


def time_steps(address: tuple[str, int], request: bytes, count: int, serve: Callable[[], Iterator[None]],
               names: Sequence[str]) -> None:
    """Print the server-side seconds between ``serve``'s yields, averaged over ``count`` fresh connections.

    For each connection a client connects and sends ``request``; ``serve``
    takes it from the listener, yielding after each of its steps; then the
    client reads the answer to the end and closes. The first 200 are warm-up.
    """
    spent = [0.0] * len(names)
    answer = bytearray(1 << 18)
    clock = time.perf_counter
    for turn in range(count + 200):
        client = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM)
        client.connect(address)
        client.send(request)
        stamps = [clock()]
        for _ in serve():
            stamps.append(clock())
        if turn >= 200:
            for step in range(len(names)):
                spent[step] += stamps[step + 1] - stamps[step]
        while client.recv_into(answer):
            pass
        client.close()
    print(", ".join(f"{name} {total / count * 1e6:.1f} us" for name, total in zip(names, spent))
          + f"; in all {sum(spent) / count * 1e6:.1f} us")


def print_phases(worker: Worker, entrance: Entrance, address: tuple[str, int], request: bytes, count: int) -> None:
    """Time the steps of ``Worker._accept`` one by one, in sequence, on fresh connections; and the floor's.

    The steps are restated here (accept and wrap, Connection, receive, serve,
    close, the batch's look for a second connection) so a clock can sit between them: keep
    them in step with ``Worker._accept`` when it changes. Each step is timed
    where it really runs, cold caches and all, unlike a step repeated alone.
    """
    listener = entrance.sock
    canned = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!"

    def accept() -> tuple[socket.SocketType, tuple[str, str]]:
        fd, peer = listener._accept()
        sock = socket.SocketType(entrance.family, socket.SOCK_STREAM, 0, fd)
        sock.setblocking(False)
        return sock, (peer[0], str(peer[1]))

    def forkserver_steps() -> Iterator[None]:
        sock, remote = accept()
        yield
        parser, worker.spare_parser = worker.spare_parser, None  # renewed, as in Worker._connection
        connection = Connection(sock, remote, entrance.environ, worker.service, parser=parser)
        yield
        connection.receive()
        yield
        serve(connection, 0)
        yield
        worker.spare_parser = connection.close().give_up_parser()  # as Worker._close keeps it
        yield
        entrance.queued(0)
        yield

    def floor_steps() -> Iterator[None]:  # system calls only, as scripts/floor_server.py makes them
        sock, _ = accept()
        yield
        sock.recv(65536)
        yield
        sock.send(canned)
        yield
        sock.close()
        yield

    print(f"  in steps (server side, {count} connections, Connection: close): ", end="")
    time_steps(address, request, count, forkserver_steps,
               ("accept + socket object + setblocking", "Connection(), its parser renewed", "receive (recv + parse)",
                "serve (environ, app, response, send)", "close", "the batch's look for a second connection (poll)"))
    print("  the floor's steps: ", end="")
    time_steps(address, request, count, floor_steps, ("accept + socket object + setblocking", "recv", "send", "close"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--path", default="/", help="path to request from scripts/bench_apps.py (default /)")
    parser.add_argument("--requests", type=int, default=20000, help="requests per round (default 20000)")
    parser.add_argument("--stats", action="store_true", help="count requests in a stats Reporter, as --stats-bind does")
    parser.add_argument("--access-log", action="store_true", help="write the default access log (to a temporary file)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions by own time")
    parser.add_argument("--bytecodes", action="store_true",
                        help="print the bytecodes and calls the interpreter runs per request, by function")
    parser.add_argument("--connection", choices=("close", "keep-alive"),
                        help="measure a whole connection (accept, request, close) through a real Worker instead")
    args = parser.parse_args()
    if args.connection:
        profile_connection(args.connection, args.path, args.requests, args.profile)
        return 0

    request = (f"GET {args.path} HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n").encode()
    answer = bytearray(1 << 18)  # the client's read buffer, reused: a 64 KiB response and its head fit
    server_side, client = socket.socketpair()
    server_side.setblocking(False)
    stats_ends = new_channel()  # both ends kept open: flushes land in the pipe as in a worker
    with tempfile.TemporaryDirectory() as tmp:
        access_log = open_access_log(os.path.join(tmp, "access.log"), DEFAULT_ACCESS_LOG_FORMAT,
                                     batched=True) if args.access_log else None
        service = Service(app=bench_apps.app, limits=Limits(), date=DateHeader(), access_log=access_log,
                          io_timeout=None, closing=Closing(), board=Scoreboard(1),
                          stats=Reporter(stats_ends[1], pid=os.getpid(), slot=0, generation=1) if args.stats else None,
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
        environ = build_environ(parsed, base, codec)
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = "127.0.0.1", "40000"
        environ["wsgi.input"] = io.BytesIO()
        output = NullOutput()
        exchange = Exchange(service.limits, service.date, service.closing)

        def respond_once() -> None:
            exchange.receive(request)
            exchange.start()
            run_app(bench_apps.app, dict(environ), Response(exchange, output, codec))
            exchange.reuse()

        parse = best_per_call(lambda: request_parser.feed(request), count)
        build = best_per_call(lambda: build_environ(parsed, base, codec), count)
        respond = best_per_call(respond_once, count)

        print(f"GET {args.path}: {total * 1e6:.1f} us per request, of which {socket_floor * 1e6:.1f} us "
              f"socketpair send/recv (floor): {(total - socket_floor) * 1e6:.1f} us of forkserver and app")
        print(f"  alone: parse {parse * 1e6:.1f} us, environ {build * 1e6:.1f} us (built once per connection), "
              f"parse + app + start_response + head {respond * 1e6:.1f} us")
        if args.bytecodes:
            print_bytecodes(one_request, "request", 15)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(lambda: [one_request() for _ in range(count)])
            pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
        if access_log is not None:
            access_log.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
