#!/usr/bin/env python3
"""Benchmark forkserver against gunicorn (sync and gthread) and its peers, side by side.

    python3 -m pip install -e '.[bench]'      # gunicorn, flask, psutil
    apt-get install -y wrk nginx libev-dev
    python3 -m pip install uwsgi granian bjoern
    python3 scripts/bench.py                   # full run: 5 s per run, 3 rounds
    python3 scripts/bench.py --quick           # smoke test: 2 s per run, 1 round

The peers are uWSGI, granian and bjoern (C and Rust servers running the same
WSGI app), nginx serving the 64 KiB body as a static file, and the "floor":
scripts/floor_server.py, a pure-Python epoll loop that answers every read
with a canned reply, so what it costs per connection is the least any Python
server pays. Each peer takes part in the scenarios of the side-by-side table
(the floor in hello and Connection: close only, nginx in 64 KiB only). A peer
that is not installed is reported as missing, in the log and in the tables.

Every server is started by this script with the same worker count on its own
pre-bound loopback socket (``--bind fd://N``, uWSGI's ``fd://N``, nginx's
``NGINX`` variable; granian alone binds a port that was free a moment
before; nothing listens beyond 127.0.0.1), serving ``scripts/bench_apps.py``.
Load comes from wrk (1 thread, 50 connections by default) on the same
machine. For each scenario the servers
are measured interleaved for ``--rounds`` rounds, in an order that flips
every round (A B, B A, A B, ...), and the median round is reported: slow
drift of the machine hits every server alike, and a drift within a round
does not always land on the server that runs second.

The feature pairs (access log on vs off, stats on vs off) look for a cost
of a few percent, less than the machine's swing between two 5 s runs. So
each of their rounds is ``--pair-slices`` 1 s runs per config (15 by
default), the two configs alternating run by run, and the cost reported is
the median over adjacent runs of 1 - on/off: each run is judged against its
neighbour in time, and many of them narrow the median down.

Per run the script records wrk's req/s, p50/p99 latency (``--latency``),
errors (socket errors + non-2xx/3xx responses) and the server's CPU time per
request: the CPU-time delta of the whole process tree (master, workers, and
workers the master reaped) over the run, divided by wrk's request count.
After the hello scenario and again after all scenarios it records each
tree's memory (sum of PSS). Before the Connection: close scenario each
server is asked once whether it closes a connection whose request says so
(uWSGI's keep-alive mode would not, and would turn the scenario into a
keep-alive run); one that does not is named in the report. Startup time
(process start to the first 200 on ``/``) is measured on separate starts,
``--starts`` per server (15 by default), interleaved: one start varies by
±40 ms here, so a handful could not tell servers apart that differ by ten.

A scaling run serves ``/pid`` (which names the worker in ``X-Worker-Pid``)
with -w 1, 2 and 4; wrk's Lua ``response()`` tallies the header, so the
count costs wrk a little CPU but adds nothing to the servers.

Every run is bounded in time, and every server is stopped by its PID in a
``finally`` block, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import compileall
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import psutil
except ImportError:  # pragma: no cover - told to the user below
    psutil = None  # type: ignore[assignment]

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
APP = "bench_apps:app"
HOST = "127.0.0.1"

READY_TIMEOUT = 30.0     # seconds a server gets to answer its first 200
STOP_TIMEOUT = 10.0      # seconds between SIGINT and SIGKILL
WRK_SLACK = 30.0         # seconds a wrk run may overrun its -d before it is killed
WRK_TIMEOUT = "5s"       # a response slower than this counts as a wrk timeout error
IDLE_TIMEOUT = 10.0      # socket timeout while opening idle connections

MAIN_SERVERS = ("forkserver", "gunicorn-sync", "gunicorn-gthread")
PEERS = ("uwsgi", "granian", "bjoern", "floor", "nginx-static")
# HTTPS: forkserver and gunicorn each terminating TLS themselves, with the same certificate.
TLS_SERVERS = ("forkserver+tls", "gunicorn-sync+tls", "gunicorn-gthread+tls")
TLS_SCENARIOS = ("tls", "tls-close")
ALL_SERVERS = MAIN_SERVERS + PEERS + TLS_SERVERS
BASELINE = "gunicorn-sync"
FLOOR = "floor"
# The scenarios of the side-by-side table, which the peers run too (idle and scaling are ours and gunicorn's).
PEER_SCENARIOS = ("hello", "close", "64k", "flask", "upload", "startup")

POST_LUA = """\
wrk.method = "POST"
wrk.body = string.rep("a", 1048576)
wrk.headers["Content-Type"] = "application/octet-stream"
"""

# counts must be a global: done() reads it from the thread's Lua state with get().
TALLY_LUA = """\
counts = {}
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function response(status, headers, body)
  local pid = headers["X-Worker-Pid"] or headers["x-worker-pid"]
  if pid then
    counts[pid] = (counts[pid] or 0) + 1
  end
end

function done(summary, latency, requests)
  for _, thread in ipairs(threads) do
    local tally = thread:get("counts")
    for pid, n in pairs(tally) do
      io.write(string.format("WORKER %s %d\\n", pid, n))
    end
  end
end
"""


# -- servers -----------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """One way of starting a server. ``requires`` names a forkserver flag that
    must appear in ``forkserver --help``; without it the config is skipped.
    ``scenarios`` lists the scenario keys the server takes part in (empty:
    every one); ``install`` says how to get a peer that is missing."""

    name: str
    kind: str  # forkserver, gunicorn, uwsgi, granian, bjoern, floor or nginx
    extra: tuple[str, ...] = ()
    requires: str = ""
    note: str = ""
    scenarios: tuple[str, ...] = ()
    install: str = ""
    tls: bool = False  # serves HTTPS with the run's test certificate, in the TLS scenarios only

    def runs(self, scenario: str) -> bool:
        if (scenario in TLS_SCENARIOS) != self.tls:
            return False
        return not self.scenarios or scenario in self.scenarios

    @property
    def binds_itself(self) -> bool:
        """granian takes no inherited socket: it is given a port that was free a moment before."""
        return self.kind == "granian"


def server_configs(gthread_threads: int) -> dict[str, ServerConfig]:
    return {
        "forkserver": ServerConfig("forkserver", "forkserver"),
        "gunicorn-sync": ServerConfig("gunicorn-sync", "gunicorn", ("-k", "sync")),
        "gunicorn-gthread": ServerConfig("gunicorn-gthread", "gunicorn",
                                         ("-k", "gthread", "--threads", str(gthread_threads))),
        # Pairs: "forkserver" is the "off" side of both.
        "forkserver+accesslog": ServerConfig("forkserver+accesslog", "forkserver",
                                             ("--access-logfile", "{tmp}/access-{id}.log")),
        "forkserver+stats": ServerConfig("forkserver+stats", "forkserver",
                                         ("--stats-bind", "unix:{tmp}/stats-{id}.sock"),
                                         requires="--stats-bind",
                                         note="stats on (--stats-bind)"),
        # Peers, each as a deployment would run it with -w workers.
        "uwsgi": ServerConfig("uwsgi", "uwsgi", scenarios=PEER_SCENARIOS, install="pip install uwsgi",
                              note="uWSGI --http-socket closes every connection, like gunicorn sync; its "
                                   "--http11-socket keep-alive ignores a request's Connection: close"),
        "granian": ServerConfig("granian", "granian", scenarios=PEER_SCENARIOS, install="pip install granian",
                                note="granian --interface wsgi --http 1 --no-ws, binding its own port"),
        "bjoern": ServerConfig("bjoern", "bjoern", scenarios=PEER_SCENARIOS,
                               install="apt-get install -y libev-dev && pip install bjoern",
                               note="bjoern forked after importing the app (scripts/bjoern_server.py)"),
        "floor": ServerConfig("floor", "floor", scenarios=("hello", "close", "startup"),
                              note="pure-Python epoll loop, canned reply, parses nothing (scripts/floor_server.py)"),
        "nginx-static": ServerConfig("nginx-static", "nginx", scenarios=("64k",), install="apt-get install -y nginx",
                                     note="nginx serving the 64 KiB body as a static file"),
        "forkserver+tls": ServerConfig("forkserver+tls", "forkserver", TLS_FILES, requires="--certfile", tls=True),
        "gunicorn-sync+tls": ServerConfig("gunicorn-sync+tls", "gunicorn", ("-k", "sync", *TLS_FILES), tls=True),
        "gunicorn-gthread+tls": ServerConfig("gunicorn-gthread+tls", "gunicorn",
                                             ("-k", "gthread", "--threads", str(gthread_threads), *TLS_FILES),
                                             tls=True),
    }


TLS_FILES = ("--certfile", "{tmp}/tls.pem", "--keyfile", "{tmp}/tls.key")


def make_certificate(tmpdir: Path) -> None:
    """A self-signed certificate for the TLS scenarios (wrk does not verify it), made with the openssl CLI."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-keyout", str(tmpdir / "tls.key"),
                    "-out", str(tmpdir / "tls.pem")], check=True, capture_output=True, timeout=60)


