"""Readings from the kernel on real sockets and processes: accept queues, memory and CPU."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from forkserver.master.sampler import BacklogWatch, ProcessSampler, accept_queue_depth, listener_stats, somaxconn
from forkserver.sockets import bind, parse_address

DEADLINE = 10.0  # seconds to wait for the kernel to show what the test did


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _connect_many(address, family, count):
    clients = []
    for _ in range(count):
        client = socket.socket(family, socket.SOCK_STREAM)
        client.settimeout(DEADLINE)
        client.connect(address)
        clients.append(client)
    return clients


def _wait_for_depth(sock, expected):
    deadline = time.monotonic() + DEADLINE
    while accept_queue_depth(sock) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return accept_queue_depth(sock)


@pytest.mark.parametrize("family,host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_accept_queue_depth_counts_unaccepted_connections(family, host):
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = socket.socket(family, socket.SOCK_STREAM)
    try:
        try:
            server.bind((host, 0))
        except OSError:
            pytest.skip(f"cannot bind {host}")
        server.listen(16)
        assert accept_queue_depth(server) == 0
        clients = _connect_many(server.getsockname()[:2], family, 5)
        assert _wait_for_depth(server, 5) == 5
        for _ in range(2):
            server.accept()[0].close()
        assert accept_queue_depth(server) == 3
        for client in clients:
            client.close()
    finally:
        server.close()


def test_accept_queue_depth_under_reuse_port_sums_the_workers_sockets():
    """The master's placeholder is bound but not listening; the workers' own sockets hold the queues."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    workers = []
    try:
        for _ in range(2):
            own = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            own.bind(holder.getsockname())
            own.listen(16)
            workers.append(own)
        assert accept_queue_depth(holder) == 0
        clients = _connect_many(holder.getsockname(), socket.AF_INET, 6)
        assert _wait_for_depth(holder, 6) == 6
        assert sum(accept_queue_depth(w) for w in workers) == 6
        for client in clients:
            client.close()
    finally:
        for sock in [holder, *workers]:
            sock.close()


def test_accept_queue_depth_is_none_where_the_kernel_does_not_tell(tmp_path):
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    unbound = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        unix.bind(str(tmp_path / "s.sock"))
        unix.listen(4)
        assert accept_queue_depth(unix) is None
        assert accept_queue_depth(udp) is None
        assert accept_queue_depth(unbound) is None
    finally:
        for sock in (unix, udp, unbound):
            sock.close()


def test_listener_stats_describes_real_listeners(tmp_path):
    listeners = [bind(parse_address(text), backlog=8, reuse_port=False, unix_mode=0o600)
                 for text in ("127.0.0.1:0", f"unix:{tmp_path / 'app.sock'}")]
    try:
        clients = _connect_many(listeners[0].sock.getsockname(), socket.AF_INET, 2)
        _wait_for_depth(listeners[0].sock, 2)
        tcp, unix = listener_stats(listeners)
        assert tcp["address"].startswith("http://127.0.0.1:") and tcp["accept_queue"] == 2
        assert tcp["accept_queue_max"] == 8 and tcp["accept_queue_peak"] == 2
        assert unix == {"address": f"unix:{tmp_path / 'app.sock'}", "accept_queue": None,
                        "accept_queue_max": None, "accept_queue_peak": None}
        for client in clients:
            client.close()
    finally:
        for listener in listeners:
            listener.close()


def test_process_sampler_reads_a_live_child_and_caches_it():
    clock = Clock()
    sampler = ProcessSampler(max_age=1.0, clock=clock)
    pid = os.fork()
    if pid == 0:
        try:
            time.sleep(DEADLINE)
        finally:
            os._exit(0)
    try:
        reading = sampler.read(pid)
        assert reading["memory_uss_bytes"] > 0 and reading["memory_pss_bytes"] > 0
        assert reading["cpu_seconds"] >= 0
        assert sampler.read(pid) is reading  # cached
        clock.now += 1.0
        assert sampler.read(pid) is not reading
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    sampler.forget(pid)
    assert sampler.read(pid) == {}  # reaped: gone


def test_the_queue_maximum_is_the_backlog_the_kernel_applies():
    """A backlog above net.core.somaxconn is cut to it by listen(): the maximum says what really holds."""
    cap = somaxconn()
    assert cap is not None and cap > 0
    listener = bind(parse_address("127.0.0.1:0"), backlog=cap + 1000, reuse_port=False, unix_mode=0o600)
    try:
        (entry,) = listener_stats([listener])
        assert entry["accept_queue_max"] == cap
    finally:
        listener.close()


def test_the_reuse_port_maximum_sums_the_workers_sockets():
    listener = bind(parse_address("127.0.0.1:0"), backlog=16, reuse_port=True, unix_mode=0o600)
    workers = [listener.worker_socket() for _ in range(3)]
    try:
        (entry,) = listener_stats([listener])
        assert (entry["accept_queue"], entry["accept_queue_max"]) == (0, 3 * min(16, somaxconn()))
    finally:
        for sock in workers:
            sock.close()
        listener.close()


def test_backlog_peaks_outlive_the_burst_until_each_reader_takes_its_own():
    """A burst that drained before anyone read is still seen by every reader, once."""
    listener = bind(parse_address("127.0.0.1:0"), backlog=16, reuse_port=False, unix_mode=0o600)
    watch = BacklogWatch(("/stats", "/metrics", "statsd"))
    try:
        clients = _connect_many(listener.sock.getsockname(), socket.AF_INET, 5)
        _wait_for_depth(listener.sock, 5)
        watch.sample([listener])
        for _ in range(5):
            listener.sock.accept()[0].close()  # the burst drains before any read
        watch.sample([listener])
        (entry,) = listener_stats([listener], watch, "/metrics")
        assert (entry["accept_queue"], entry["accept_queue_peak"]) == (0, 5)
        (entry,) = listener_stats([listener], watch, "/metrics")
        assert entry["accept_queue_peak"] == 0  # taken: the next scrape starts afresh
        (entry,) = listener_stats([listener], watch, "/stats")
        assert entry["accept_queue_peak"] == 5  # the other readers still have theirs
        assert watch.take("statsd", listener, 1) == 5
        assert watch.take("statsd", listener, 1) == 1  # no peak since: the depth now
        for client in clients:
            client.close()
    finally:
        listener.close()
