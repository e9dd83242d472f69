#!/usr/bin/env python3
"""Soak test: mixed load against a forkserver while workers are SIGKILLed and the pool is reloaded.

Starts its own server (``-w 4``, tests/apps/lifecycle_app.py) on a loopback
socket it binds itself, then for ``--minutes`` runs client threads (half keep
a connection alive with a requests.Session, half open a new connection per
request; one request in five is a short ``/slow``), while a chaos thread
SIGKILLs a random worker every few seconds and sends HUP periodically.

At the end it prints the requests served and failed, the failures split by
cause, which failures are explained by a SIGKILLed worker's in-flight
requests (or a reload), and the master's memory (RSS/USS) at start and end.
It stops by itself and ends every process it started by PID.  The exit code
is 0 only if the master survived and every failure is explained.

    python scripts/soak.py --minutes 2
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from stopping import stop, tree

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "tests" / "apps"
REQUEST_TIMEOUT = (3.0, 10.0)


@dataclass
class Record:
    start: float
    end: float
    keepalive: bool
    cause: str = ""  # "" for a good answer
    pid: int = 0  # worker that answered
    hint: int = 0  # worker that served this keep-alive connection last (0: unknown / new connection)


@dataclass
class Events:
    kills: list[tuple[float, int]] = field(default_factory=list)  # (time, victim pid)
    hups: list[float] = field(default_factory=list)


def classify(exc: BaseException) -> str:
    """Name the cause of a failed request: reset, closed, refused, timeout or other."""
    if isinstance(exc, requests.Timeout):
        return "timeout"
    seen, chain = set(), [exc]
    while chain:
        item = chain.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ConnectionRefusedError):
            return "refused"
        if isinstance(item, ConnectionResetError):
            return "reset"
        if isinstance(item, (http.client.RemoteDisconnected, BrokenPipeError)):
            return "closed"
        if isinstance(item, (TimeoutError, socket.timeout)):
            return "timeout"
        chain.extend([item.__cause__, item.__context__, *[a for a in getattr(item, "args", ()) if
                                                          isinstance(a, BaseException)]])
        reason = getattr(item, "reason", None)
        if isinstance(reason, BaseException):
            chain.append(reason)
    text = str(exc)
    if "Connection refused" in text:
        return "refused"
    if "reset by peer" in text:
        return "reset"
    if "without response" in text:
        return "closed"
    return f"other ({type(exc).__name__})"


class Client(threading.Thread):
    def __init__(self, url: str, keepalive: bool, stop: threading.Event, until: float, max_requests: int) -> None:
        super().__init__(daemon=True)
        self.url, self.keepalive, self.stop, self.until, self.max_requests = url, keepalive, stop, until, max_requests
        self.records: list[Record] = []

    def run(self) -> None:
        session = requests.Session() if self.keepalive else None
        hint = 0
        rng = random.Random()
        try:
            for _ in range(self.max_requests):
                if self.stop.is_set() or time.monotonic() > self.until:
                    return
                path = "/slow?0.05" if rng.random() < 0.2 else "/"
                record = Record(time.monotonic(), 0.0, self.keepalive, hint=hint)
                try:
                    if session is not None:
                        response = session.get(self.url + path, timeout=REQUEST_TIMEOUT)
                    else:
                        response = requests.get(self.url + path, timeout=REQUEST_TIMEOUT,
                                                headers={"Connection": "close"})
                    if response.status_code >= 500:
                        record.cause = f"http {response.status_code}"
                        hint = 0
                    else:
                        record.pid = response.json()["pid"]
                        closing = response.headers.get("Connection", "").lower() == "close"
                        hint = 0 if closing or session is None else record.pid
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    record.cause = classify(exc)
                    hint = 0
                record.end = time.monotonic()
                self.records.append(record)
                time.sleep(0.004)
        finally:
            if session is not None:
                session.close()


def live_workers(master: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(master).children() if c.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def memory(pid: int) -> tuple[float, float]:
    info = psutil.Process(pid).memory_full_info()
    return info.rss / 1048576, info.uss / 1048576


def chaos(master: int, events: Events, stop: threading.Event, until: float, kill_every: float,
          hup_every: float) -> None:
    rng = random.Random()
    next_kill = time.monotonic() + rng.uniform(0.5, 1.5) * kill_every
    next_hup = time.monotonic() + hup_every
    while not stop.is_set() and time.monotonic() < until:
        now = time.monotonic()
        if now >= next_hup:
            events.hups.append(time.monotonic())
            os.kill(master, signal.SIGHUP)
            next_hup = now + hup_every
        if now >= next_kill:
            workers = live_workers(master)
            if workers:
                victim = rng.choice(workers)
                events.kills.append((time.monotonic(), victim))
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    events.kills.pop()
            next_kill = now + rng.uniform(0.5, 1.5) * kill_every
        stop.wait(0.05)


def stop_server(proc: subprocess.Popen) -> int | None:
    """TERM the master (a graceful stop is part of the soak), then KILL whatever of its tree is left, by PID."""
    return stop(proc, tree(proc), grace=30.0, signum=signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=6, help="client threads, half keep-alive (default 6)")
    parser.add_argument("--kill-every", type=float, default=4.0, help="mean seconds between SIGKILLs")
    parser.add_argument("--hup-every", type=float, default=20.0, help="seconds between HUPs")
    parser.add_argument("--max-requests-per-client", type=int, default=200_000)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="forkserver-soak-"))
    error_log = workdir / "error.log"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1024)
    listener.set_inheritable(True)
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    command = [sys.executable, "-m", "forkserver", "-b", f"fd://{listener.fileno()}", "--pythonpath", str(APPS),
               "lifecycle_app:app", "-w", str(args.workers), "--error-logfile", str(error_log)]
    with open(workdir / "stderr.log", "wb") as err:
        proc = subprocess.Popen(command, stdout=err, stderr=err, cwd=workdir, env=env, pass_fds=(listener.fileno(),))
    stop = threading.Event()
    events = Events()
    clients: list[Client] = []
    master_died = ""
    try:
        deadline = time.monotonic() + 20
        while len(live_workers(proc.pid)) < args.workers or not _answers(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start (exit {proc.poll()}): {(workdir / 'stderr.log').read_text()}")
            time.sleep(0.1)
        time.sleep(0.5)
        mem_start = memory(proc.pid)
        started = time.monotonic()
        until = started + args.minutes * 60
        clients = [Client(url, keepalive=i % 2 == 0, stop=stop, until=until, max_requests=args.max_requests_per_client)
                   for i in range(args.clients)]
        for client in clients:
            client.start()
        chaos_thread = threading.Thread(target=chaos, args=(proc.pid, events, stop, until, args.kill_every,
                                                             args.hup_every), daemon=True)
        chaos_thread.start()
        while time.monotonic() < until:
            if proc.poll() is not None:
                master_died = f"master exited with {proc.returncode} at +{time.monotonic() - started:.1f}s"
                break
            time.sleep(0.2)
        stop.set()
        for client in clients:
            client.join(30)
        chaos_thread.join(10)
        mem_end = memory(proc.pid) if proc.poll() is None else (float("nan"), float("nan"))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        code = stop_server(proc)
        listener.close()

    records = [r for client in clients for r in client.records]
    failures = [r for r in records if r.cause]
    by_cause = Counter(r.cause for r in failures)

    def killed_in_flight(r: Record) -> bool:
        for when, victim in events.kills:
            if r.start - 0.002 <= when <= r.end + 0.002 and r.hint in (0, victim):
                return True
            if r.hint == victim and r.start >= when:
                return True  # a kept-alive connection to a worker killed earlier
        return False

    def during_reload(r: Record) -> bool:
        return any(hup - 0.002 <= r.end and r.start <= hup + 5.0 for hup in events.hups)

    by_kill = [r for r in failures if killed_in_flight(r)]
    by_reload = [r for r in failures if r not in by_kill and during_reload(r)]
    unexplained = [r for r in failures if r not in by_kill and r not in by_reload]
    log = error_log.read_text(errors="replace") if error_log.exists() else ""
    errors = [ln for ln in log.splitlines() if "[ERROR]" in ln or "[CRITICAL]" in ln]

    print(f"forkserver soak: {elapsed:.0f}s, {args.workers} workers, {len(clients)} clients "
          f"({sum(c.keepalive for c in clients)} keep-alive, {sum(not c.keepalive for c in clients)} new-connection)")
    print(f"  chaos: {len(events.kills)} workers SIGKILLed, {len(events.hups)} HUPs; "
          f"log: {log.count('worker died')} 'worker died', {log.count('reload complete')} 'reload complete', "
          f"{log.count('reload failed')} 'reload failed', {log.count('retry in')} boot back-offs")
    print(f"  requests: {len(records)} total, {len(records) - len(failures)} served, {len(failures)} failed "
          f"({len(records) / max(elapsed, 1e-9):.0f} req/s offered)")
    for cause in ("reset", "closed", "refused", "timeout"):
        print(f"    {cause:<28}{by_cause.pop(cause, 0)}")
    print(f"    {'http 5xx':<28}{sum(n for c, n in by_cause.items() if c.startswith('http '))}")
    for cause, count in sorted(by_cause.items()):
        if not cause.startswith("http "):
            print(f"    {cause:<28}{count}")
    print(f"  failures attributable to a SIGKILLed worker's in-flight requests: {len(by_kill)}")
    print(f"  other failures during a reload (HUP + 5 s):                     {len(by_reload)} "
          f"{_kinds(by_reload)}")
    print(f"  unexplained failures:                                            {len(unexplained)} "
          f"{_kinds(unexplained)}")
    print(f"  master memory: start RSS {mem_start[0]:.1f} MiB USS {mem_start[1]:.1f} MiB; "
          f"end RSS {mem_end[0]:.1f} MiB USS {mem_end[1]:.1f} MiB")
    print(f"  master: {master_died or 'survived'}; exit code after TERM: {code}")
    if errors:
        unexpected = [ln for ln in errors if "worker died" not in ln]
        print(f"  error-log lines at ERROR/CRITICAL: {len(errors)}; first unexpected: "
              f"{unexpected[0][:200] if unexpected else 'none'}")
    print(f"  logs kept in {workdir}")
    return 0 if not master_died and not unexplained and code == 0 else 1


def _kinds(records: list[Record]) -> str:
    if not records:
        return ""
    counts = Counter(("keep-alive " if r.keepalive else "new-conn ") + r.cause for r in records)
    return "(" + ", ".join(f"{n} {k}" for k, n in counts.most_common()) + ")"


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=(1, 2)).status_code == 200
    except requests.RequestException:
        return False


if __name__ == "__main__":
    sys.exit(main())
