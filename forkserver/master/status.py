"""The stats endpoint: GET /stats (JSON) and GET /metrics (Prometheus text), served by the master.

The master polls one descriptor (an epoll set holding the listener and every
client) and calls ``handle_ready``, which reads, answers and closes without
ever waiting: each client is a small state machine over a non-blocking
socket, and one that dawdles past ``client_timeout`` is dropped.  This module
only formats and serves; the numbers come from the ``snapshot`` callable,
which is told the path asked for: /stats and /metrics each keep their own
"since the last read" marks (``sampler.BacklogWatch``).

The endpoint has no authentication and shows request paths, so a TCP bind
that other hosts can reach is refused unless ``allow`` (``stats_allow_ips``)
names the clients that may read it; with a list, a client not on it is
disconnected at once, unanswered: it costs no client slot (``MAX_CLIENTS``)
and learns nothing, and the refusals are logged once per interval.
"""

from __future__ import annotations

import json
import logging
import math
import select
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..backoff import AcceptPause, CountedLog
from ..errors import BindError, ConfigError
from ..preflight import exposure_problem
from ..proxy import Trust
from ..sockets import Listener, bind, parse_address

log = logging.getLogger("forkserver")

MAX_REQUEST_BYTES = 8192  # a GET line and a few headers; anything bigger is not an operator's curl
MAX_CLIENTS = 64
ACCEPT_BATCH = 16
CLIENT_TIMEOUT = 5.0
RECV_BYTES = 4096
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error"}


# -- Prometheus text format -----------------------------------------------------------------


def _label_value(value: object) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


Sample = tuple[str, dict[str, object], float | None]  # (name suffix, labels, value or None for "unknown")


class _Exposition:
    """Collects metric families, each written as # HELP, # TYPE and its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            if value is None:
                continue  # unknown (e.g. memory not readable): no sample rather than a fake 0
            label_text = ",".join(f'{key}="{_label_value(v)}"' for key, v in labels.items())
            series = f"{name}{suffix}{{{label_text}}}" if label_text else f"{name}{suffix}"
            self.lines.append(f"{series} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _histogram(bounds: Sequence[float], counts: Sequence[int], total: float) -> list[Sample]:
    """A Prometheus histogram's samples: cumulative ``_bucket``s up to +Inf, ``_sum`` and ``_count``."""
    cumulative, samples = 0, list[Sample]()
    for bound, count in zip([*bounds, math.inf], counts):
        cumulative += count
        samples.append(("_bucket", {"le": _number(float(bound))}, cumulative))
    return samples + [("_sum", {}, total), ("_count", {}, cumulative)]


