#!/usr/bin/env python3
"""Fleet simulation: several forkserver instances behind HAProxy, a rolling restart and a scale-down under load.

Starts ``--instances`` forkservers on loopback ports (scripts/fleet_app.py,
``--health-path /healthz``, ``--shutdown-delay``), and HAProxy in front with
HTTP health checks on that path, retries on (``retries 3``, ``option
redispatch``: the usual production setting, so a retry the client never sees
still shows in HAProxy's counters) and an admin socket to read them.  HAProxy
stamps every request ``X-Request-Start: t=<microseconds>`` as it forwards it;
forkserver trusts loopback peers, so it measures the proxy queue time (proxy
to app call: the wait in the listen backlog and for a worker) and the app
sends it back in ``X-Queue-Time``.  Client threads send GETs and small POSTs
through HAProxy, each on a new connection and each taking ``--app-ms`` in the
app, while the script

1. restarts every instance in turn (TERM, wait for the exit, start a new one
   on the same port, wait until it serves and HAProxy has it UP again), then
2. scales down by stopping the last instance for good.

For each phase it prints the requests sent, client errors, HAProxy's retries,
redispatches and connection errors, and percentiles of the latency clients saw
and of the queue time forkserver measured.  The load is
bounded by ``--max-requests`` and every phase by a deadline; every process the
script starts is ended by PID.  Run it with ``--shutdown-delay 0`` to see
what the delay buys.  Needs haproxy (apt-get install haproxy).

    python scripts/fleet_sim.py --instances 3 --shutdown-delay 2
"""

from __future__ import annotations

import argparse
import csv
import http.client
import io
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
APP_DIR = ROOT / "scripts"  # fleet_app.py
CHECK = "inter 300ms fall 2 rise 2"  # HAProxy marks a server down after 2 failed checks 300 ms apart
PHASE_DEADLINE = 60.0


