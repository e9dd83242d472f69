"""Behind a proxy, on real servers: forwarding headers and PROXY protocol headers, trusted or not."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import time
from pathlib import Path

import pytest

from harness import ServerProcess, poll, read_all

FORWARDED_HEADERS = (b"X-Forwarded-For: 198.51.100.1, 203.0.113.7\r\n"
                     b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\n")
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def request(headers: bytes = b"", *, close: bool = True, path: str = "/") -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return f"GET {path} HTTP/1.1\r\nHost: origin.example\r\n".encode() + connection + headers + b"\r\n"


def exchange(data: bytes, *, port: int | None = None, unix: str | None = None,
             pieces: list[bytes] | None = None) -> bytes:
    """Connect over TCP or a UNIX socket, send ``data`` (or ``pieces`` one at a time), read to EOF."""
    family = socket.AF_UNIX if unix else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(unix or ("127.0.0.1", port))
        if family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces or [data]:
            conn.sendall(piece)
            if pieces:
                time.sleep(0.05)  # let each piece arrive as its own read
        return read_all(conn)


def environ_of(answer: bytes) -> dict:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    return json.loads(body)


def read_one(stream) -> dict:
    """Read one Content-Length response from a keep-alive socket's file; return the echoed environ."""
    status = stream.readline()
    assert status.startswith(b"HTTP/1.1 200 "), status
    length = 0
    while (line := stream.readline()) != b"\r\n":
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return json.loads(stream.read(length))


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str | None = None, dst: str = "", sport: int = 0, dport: int = 0, *, local: bool = False,
       tlvs: bytes = b"") -> bytes:
    if local:
        return V2_SIGNATURE + b"\x20\x00\x00\x00"
    source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if source.version == 4 else 0x21
    payload = source.packed + destination.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(payload)) + payload


def ssl_tlv() -> bytes:
    value = b"\x01" + b"\x00" * 4  # PP2_CLIENT_SSL, verified
    return b"\x20" + struct.pack("!H", len(value)) + value


def start_proxied(server, *args: str) -> ServerProcess:
    """Start a --proxy-protocol server and wait until it answers a request behind a PROXY header."""
    srv = server("basic:echo", "--proxy-protocol", *args, wait=False)

    def answers() -> bool:
        if srv.proc.poll() is not None:
            raise AssertionError(f"server exited: {srv.log()}")
        try:
            return exchange(v1("192.0.2.1", "192.0.2.2", 1, 2) + request(), port=srv.port).startswith(b"HTTP/1.1 ")
        except OSError:
            return False
    poll(answers, 15, what="server to answer behind a PROXY header")
    return srv


# -- forwarding headers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """One echo server with the default trust list (loopback) and an access log on stdout."""
    proc = ServerProcess(["basic:echo", "-w", "1", "--access-logfile", "-"], tmp_path_factory.mktemp("proxies"),
                         wait=False)
    try:
        proc.wait_ready(workers=1)
        yield proc
    finally:
        proc.stop()


def test_loopback_peer_is_trusted_by_default_for_x_forwarded(default_server):
    environ = environ_of(exchange(request(FORWARDED_HEADERS), port=default_server.port))
    assert environ["REMOTE_ADDR"] == "203.0.113.7"  # the right-most untrusted hop
    assert environ["REMOTE_PORT"] == ""
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "shop.example"
    assert environ["HTTP_X_FORWARDED_FOR"] == "198.51.100.1, 203.0.113.7"  # still there for the app
    assert environ["SERVER_NAME"] == "127.0.0.1"  # left alone
    poll(lambda: "\n203.0.113.7 - - [" in "\n" + default_server.stdout(), what="the client in the access log")


def test_forwarded_is_preferred_with_quoting_and_ipv6(default_server):
    headers = (b'Forwarded: for="[2001:db8::7]:4711";proto=https;host="fw.example:8443"\r\n'
               b"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-Proto: http\r\n")
    environ = environ_of(exchange(request(headers), port=default_server.port))
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("2001:db8::7", "4711")
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "fw.example:8443"


@pytest.mark.parametrize("headers", [
    b"X-Forwarded-For: not-an-address\r\nX-Forwarded-Proto: gopher\r\nX-Forwarded-Host: a b\r\n",
    b"Forwarded: for=[2001:db8::7]\r\n",  # unquoted IPv6: malformed, and it wins over X-Forwarded-For
    b"Forwarded: for=unknown;proto=ftp\r\nX-Forwarded-For: 198.51.100.1\r\n",
    b"X_Forwarded_For: 198.51.100.1\r\n",
])
def test_malformed_values_from_a_trusted_peer_are_ignored(default_server, headers):
    environ = environ_of(exchange(request(headers), port=default_server.port))
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["HTTP_HOST"] == "origin.example"