def peer_executable(name: str) -> str | None:
    """A console script installed beside this interpreter (a venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if os.access(beside, os.X_OK) else shutil.which(name)


def missing_peer(config: ServerConfig) -> str:
    """Why ``config`` cannot start on this machine ('' when it can)."""
    if config.kind == "uwsgi" and not peer_executable("uwsgi"):
        return f"uwsgi is not installed ({config.install})"
    if config.kind in ("granian", "bjoern") and importlib.util.find_spec(config.kind) is None:
        return f"{config.kind} is not installed for {sys.executable} ({config.install})"
    if config.kind == "nginx" and not shutil.which("nginx"):
        return f"nginx is not installed ({config.install})"
    return ""


def listening_socket(backlog: int = 2048) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


class Server:
    """A server master we started, on a socket we bound, and its process tree."""

    def __init__(self, config: ServerConfig, workers: int, keepalive: float, tmpdir: Path,
                 app: str = APP) -> None:
        self.config = config
        self.app = app
        self.workers = workers
        self.keepalive = keepalive
        self.tmpdir = tmpdir
        self.sock = listening_socket()
        self.port = self.sock.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: Any = None
        self.known: dict[int, float] = {}  # pid -> create_time of every process seen in the tree
        self.log_path = tmpdir / f"{config.name}-w{workers}-{self.port}.log"
        self.startup = float("nan")

    @property
    def name(self) -> str:
        return self.config.name

    def command(self) -> list[str]:
        fd, workers = self.sock.fileno(), str(self.workers)
        extra = [arg.format(tmp=self.tmpdir, id=self.port) for arg in self.config.extra]
        kind = self.config.kind
        if kind == "forkserver":
            return [sys.executable, "-m", "forkserver", self.app, "-w", workers, "-b", f"fd://{fd}",
                    "--keepalive", str(self.keepalive), "--log-level", "warning", *extra]
        if kind == "gunicorn":
            return [sys.executable, "-m", "gunicorn", "-w", workers, "--bind", f"fd://{fd}",
                    "--keep-alive", str(int(self.keepalive)), "--log-level", "warning", *extra, self.app]
        if kind == "uwsgi":
            # Without the header the client learns of the close only by reading EOF (wrk: a read error).
            home = ["--home", sys.prefix] if sys.prefix != sys.base_prefix else []
            return [peer_executable("uwsgi") or "uwsgi", "--http-socket", f"fd://{fd}", "--add-header",
                    "Connection: close", "--master", "--processes", workers, "--module", self.app,
                    "--pythonpath", str(SCRIPTS), *home, "--disable-logging"]
        if kind == "granian":
            return [sys.executable, "-m", "granian", "--interface", "wsgi", "--http", "1", "--no-ws",
                    "--workers", workers, "--host", HOST, "--port", str(self.port), "--log-level", "warning", self.app]
        if kind == "bjoern":
            return [sys.executable, str(SCRIPTS / "bjoern_server.py"), str(fd), workers, self.app]
        if kind == "floor":
            return [sys.executable, str(SCRIPTS / "floor_server.py"), str(fd), workers]
        if kind == "nginx":
            return ["nginx", "-p", str(self.tmpdir), "-e", str(self.log_path), "-c", str(self._nginx_conf())]
        raise ValueError(f"unknown server kind {kind!r}")

    def _nginx_conf(self) -> Path:
        """A configuration serving ``/64k`` (the app's 64 KiB body) and ``/`` from files, on the inherited socket."""
        root = self.tmpdir / "static"
        root.mkdir(exist_ok=True)
        import bench_apps  # the body the apps serve; imported here, since it imports Flask

        (root / "64k").write_bytes(bench_apps.BIG)
        (root / "index.html").write_bytes(bench_apps.HELLO)  # ``/`` answers 200, as start() waits for
        conf = self.tmpdir / f"nginx-{self.port}.conf"
        conf.write_text(
            "daemon off;\nmaster_process on;\n"
            + ("user root;\n" if os.geteuid() == 0 else "")  # workers can read the private temporary directory
            + f"worker_processes {self.workers};\npid {self.tmpdir}/nginx-{self.port}.pid;\n"
            f"error_log {self.log_path} warn;\nevents {{ worker_connections 4096; }}\n"
            f"http {{\n  access_log off;\n  keepalive_timeout {self.keepalive:g}s;\n"
            "  keepalive_requests 100000000;\n"  # the default 1000 would close connections the others keep
            f"  server {{ listen {HOST}:{self.port}; root {root}; }}\n}}\n")
        return conf

    def start(self) -> float:
        """Start the master; return seconds from exec to the first 200 on ``/``."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPTS), env.get("PYTHONPATH", "")]))
        env.pop("GUNICORN_CMD_ARGS", None)
        for key in [k for k in env if k.startswith("FORKSERVER_")]:
            del env[key]
        if self.config.kind == "nginx":
            env["NGINX"] = f"{self.sock.fileno()};"  # nginx's way of taking over listening sockets
        cmd = self.command()
        if self.config.binds_itself:
            self.sock.close()
        with open(self.log_path, "ab") as logfile:
            started = time.monotonic()
            self.proc = subprocess.Popen(cmd, pass_fds=[] if self.config.binds_itself else [self.sock.fileno()],
                                         stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, env=env,
                                         cwd=str(SCRIPTS))
        self.ps = psutil.Process(self.proc.pid)
        self._remember()
        # The socket is already listening, so this connect succeeds at once and
        # the answer arrives when the first worker is ready to serve.
        status = self._first_response(started + READY_TIMEOUT)
        self.startup = time.monotonic() - started
        if status != 200:
            raise RuntimeError(f"{self.name}: first response was {status}, not 200\n{self.log_tail()}")
        # Wait for the whole pool, so the first round is not run on half of it.
        deadline = time.monotonic() + READY_TIMEOUT
        while len(self.children()) < self.workers and time.monotonic() < deadline:
            self._check_alive()
            time.sleep(0.05)
        self._remember()
        return self.startup

    def _connect(self, deadline: float) -> socket.socket:
        """Connect; a server that binds its own port is retried every 2 ms until it listens."""
        while True:
            try:
                conn = socket.create_connection((HOST, self.port), timeout=READY_TIMEOUT)
                if self.config.tls:
                    import ssl  # only the TLS scenarios need it

                    unverified = ssl._create_unverified_context()  # our own self-signed test certificate
                    conn = unverified.wrap_socket(conn)
                return conn
            except ConnectionRefusedError:
                if not self.config.binds_itself or time.monotonic() > deadline:
                    raise
                self._check_alive()
                time.sleep(0.002)

    def _first_response(self, deadline: float) -> int:
        with self._connect(deadline) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            conn.settimeout(0.02)
            data = b""
            while b"\r\n" not in data:
                self._check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no response within {READY_TIMEOUT:.0f}s\n{self.log_tail()}")
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                if not chunk:
                    raise RuntimeError(f"{self.name}: closed the first connection without a response\n"
                                       f"{self.log_tail()}")
                data += chunk
        try:
            return int(data.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return 0

    def closes_on_request(self) -> bool:
        """Whether the server closes the connection after answering a request with Connection: close."""
        with self._connect(time.monotonic() + READY_TIMEOUT) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            conn.settimeout(5.0)
            try:
                while conn.recv(65536):
                    pass
            except TimeoutError:
                return False
            except ConnectionResetError:
                pass
        return True

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name}: exited with code {self.proc.returncode} while starting\n"
                               f"{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text[-lines:])

    def children(self) -> list[Any]:
        try:
            return self.ps.children(recursive=True)
        except psutil.Error:
            return []

    def tree(self) -> list[Any]:
        return [self.ps, *self.children()]

    def _remember(self) -> None:
        for proc in self.tree():
            try:
                self.known.setdefault(proc.pid, proc.create_time())
            except psutil.Error:
                pass

    def cpu_seconds(self) -> tuple[float, dict[int, float]]:
        """User + system CPU of the master, its live descendants and its reaped
        children; and of each direct child (worker) on its own."""
        total = 0.0
        per_worker: dict[int, float] = {}
        try:
            times = self.ps.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        except psutil.Error:
            pass
        direct = set(self.worker_pids())
        for child in self.children():
            try:
                times = child.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
            if child.pid in direct:
                per_worker[child.pid] = times.user + times.system
        return total, per_worker

    def pss_bytes(self) -> tuple[int, int]:
        """(sum of PSS over the tree, number of processes)."""
        total, count = 0, 0
        for proc in self.tree():
            try:
                total += proc.memory_full_info().pss
                count += 1
            except psutil.Error:
                pass
        return total, count

    def worker_pids(self) -> list[int]:
        try:
            return [proc.pid for proc in self.ps.children()] if self.ps else []
        except psutil.Error:
            return []

    def stop(self) -> None:
        """SIGINT (fast stop in both servers), then SIGKILL; always by PID."""
        if self.proc is None:
            self.sock.close()
            return
        self._remember()
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGINT)
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                try:
                    self.proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
            except ProcessLookupError:
                pass
        for pid, created in self.known.items():
            if pid == self.proc.pid:
                continue
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created:  # the same process, not a recycled PID
                    proc.kill()
            except psutil.Error:
                pass
        self.proc = None
        self.sock.close()


# -- wrk ---------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float = 0.0
    requests: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    socket_errors: int = 0
    non_2xx: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)  # connect/read/write/timeout/non-2xx
    workers: dict[int, int] = field(default_factory=dict)
    cpu_us_per_req: float = float("nan")
    cpu_balance: float = float("nan")  # busiest worker's CPU over the workers' average
    wrk_cpu: float = float("nan")      # wrk's CPU time over the run's wall time (1.0 = one core)
    failed: str = ""

    @property
    def errors(self) -> int:
        return self.socket_errors + self.non_2xx


UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0, "h": 3600000.0}


def parse_wrk(text: str) -> WrkResult:
    result = WrkResult()
    if match := re.search(r"Requests/sec:\s+([\d.]+)", text):
        result.rps = float(match.group(1))
    if match := re.search(r"(\d+) requests in ", text):
        result.requests = int(match.group(1))
    for pct, attr in (("50", "p50_ms"), ("99", "p99_ms")):
        if match := re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
            setattr(result, attr, float(match.group(1)) * UNITS_MS[match.group(2)])
    if match := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        result.socket_errors = sum(int(g) for g in match.groups())
        for kind, value in zip(("connect", "read", "write", "timeout"), match.groups()):
            if int(value):
                result.error_kinds[kind] = int(value)
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        result.non_2xx = int(match.group(1))
        result.error_kinds["non-2xx"] = result.non_2xx
    for pid, count in re.findall(r"^WORKER (\d+) (\d+)$", text, re.M):
        result.workers[int(pid)] = result.workers.get(int(pid), 0) + int(count)
    return result


def run_wrk(wrk: str, url: str, duration: int, connections: int, threads: int,
            script: Path | None = None, headers: Sequence[str] = ()) -> WrkResult:
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", WRK_TIMEOUT]
    for header in headers:
        cmd += ["-H", header]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    # Servers are our children too, but none is reaped during a run, so the
    # RUSAGE_CHILDREN delta is wrk's own CPU time.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + WRK_SLACK)
    except subprocess.TimeoutExpired:
        return WrkResult(failed=f"wrk ran over {duration + WRK_SLACK:.0f}s and was killed")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = parse_wrk(done.stdout)
    result.wrk_cpu = ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / (
        time.monotonic() - began)
    if done.returncode != 0 or result.requests == 0:
        result.failed = (done.stderr.strip() or done.stdout.strip() or f"wrk exited {done.returncode}")[-300:]
    return result


# -- idle connections --------------------------------------------------------


def _read_response(conn: socket.socket) -> bool:
    """Read one response; return whether the server keeps the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    remaining = (int(match.group(1)) if match else 0) - len(body)
    while remaining > 0:
        chunk = conn.recv(remaining)
        if not chunk:
            return False
        remaining -= len(chunk)
    return re.search(rb"(?im)^connection:\s*close", head) is None


def open_idle(port: int, count: int) -> list[socket.socket]:
    """Open ``count`` connections, send one keep-alive request on each, and keep
    open those the server keeps alive. Like any HTTP client, close a connection
    whose response says ``Connection: close`` (gunicorn sync says it every
    time, then lingers up to 2 s in the worker for the client to close)."""
    socks = []
    deadline = time.monotonic() + IDLE_TIMEOUT * 3
    try:
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            conn = socket.create_connection((HOST, port), timeout=IDLE_TIMEOUT)
            conn.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
            if _read_response(conn):
                socks.append(conn)
            else:
                conn.close()
    except BaseException:
        close_all(socks)
        raise
    return socks


def still_open(socks: Iterable[socket.socket]) -> int:
    alive = 0
    for conn in socks:
        try:
            conn.setblocking(False)
            alive += conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def close_all(socks: Iterable[socket.socket]) -> None:
    for conn in socks:
        try:
            conn.close()
        except OSError:
            pass


# -- scenarios ---------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    path: str = "/"
    headers: tuple[str, ...] = ()
    script: str = ""          # "post" or "" (the Lua file to use)
    idle: bool = False        # open --idle-connections idle keep-alive connections during the load
    pair: tuple[str, str] = ()  # (off, on) forkserver configs instead of the main servers


SCENARIOS = [
    Scenario("hello", "hello keep-alive"),
    Scenario("close", "hello, Connection: close", headers=("Connection: close",)),
    Scenario("64k", "64 KiB body", path="/64k"),
    Scenario("flask", "Flask JSON", path="/json"),
    Scenario("upload", "1 MiB POST echo", path="/echo", script="post"),
    Scenario("idle", "{idle} idle keep-alive conns + load", idle=True),
    Scenario("accesslog", "access log on vs off (hello keep-alive)", pair=("forkserver", "forkserver+accesslog")),
    Scenario("stats", "stats on vs off (hello keep-alive)", pair=("forkserver", "forkserver+stats")),
    Scenario("tls", "hello keep-alive over TLS"),
    Scenario("tls-close", "hello, Connection: close over TLS (a handshake per request)",
             headers=("Connection: close",)),
]
EXTRA_SCENARIOS = ("startup", "scaling")
ALL_SCENARIOS = [s.key for s in SCENARIOS] + list(EXTRA_SCENARIOS)


# -- running -----------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(server: Server, args: argparse.Namespace, scenario: Scenario, scripts: dict[str, Path],
            duration: int) -> tuple[WrkResult, int]:
    """One bounded wrk run against one server; returns (result, idle connections left open)."""
    idle: list[socket.socket] = []
    try:
        if scenario.idle:
            idle = open_idle(server.port, args.idle_connections)
        cpu_before, workers_before = server.cpu_seconds()
        scheme = "https" if server.config.tls else "http"
        result = run_wrk(args.wrk, f"{scheme}://{HOST}:{server.port}{scenario.path}", duration, args.connections,
                         args.wrk_threads, scripts.get(scenario.script), scenario.headers)
        cpu_after, workers_after = server.cpu_seconds()
        left = still_open(idle)
    finally:
        close_all(idle)
    if result.requests:
        result.cpu_us_per_req = (cpu_after - cpu_before) / result.requests * 1e6
    deltas = [workers_after[pid] - workers_before[pid] for pid in workers_after if pid in workers_before]
    if deltas and sum(deltas) > 0:
        result.cpu_balance = max(deltas) / (sum(deltas) / len(deltas))
    return result, left