def bound_socket(port: int = 0) -> socket.socket:
    """A loopback listening socket the instance inherits (the same port again for a restart)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


class Instance:
    """One forkserver on its own port; ``start`` again after ``stop`` for a restart."""

    def __init__(self, workdir: Path, number: int, args: argparse.Namespace) -> None:
        self.workdir, self.number, self.args = workdir, number, args
        self.port = 0
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        sock = bound_socket(self.port)
        self.port = sock.getsockname()[1]
        log = open(self.workdir / f"instance{self.number}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "forkserver", "-b", f"fd://{sock.fileno()}", "--pythonpath", str(APP_DIR),
             "-w", str(self.args.workers), "--health-path", "/healthz",
             "--shutdown-delay", str(self.args.shutdown_delay), "fleet_app:app"],
            stdout=log, stderr=log, pass_fds=(sock.fileno(),), cwd=self.workdir)
        sock.close()  # the instance holds the only copy: when it stops, the port refuses
        log.close()

    def serving(self) -> bool:
        """True once a worker answers the health path (the listener queues connections before that)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def stop(self) -> None:
        """TERM, and wait for the exit (its graceful stop, shutdown delay included)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(self.args.shutdown_delay + 40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def quit(self) -> None:
        """QUIT (a fast stop: the master ends its workers), then KILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class HAProxy:
    """HAProxy with health checks on every instance, and an admin socket for its counters."""

    def __init__(self, workdir: Path, instances: list[Instance]) -> None:
        binary = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/sbin")
        if binary is None:
            sys.exit("haproxy is not installed (apt-get install haproxy)")
        self.front = bound_socket()
        self.port = self.front.getsockname()[1]
        self.admin = workdir / "haproxy.sock"
        servers = "".join(f"    server s{i.number} 127.0.0.1:{i.port} check\n" for i in instances)
        config = workdir / "haproxy.cfg"
        config.write_text(
            f"global\n    maxconn 1024\n    stats socket {self.admin} level admin\n"
            "defaults\n    mode http\n    retries 3\n    option redispatch\n    timeout connect 5s\n"
            # A check waits up to 2 s for its answer: on a loaded machine the
            # default (inter) marks healthy servers down.
            "    timeout client 30s\n    timeout server 30s\n    timeout check 2s\n"
            f"frontend web\n    bind fd@{self.front.fileno()}\n"
            # The stamp forkserver's proxy queue time counts from; set-header
            # also replaces any client's own.  Microseconds, since the waits
            # measured here are often below a millisecond.
            "    http-request set-header X-Request-Start t=%[date(0,us)]\n    default_backend app\n"
            "backend app\n    balance roundrobin\n"
            "    option httpchk\n    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host fleet\n"
            f"    default-server {CHECK}\n{servers}")
        self.log = open(workdir / "haproxy.log", "wb")
        self.proc = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=self.log, stderr=self.log,
                                     pass_fds=(self.front.fileno(),))

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` as rows (one per server, plus the frontend and backend)."""
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(str(self.admin))
            conn.sendall(b"show stat\n")
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
        return list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))

    def backend_counters(self) -> dict[str, int]:
        """Retries, redispatches and connection errors of the backend, so far."""
        for row in self.stats():
            if row["svname"] == "BACKEND":
                return {key: int(row[key] or 0) for key in ("wretr", "wredis", "econ", "eresp")}
        return {}

    def server_up(self, number: int) -> bool:
        try:
            return any(row["svname"] == f"s{number}" and row["status"].startswith("UP") for row in self.stats())
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.front.close()
        self.log.close()


class Outcome(NamedTuple):
    """What one request came to, as the client saw it."""

    latency: float  # seconds, connect to the end of the response
    error: str  # "" for a 200
    queue_time: float | None  # forkserver's proxy queue time, None if it sent none


def queue_time(response: http.client.HTTPResponse) -> float | None:
    """The app's ``X-Queue-Time`` answer: seconds, or None for "-" (no stamp) or no header."""
    value = response.getheader("X-Queue-Time", "-")
    return None if value == "-" else float(value)


class Load:
    """Client threads through the proxy, new connection per request, until stopped or capped."""

    def __init__(self, port: int, threads: int, cap: int, app_ms: float) -> None:
        self.port, self.cap = port, cap
        self.target = f"/?ms={app_ms:g}" if app_ms else "/"
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.results: list[Outcome] = []  # since the last take()
        self.sent = 0  # in all, for the cap
        self.workers = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        for worker in self.workers:
            worker.start()

    def _run(self, number: int) -> None:
        sent = 0
        while not self.stop.is_set() and self.sent < self.cap:
            sent += 1
            method, body = ("POST", b"x" * 512) if sent % 3 == 0 else ("GET", None)
            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            queued = None
            try:
                conn.request(method, self.target, body=body)
                response = conn.getresponse()
                response.read()
                error = "" if response.status == 200 else f"{method} status {response.status}"
                queued = queue_time(response)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                error = f"{method} {type(exc).__name__}"
            finally:
                conn.close()
            with self.lock:
                self.sent += 1
                self.results.append(Outcome(time.perf_counter() - started, error, queued))
            self.stop.wait(0.002)  # a steady load, not the most the machine can send

    def take(self) -> list[Outcome]:
        """The results since the last call."""
        with self.lock:
            results, self.results = self.results, []
        return results

    def finish(self) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(40)


def wait_for(predicate, what: str, timeout: float = PHASE_DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def percentile(values: list[float], share: float) -> float:
    return values[min(len(values) - 1, int(share * len(values)))] if values else 0.0


SHARES = (0.5, 0.9, 0.99)
COUNTS = f"{'phase':<14} {'requests':>8} {'errors':>6} {'retries':>7} {'redisp':>6} {'econ':>4}"
SPREAD = f"{'p50':>6} {'p90':>6} {'p99':>6} {'max':>7}"
HEADER = (f"{'':{len(COUNTS)}}   {'latency, ms':<{len(SPREAD)}}   queue time, ms\n"
          f"{COUNTS} | {SPREAD} | {SPREAD}")


def spread(values: list[float]) -> str:
    """p50, p90, p99 and max of ``values`` (seconds) in milliseconds, under SPREAD's headings; dashes if none."""
    if not values:
        return f"{'-':>6} {'-':>6} {'-':>6} {'-':>7}"
    ordered = sorted(values)
    p50, p90, p99 = (percentile(ordered, share) * 1000 for share in SHARES)
    return f"{p50:>6.1f} {p90:>6.1f} {p99:>6.1f} {ordered[-1] * 1000:>7.1f}"


def report(phase: str, results: list[Outcome], before: dict[str, int], after: dict[str, int]) -> int:
    """Print one phase's line (and its errors by kind); return the client errors."""
    errors = [outcome.error for outcome in results if outcome.error]
    queued = [outcome.queue_time for outcome in results if outcome.queue_time is not None]
    delta = {key: after[key] - before[key] for key in after}
    print(f"{phase:<14} {len(results):>8} {len(errors):>6} {delta['wretr']:>7} {delta['wredis']:>6} "
          f"{delta['econ']:>4} | {spread([outcome.latency for outcome in results])} | {spread(queued)}")
    for kind in sorted(set(errors)):
        print(f"{'':14}   {errors.count(kind)} x {kind}")
    unstamped = len(results) - len(errors) - len(queued)
    if unstamped:
        print(f"{'':14}   {unstamped} answers without a queue time (the proxy's stamp was not used)")
    return len(errors)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="workers per instance")
    parser.add_argument("--shutdown-delay", type=float, default=2.0,
                        help="each instance's shutdown_delay; above HAProxy's 2 x 300 ms checks")
    parser.add_argument("--threads", type=int, default=4, help="client threads")
    parser.add_argument("--max-requests", type=int, default=200_000, help="cap on all requests sent")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of load before and between phases")
    parser.add_argument("--app-ms", type=float, default=5.0,
                        help="milliseconds each request spends in the app (a sleep), so the pool can fill")
    args = parser.parse_args()
    if args.instances < 2:
        parser.error("--instances: at least 2, so one can stop while another serves")

    workdir = Path(tempfile.mkdtemp(prefix="fleet-"))
    instances = [Instance(workdir, number, args) for number in range(args.instances)]
    proxy: HAProxy | None = None
    load: Load | None = None
    errors = 0
    try:
        for instance in instances:
            instance.start()
        # HAProxy counts a server UP from its start, before any check: were
        # the instances still booting, the first requests would queue on
        # their listeners and show as queue time that no deploy caused.
        wait_for(lambda: all(i.serving() for i in instances), "every instance serving")
        proxy = HAProxy(workdir, instances)
        wait_for(lambda: all(proxy.server_up(i.number) for i in instances), "every instance UP in HAProxy")
        load = Load(proxy.port, args.threads, args.max_requests, args.app_ms)
        print(f"{args.instances} instances x {args.workers} workers behind HAProxy ({CHECK}), "
              f"shutdown_delay {args.shutdown_delay:g}s, {args.threads} client threads, "
              f"{args.app_ms:g} ms in the app; logs in {workdir}")
        print(HEADER)
        counters = proxy.backend_counters()
        phases: list[tuple[str, Callable[[], None]]] = [("steady", lambda: None)]

        def restart(instance: Instance) -> None:
            instance.stop()
            instance.start()
            # Not before it serves: with no shutdown delay HAProxy may never
            # have marked it down, and sends to it while it boots.
            wait_for(instance.serving, f"instance {instance.number} serving again")
            wait_for(lambda: proxy.server_up(instance.number), f"instance {instance.number} UP again")

        for instance in instances:
            phases.append((f"restart s{instance.number}", lambda instance=instance: restart(instance)))
        phases.append((f"scale-down s{instances[-1].number}", instances[-1].stop))
        for name, action in phases:
            action()
            time.sleep(args.settle)
            after = proxy.backend_counters()
            errors += report(name, load.take(), counters, after)
            counters = after
        if load.sent >= args.max_requests:
            print(f"the load stopped at --max-requests {args.max_requests}: later phases ran without it")
    finally:
        if load is not None:
            load.finish()
        if proxy is not None:
            proxy.stop()
        for instance in instances:
            instance.quit()
    print(f"client errors in all: {errors}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