def render_prometheus(snapshot: dict[str, Any]) -> str:
    """Render a /stats snapshot in the Prometheus text format 0.0.4.

    Counters carry ``worker="SLOT"``: a slot's series keeps growing across
    its workers' restarts.  Gauges about one process carry ``pid`` as well,
    because during a reload two generations can share a slot.
    """
    out = _Exposition()
    slots, workers, counters = snapshot["slots"], snapshot["workers"], snapshot["counters"]
    out.family("forkserver_requests_total", "counter", "Requests served, by worker slot and status class.",
               (("", {"worker": s["slot"], "status_class": c}, n) for s in slots for c, n in s["status"].items()))
    out.family("forkserver_received_bytes_total", "counter", "Request bytes read, by worker slot.",
               (("", {"worker": s["slot"]}, s["bytes_in"]) for s in slots))
    out.family("forkserver_sent_bytes_total", "counter", "Response bytes written, by worker slot.",
               (("", {"worker": s["slot"]}, s["bytes_out"]) for s in slots))
    out.family("forkserver_worker_cpu_seconds_total", "counter", "CPU time workers reported, by worker slot.",
               (("", {"worker": s["slot"]}, s["cpu_seconds"]) for s in slots))
    totals, bounds = snapshot["totals"], snapshot["histogram_bounds_seconds"]
    out.family("forkserver_request_duration_seconds", "histogram", "Time to serve a request, all workers.",
               _histogram(bounds, totals["histogram"], totals["duration_sum_seconds"]))
    out.family("forkserver_workers_alive", "gauge", "Worker processes running now.",
               [("", {}, counters["workers_alive"])])
    out.family("forkserver_workers", "gauge", "Worker processes running now, by state.",
               (("", {"state": state}, n) for state, n in counters["workers_by_state"].items()))
    out.family("forkserver_worker_exits_total", "counter", "Worker processes ended, by cause.",
               (("", {"cause": cause}, n) for cause, n in counters["worker_exits"].items()))
    out.family("forkserver_workers_respawned_total", "counter", "Workers started to replace one that ended.",
               [("", {}, counters["workers_respawned"])])
    out.family("forkserver_reloads_total", "counter", "Reloads (HUP) started.", [("", {}, counters["reloads"])])
    out.family("forkserver_stats_messages_rejected_total", "counter",
               "Stats messages from workers dropped as malformed.", [("", {}, counters["stats_messages_rejected"])])
    out.family("forkserver_log_lines_dropped_total", "counter",
               "Log lines the master and workers could not write (a full disk).",
               [("", {}, counters["log_lines_dropped"])])
    out.family("forkserver_uptime_seconds", "gauge", "Seconds since the master started.",
               [("", {}, snapshot["uptime_seconds"])])
    out.family("forkserver_start_time_seconds", "gauge", "Unix time the master started.",
               [("", {}, snapshot["started_at_unix"])])
    out.family("forkserver_worker_info", "gauge",
               "Always 1: a live worker's slot, pid, generation, state (mold: the refork mold) and the pid of "
               "the mold that forked it (empty: the master).",
               (("", {"worker": w["slot"], "pid": w["pid"], "generation": w["generation"], "state": w["state"],
                      "forked_by": w.get("forked_by") or ""}, 1) for w in workers))
    for field, help_text in (
        ("memory_uss_bytes", "Memory unique to a worker process (USS)."),
        ("memory_pss_bytes", "A worker's proportional share of memory (PSS)."),
        ("memory_shared_bytes", "A worker's resident memory that other processes map too (RSS minus USS)."),
        ("memory_merged_bytes", "A worker's memory the kernel's same-page merging shares (memory_merge)."),
        ("age_seconds", "Seconds since a worker was forked."),
        ("heartbeat_age_seconds", "Seconds since a worker last showed progress."),
    ):
        out.family(f"forkserver_worker_{field}", "gauge", help_text,
                   (("", {"worker": w["slot"], "pid": w["pid"]}, w[field]) for w in workers))
    master = snapshot.get("master") or {}
    for field, help_text in (
        ("memory_uss_bytes", "Memory unique to the master process (USS)."),
        ("memory_pss_bytes", "The master's proportional share of memory (PSS)."),
        ("memory_shared_bytes", "The master's resident memory that workers map too (RSS minus USS)."),
        ("memory_merged_bytes", "The master's memory the kernel's same-page merging shares (memory_merge)."),
    ):
        out.family(f"forkserver_master_{field}", "gauge", help_text, [("", {}, master.get(field))])
    out.family("forkserver_listener_accept_queue", "gauge",
               "Connections waiting to be accepted, by listener (where the kernel tells).",
               (("", {"listener": entry["address"]}, entry.get("accept_queue")) for entry in snapshot["listeners"]))
    _saturation_families(out, snapshot)
    return out.text()


def _saturation_families(out: _Exposition, snapshot: dict[str, Any]) -> None:
    """What an autoscaler watches: busy threads, queue times, and the accept queues' limits and high-water marks.

    ``rate(forkserver_thread_busy_seconds_total)`` summed over slots is the
    number of busy threads averaged over the window; divided by
    ``forkserver_threads`` it is the utilisation to scale on.  The queue-time
    histograms say what waiting for a thread cost requests, and a peak near
    ``forkserver_listener_accept_queue_max`` means clients already waited.
    """
    saturation, listeners = snapshot["saturation"], snapshot["listeners"]
    out.family("forkserver_threads", "gauge",
               "Request threads that can serve now (of workers taking connections).",
               [("", {}, saturation["threads"])])
    out.family("forkserver_requests_in_flight", "gauge", "Requests being served right now, all workers.",
               [("", {}, saturation["requests_in_flight"])])
    out.family("forkserver_threads_busy_ratio", "gauge", "Share of the threads running a request right now.",
               [("", {}, saturation["threads_busy_ratio"])])
    out.family("forkserver_thread_busy_seconds_total", "counter",
               "Thread time spent on requests, in flight ones included, by worker slot.",
               (("", {"worker": s["slot"]}, s["thread_busy_seconds"]) for s in snapshot["slots"]))
    totals, bounds = snapshot["totals"], snapshot["histogram_bounds_seconds"]
    for name, key, help_text in (
        ("forkserver_request_queue_seconds", "queue_time",
         "Time requests waited between their last bytes reaching the kernel and a worker starting them (TCP)."),
        ("forkserver_request_proxy_queue_seconds", "proxy_queue_time",
         "Time since a trusted proxy stamped a request (X-Request-Start/X-Queue-Start) when a worker started it."),
    ):
        times = totals[key]
        out.family(name, "histogram", help_text, _histogram(bounds, times["histogram"], times["sum_seconds"]))
    out.family("forkserver_listener_accept_queue_max", "gauge",
               "Connections the kernel queues for a listener before refusing or dropping more.",
               (("", {"listener": entry["address"]}, entry.get("accept_queue_max")) for entry in listeners))
    out.family("forkserver_listener_accept_queue_peak", "gauge",
               "Most connections waiting to be accepted since the previous read of /metrics, by listener.",
               (("", {"listener": entry["address"]}, entry.get("accept_queue_peak")) for entry in listeners))