def test_untrusted_peer_changes_nothing(server):
    srv = server("basic:echo", "-w", "1", "--forwarded-allow-ips", "10.9.9.9")
    headers = FORWARDED_HEADERS + b"Forwarded: for=192.0.2.60;proto=https;host=fw.example\r\n"
    environ = environ_of(exchange(request(headers), port=srv.port))
    assert environ["REMOTE_ADDR"] == "127.0.0.1"
    assert environ["REMOTE_PORT"] != ""
    assert environ["wsgi.url_scheme"] == "http"
    assert environ["HTTP_HOST"] == "origin.example"
    assert environ["HTTP_X_FORWARDED_FOR"] == "198.51.100.1, 203.0.113.7"
    assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
    assert environ["HTTP_FORWARDED"] == "for=192.0.2.60;proto=https;host=fw.example"


def test_the_same_request_from_trusted_and_untrusted_peers_gets_each_its_own_client(server):
    """A worker shares the environ built for one connection's request with the next that sends the same;
    the peer, and what a trusted proxy says of the client, must stay each connection's own."""
    srv = server("basic:echo", "-w", "1", "--forwarded-allow-ips", "127.0.0.2")
    data = request(FORWARDED_HEADERS)

    def from_source(source: str) -> tuple[dict, int]:
        with socket.socket() as conn:
            conn.settimeout(10)
            conn.bind((source, 0))
            conn.connect(("127.0.0.1", srv.port))
            conn.sendall(data)
            return environ_of(read_all(conn)), conn.getsockname()[1]

    for source in ("127.0.0.2", "127.0.0.1", "127.0.0.1", "127.0.0.2", "127.0.0.1"):
        environ, port = from_source(source)
        if source == "127.0.0.2":  # the trusted proxy
            assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("203.0.113.7", ""), source
            assert environ["wsgi.url_scheme"] == "https" and environ["HTTP_HOST"] == "shop.example"
        else:
            assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("127.0.0.1", str(port)), source
            assert environ["wsgi.url_scheme"] == "http" and environ["HTTP_HOST"] == "origin.example"


def test_cidr_trust_list_trusts_loopback_network(server):
    srv = server("basic:echo", "-w", "1", "--forwarded-allow-ips", "10.0.0.0/8, 127.0.0.0/8")
    environ = environ_of(exchange(request(b"X-Forwarded-For: 203.0.113.7, 127.0.0.5\r\n"), port=srv.port))
    assert environ["REMOTE_ADDR"] == "203.0.113.7"


def test_unix_socket_peer_is_always_trusted(server, tmp_path):
    path = tmp_path / "fs.sock"
    srv = server("basic:echo", "-w", "1", "-b", f"unix:{path}", "--forwarded-allow-ips", "10.9.9.9", wait=False)
    poll(lambda: _unix_answer(path), 15, what="the unix socket to answer")
    environ = environ_of(exchange(request(FORWARDED_HEADERS), unix=str(path)))
    assert environ["REMOTE_ADDR"] == "203.0.113.7"
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTP_HOST"] == "shop.example"
    assert srv.proc.poll() is None


def _unix_answer(path: Path) -> bytes | None:
    try:
        return exchange(request(), unix=str(path)) or None
    except OSError:
        return None


# -- PROXY protocol -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    """One --proxy-protocol echo server, one worker, short header timeout."""
    workdir = tmp_path_factory.mktemp("proxied")
    started: list[ServerProcess] = []

    def start(*args: str, **kwargs) -> ServerProcess:
        proc = ServerProcess(args, workdir, **kwargs)
        started.append(proc)
        return proc
    try:
        yield start_proxied(start, "-w", "1", "--header-timeout", "1")
    finally:
        for proc in started:
            proc.stop()


@pytest.mark.parametrize("header, remote", [
    (v1("192.0.2.10", "192.0.2.2", 51000, 443), ("192.0.2.10", "51000")),
    (v1("2001:db8::10", "2001:db8::2", 51001, 443), ("2001:db8::10", "51001")),
    (v2("192.0.2.11", "192.0.2.2", 51002, 443), ("192.0.2.11", "51002")),
    (v2("2001:db8::11", "2001:db8::2", 51003, 443), ("2001:db8::11", "51003")),
    (b"PROXY UNKNOWN\r\n", ("127.0.0.1", None)),
    (v2(local=True), ("127.0.0.1", None)),
], ids=["v1-tcp4", "v1-tcp6", "v2-inet", "v2-inet6", "v1-unknown", "v2-local"])
def test_proxy_header_sets_remote_addr_and_port(proxied, header, remote):
    environ = environ_of(exchange(header + request(), port=proxied.port))
    assert environ["REMOTE_ADDR"] == remote[0]
    if remote[1] is not None:
        assert environ["REMOTE_PORT"] == remote[1]
    assert environ["wsgi.url_scheme"] == "http"


def test_proxy_header_split_across_reads(proxied):
    header = v2("192.0.2.12", "192.0.2.2", 51004, 443)
    data = header + request()
    pieces = [data[:5], data[5:14], data[14:17], data[17:len(header) + 3], data[len(header) + 3:]]
    environ = environ_of(exchange(data, port=proxied.port, pieces=pieces))
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("192.0.2.12", "51004")
    line = v1("192.0.2.13", "192.0.2.2", 51005, 443)
    pieces = [line[:3], line[3:20], line[20:-1], line[-1:] + request()]
    assert environ_of(exchange(b"", port=proxied.port, pieces=pieces))["REMOTE_ADDR"] == "192.0.2.13"


