"""The stats endpoint on real loopback and UNIX sockets, driven the way the master drives it.

Most tests call ``handle_ready`` from the test thread between client steps,
as the master's loop would, so a call that blocked would hang right here.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time

import pytest
from harness import serving_in_thread
from prometheus_client.parser import text_string_to_metric_families

from forkserver.master.aggregator import Aggregator
from forkserver.errors import BindError
from forkserver.stats import HISTOGRAM_BUCKETS, CountersFlushed
from forkserver.master.status import MAX_CLIENTS, MAX_REQUEST_BYTES, StatusServer
from forkserver.tools.top import fetch

DEADLINE = 10.0


def sample_snapshot(reader: str = "/stats") -> dict:
    agg = Aggregator()
    agg.add_worker(1, pid=4242, slot=0, generation=1)
    agg.ingest(1, CountersFlushed(4242, 3, (0, 2, 0, 1, 0), 30, 300, (3,) + (0,) * (len(HISTOGRAM_BUCKETS) - 1),
                                  0.002, 0.1, 0))
    agg.set_state(1, "idle")
    return agg.snapshot({}, [{"address": "http://127.0.0.1:8000", "accept_queue": 0}])


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["tcp", "unix"])
def address(request, tmp_path) -> str:
    return "127.0.0.1:0" if request.param == "tcp" else f"unix:{tmp_path / 'stats.sock'}"


@pytest.fixture
def make_server():
    made = []

    def make(address: str, snapshot=sample_snapshot, **kw) -> StatusServer:
        server = StatusServer(address, snapshot, **kw)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def connect(server: StatusServer) -> socket.socket:
    sock = server.listener.sock
    client = socket.socket(sock.family, socket.SOCK_STREAM)
    client.settimeout(DEADLINE)
    client.connect(sock.getsockname())
    return client


def exchange(server: StatusServer, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` and serve it from this thread until the server closes; return status, headers, body."""
    client = connect(server)
    client.sendall(request)
    client.setblocking(False)
    received = b""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        server.handle_ready()
        try:
            chunk = client.recv(65536)
        except BlockingIOError:
            select.select([client, server], [], [], 0.05)
            continue
        if not chunk:
            break
        received += chunk
    else:
        pytest.fail("no complete response before the deadline")
    client.close()
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in header_lines)}
    assert int(headers["content-length"]) == len(body) or request.startswith(b"HEAD")
    return int(status_line.split()[1]), headers, body


def serving(server: StatusServer):
    """Run the server's loop in a thread, as the master's poll loop would."""
    return serving_in_thread(server, DEADLINE)


