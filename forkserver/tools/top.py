"""``forkserver stats ADDR`` and ``forkserver top ADDR``: an operator's view of /stats.

``fetch`` asks a running master for its snapshot; ``render`` turns snapshots
into screen lines and is pure, so it is tested without a terminal; ``main_top``
is the only part that touches the terminal, and it always puts it back.
This module runs in the operator's shell, never in the server.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import socket
import sys
import termios
import time
import tty
from typing import Any

from ..errors import ForkserverError
from ..master.aggregator import estimate_quantile
from ..sockets import parse_address

FETCH_TIMEOUT = 5.0
# Alternate screen and hidden cursor on entry; both undone on exit, so the
# operator's scrollback looks as it did before.
ENTER_SCREEN = "\x1b[?1049h\x1b[?25l"
LEAVE_SCREEN = "\x1b[?25h\x1b[?1049l"
QUIT_KEYS = (b"q", b"Q", b"\x03", b"\x04")  # q, and Ctrl-C / Ctrl-D in case the tty passes them through
# FROM: the refork mold that forked the worker, "-" for the master.  QUEUE:
# the mean queue time of the requests the worker started since the previous
# frame (since it started, in the first).  The master has its own row;
# shared memory is in /stats and /metrics (no room here).  MERGED (memory
# the kernel's same-page merging shares) is shown only while it merges
# something (memory_merge), so that 80 columns still hold CURRENT.
ROW = "{:>4} {:>7} {:>7} {:>3} {:<8} {:>7} {:>6} {:>6} {:>6}{}  {}"
MERGED_CELL = " {:>6}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a UNIX socket path."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def fetch(address: str, path: str = "/stats", timeout: float = FETCH_TIMEOUT) -> dict[str, Any]:
    """GET ``path`` from the stats server at ``address`` and decode its JSON.

    Raises:
        ForkserverError: one line saying what went wrong and where.
    """
    text = address.removeprefix("http://").rstrip("/")
    try:
        parsed = parse_address(text)
    except ForkserverError as exc:
        raise ForkserverError(str(exc).replace("bind ", "stats address ", 1)) from None
    if parsed.path:
        connection: http.client.HTTPConnection = _UnixHTTPConnection(parsed.path, timeout)
    else:
        connection = http.client.HTTPConnection(parsed.host, parsed.port, timeout=timeout)
    try:
        connection.request("GET", path, headers={"Accept": "application/json"})
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ForkserverError(f"stats {address}: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        connection.close()
    if response.status != 200:
        raise ForkserverError(f"stats {address}: HTTP {response.status} for {path}")
    try:
        document = json.loads(body)
    except ValueError:
        raise ForkserverError(f"stats {address}: {path} did not return JSON") from None
    if not isinstance(document, dict) or "workers" not in document:
        raise ForkserverError(f"stats {address}: {path} is not a forkserver stats document")
    return document


# -- formatting -------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _latency(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.001:
        return f"{seconds * 1000:.2f}ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms" if seconds >= 0.01 else f"{seconds * 1000:.1f}ms"
    return f"{seconds:.1f}s"


def _size(count: float | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if count < 1024 or unit == "G":
            return f"{count:.0f}{unit}" if unit == "B" else f"{count:.1f}{unit}"
        count /= 1024
    return f"{count:.1f}T"  # unreachable; keeps type checkers content


def _count(n: int) -> str:
    return str(n) if n < 10_000_000 else f"{n / 1e6:.1f}M"


def _rate(now: dict[str, Any], before: dict[str, Any] | None, elapsed: float) -> str:
    if before is None or elapsed <= 0:
        return "-"
    return f"{max(0, now['requests'] - before['requests']) / elapsed:.1f}"


def _queued_since(now: dict[str, Any] | None, before: dict[str, Any] | None) -> tuple[list[int], float] | None:
    """The queue-time histogram and sum of the requests started after ``before`` (all of them without it).

    /stats keeps these as counters since the start, so two frames' difference
    is exactly what the interval added.  None when no request was timed, from
    a server that does not time queues, or when ``before`` is not an earlier
    reading of the same counters (the master restarted at the address).
    """
    if not now:
        return None
    histogram, total = list(now["histogram"]), now["sum_seconds"]
    if before:
        histogram = [count - earlier for count, earlier in zip(histogram, before["histogram"])]
        total -= before["sum_seconds"]
    if any(count < 0 for count in histogram) or not any(histogram):
        return None
    return histogram, max(0.0, total)


def _queue_mean(now: dict[str, Any] | None, before: dict[str, Any] | None) -> str:
    queued = _queued_since(now, before)
    return _latency(queued[1] / sum(queued[0])) if queued else "-"


def _queue_summary(snapshot: dict[str, Any], previous: dict[str, Any] | None, elapsed: float) -> str:
    """``queue time mean 1.5s p50 1.7s p99 2.4s  (4 request(s) in 1.0s)``: what waiting for a worker cost."""
    span = f"in {elapsed:.1f}s" if previous else "since start"
    queued = _queued_since(snapshot["totals"].get("queue_time"), previous and previous["totals"].get("queue_time"))
    if queued is None:
        return f"queue time -  (no requests timed {span})"
    histogram, total = queued
    count = sum(histogram)
    return (f"queue time mean {_latency(total / count)} p50 {_latency(estimate_quantile(0.5, histogram))} "
            f"p99 {_latency(estimate_quantile(0.99, histogram))}  ({count} request(s) {span})")


def _current(worker: dict[str, Any]) -> str:
    current = worker.get("current_request")
    if not current:
        return ""
    elapsed = current.get("elapsed_seconds")
    shown = f"{elapsed:.1f}s " if isinstance(elapsed, (int, float)) else ""
    return f"{shown}{current.get('method', '?')} {current.get('path', '?')}"


def _threads_busy(saturation: dict[str, Any] | None) -> str:
    """``  threads busy 3/8 (38%)``, or nothing from a server too old to say."""
    if not saturation:
        return ""
    return (f"  threads busy {saturation['requests_in_flight']}/{saturation['threads']} "
            f"({saturation['threads_busy_ratio']:.0%})")


def _summary(snapshot: dict[str, Any], previous: dict[str, Any] | None, elapsed: float) -> list[str]:
    totals, counters = snapshot["totals"], snapshot["counters"]
    states = counters.get("workers_by_state", {})
    exits = counters.get("worker_exits", {})
    queues = [entry["accept_queue"] for entry in snapshot.get("listeners", []) if entry.get("accept_queue") is not None]
    classes = "  ".join(f"{name} {_count(n)}" for name, n in totals["status"].items())
    return [
        (f"forkserver master {snapshot.get('master_pid', '?')}  up {_duration(snapshot['uptime_seconds'])}  "
         f"workers {counters['workers_alive']} ({states.get('busy', 0)} busy)  reloads {counters['reloads']}"),
        (f"requests {_count(totals['requests'])} ({_rate(totals, previous and previous['totals'], elapsed)}/s)  "
         + classes),
        (f"latency p50 {_latency(totals.get('p50_seconds'))} p90 {_latency(totals.get('p90_seconds'))} "
         f"p99 {_latency(totals.get('p99_seconds'))}  in {_size(totals['bytes_in'])} out {_size(totals['bytes_out'])}"
         f"  accept queue {sum(queues) if queues else '-'}"),
        (f"respawned {counters['workers_respawned']}  timeouts {exits.get('killed_timeout', 0)}  "
         f"recycled {exits.get('recycled', 0)}  died {exits.get('died', 0)}"
         + _threads_busy(snapshot.get("saturation"))),
        _queue_summary(snapshot, previous, elapsed),
        "",
    ]


def _merged_cell(process: dict[str, Any], merging: bool) -> str:
    return MERGED_CELL.format(_size(process.get("memory_merged_bytes"))) if merging else ""


def _header(merging: bool) -> str:
    return ROW.format("SLOT", "PID", "FROM", "GEN", "STATE", "REQS", "REQ/S", "QUEUE", "USS",
                      MERGED_CELL.format("MERGED") if merging else "", "CURRENT")


def _row(worker: dict[str, Any], before: dict[str, Any] | None, elapsed: float, merging: bool) -> str:
    """One worker (or the mold); FROM is the mold that forked it, ``-`` for the master."""
    return ROW.format(worker["slot"], worker["pid"], worker.get("forked_by") or "-", worker["generation"],
                      worker["state"], _count(worker["requests"]), _rate(worker, before, elapsed),
                      _queue_mean(worker.get("queue_time"), before and before.get("queue_time")),
                      _size(worker.get("memory_uss_bytes")), _merged_cell(worker, merging), _current(worker))


def _master_row(snapshot: dict[str, Any], merging: bool) -> str:
    master = snapshot.get("master") or {}
    return ROW.format("-", master.get("pid", snapshot.get("master_pid", "?")), "-", "-", "master", "-", "-", "-",
                      _size(master.get("memory_uss_bytes")), _merged_cell(master, merging), "")


def render(snapshot: dict[str, Any], width: int = 80, height: int = 24,
           previous: dict[str, Any] | None = None, interval: float = 1.0) -> list[str]:
    """Lay a snapshot out as at most ``height`` lines of at most ``width`` characters.

    Rates compare with ``previous``: over the difference in the master's
    uptime when both snapshots carry it, else over ``interval`` seconds.
    """
    elapsed = interval
    if previous is not None:
        gap = snapshot["uptime_seconds"] - previous.get("uptime_seconds", 0)
        if gap > 0:
            elapsed = gap
    before_by_pid = {w["pid"]: w for w in previous["workers"]} if previous else {}
    merging = any(process.get("memory_merged_bytes") for process in [snapshot.get("master") or {},
                                                                       *snapshot["workers"]])
    lines = _summary(snapshot, previous, elapsed) + [_header(merging), _master_row(snapshot, merging)]
    rows = [_row(w, before_by_pid.get(w["pid"]) if previous else None, elapsed, merging)
            for w in snapshot["workers"]]
    room = max(0, height - len(lines))
    if len(rows) > room:
        hidden = len(rows) - room + 1
        rows = rows[:room - 1] + [f"  ... {hidden} more worker(s)"] if room else []
    return [line[:width].rstrip() for line in (lines + rows)[:height]]


# -- commands ---------------------------------------------------------------------------------


def main_stats(address: str, *, raw: bool = False) -> int:
    """Print one snapshot as a table (or as JSON with ``raw``); return the exit code."""
    snapshot = fetch(address)
    if raw:
        print(json.dumps(snapshot, indent=2))
        return 0
    width = max(80, shutil.get_terminal_size().columns)
    for line in render(snapshot, width=width, height=10 + len(snapshot["workers"])):
        print(line.rstrip())
    return 0


def main_top(address: str, interval: float = 1.0) -> int:
    """Redraw the view every ``interval`` seconds until q or Ctrl-C; the terminal is always restored."""
    fd = sys.stdin.fileno()
    if not (os.isatty(fd) and sys.stdout.isatty()):
        raise ForkserverError("top needs a terminal; `forkserver stats ADDR` prints one snapshot")
    saved = termios.tcgetattr(fd)
    previous: dict[str, Any] | None = None
    try:
        # cbreak: keys arrive one at a time, unechoed; Ctrl-C still raises KeyboardInterrupt.
        tty.setcbreak(fd)
        _paint_raw(ENTER_SCREEN)
        while True:
            columns, rows = shutil.get_terminal_size()
            try:
                snapshot = fetch(address, timeout=max(1.0, interval))
                lines = render(snapshot, columns, rows - 1, previous, interval)
                previous = snapshot
            except ForkserverError as exc:
                lines = [str(exc)[:columns], "retrying..."]
            footer = f"q quits  every {interval:g}s  {time.strftime('%H:%M:%S')}  {address}"
            _paint(lines, footer[:columns], rows)
            if _wait_for_quit(fd, interval):
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _paint_raw(LEAVE_SCREEN)
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _wait_for_quit(fd: int, interval: float) -> bool:
    """Wait up to ``interval`` for a key; True if it means quit (or the terminal went away)."""
    deadline = time.monotonic() + interval
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return False
        keys = os.read(fd, 64)
        if not keys or any(key in keys for key in QUIT_KEYS):
            return True
    return False


def _paint(lines: list[str], footer: str, rows: int) -> None:
    """Redraw from the top-left, clearing each line's tail: no flicker, no scrolling."""
    body = lines[:max(0, rows - 1)]
    body += [""] * (rows - 1 - len(body))
    _paint_raw("\x1b[H" + "".join(line + "\x1b[K\r\n" for line in body) + "\x1b[7m" + footer + "\x1b[0m\x1b[K")


def _paint_raw(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
