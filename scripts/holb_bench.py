#!/usr/bin/env python3
"""Head-of-line wait behind a busy worker: quick requests' latency next to slow ones, behind nginx.

    python3 scripts/holb_bench.py                       # forkserver and gunicorn sync, 20 s each
    python3 scripts/holb_bench.py --servers forkserver --duration 10
    python3 scripts/holb_bench.py --forkserver-path /some/other/checkout   # compare another tree

The recommended deployment: the real nginx (from the system, ``apt-get
install -y nginx``) in front, with an upstream ``keepalive`` block, so its
connections to the app server are reused.  A bounded number of clients
(``--slow-clients`` asking for ``/slow``, which takes ``--slow`` seconds,
and ``--fast-clients`` asking for ``/fast``, 5 ms) run for ``--duration``
seconds against each server in turn, every server with the same
``--workers`` workers, and the script prints the quick requests' p50, p99
and maximum, and how many waited over a second.  With fewer slow clients
than workers a free worker exists at every moment, so a quick request that
waits long waited behind a slow one on a busy worker: forkserver's relay
(forkserver.relay) must keep the quick p99 no worse than gunicorn's sync
worker, which takes a new connection for every request and so never queues
one behind another.  The defaults keep three of four workers busy with slow
requests most of the time, and the quick requests well within what the
fourth can serve: a setup where waiting behind a slow request shows.  (With
more quick requests than the free workers can serve, requests queue in
any case, and a shared accept queue, gunicorn's, spreads that wait more
evenly than connections bound to workers do.)

Everything listens on 127.0.0.1 only, on sockets this script binds first
and hands over (``fd://N``, nginx's ``NGINX`` variable); every process it
starts is stopped by its PID, its children included.  On a shared machine
figures move from run to run: compare servers measured in the same run.
"""

from __future__ import annotations

import argparse
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from stopping import stop, tree

ROOT = Path(__file__).resolve().parent.parent
SETTLE = 3.0
APP = '''
import time

def app(environ, start_response):
    path = environ["PATH_INFO"]
    time.sleep(SLOW if path == "/slow" else 0.005)
    body = path.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''
NGINX_CONF = '''worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream app {{
        server 127.0.0.1:{upstream};
        keepalive 32;
        keepalive_timeout 4s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 60s;
        }}
    }}
}}
'''


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def wait_answering(port: int, path: str, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{what} did not answer within {timeout:g}s")


def start_server(kind: str, sock: socket.socket, workdir: Path, args: argparse.Namespace) -> subprocess.Popen:
    fd = sock.fileno()
    common = ["--bind", f"fd://{fd}", "--workers", str(args.workers), "--chdir", str(workdir)]
    if kind == "forkserver":
        env = dict(os.environ, PYTHONPATH=str(args.forkserver_path))
        command = [sys.executable, "-m", "forkserver", *common, "--keep-alive", "5", "holb_app:app"]
    else:
        env = dict(os.environ)
        command = [sys.executable, "-m", "gunicorn", *common, "--worker-class", "sync", "--timeout", "60",
                   "holb_app:app"]
    log = open(workdir / f"{kind}.log", "wb")
    return subprocess.Popen(command, stdout=log, stderr=log, env=env, pass_fds=(fd,), cwd=workdir)


def start_nginx(workdir: Path, sock: socket.socket, upstream: int) -> subprocess.Popen:
    port = sock.getsockname()[1]
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, port=port, upstream=upstream))
    user = ["-g", "daemon off; user root;"] if os.geteuid() == 0 else ["-g", "daemon off;"]
    env = dict(os.environ, NGINX=f"{sock.fileno()};")
    log = open(workdir / "nginx.stderr", "wb")
    return subprocess.Popen(["nginx", "-p", str(workdir), "-c", str(conf), *user], stdout=log, stderr=log,
                            env=env, pass_fds=(sock.fileno(),))


def run_clients(port: int, args: argparse.Namespace) -> tuple[list[float], int, int]:
    """(quick latencies in seconds, slow requests answered, errors) over ``args.duration``."""
    quick: list[float] = []
    counts = {"slow": 0, "errors": 0}
    lock = threading.Lock()
    end = time.monotonic() + args.duration

    def client(path: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while time.monotonic() < end:
            began = time.perf_counter()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                ok = response.status == 200 and body == path.encode()
            except (OSError, http.client.HTTPException):
                ok = False
                conn.close()
            took = time.perf_counter() - began
            with lock:
                if not ok:
                    counts["errors"] += 1
                elif path == "/slow":
                    counts["slow"] += 1
                else:
                    quick.append(took)
            if path == "/fast":
                time.sleep(args.pause)
        conn.close()

    threads = [threading.Thread(target=client, args=("/slow",), daemon=True) for _ in range(args.slow_clients)]
    threads += [threading.Thread(target=client, args=("/fast",), daemon=True) for _ in range(args.fast_clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(args.duration + args.slow + 60)
    return quick, counts["slow"], counts["errors"]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def measure(kind: str, args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="holb-") as directory:
        workdir = Path(directory)
        (workdir / "holb_app.py").write_text(APP.replace("SLOW", repr(args.slow)))
        upstream_sock, front_sock = listening_socket(), listening_socket()
        server = start_server(kind, upstream_sock, workdir, args)
        proxy = None
        try:
            wait_answering(upstream_sock.getsockname()[1], "/fast", server, kind)
            proxy = start_nginx(workdir, front_sock, upstream_sock.getsockname()[1])
            wait_answering(front_sock.getsockname()[1], "/fast", proxy, "nginx")
            time.sleep(SETTLE)  # every worker booted, not just the first to answer: a steady state is measured
            quick, slow, errors = run_clients(front_sock.getsockname()[1], args)
        finally:
            if proxy is not None:
                stop(proxy, tree(proxy), grace=15.0, signum=signal.SIGQUIT)
            stop(server, tree(server), grace=15.0, signum=signal.SIGTERM)
            upstream_sock.close()
            front_sock.close()
    ms = 1000
    return (f"{kind:<11} quick: {len(quick):5d} answered, p50 {percentile(quick, 0.5) * ms:7.1f} ms, "
            f"p99 {percentile(quick, 0.99) * ms:7.1f} ms, p99.9 {percentile(quick, 0.999) * ms:7.1f} ms, "
            f"max {max(quick, default=float('nan')) * ms:7.1f} ms, over 1 s: {sum(t > 1 for t in quick)}; "
            f"slow: {slow} answered; errors: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", nargs="+", choices=("forkserver", "gunicorn"), default=["forkserver", "gunicorn"])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per server")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--slow-clients", type=int, default=3, help="keep fewer than --workers")
    parser.add_argument("--fast-clients", type=int, default=4)
    parser.add_argument("--slow", type=float, default=5.0, help="seconds a slow request takes")
    parser.add_argument("--pause", type=float, default=0.05, help="seconds a quick client waits between requests")
    parser.add_argument("--forkserver-path", type=Path, default=ROOT, help="the checkout whose forkserver runs")
    args = parser.parse_args()
    if args.slow_clients >= args.workers:
        parser.error("--slow-clients must stay below --workers, or no worker is free and every server waits")
    print(f"{args.workers} workers; {args.slow_clients} clients asking for {args.slow:g} s requests, "
          f"{args.fast_clients} for 5 ms ones, {args.duration:g} s, through nginx with upstream keep-alive")
    for kind in args.servers:
        print(measure(kind, args), flush=True)


if __name__ == "__main__":
    main()