def test_get_stats_returns_the_snapshot_as_json(address, make_server):
    server = make_server(address)
    status, headers, body = exchange(server, b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert json.loads(body) == json.loads(json.dumps(sample_snapshot())) | {
        "uptime_seconds": json.loads(body)["uptime_seconds"],
        "started_at_unix": json.loads(body)["started_at_unix"],
        "workers": json.loads(body)["workers"],
    }
    assert json.loads(body)["workers"][0]["pid"] == 4242


def test_get_metrics_returns_prometheus_text(address, make_server):
    server = make_server(address)
    status, headers, body = exchange(server, b"GET /metrics HTTP/1.0\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    (sample,) = [s for s in families["forkserver_requests"].samples if s.labels["status_class"] == "2xx"]
    assert sample.value == 2 and sample.labels["worker"] == "0"


@pytest.mark.parametrize("request_bytes,expected", [
    (b"GET /stats?pretty=1 HTTP/1.1\r\n\r\n", 200),
    (b"GET http://localhost/stats HTTP/1.1\r\n\r\n", 200),
    (b"GET /stats HTTP/1.1\n\n", 200),
    (b"GET / HTTP/1.1\r\n\r\n", 404),
    (b"GET /statsx HTTP/1.1\r\n\r\n", 404),
    (b"POST /stats HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"BREW /metrics HTTP/1.1\r\n\r\n", 405),
    (b"hello\r\n\r\n", 400),
    (b"GET /stats\r\n\r\n", 400),
    (b"GET /stats HTTP/2.0\r\n\r\n", 400),
])
def test_routes_and_errors(make_server, request_bytes, expected):
    server = make_server("127.0.0.1:0")
    status, headers, _ = exchange(server, request_bytes)
    assert status == expected
    if expected == 405:
        assert headers["allow"] == "GET, HEAD"


def test_head_sends_headers_only(make_server):
    server = make_server("127.0.0.1:0")
    status, headers, body = exchange(server, b"HEAD /stats HTTP/1.1\r\n\r\n")
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0


def test_oversized_request_gets_431(make_server):
    server = make_server("127.0.0.1:0")
    junk = b"X-Junk: " + b"j" * MAX_REQUEST_BYTES + b"\r\n"
    status, _, _ = exchange(server, b"GET /stats HTTP/1.1\r\n" + junk)
    assert status == 431


def test_a_failing_snapshot_is_a_500_and_the_server_carries_on(make_server):
    calls = []

    def snapshot(reader):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return sample_snapshot()

    server = make_server("127.0.0.1:0", snapshot)
    assert exchange(server, b"GET /stats HTTP/1.1\r\n\r\n")[0] == 500
    assert exchange(server, b"GET /stats HTTP/1.1\r\n\r\n")[0] == 200


def test_fileno_polls_readable_when_a_client_needs_service(make_server):
    server = make_server("127.0.0.1:0")
    poller = select.poll()
    poller.register(server.fileno(), select.POLLIN)
    assert poller.poll(0) == []
    client = connect(server)
    assert poller.poll(DEADLINE * 1000)
    server.handle_ready()  # accepts
    assert poller.poll(0) == []  # nothing more to do until the client speaks
    client.sendall(b"GET /stats HTTP/1.1\r\n\r\n")
    assert poller.poll(DEADLINE * 1000)
    client.close()


def test_a_silent_client_never_holds_up_others_and_is_dropped_after_its_timeout(make_server):
    clock = Clock()
    server = make_server("127.0.0.1:0", client_timeout=5.0, clock=clock)
    silent = connect(server)
    silent.sendall(b"GET /sta")  # and then nothing
    deadline = time.monotonic() + DEADLINE
    while not server.clients and time.monotonic() < deadline:
        server.handle_ready()
    assert len(server.clients) == 1
    assert exchange(server, b"GET /stats HTTP/1.1\r\n\r\n")[0] == 200
    clock.now += 4.9
    server.handle_ready()
    assert len(server.clients) == 1
    clock.now += 0.2
    server.handle_ready()
    assert server.clients == {}
    assert silent.recv(100) == b""  # closed on it
    silent.close()


def test_a_client_that_reads_slowly_gets_every_byte_without_blocking_the_server(make_server):
    """A response far bigger than the socket buffers is written as the client makes room."""
    big = sample_snapshot() | {"padding": "p" * 8_000_000}
    server = make_server("127.0.0.1:0", lambda reader: big)
    client = connect(server)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.sendall(b"GET /stats HTTP/1.1\r\n\r\n")
    deadline = time.monotonic() + DEADLINE
    while not any(c.pending is not None for c in server.clients.values()) and time.monotonic() < deadline:
        server.handle_ready()
    (pending_client,) = server.clients.values()
    assert pending_client.pending  # the kernel took only part of it, and handle_ready returned anyway
    received = b""
    client.setblocking(False)
    deadline = time.monotonic() + DEADLINE * 3
    while time.monotonic() < deadline:
        server.handle_ready()
        try:
            chunk = client.recv(1 << 20)
        except BlockingIOError:
            select.select([client, server], [], [], 0.05)
            continue
        if not chunk:
            break
        received += chunk
    client.close()
    body = received.partition(b"\r\n\r\n")[2]
    assert json.loads(body)["padding"] == big["padding"]


def test_clients_beyond_the_cap_are_turned_away(make_server):
    server = make_server("127.0.0.1:0")
    clients = []
    try:
        for _ in range(MAX_CLIENTS + 5):
            clients.append(connect(server))
            server.handle_ready()  # accept as we go: the listen backlog is smaller than the test
        deadline = time.monotonic() + DEADLINE
        while len(server.clients) < MAX_CLIENTS and time.monotonic() < deadline:
            server.handle_ready()
        assert len(server.clients) == MAX_CLIENTS
        turned_away = 0
        for client in clients:
            client.setblocking(False)
            try:
                turned_away += client.recv(1) == b""
            except BlockingIOError:
                pass
        assert turned_away == 5
    finally:
        for client in clients:
            client.close()


def test_a_client_that_hangs_up_mid_request_is_forgotten(make_server):
    server = make_server("127.0.0.1:0")
    client = connect(server)
    client.sendall(b"GET /st")
    deadline = time.monotonic() + DEADLINE
    while not server.clients and time.monotonic() < deadline:
        server.handle_ready()
    client.close()
    while server.clients and time.monotonic() < deadline:
        server.handle_ready()
    assert server.clients == {}


def test_close_removes_the_unix_socket_file_unless_told_not_to(tmp_path):
    path = tmp_path / "stats.sock"
    server = StatusServer(f"unix:{path}", sample_snapshot)
    assert server.address == f"unix:{path}"
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    server.close()
    assert not path.exists()
    # What a forked worker does with its inherited copy: close it, leave the master's file alone.
    server = StatusServer(f"unix:{path}", sample_snapshot)
    server.close(unlink=False)
    assert path.exists()
    os.unlink(path)


def test_an_address_in_use_is_a_stats_bind_error(make_server):
    first = make_server("127.0.0.1:0")
    with pytest.raises(BindError, match="stats-bind.*address already in use"):
        StatusServer(first.address, sample_snapshot)


def test_fetch_reads_from_a_server_in_a_master_like_loop(address, make_server):
    """The whole path: Aggregator -> StatusServer in a poll loop -> top.fetch over TCP and UNIX."""
    server = make_server(address)
    with serving(server):
        for _ in range(3):
            document = fetch(server.address)
            assert document["workers"][0]["pid"] == 4242
            assert document["totals"]["requests"] == 3


def test_the_snapshot_is_told_which_path_reads_it(make_server):
    """/stats and /metrics keep separate "since the last read" marks, so the server says which one asks."""
    readers = []

    def snapshot(reader):
        readers.append(reader)
        return sample_snapshot()

    server = make_server("127.0.0.1:0", snapshot)
    for request in (b"GET /metrics HTTP/1.1\r\n\r\n", b"GET /stats HTTP/1.1\r\n\r\n",
                    b"HEAD /metrics HTTP/1.1\r\n\r\n"):
        assert exchange(server, request)[0] == 200
    assert readers == ["/metrics", "/stats", "/metrics"]
