"""TLS termination by real servers, with certificates this module makes with the openssl CLI.

A test CA signs a server certificate for 127.0.0.1/localhost, a second one
for rotation, and a client certificate; every HTTPS client here verifies
the server against that CA.  The harness's listening socket becomes the
TLS port (``--certfile`` alone makes every bind TLS), so readiness is
polled over HTTPS rather than by the harness's plain request.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import APPS, ParsedResponse, listening_socket, poll, read_all

from forkserver.errors import EXIT_CONFIG

TIMEOUT = 5.0
STALLED = 50


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def issue(pki: Path, name: str, subject: str, serial: int, usage: str, san: str = "") -> None:
    """A key and a certificate for it, signed by the test CA."""
    openssl(pki, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    extensions = ["basicConstraints=CA:FALSE", f"extendedKeyUsage={usage}",
                  "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"]
    if san:
        extensions.append(f"subjectAltName={san}")
    (pki / f"{name}.ext").write_text("\n".join(extensions) + "\n")
    openssl(pki, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make the test certificates (apt-get install openssl)")
    pki = tmp_path_factory.mktemp("pki")
    openssl(pki, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=forkserver test CA")
    san = "IP:127.0.0.1,DNS:localhost"
    issue(pki, "server", "/CN=localhost", 4097, "serverAuth", san)
    issue(pki, "rotated", "/CN=localhost", 8193, "serverAuth", san)
    issue(pki, "client", "/O=Example/CN=client-1", 12289, "clientAuth")
    return pki


def client_context(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    context.set_alpn_protocols(["http/1.1"])
    if cert:
        context.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return context


def connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    return context.wrap_socket(raw, server_hostname="localhost")


def exchange(conn: ssl.SSLSocket, data: bytes) -> bytes:
    """Send ``data`` and read until the server closes (the last request says Connection: close)."""
    conn.sendall(data)
    chunks = []
    while True:
        try:
            chunk = conn.recv(65536)
        except (ssl.SSLEOFError, ConnectionResetError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def get(port: int, context: ssl.SSLContext, path: str = "/") -> ParsedResponse:
    with connect(port, context) as conn:
        return ParsedResponse(exchange(conn, f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()))


def echo(port: int, context: ssl.SSLContext) -> dict:
    response = get(port, context)
    assert response.status == 200, response.body
    return json.loads(response.body)


def start_tls(server, pki: Path, *args: str, app: str = "basic:echo", workers: int = 1, sock=None,
              cert: str = "server", client: str | None = None):
    """A server whose harness socket speaks TLS, ready once it answers over HTTPS (as ``client``)."""
    proc = server(app, "-w", str(workers), "--certfile", str(pki / f"{cert}.pem"),
                  "--keyfile", str(pki / f"{cert}.key"), *args, wait=False, **({"sock": sock} if sock else {}))
    context = client_context(pki, client)

    def answers() -> bool:
        if proc.proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.proc.returncode}: {proc.log()}")
        try:
            return get(proc.port, context).status == 200
        except OSError:
            return False

    poll(answers, 15, what="the server to answer over HTTPS")
    poll(lambda: len(proc.worker_pids()) == workers and not proc.booting_pids(), 15, what="booted workers")
    return proc


def test_https_verifies_and_the_app_sees_an_https_request(server, pki):
    srv = start_tls(server, pki)
    with connect(srv.port, client_context(pki)) as conn:
        assert conn.selected_alpn_protocol() == "http/1.1"
        assert conn.version() in ("TLSv1.2", "TLSv1.3")
        response = ParsedResponse(exchange(conn, b"GET /x HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"))
    environ = json.loads(response.body)
    assert environ["wsgi.url_scheme"] == "https"
    assert environ["HTTPS"] == "on"
    assert environ["SSL_PROTOCOL"] in ("TLSv1.2", "TLSv1.3")
    assert "SSL_CLIENT_S_DN" not in environ  # no client certificate was asked for


@pytest.mark.parametrize("threads", ["1", "3"])
def test_keep_alive_and_pipelining_over_tls(server, pki, threads):
    srv = start_tls(server, pki, "--threads", threads)
    request = b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n"
    with connect(srv.port, client_context(pki)) as conn:
        pids = set()
        for i in range(3):  # one at a time on one connection
            conn.sendall(request % i)
            head = b""
            while b"}" not in head:
                head += conn.recv(65536)
            pids.add(json.loads(head.split(b"\r\n\r\n", 1)[1])["pid"])
        # Ten pipelined in one write: more than one TLS record's worth of answers, all in order.
        burst = b"".join(request % i for i in range(10)) + b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        data = exchange(conn, burst)
    assert len(pids) == 1
    assert data.count(b"HTTP/1.1 200 OK") == 11
    assert data.index(b'"PATH_INFO": "/9"') < data.index(b'"PATH_INFO": "/last"')


@pytest.mark.parametrize("threads", ["1", "3"])
def test_a_request_behind_a_body_in_the_same_tls_record_is_answered(server, pki, threads):
    """The body is read exactly, so OpenSSL keeps the next request decrypted where epoll cannot see it."""
    srv = start_tls(server, pki, "--keep-alive", "30", "--threads", threads)
    with connect(srv.port, client_context(pki)) as conn:
        conn.sendall(b"POST /first HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n")
        time.sleep(0.2)  # the head is read (and the app waits for the body) before the rest arrives
        conn.settimeout(10)
        data = exchange(conn, b"hello" + b"GET /second HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert data.count(b"HTTP/1.1 200 OK") == 2, data
    assert b'"PATH_INFO": "/second"' in data


def test_chunked_upload_with_100_continue_over_tls(server, pki):
    srv = start_tls(server, pki)
    body = os.urandom(200_000).hex().encode()  # 400 kB: many records each way
    with connect(srv.port, client_context(pki)) as conn:
        conn.sendall(b"POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        interim = conn.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n"), interim
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 30000]), body[i:i + 30000])
                          for i in range(0, len(body), 30000))
        response = ParsedResponse(exchange(conn, chunks + b"0\r\n\r\n"))
    assert response.status == 200
    environ = json.loads(response.body)
    assert environ["body"].encode() == body
    assert environ["CONTENT_LENGTH"] == str(len(body))


def test_static_file_over_tls_is_sent_whole(server, pki, tmp_path):
    public = tmp_path / "public"
    public.mkdir()
    content = os.urandom(3 * 1024 * 1024 + 17)  # sendfile cannot encrypt: read and sent in pieces
    (public / "big.bin").write_bytes(content)
    srv = start_tls(server, pki, "--static", f"/static={public}", app="basic:hello")
    response = get(srv.port, client_context(pki), "/static/big.bin")
    assert response.status == 200
    assert response.body == content


def test_plain_http_and_garbage_on_the_tls_port_are_turned_away_and_the_worker_serves_on(server, pki):
    srv = start_tls(server, pki)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_all(conn)
    response = ParsedResponse(answer)
    assert (response.status, response.complete, response.keep_alive) == (400, 1, False), answer
    assert response.body == b"The plain HTTP request was sent to an HTTPS port.\n"
    assert answer.endswith(response.body)  # nothing after the body the length announced
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as conn:
        conn.sendall(b"\x16\x03\x01\x00\x05hello" + os.urandom(300))
        answer = read_all(conn)  # an alert at most, then the close
    assert not answer.startswith(b"HTTP/")
    assert echo(srv.port, client_context(pki))["wsgi.url_scheme"] == "https"
    log = poll(lambda: (text := srv.log()).count("TLS handshake failed") >= 2 and text, what="two info lines")
    assert "plain HTTP sent to a TLS port" in log
    assert "Traceback" not in log


def test_connections_reset_before_the_worker_accepts_them_cost_nothing(server, pki):
    srv = start_tls(server, pki)
    worker = srv.worker_pids()[0]
    os.kill(worker, signal.SIGSTOP)  # the resets all land while the connections wait in the queue
    try:
        for i in range(20):
            conn = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
            if i % 2:
                conn.sendall(half_client_hello(pki))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            conn.close()  # with SO_LINGER 0: a reset
    finally:
        os.kill(worker, signal.SIGCONT)
    assert echo(srv.port, client_context(pki))["pid"] == worker
    assert "Traceback" not in srv.log()


def half_client_hello(pki: Path) -> bytes:
    """The first half of a real ClientHello, as a client that stalls mid-handshake sends it."""
    outgoing = ssl.MemoryBIO()
    tls = client_context(pki).wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    return hello[:len(hello) // 2]


def test_stalled_handshakes_do_not_block_a_normal_client(server, pki):
    srv = start_tls(server, pki, "--header-timeout", "30", workers=2)
    half = half_client_hello(pki)
    stalled = []
    try:
        for i in range(STALLED):
            conn = socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT)
            if i % 2:
                conn.sendall(half)
            stalled.append(conn)
        context = client_context(pki)
        for _ in range(10):  # each a new connection, whichever worker takes it
            assert echo(srv.port, context)["wsgi.url_scheme"] == "https"
        for conn in stalled:
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):  # still held open, waiting, by the loop
                conn.recv(1)
    finally:
        for conn in stalled:
            conn.close()


def test_a_stalled_handshake_is_closed_at_the_header_timeout(server, pki):
    srv = start_tls(server, pki, "--header-timeout", "1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as conn:
        conn.sendall(half_client_hello(pki))
        conn.settimeout(10)
        assert read_all(conn) == b""  # closed by the server, no answer
    poll(lambda: "TLS handshake timeout remote=127.0.0.1" in srv.log(), what="the timeout's info line")


def test_required_client_certificate(server, pki):
    srv = start_tls(server, pki, "--ca-certs", str(pki / "ca.pem"), "--cert-reqs", "required", client="client")
    environ = echo(srv.port, client_context(pki, "client"))
    assert environ["SSL_CLIENT_S_DN"] == "CN=client-1,O=Example"
    assert environ["SSL_CLIENT_S_DN_CN"] == "client-1"
    assert environ["SSL_CLIENT_I_DN"] == "CN=forkserver test CA"
    assert environ["SSL_CLIENT_VERIFY"] == "SUCCESS"
    assert environ["SSL_CLIENT_M_SERIAL"] == "3001"  # 12289
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(srv.port, client_context(pki))  # TLS 1.3 reports the refusal after the client's Finished
    assert echo(srv.port, client_context(pki, "client"))["SSL_CLIENT_S_DN_CN"] == "client-1"
    poll(lambda: "TLS handshake failed" in srv.log(), what="the refusal's info line")


def test_optional_client_certificate(server, pki):
    srv = start_tls(server, pki, "--ca-certs", str(pki / "ca.pem"), "--cert-reqs", "optional")
    assert "SSL_CLIENT_S_DN" not in echo(srv.port, client_context(pki))
    assert echo(srv.port, client_context(pki, "client"))["SSL_CLIENT_S_DN"] == "CN=client-1,O=Example"


def test_one_plain_and_one_tls_listener(server, pki, tmp_path):
    tls_sock = listening_socket()
    plain_path = tmp_path / "plain.sock"
    proc = start_tls(server, pki, "-b", f"unix:{plain_path}", "--tls-bind", f"fd://{tls_sock.fileno()}",
                     sock=tls_sock)
    assert echo(proc.port, client_context(pki))["wsgi.url_scheme"] == "https"
    with socket.socket(socket.AF_UNIX) as conn:
        conn.settimeout(TIMEOUT)
        conn.connect(str(plain_path))
        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        plain = json.loads(ParsedResponse(read_all(conn)).body)
    assert plain["wsgi.url_scheme"] == "http" and "HTTPS" not in plain
    poll(lambda: f"listening at https://127.0.0.1:{proc.port}" in proc.log().replace(f"fd://{tls_sock.fileno()} (", ""),
         what="the TLS listener in the start-up log")


def serial(port: int, context: ssl.SSLContext) -> str:
    with connect(port, context) as conn:
        return conn.getpeercert()["serialNumber"]


def test_certificate_rotates_on_hup_without_a_failed_request(server, pki, tmp_path):
    certfile, keyfile = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki / "server.pem", certfile)
    shutil.copy(pki / "server.key", keyfile)
    srv = server("basic:echo", "-w", "2", "--certfile", str(certfile), "--keyfile", str(keyfile), wait=False)
    context = client_context(pki)
    poll(lambda: srv.proc.poll() is None and _answers(srv.port, context), 15, what="HTTPS answers")
    assert serial(srv.port, context) == "1001"  # 4097
    results = {"ok": 0, "failed": []}
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 60  # bounded even if the test body fails
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                with connect(srv.port, context) as conn:  # verifies whichever certificate is served
                    for i in range(3):  # keep-alive across the reload, too
                        last = b"Connection: close\r\n" if i == 2 else b""
                        conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n" + last + b"\r\n")
                        data = b""
                        while b"}" not in data:
                            chunk = conn.recv(65536)
                            if not chunk:
                                raise ConnectionError(f"closed after {data!r}")
                            data += chunk
                        assert data.startswith(b"HTTP/1.1 200 OK"), data
                        if b"\r\nConnection: close\r\n" in data:
                            break  # a retiring worker's last answer on this connection, as a client honours it
                results["ok"] += 1
            except Exception as exc:  # every failure is counted and shown
                results["failed"].append(repr(exc))

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        poll(lambda: results["ok"] >= 5, what="the load loop to run")
        shutil.copy(pki / "rotated.pem", certfile)
        shutil.copy(pki / "rotated.key", keyfile)
        srv.signal(signal.SIGHUP)
        poll(lambda: serial(srv.port, context) == "2001", 20, what="the rotated certificate (8193)")
        served = results["ok"]
        poll(lambda: results["ok"] >= served + 5, what="more requests after the rotation")
    finally:
        stop.set()
        thread.join(30)
    assert results["failed"] == [], srv.log()
    assert "TLS certificate loaded from" in srv.log()

    # A broken replacement keeps the running certificate, and says why.
    certfile.write_text("not a certificate\n")
    srv.signal(signal.SIGHUP)
    poll(lambda: "TLS reload failed, keeping the running certificate: certfile" in srv.log(), 20,
         what="the failed reload's line")
    poll(lambda: srv.log().count("worker ready") >= 6, 20, what="the third generation")
    assert serial(srv.port, context) == "2001"


def _answers(port: int, context: ssl.SSLContext) -> bool:
    try:
        return get(port, context).status == 200
    except OSError:
        return False


def refused_start(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    return subprocess.run([sys.executable, "-m", "forkserver", "--pythonpath", str(APPS), "basic:hello",
                           "-b", "127.0.0.1:0", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=30)


def test_unreadable_or_mismatched_files_stop_the_start_with_one_line(pki, tmp_path):
    missing = tmp_path / "missing.pem"
    result = refused_start(tmp_path, "--certfile", str(missing), "--keyfile", str(pki / "server.key"))
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.splitlines() == [
        f"forkserver: error: certfile {missing}: cannot read it: No such file or directory"]
    result = refused_start(tmp_path, "--certfile", str(pki / "server.pem"), "--keyfile", str(pki / "client.key"))
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.splitlines() == [
        f"forkserver: error: keyfile {pki / 'client.key'}: the private key does not match the certificate "
        f"in certfile {pki / 'server.pem'}"]
    result = refused_start(tmp_path, "--certfile", str(pki / "server.key"), "--keyfile", str(pki / "server.key"))
    assert result.returncode == EXIT_CONFIG
    assert result.stderr.splitlines() == [f"forkserver: error: certfile {pki / 'server.key'}: no PEM certificate in it"]


def test_tls_on_a_unix_socket_beside_a_plain_tcp_bind(server, pki, tmp_path):
    tls_path = tmp_path / "tls.sock"
    plain = listening_socket()
    srv = server("basic:echo", "-w", "1", "-b", f"fd://{plain.fileno()}", "--tls-bind", f"unix:{tls_path}",
                 "--certfile", str(pki / "server.pem"), "--keyfile", str(pki / "server.key"), sock=plain,
                 workers=1)  # ready: the harness's plain HTTP request on the TCP socket was answered
    raw = socket.socket(socket.AF_UNIX)
    raw.settimeout(TIMEOUT)
    raw.connect(str(tls_path))
    with client_context(pki).wrap_socket(raw, server_hostname="localhost") as conn:
        environ = json.loads(ParsedResponse(exchange(
            conn, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")).body)
    assert environ["wsgi.url_scheme"] == "https" and environ["HTTPS"] == "on"
    poll(lambda: f"listening at unix:{tls_path} (TLS)" in srv.log(), what="the TLS listener in the start-up log")


def test_a_gunicorn_tls_command_line_serves_https_with_only_the_first_word_changed(server, pki):
    srv = start_tls(server, pki, "--ca-certs", str(pki / "ca.pem"), "--cert-reqs", "2", "--ssl-version", "TLSv1_2",
                    "--ciphers", "ECDHE+AESGCM", "--do-handshake-on-connect", "--suppress-ragged-eofs",
                    client="client")
    assert echo(srv.port, client_context(pki, "client"))["SSL_CLIENT_S_DN_CN"] == "client-1"
    tls12 = client_context(pki, "client")
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    with connect(srv.port, tls12) as conn:
        assert conn.version() == "TLSv1.2"
        assert conn.cipher()[0].startswith("ECDHE-") and "GCM" in conn.cipher()[0]
    poll(lambda: "do_handshake_on_connect accepted but not needed" in srv.log(), what="the setting's notice")