# -- the server ----------------------------------------------------------------------------


def _response(status: int, content_type: str, body: bytes, head_only: bool = False,
              extra: str = "") -> bytes:
    head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n{extra}\r\n")
    return head.encode("ascii") + (b"" if head_only else body)


def _plain(status: int, text: str, extra: str = "") -> bytes:
    return _response(status, "text/plain; charset=utf-8", (text + "\n").encode(), extra=extra)


class _Client:
    """One accepted connection: bytes read so far, bytes still to write, and when to give up."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline
        self.received = bytearray()
        self.pending: memoryview | None = None  # the response, once there is one


class StatusServer:
    """Serves snapshots over HTTP/1.1 from inside the master's loop; never blocks."""

    def __init__(self, address: str, snapshot: Callable[[str], dict[str, Any]], *,
                 allow: Sequence[str] = (), client_timeout: float = CLIENT_TIMEOUT, unix_mode: int = 0o600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        try:
            self.listener: Listener = bind(parse_address(address), backlog=64, reuse_port=False,
                                           unix_mode=unix_mode)
        except BindError as exc:
            raise BindError(f"stats-bind: {exc}") from None
        if self.listener.reuse_port or not self.listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            self.listener.close()
            raise BindError(f"stats-bind {address!r}: not a listening socket")
        tcp = self.listener.sock.family in (socket.AF_INET, socket.AF_INET6)
        host = self.listener.sock.getsockname()[0] if tcp else ""
        problem = exposure_problem(address, host) if tcp and not allow else None
        if problem is not None:
            self.listener.close()
            raise ConfigError(problem)
        # Checked on a TCP bind only: a UNIX socket's readers are whoever its file mode lets in.
        self.allowed = Trust(allow) if tcp and allow else None
        self.refusals = CountedLog(logging.WARNING, clock=clock)
        self.snapshot = snapshot
        self.client_timeout = client_timeout
        self.clock = clock
        self.clients: dict[int, _Client] = {}
        self.pause = AcceptPause("stats accept", clock=clock)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.sock.fileno(), select.EPOLLIN)

    @property
    def address(self) -> str:
        """Where the server listens, in the form ``fetch`` and ``--stats-bind`` take (real port for :0)."""
        sock = self.listener.sock
        if sock.family == socket.AF_UNIX:
            return f"unix:{sock.getsockname()}"
        host, port = sock.getsockname()[:2]
        return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"

    def fileno(self) -> int:
        """The one descriptor for the master to poll for POLLIN: readable whenever a client needs us."""
        return self.epoll.fileno()

    def wake_at(self) -> float:
        """When ``handle_ready`` is due although nothing polls readable: the end of an accept pause, else inf.

        The listener is out of the epoll set while paused, so nothing else
        wakes the master for it.  Left to the master's one-second tick, each
        0.1 s pause lasted a second: after a flood of connections that gave
        up, the endpoint drained the dead ones a few per second and came back
        seconds after the descriptors did.
        """
        return self.pause.resume_at or math.inf

    def handle_ready(self) -> None:
        """Do every bit of work that can be done now, and drop clients past their deadline.

        Call it when ``fileno()`` polls readable, once per tick (for the
        client deadlines), and at ``wake_at`` (to end an accept pause).
        """
        if self.pause.due():
            self.epoll.register(self.listener.sock.fileno(), select.EPOLLIN)
        for fd, events in self.epoll.poll(0):
            if fd == self.listener.sock.fileno():
                self._accept()
                continue
            client = self.clients.get(fd)
            if client is None:
                continue
            try:
                if events & (select.EPOLLERR | select.EPOLLHUP):
                    self._drop(client)
                elif events & select.EPOLLOUT:
                    self._write(client)
                elif events & (select.EPOLLIN | select.EPOLLRDHUP):
                    self._read(client)
            except OSError as exc:
                log.debug("stats client dropped: %s", exc)
                self._drop(client)
        self._sweep()

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if self.pause.failed(exc):  # out of descriptors: stop polling the listener for a while
                    self.epoll.unregister(self.listener.sock.fileno())
                else:  # ECONNABORTED and the like: that connection's trouble, not ours
                    log.debug("stats accept failed: %s", exc)
                return
            self.pause.succeeded()
            if self.allowed is not None and peer[0] not in self.allowed:
                sock.close()
                self.refusals.event(f"stats: disconnected {peer[0]}, not in stats_allow_ips")
                continue
            if len(self.clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, self.clock() + self.client_timeout)
            self.clients[sock.fileno()] = client
            self.epoll.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)

    def _read(self, client: _Client) -> None:
        while True:
            try:
                data = client.sock.recv(RECV_BYTES)
            except BlockingIOError:
                return
            if not data:
                self._drop(client)
                return
            client.received += data
            if b"\r\n\r\n" in client.received or b"\n\n" in client.received:
                self._respond(client, self._answer(bytes(client.received)))
                return
            if len(client.received) > MAX_REQUEST_BYTES:
                self._respond(client, _plain(431, "request too large"))
                return

    def _answer(self, head: bytes) -> bytes:
        """Route one request head to its response bytes."""
        parts = head.split(b"\n", 1)[0].strip().split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _plain(400, "bad request")
        method, target = parts[0], parts[1].decode("latin-1")
        if "://" in target:  # absolute-form, RFC 9112 §3.2.2
            target = "/" + target.split("://", 1)[1].partition("/")[2]
        path = target.partition("?")[0]
        if path not in ("/stats", "/metrics"):
            return _plain(404, "not found: try /stats or /metrics")
        if method not in (b"GET", b"HEAD"):
            return _plain(405, "only GET and HEAD", extra="Allow: GET, HEAD\r\n")
        try:
            snapshot = self.snapshot(path)
            if path == "/stats":
                body, kind = (json.dumps(snapshot) + "\n").encode(), "application/json"
            else:
                body, kind = render_prometheus(snapshot).encode(), PROMETHEUS_TYPE
        except Exception:
            log.exception("stats snapshot failed path=%s", path)
            return _plain(500, "snapshot failed; see the error log")
        return _response(200, kind, body, head_only=method == b"HEAD")

    def _respond(self, client: _Client, data: bytes) -> None:
        client.pending = memoryview(data)
        self.epoll.modify(client.sock.fileno(), select.EPOLLOUT)
        self._write(client)

    def _write(self, client: _Client) -> None:
        pending = client.pending
        if pending is None:
            return
        while pending:
            try:
                sent = client.sock.send(pending)
            except BlockingIOError:
                client.pending = pending
                return  # EPOLLOUT brings us back
            pending = pending[sent:]
        self._drop(client)

    def _drop(self, client: _Client) -> None:
        """Close a client; shutdown first, so a forked worker's copy of the fd cannot keep it open."""
        fd = client.sock.fileno()
        self.clients.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        try:
            client.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client.sock.close()

    def _sweep(self) -> None:
        now = self.clock()
        for client in [c for c in self.clients.values() if c.deadline <= now]:
            log.debug("stats client timed out after %.1fs", self.client_timeout)
            self._drop(client)

    def close(self, *, unlink: bool = True) -> None:
        """Stop serving.  In a freshly forked worker pass ``unlink=False``: the socket file is the master's."""
        for client in list(self.clients.values()):
            if unlink:
                self._drop(client)
            else:
                client.sock.close()  # no shutdown: that would cut the master's own connection
        self.clients.clear()
        self.epoll.close()
        self.listener.close(remove=unlink)
