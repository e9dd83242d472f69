"""The stats endpoint refuses to be reachable from other hosts unless an allow-list says who may read it.

Real servers on real sockets.  The whole of 127.0.0.0/8 is loopback on
Linux, so a client bound to 127.0.0.2 is a different peer address from one
on 127.0.0.1: that is how the allow-list is put to the test on one machine.
"""

from __future__ import annotations

import socket

import psutil
import pytest
from harness import poll, read_all

from forkserver.errors import EXIT_CONFIG

ALLOWED = "127.0.0.2"


def stats_port(srv) -> int:
    """The TCP port the master listens on for stats (bound to :0), found among its own sockets."""
    def find() -> int:
        ports = {c.laddr.port for c in psutil.Process(srv.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port != srv.port}
        return ports.pop() if len(ports) == 1 else 0
    return poll(find, what="the stats listener")


def get_stats(port: int, source: str) -> bytes:
    """GET /stats from ``source``; b"" if the server closed without a word."""
    with socket.socket() as conn:
        conn.settimeout(5)
        conn.bind((source, 0))
        conn.connect(("127.0.0.1", port))
        try:
            conn.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            return b""
        return read_all(conn)


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0"])
def test_a_bind_beyond_loopback_without_an_allow_list_exits_78_naming_the_setting(server, address):
    srv = server("basic:hello", "--stats-bind", address, wait=False)
    assert srv.wait_exit() == EXIT_CONFIG, srv.log()
    lines = srv.log().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in srv.log(), srv.log()
    assert lines[0].startswith("forkserver: error: stats_bind") and "stats_allow_ips" in lines[0], lines[0]
    assert "Prometheus" in lines[0]


def test_a_bad_allow_list_entry_exits_78_naming_the_setting(server):
    srv = server("basic:hello", "--stats-bind", "0.0.0.0:0", "--stats-allow-ips", "10.0.0.1/8", wait=False)
    assert srv.wait_exit() == EXIT_CONFIG
    assert "stats_allow_ips" in srv.log() and "host bits" in srv.log(), srv.log()


@pytest.mark.parametrize("address", ["0.0.0.0:0", "127.0.0.1:0"], ids=["all-interfaces", "loopback"])
def test_with_an_allow_list_only_listed_clients_are_answered(server, address):
    srv = server("basic:hello", "--stats-bind", address, "--stats-allow-ips", f"{ALLOWED},10.0.0.0/8")
    port = stats_port(srv)
    assert get_stats(port, ALLOWED).startswith(b"HTTP/1.1 200 OK")
    assert get_stats(port, "127.0.0.1") == b""
    poll(lambda: "stats: disconnected 127.0.0.1, not in stats_allow_ips" in srv.log(), what="the refusal line")
    assert get_stats(port, ALLOWED).startswith(b"HTTP/1.1 200 OK")  # a refusal costs the server nothing


def test_loopback_without_a_list_and_unix_sockets_stay_open_to_local_clients(server, tmp_path):
    srv = server("basic:hello", "--stats-bind", "127.0.0.1:0")
    assert get_stats(stats_port(srv), ALLOWED).startswith(b"HTTP/1.1 200 OK")
    path = tmp_path / "stats.sock"
    srv = server("basic:hello", "--stats-bind", f"unix:{path}", "--stats-allow-ips", "10.0.0.0/8")
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(5)
        conn.connect(str(path))
        conn.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_all(conn).startswith(b"HTTP/1.1 200 OK")