def turn_order(names: Sequence[str], rnd: int) -> list[str]:
    """The servers in the order they run in round ``rnd``: A B, then B A, and so on."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))


def paired_cost(off: Sequence[WrkResult], on: Sequence[WrkResult]) -> float:
    """The feature's cost in req/s: the median, over slices run back to back, of 1 - on/off.

    Each slice of one config is compared with the other config's slice right
    beside it in time, not with a median taken over the whole scenario.
    """
    return median(1 - b.rps / a.rps for a, b in zip(off, on) if a.rps and not a.failed and not b.failed)


def median(values: Iterable[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def summarize(runs: list[WrkResult]) -> dict[str, Any]:
    good = [r for r in runs if not r.failed]
    return {
        "rps": median(r.rps for r in good),
        "p50_ms": median(r.p50_ms for r in good),
        "p99_ms": median(r.p99_ms for r in good),
        "errors": sum(r.errors for r in runs),
        "error_kinds": {kind: sum(r.error_kinds.get(kind, 0) for r in runs)
                        for kind in sorted({k for r in runs for k in r.error_kinds})},
        "cpu_us": median(r.cpu_us_per_req for r in good),
        "balance": median(r.cpu_balance for r in good),
        "wrk_cpu": median(r.wrk_cpu for r in good),
        "runs": len(runs),
        "failed": [r.failed for r in runs if r.failed],
        "rps_each": [round(r.rps, 1) for r in runs],
    }


def start_servers(names: Sequence[str], configs: dict[str, ServerConfig], workers: int,
                  args: argparse.Namespace, tmpdir: Path, started: list[Server]) -> dict[str, Server]:
    servers = {}
    for name in names:
        server = Server(configs[name], workers, args.keepalive, tmpdir)
        started.append(server)
        server.start()
        log(f"  started {name:22s} -w {workers}  port {server.port}  pid {server.proc.pid}  "
            f"first 200 after {server.startup * 1000:.0f} ms")
        servers[name] = server
    return servers


def stop_servers(servers: Iterable[Server], started: list[Server]) -> None:
    for server in servers:
        server.stop()
        if server in started:
            started.remove(server)


def compile_bytecode() -> list[str]:
    """Write the ``.pyc`` files of forkserver's package and of these scripts; return the directories.

    ``pip install`` compiles a package's modules when it installs it, and
    the peers and Flask were installed so. An editable install, or
    ``PYTHONDONTWRITEBYTECODE=1`` in the environment, leaves forkserver's
    checkout without them, and every start then compiles its fifty-odd
    modules from source again: about 100 ms (a start of hello took 234 ms
    without them, 134 ms with them, medians of 9 starts), which no
    installed server pays. bench_apps.py and the peers' scripts here are
    compiled too, so every server imports the same bytecode.
    """
    spec = importlib.util.find_spec("forkserver")  # the one ``python -m forkserver`` runs: same sys.path
    package = list(spec.submodule_search_locations or []) if spec is not None else []
    for directory in package:
        compileall.compile_dir(directory, quiet=1)
    compileall.compile_dir(str(SCRIPTS), maxlevels=0, quiet=1)
    return [*package, str(SCRIPTS)]


def bench(args: argparse.Namespace, tmpdir: Path, started: list[Server]) -> dict[str, Any]:
    configs = server_configs(args.gthread_threads)
    results: dict[str, Any] = {"scenarios": {}, "skipped": [], "startup": {}, "memory": {}, "memory_hello": {},
                               "scaling": {}, "idle_open": {}, "missing": {}, "kept_open": []}
    for name in args.servers:
        if reason := missing_peer(configs[name]):
            log(f"missing: {name}: {reason}")
            results["missing"][name] = reason
    present = [name for name in args.servers if name not in results["missing"]]
    log(f"bytecode compiled, as an installed package has it: {', '.join(compile_bytecode())}")

    def taking_part(key: str) -> list[str]:
        return [name for name in present if configs[name].runs(key)]

    help_text = subprocess.run([sys.executable, "-m", "forkserver", "--help"], capture_output=True, text=True,
                               timeout=60, cwd=str(SCRIPTS)).stdout
    unavailable = {name for name, cfg in configs.items() if cfg.requires and cfg.requires not in help_text}

    scripts = {"post": tmpdir / "post.lua", "tally": tmpdir / "tally.lua"}
    scripts["post"].write_text(POST_LUA)
    scripts["tally"].write_text(TALLY_LUA)
    if any(configs[name].tls for name in present):
        make_certificate(tmpdir)

    selected = [s for s in SCENARIOS if s.key in args.scenarios]
    runnable = []
    for scenario in selected:
        if scenario.pair:
            missing = [name for name in scenario.pair if name in unavailable]
            if missing:
                note = (f"skipped '{scenario.key}': forkserver --help has no "
                        f"{', '.join(configs[n].requires for n in missing)} (not implemented yet)")
                log(note)
                results["skipped"].append(note)
                continue
            if "forkserver" not in args.servers:
                note = f"skipped '{scenario.key}': needs forkserver in --servers"
                log(note)
                results["skipped"].append(note)
                continue
        elif not taking_part(scenario.key):
            note = f"skipped '{scenario.key}': none of the servers selected takes part in it"
            log(note)
            results["skipped"].append(note)
            continue
        runnable.append(scenario)

    # Startup: fresh starts, interleaved, one per server per round.
    if "startup" in args.scenarios:
        log(f"startup: {args.starts} start(s) each of {args.startup_app}, time from exec to the first 200 on /")
        results["startup_app"] = args.startup_app
        samples: dict[str, list[float]] = {name: [] for name in taking_part("startup")}
        for rnd in range(args.starts):
            for name in turn_order(list(samples), rnd):
                server = Server(configs[name], args.workers, args.keepalive, tmpdir, app=args.startup_app)
                started.append(server)
                try:
                    samples[name].append(server.start())
                finally:
                    stop_servers([server], started)
                log(f"  round {rnd + 1} {name:22s} {samples[name][-1] * 1000:7.0f} ms")
        results["startup"] = {name: {"median_ms": median(v) * 1000, "min_ms": min(v) * 1000,
                                     "max_ms": max(v) * 1000} for name, v in samples.items()}

    # Scenarios: every config needed is started once and kept for all scenarios.
    if runnable:
        needed: list[str] = []
        for scenario in runnable:
            for name in (scenario.pair or taking_part(scenario.key)):
                if name not in needed:
                    needed.append(name)
        log(f"scenarios: starting {', '.join(needed)} with -w {args.workers}")
        servers = start_servers(needed, configs, args.workers, args, tmpdir, started)
        try:
            if any(scenario.key in ("close", "tls-close") for scenario in runnable):
                # A server that keeps the connection open would turn 'close' into a keep-alive run.
                close_runs = {scenario.key for scenario in runnable} & {"close", "tls-close"}
                results["kept_open"] = [name for key in sorted(close_runs) for name in taking_part(key)
                                        if not servers[name].closes_on_request()]
                for name in results["kept_open"]:
                    log(f"  {name} kept the connection open after Connection: close")
            for scenario in runnable:
                title = scenario.title.format(idle=args.idle_connections)
                names = list(scenario.pair or taking_part(scenario.key))
                log(f"scenario '{scenario.key}': {title}")
                for name in names:  # warm-up, not recorded
                    measure(servers[name], args, scenario, scripts, args.warmup)
                runs: dict[str, list[WrkResult]] = {name: [] for name in names}
                idle_left: dict[str, list[int]] = {name: [] for name in names}
                # A pair measures a small cost: each round is --pair-slices 1 s runs
                # per config, alternated, so that a phase of the machine lasting a
                # few seconds lands on both configs (see paired_cost).
                slices = args.pair_slices if scenario.pair else 1
                for turn in range(args.rounds * slices):
                    rnd = turn // slices
                    for name in turn_order(names, turn):
                        result, left = measure(servers[name], args, scenario, scripts,
                                               1 if scenario.pair else args.duration)
                        runs[name].append(result)
                        idle_left[name].append(left)
                        log(f"  round {rnd + 1} {name:22s} {result.rps:10.0f} req/s  p50 {result.p50_ms:7.2f} ms  "
                            f"p99 {result.p99_ms:7.2f} ms  err {result.errors:5d}  "
                            f"cpu {result.cpu_us_per_req:7.1f} us/req  balance {result.cpu_balance:4.2f}  "
                            f"wrk {result.wrk_cpu * 100:3.0f}%"
                            + (f"  idle open {left}/{args.idle_connections}" if scenario.idle else "")
                            + (f"  errors {result.error_kinds}" if result.error_kinds else "")
                            + (f"  FAILED: {result.failed}" if result.failed else ""))
                        if result.errors and servers[name].config.kind == "forkserver":
                            # The server's own account (a worker that died, a timeout), before its log
                            # goes: given a moment for the master to reap and say why, and long enough
                            # for a worker's stack dump, which alone runs past 15 lines.
                            time.sleep(0.5)
                            log(servers[name].log_tail(80))
                results["scenarios"][scenario.key] = {
                    "title": title, "pair": list(scenario.pair),
                    "servers": {name: summarize(r) for name, r in runs.items()},
                }
                if scenario.pair:
                    results["scenarios"][scenario.key]["paired_cost"] = paired_cost(*(runs[n] for n in names))
                if scenario.idle:
                    results["idle_open"] = {name: min(v) for name, v in idle_left.items()}
                if scenario.key == "hello":  # the side-by-side table's memory: every server, the same load
                    for name in names:
                        pss, count = servers[name].pss_bytes()
                        results["memory_hello"][name] = {"pss_mib": pss / 2**20, "processes": count}
            for name in present:
                if name not in servers:
                    continue  # only the forkserver pair scenarios ran
                pss, count = servers[name].pss_bytes()
                results["memory"][name] = {"pss_mib": pss / 2**20, "processes": count}
        finally:
            stop_servers(servers.values(), started)

    # Scaling: /pid with -w 1, 2, 4; wrk's response() tallies X-Worker-Pid.
    if "scaling" in args.scenarios and taking_part("scaling"):
        scenario = Scenario("scaling", "scaling", path="/pid", script="tally")
        names = taking_part("scaling")
        for workers in args.scaling_workers:
            log(f"scaling: -w {workers}")
            servers = start_servers(names, configs, workers, args, tmpdir, started)
            try:
                for name in names:
                    measure(servers[name], args, scenario, scripts, args.warmup)
                runs = {name: [] for name in names}
                for rnd in range(args.rounds):
                    for name in turn_order(names, rnd):
                        result, _ = measure(servers[name], args, scenario, scripts, args.duration)
                        pids = servers[name].worker_pids()
                        for pid in pids:  # a worker that served nothing still counts
                            result.workers.setdefault(pid, 0)
                        runs[name].append(result)
                        log(f"  round {rnd + 1} {name:22s} {result.rps:10.0f} req/s  "
                            f"per worker {sorted(result.workers.values(), reverse=True)}  "
                            f"cpu balance {result.cpu_balance:4.2f}  wrk {result.wrk_cpu * 100:3.0f}%")
                for name, rs in runs.items():
                    totals: dict[int, int] = {}
                    ratios = []
                    for r in rs:
                        for pid, n in r.workers.items():
                            totals[pid] = totals.get(pid, 0) + n
                        served = sum(r.workers.values())
                        if served:
                            ratios.append(max(r.workers.values()) / (served / max(workers, len(r.workers))))
                    summary = summarize(rs)
                    total = sum(totals.values()) or 1
                    summary["shares"] = sorted((n / total for n in totals.values()), reverse=True)
                    summary["busiest_over_avg_worst"] = max(ratios) if ratios else float("nan")
                    results["scaling"].setdefault(name, {})[workers] = summary
            finally:
                stop_servers(servers.values(), started)
    return results


# -- report ------------------------------------------------------------------


def fmt(value: float, spec: str = ".0f") -> str:
    return "—" if value != value else format(value, spec)


def mib(memory: dict[str, Any] | None) -> str:
    return f"{memory['pss_mib']:.1f} MiB" if memory else "—"


def ratio_text(value: float) -> str:
    return "—" if value != value else f"{value:.2f}x"


def report(results: dict[str, Any], args: argparse.Namespace, meta: dict[str, Any]) -> str:
    out = []
    out.append("## forkserver benchmark\n")
    peers = f", {meta['peers']}" if meta.get("peers") else ""
    out.append(f"{meta['cpus']} CPUs, {meta['python']}, {meta['wrk']}, gunicorn {meta['gunicorn']}, "
               f"forkserver {meta['forkserver']}{peers}; load average at start {meta['loadavg']}.")
    out.append(f"wrk -t{args.wrk_threads} -c{args.connections}, {args.duration} s per run, {args.rounds} round(s) "
               f"interleaved, medians shown; -w {args.workers}; gunicorn gthread --threads {args.gthread_threads}; "
               f"keep-alive timeout {args.keepalive:g} s where a server takes one; loopback. On/off pairs: "
               f"{args.pair_slices} alternated 1 s runs per config and round, cost = median of the "
               f"adjacent runs' 1 - on/off.\n")

    out.append(side_by_side(results, args))

    scen = results["scenarios"]
    if scen:
        out.append("| scenario | server | req/s | p50 ms | p99 ms | errors | server CPU µs/req "
                   "| busiest worker CPU / avg | wrk CPU | vs gunicorn sync |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key, data in scen.items():
            baseline = BASELINE + "+tls" if key in TLS_SCENARIOS else BASELINE
            base = data["servers"].get(baseline, {}).get("rps", float("nan"))
            for name, s in data["servers"].items():
                ratio = s["rps"] / base if base == base and base else float("nan")
                if data["pair"] and name == data["pair"][1]:
                    off = data["servers"][data["pair"][0]]["rps"]
                    ratio_cell = f"{s['rps'] / off:.2f}x of off" if off else "—"
                else:
                    ratio_cell = ratio_text(ratio)
                failed = f" ({len(s['failed'])} failed runs)" if s["failed"] else ""
                kinds = " (" + ", ".join(f"{k} {v}" for k, v in s["error_kinds"].items()) + ")" if s["errors"] else ""
                out.append(f"| {data['title']} | {name} | {fmt(s['rps'])}{failed} | {fmt(s['p50_ms'], '.2f')} | "
                           f"{fmt(s['p99_ms'], '.2f')} | {s['errors']}{kinds} | {fmt(s['cpu_us'], '.1f')} | "
                           f"{fmt(s['balance'], '.2f')} | {fmt(s['wrk_cpu'] * 100, '.0f')}% | {ratio_cell} |")
        out.append("")
        out.append("Server CPU µs/req: CPU-time delta of the server's whole process tree over the run / wrk's "
                   "request count. Busiest worker CPU / avg: the per-worker CPU-time deltas (2.00 with -w 2 means "
                   "one worker did all the work). wrk CPU: wrk's CPU time / wall time (100% = one core; near "
                   "100% means the load generator, not the server, set the pace).\n")
        if results["idle_open"]:
            out.append("Idle connections still open after the load (fewest over the rounds): "
                       + ", ".join(f"{n} {v}/{args.idle_connections}" for n, v in results["idle_open"].items())
                       + ". gunicorn sync answers every request with Connection: close, so it keeps none.\n")
    for note in results["skipped"]:
        out.append(f"Note: {note}.")
    for name, reason in results["missing"].items():
        out.append(f"Missing: {name}: {reason}; its cells read 'missing'.")
    for name in results["kept_open"]:
        out.append(f"Note: {name} kept the connection open after a request with Connection: close, so its "
                   "'close' runs measured keep-alive.")
    if results["skipped"] or results["missing"] or results["kept_open"]:
        out.append("")

    if results["startup"] or results["memory"] or results["memory_hello"]:
        started_app = results.get("startup_app", APP)
        out.append(f"| server | startup to first 200{'' if started_app == APP else f' of {started_app}'} "
                   "(median, min–max) | tree PSS after hello | tree PSS after the run | processes |")
        out.append("|---|---:|---:|---:|---:|")
        for name in args.servers:
            st = results["startup"].get(name)
            mem = results["memory"].get(name) or results["memory_hello"].get(name)
            if not (st or mem):
                continue
            st_cell = f"{st['median_ms']:.0f} ms ({st['min_ms']:.0f}–{st['max_ms']:.0f})" if st else "—"
            out.append(f"| {name} | {st_cell} | {mib(results['memory_hello'].get(name))} | "
                       f"{mib(results['memory'].get(name))} | {mem['processes'] if mem else '—'} |")
        out.append("")

    if results["scaling"]:
        out.append("| server | -w | req/s | req/s per worker | share of requests per worker "
                   "| busiest / average (worst round) | busiest worker CPU / avg (median) |")
        out.append("|---|---:|---:|---:|---|---:|---:|")
        for name, per in results["scaling"].items():
            for workers, s in per.items():
                shares = " / ".join(f"{x * 100:.0f}%" for x in s["shares"])
                out.append(f"| {name} | {workers} | {fmt(s['rps'])} | {fmt(s['rps'] / workers)} | {shares} | "
                           f"{fmt(s['busiest_over_avg_worst'], '.2f')} | {fmt(s['balance'], '.2f')} |")
        out.append("")

    out.append(targets(results, args))
    out.append(peer_targets(results))
    return "\n".join(out)


SIDE_BY_SIDE = (("hello", "hello keep-alive"), ("close", "hello, Connection: close"), ("64k", "64 KiB"),
                ("flask", "Flask JSON"), ("upload", "1 MiB upload"))


def side_by_side(results: dict[str, Any], args: argparse.Namespace) -> str:
    """Every server in one table: req/s as a ratio to gunicorn sync, with the server CPU per request."""
    configs = server_configs(args.gthread_threads)
    scen = results["scenarios"]
    lines = ["| server | " + " | ".join(title for _, title in SIDE_BY_SIDE)
             + " | startup to first 200 | tree PSS, hello |",
             "|---|" + "---:|" * (len(SIDE_BY_SIDE) + 2)]
    for name in args.servers:
        if configs[name].tls:
            continue  # the TLS scenarios have their rows in the table below
        if name in results["missing"]:
            lines.append(f"| {name} |" + " missing |" * (len(SIDE_BY_SIDE) + 2))
            continue
        cells = []
        for key, _ in SIDE_BY_SIDE:
            measured = scen.get(key, {}).get("servers", {})
            mine = measured.get(name)
            if not configs[name].runs(key):
                cells.append("n/a")
            elif mine is None:
                cells.append("—")  # scenario not selected
            else:
                base = measured.get(BASELINE, {}).get("rps", float("nan"))
                cell = f"{ratio_text(mine['rps'] / base if base else float('nan'))} ({fmt(mine['cpu_us'])} µs)"
                if key == "close" and name in results["kept_open"]:
                    cell += " kept open"
                if mine["errors"]:
                    cell += f", {mine['errors']} errors"
                cells.append(cell)
        startup = results["startup"].get(name)
        cells.append(f"{startup['median_ms']:.0f} ms" if startup else ("n/a" if not configs[name].runs("startup")
                                                                        else "—"))
        cells.append(mib(results["memory_hello"].get(name)) if configs[name].runs("hello") else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Each cell: req/s over gunicorn sync's in the same run (median of the rounds), and in brackets the "
                 "server CPU per request. n/a: the server does not take part (the floor runs the two hello "
                 "scenarios only, nginx-static serves only the 64 KiB file). "
                 + " ".join(f"{n}: {configs[n].note}." for n in args.servers if configs[n].kind not in
                            ("forkserver", "gunicorn") and n not in results["missing"]) + "\n")
    return "\n".join(lines)


def peer_targets(results: dict[str, Any]) -> str:
    """Issue 21's targets, each judged against the peer measured in the same run."""
    scen = results["scenarios"]
    nan = float("nan")

    def measured(key: str, name: str, field_: str) -> float:
        return scen.get(key, {}).get("servers", {}).get(name, {}).get(field_, nan)

    def startup(name: str) -> float:
        return results["startup"].get(name, {}).get("median_ms", nan)

    def pss(name: str) -> float:
        return results["memory_hello"].get(name, {}).get("pss_mib", nan)

    rows = []

    def against(label: str, mine: float, peer: str, theirs: float, factor: float, higher: bool, unit: str) -> None:
        if mine != mine or theirs != theirs:
            why = results["missing"].get(peer) or (f"{peer} not measured" if mine == mine else "not measured")
            rows.append((label, why, "n/a"))
            return
        ok = mine >= factor * theirs if higher else mine <= factor * theirs
        spec = ".0f" if unit == "req/s" else ".1f"
        shown = f"{mine:{spec}} {unit} vs {peer} {theirs:{spec}} {unit} ({mine / theirs:.2f}x)"
        if peer in results["kept_open"] and "close" in label:
            shown += f"; {peer} kept its connections open"
        rows.append((label, shown, "met" if ok else "**missed**"))

    fs = "forkserver"
    against("Connection: close CPU/req ≤ 1.15x the floor's", measured("close", fs, "cpu_us"), FLOOR,
            measured("close", FLOOR, "cpu_us"), 1.15, False, "µs")
    against("Connection: close req/s ≥ uWSGI's", measured("close", fs, "rps"), "uwsgi",
            measured("close", "uwsgi", "rps"), 1.0, True, "req/s")
    against("hello keep-alive req/s ≥ 0.6x the floor's", measured("hello", fs, "rps"), FLOOR,
            measured("hello", FLOOR, "rps"), 0.6, True, "req/s")
    against("Flask JSON req/s ≥ bjoern's", measured("flask", fs, "rps"), "bjoern",
            measured("flask", "bjoern", "rps"), 1.0, True, "req/s")
    against("64 KiB req/s ≥ granian's", measured("64k", fs, "rps"), "granian",
            measured("64k", "granian", "rps"), 1.0, True, "req/s")
    against("64 KiB req/s ≥ 0.9x nginx's static file", measured("64k", fs, "rps"), "nginx-static",
            measured("64k", "nginx-static", "rps"), 0.9, True, "req/s")
    upload = scen.get("upload", {}).get("servers", {})
    others = {n: v["rps"] for n, v in upload.items() if n != fs and v["rps"] == v["rps"]}
    best = max(others, key=others.__getitem__, default="")
    against(f"1 MiB upload req/s the best of all ({len(others)} others measured)", measured("upload", fs, "rps"),
            best or "any other server", others.get(best, nan), 1.0, True, "req/s")
    against("startup to first 200 ≤ 1.5x the floor's", startup(fs), FLOOR, startup(FLOOR), 1.5, False, "ms")
    against("tree PSS after hello ≤ uWSGI's", pss(fs), "uwsgi", pss("uwsgi"), 1.0, False, "MiB")

    lines = ["| target (forkserver vs the peer, same run) | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def targets(results: dict[str, Any], args: argparse.Namespace) -> str:
    scen = results["scenarios"]
    rows = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    def ratio(key: str) -> float:
        servers = scen.get(key, {}).get("servers", {})
        if "forkserver" in servers and BASELINE in servers and servers[BASELINE]["rps"]:
            return servers["forkserver"]["rps"] / servers[BASELINE]["rps"]
        return float("nan")

    for key, label, want in (("hello", "hello keep-alive ≥ 8x", 8.0), ("64k", "64 KiB ≥ 5x", 5.0),
                             ("flask", "Flask JSON ≥ 3x", 3.0), ("upload", "1 MiB upload ≥ 3.5x", 3.5)):
        r = ratio(key)
        rows.append((label, ratio_text(r), verdict(None if r != r else r >= want)))
    r = ratio("close")
    cpu = scen.get("close", {}).get("servers", {}).get("forkserver", {}).get("cpu_us", float("nan"))
    ok = None if r != r and cpu != cpu else (r >= 2.2 or cpu <= 35)
    rows.append(("Connection: close ≥ 2.2x or ≤ 35 µs CPU/req", f"{ratio_text(r)}, {fmt(cpu, '.1f')} µs", verdict(ok)))

    errors: dict[str, int] = {}  # per scenario, summed over forkserver's configs (an on/off pair has two)
    for key, data in scen.items():
        for name, summary in data["servers"].items():
            if name.startswith("forkserver"):
                errors[key] = errors.get(key, 0) + summary["errors"]
    total = sum(errors.values())
    rows.append(("0 errors (forkserver, every scenario)",
                 str(total) + (" (" + ", ".join(f"{k} {v}" for k, v in errors.items() if v) + ")" if total else ""),
                 verdict(None if not errors else total == 0)))

    for what, table, unit, field_ in (("PSS", "memory", "MiB", "pss_mib"), ("startup", "startup", "ms", "median_ms")):
        data = results[table]
        mine = data.get("forkserver", {}).get(field_)
        theirs = [(n, data[n][field_]) for n in ("gunicorn-sync", "gunicorn-gthread") if n in data]
        if mine is None or not theirs:
            rows.append((f"{what} ≤ gunicorn's", "—", "n/a"))
            continue
        shown = f"{mine:.1f} {unit} vs " + ", ".join(f"{n} {v:.1f}" for n, v in theirs)
        rows.append((f"{what} ≤ gunicorn's", shown, verdict(all(mine <= v for _, v in theirs))))

    def pair_cost(key: str, on: str) -> tuple[float, str]:
        pair = scen.get(key, {}).get("servers", {})
        if "forkserver" not in pair or on not in pair or not pair["forkserver"]["rps"]:
            return float("nan"), "—"
        off_s, on_s = pair["forkserver"], pair[on]
        cost = scen[key].get("paired_cost", 1 - on_s["rps"] / off_s["rps"])
        cpu = on_s["cpu_us"] / off_s["cpu_us"] - 1 if off_s["cpu_us"] else float("nan")
        return cost, (f"{cost * 100:.1f}% fewer req/s (median of paired 1 s slices); CPU/req {cpu * 100:+.0f}% "
                      f"({fmt(off_s['cpu_us'], '.1f')} → {fmt(on_s['cpu_us'], '.1f')} µs)")

    cost, shown = pair_cost("accesslog", "forkserver+accesslog")
    rows.append(("access log on costs < 10% (req/s)", shown, verdict(None if cost != cost else cost < 0.10)))
    cost, shown = pair_cost("stats", "forkserver+stats")
    rows.append(("stats on costs < 3% (req/s)", shown, verdict(None if cost != cost else cost < 0.03)))

    scaling = results["scaling"].get("forkserver", {})
    multi = {w: s for w, s in scaling.items() if w > 1}
    if multi:
        worst = max(s["busiest_over_avg_worst"] for s in multi.values())
        shown = ", ".join(f"-w {w}: {s['busiest_over_avg_worst']:.2f}" for w, s in multi.items())
        rows.append(("busiest worker ≤ 1.5x average", shown, verdict(worst <= 1.5)))
    else:
        rows.append(("busiest worker ≤ 1.5x average", "—", "n/a"))

    lines = ["| target (forkserver vs gunicorn sync, same run) | measured | |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"scenarios: {', '.join(ALL_SCENARIOS)}\n"
                                            f"servers: {', '.join(ALL_SERVERS)}")
    parser.add_argument("--duration", type=float, default=None,
                        help="seconds per measured run (default 5; 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds per scenario (default 3; 1 with --quick)")
    parser.add_argument("--scenarios", default=",".join(ALL_SCENARIOS),
                        help="comma-separated subset of the scenarios (default: all)")
    parser.add_argument("--servers", default=",".join(ALL_SERVERS),
                        help="comma-separated subset of the servers (default: all)")
    parser.add_argument("--quick", action="store_true", help="short smoke run: 2 s per run, 1 round, 1 s warm-up")
    parser.add_argument("--workers", "-w", type=int, default=2, help="worker processes per server (default 2)")
    parser.add_argument("--connections", "-c", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="unrecorded warm-up seconds per server and scenario (default 1)")
    parser.add_argument("--pair-slices", type=int, default=None,
                        help="1 s runs per config and round in the on/off pairs (default 15; 2 with --quick)")
    parser.add_argument("--starts", type=int, default=None,
                        help="fresh starts per server for the startup time, interleaved (default 15; 1 with --quick)")
    parser.add_argument("--startup-app", default=APP, metavar="MODULE:APP",
                        help=f"the app the startup scenario starts (default {APP}, which imports Flask); "
                             "hello_app:app imports nothing, so its start-up is the server's own")
    parser.add_argument("--idle-connections", type=int, default=200,
                        help="idle keep-alive connections in 'idle' (default 200)")
    parser.add_argument("--keepalive", type=float, default=30.0,
                        help="keep-alive timeout given to the servers that take one, longer than a run (default 30)")
    parser.add_argument("--gthread-threads", type=int, default=4, help="gunicorn gthread --threads (default 4)")
    parser.add_argument("--scaling-workers", default="1,2,4", help="worker counts for the scaling run (default 1,2,4)")
    parser.add_argument("--wrk", default=shutil.which("wrk") or "wrk", help="path to wrk")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results as JSON")
    args = parser.parse_args(argv)

    def subset(text: str, allowed: Sequence[str], what: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        unknown = [x for x in items if x not in allowed]
        if unknown or not items:
            parser.error(f"--{what}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}")
        return [x for x in allowed if x in items]  # canonical order

    args.scenarios = subset(args.scenarios, ALL_SCENARIOS, "scenarios")
    args.servers = subset(args.servers, ALL_SERVERS, "servers")
    args.duration = max(1, round(args.duration if args.duration is not None else (2 if args.quick else 5)))
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.warmup = max(1, round(args.warmup if args.warmup is not None else 1))
    args.pair_slices = max(1, args.pair_slices if args.pair_slices is not None else (2 if args.quick else 15))
    args.starts = max(1, args.starts if args.starts is not None else (1 if args.quick else 15))
    args.scaling_workers = [int(x) for x in args.scaling_workers.split(",") if x.strip()]
    if args.rounds < 1 or args.workers < 1 or args.connections < 1:
        parser.error("--rounds, --workers and --connections must be at least 1")
    return args


def preflight(args: argparse.Namespace) -> dict[str, Any]:
    problems = []
    if psutil is None:
        problems.append("psutil is missing: python3 -m pip install -e '.[bench]'")
    if not shutil.which(args.wrk):
        problems.append("wrk is missing: apt-get install -y wrk")
    needs_gunicorn = any(s.startswith("gunicorn") for s in args.servers)
    versions = {}
    for module in ("gunicorn", "flask", "forkserver"):
        try:
            __import__(module)
            versions[module] = importlib.metadata.version(module)
        except (ImportError, importlib.metadata.PackageNotFoundError):
            if module != "gunicorn" or needs_gunicorn:
                problems.append(f"{module} is missing: python3 -m pip install -e '.[bench]'")
            versions[module] = "-"
    if problems:
        for problem in problems:
            print(f"bench.py: {problem}", file=sys.stderr)
        sys.exit(2)
    # gunicorn and Flask were byte-compiled by pip at install; an editable
    # forkserver (and PYTHONDONTWRITEBYTECODE) would compile on every start.
    package = Path(sys.modules["forkserver"].__file__).parent  # imported by the check above
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=False, timeout=120)
    wrk_version = subprocess.run([args.wrk, "-v"], capture_output=True, text=True, timeout=10)
    first = (wrk_version.stdout or wrk_version.stderr).splitlines()
    return {
        "cpus": os.cpu_count(),
        "python": f"Python {platform.python_version()}",
        "wrk": first[0].split(" [")[0] if first else "wrk",
        "gunicorn": versions["gunicorn"],
        "forkserver": versions["forkserver"],
        "peers": peer_versions(args.servers),
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def peer_versions(names: Sequence[str]) -> str:
    """The installed versions of the selected peers, for the report's header."""
    shown = []
    for name, dist in (("uwsgi", "uWSGI"), ("granian", "granian"), ("bjoern", "bjoern")):
        if name in names:
            try:
                shown.append(f"{name} {importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                pass
    if "nginx-static" in names and shutil.which("nginx"):
        done = subprocess.run(["nginx", "-v"], capture_output=True, text=True, timeout=10)
        shown.append((done.stderr or done.stdout).strip().rpartition(": ")[2].replace("/", " "))
    return ", ".join(shown)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    meta = preflight(args)
    started: list[Server] = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forkserver-bench-") as tmp:
        try:
            results = bench(args, Path(tmp), started)
        except KeyboardInterrupt:
            log("interrupted")
            return 130
        finally:
            stop_servers(list(started), started)
    meta["elapsed_s"] = round(time.monotonic() - began, 1)
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    text = report(results, args, meta)
    print(text)
    print(f"Load average at the end {meta['loadavg_end']}; took {meta['elapsed_s']:.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "args": vars(args), "results": results}, indent=2,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