def test_v2_ssl_tlv_means_https(proxied):
    environ = environ_of(exchange(v2("192.0.2.14", "192.0.2.2", 1, 443, tlvs=ssl_tlv()) + request(),
                                  port=proxied.port))
    assert environ["wsgi.url_scheme"] == "https"


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 99999 443\r\n" + request(),
    b"PROXY TCP4 300.0.0.1 192.0.2.2 1 443\r\n" + request(),
    V2_SIGNATURE + b"\x13\x11\x00\x0c" + b"\x00" * 12 + request(),
    request(),  # a trusted peer must send the header first
], ids=["v1-bad-port", "v1-bad-address", "v2-bad-version", "no-header"])
def test_malformed_proxy_header_closes_and_the_worker_serves_on(proxied, data):
    before = environ_of(exchange(v1("192.0.2.1", "192.0.2.2", 1, 2) + request(), port=proxied.port))["pid"]
    assert exchange(data, port=proxied.port) == b""
    after = environ_of(exchange(v1("192.0.2.1", "192.0.2.2", 1, 2) + request(), port=proxied.port))
    assert after["pid"] == before
    assert "bad PROXY header remote=127.0.0.1" in proxied.log()
    assert "Traceback" not in proxied.log()


def test_partial_proxy_header_is_closed_at_the_header_timeout(proxied):
    with socket.create_connection(("127.0.0.1", proxied.port), timeout=10) as conn:
        conn.sendall(b"PROXY TCP4 192.0.2")
        assert read_all(conn) == b""  # the 1 s header timeout, not our 10 s socket timeout


def test_keep_alive_after_a_proxy_header(proxied):
    with socket.create_connection(("127.0.0.1", proxied.port), timeout=10) as conn:
        stream = conn.makefile("rb")
        conn.sendall(v1("192.0.2.20", "192.0.2.2", 52000, 443) + request(close=False, path="/one"))
        first = read_one(stream)
        conn.sendall(request(close=False, path="/two"))
        second = read_one(stream)
    assert (first["PATH_INFO"], second["PATH_INFO"]) == ("/one", "/two")
    assert first["REMOTE_ADDR"] == second["REMOTE_ADDR"] == "192.0.2.20"
    assert first["REMOTE_PORT"] == second["REMOTE_PORT"] == "52000"
    # Two pipelined requests in the same segment as the header.
    with socket.create_connection(("127.0.0.1", proxied.port), timeout=10) as conn:
        stream = conn.makefile("rb")
        conn.sendall(v2("192.0.2.21", "192.0.2.2", 52001, 443) + request(close=False) + request(close=False))
        assert read_one(stream)["REMOTE_ADDR"] == read_one(stream)["REMOTE_ADDR"] == "192.0.2.21"


def test_forwarding_headers_after_a_proxy_header_need_a_trusted_client(proxied):
    # The HTTP bytes behind a PROXY header come from the client it names, so
    # X-Forwarded-For counts only if that client is itself trusted.
    untrusted = environ_of(exchange(v1("192.0.2.30", "192.0.2.2", 1, 2) + request(FORWARDED_HEADERS),
                                    port=proxied.port))
    assert (untrusted["REMOTE_ADDR"], untrusted["wsgi.url_scheme"]) == ("192.0.2.30", "http")
    trusted = environ_of(exchange(v1("127.0.0.1", "127.0.0.1", 1, 2) + request(FORWARDED_HEADERS),
                                  port=proxied.port))
    assert (trusted["REMOTE_ADDR"], trusted["wsgi.url_scheme"]) == ("203.0.113.7", "https")


def test_proxy_header_from_an_untrusted_peer_is_just_bad_http(server):
    srv = server("basic:echo", "-w", "1", "--proxy-protocol", "--forwarded-allow-ips", "10.9.9.9")
    answer = exchange(v1("192.0.2.1", "192.0.2.2", 1, 2) + request(), port=srv.port)
    # "PROXY TCP4 ..." reads as a request line with an unknown method (RFC 9110 §9.1).
    assert answer.startswith(b"HTTP/1.1 501 ") and b"Connection: close\r\n" in answer
    environ = environ_of(exchange(request(), port=srv.port))
    assert environ["REMOTE_ADDR"] == "127.0.0.1"


def test_proxy_protocol_over_unix_socket(server, tmp_path):
    path = tmp_path / "pp.sock"
    srv = server("basic:echo", "-w", "1", "--threads", "2", "--proxy-protocol", "-b", f"unix:{path}", wait=False)
    header = v1("192.0.2.40", "192.0.2.2", 53000, 443)

    def answer() -> bytes | None:
        try:
            return exchange(header + request(), unix=str(path)) or None
        except OSError:
            return None
    environ = environ_of(poll(answer, 15, what="the unix socket to answer"))
    assert (environ["REMOTE_ADDR"], environ["REMOTE_PORT"]) == ("192.0.2.40", "53000")
    assert exchange(request(), unix=str(path)) == b""
    assert srv.proc.poll() is None
