"""Static files served by a real server: every rule of ``--static`` over real sockets.

A site (``public/``, with a secret file beside it and symlinks pointing in
and out) is built once per module; the main server (``-w 2 --threads 2``,
access log and stats on) is shared by the tests that only read.  Hostile
paths go over raw sockets, since ``requests`` would normalise them first.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from harness import ServerProcess, poll, read_all

SECRET = b"TOP-SECRET-must-never-be-served\n"
BIG = random.Random(7).randbytes(3 * 1024 * 1024 + 123)
CSS = b"body { color: #333 }\n" * 40
JS = b"console.log('hello from a static script');\n" * 30
TIMEOUT = 10


def build_site(base: Path) -> Path:
    """public/ and what lies around it; returns the public directory."""
    root = base / "public"
    for sub in ("css", "docs", "img", "empty"):
        (root / sub).mkdir(parents=True)
    (base / "outside").mkdir()
    (base / "secret.txt").write_bytes(SECRET)
    (base / "outside" / "secret.txt").write_bytes(SECRET)
    (base / "media").mkdir()
    (base / "media" / "photo.jpg").write_bytes(b"\xff\xd8\xff fake jpeg")
    (root / "css" / "site.css").write_bytes(CSS)
    (root / "app.js").write_bytes(JS)
    (root / "app.js.gz").write_bytes(gzip.compress(JS))
    (root / "big.bin").write_bytes(BIG)
    (root / "index.html").write_bytes(b"<h1>home</h1>\n")
    (root / "docs" / "index.html").write_bytes(b"<h1>docs</h1>\n")
    (root / "img" / "logo.svg").write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / ".env").write_bytes(SECRET)
    (root / "link-out").symlink_to(base / "secret.txt")
    (root / "link-out-relative").symlink_to("../secret.txt")
    (root / "linkdir-out").symlink_to(base / "outside")
    (root / "link-etc").symlink_to("/etc")
    (root / "link-in.css").symlink_to("css/site.css")
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    return build_site(tmp_path_factory.mktemp("site"))


def start(tmp_path_factory, site: Path, *args: str) -> ServerProcess:
    workdir = tmp_path_factory.mktemp("run")
    srv = ServerProcess(["basic:hello", "-w", "2", "--threads", "2", *args], workdir, wait=False, cwd=site.parent)
    try:
        srv.wait_ready(workers=2)
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def srv(tmp_path_factory, site) -> Iterator[ServerProcess]:
    """basic:hello behind /static=./public and /media=./media, access log and stats on."""
    stats_sock = tmp_path_factory.mktemp("stats") / "stats.sock"
    proc = start(tmp_path_factory, site, "--static", "/static=./public", "--static", "/media=./media",
                 "--static-cache-control", "/media=public, max-age=3600",
                 "--access-logfile", str(stats_sock.parent / "access.log"), "--stats-bind", f"unix:{stats_sock}")
    proc.stats_sock, proc.access_log = str(stats_sock), str(stats_sock.parent / "access.log")
    try:
        yield proc
    finally:
        proc.stop()


def url(srv: ServerProcess, path: str) -> str:
    return srv.url + path


def raw(srv: ServerProcess, target: str | bytes, method: str = "GET", headers: str = "") -> tuple[int, dict, bytes]:
    """One request over a fresh socket, the target sent byte for byte; (status, headers, body)."""
    if isinstance(target, str):
        target = target.encode("latin-1")
    request = (method.encode() + b" " + target + b" HTTP/1.1\r\nHost: t\r\n" + headers.encode()
               + b"Connection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as conn:
        conn.sendall(request)
        answer = read_all(conn)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), fields, body


# -- plain serving --------------------------------------------------------------------------


def test_file_with_type_length_and_validators(srv, site):
    r = requests.get(url(srv, "/static/css/site.css"), timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == CSS
    assert r.headers["Content-Type"] == "text/css; charset=utf-8"
    assert r.headers["Content-Length"] == str(len(CSS))
    assert r.headers["Last-Modified"] == time.strftime(
        "%a, %d %b %Y %H:%M:%S GMT", time.gmtime((site / "css" / "site.css").stat().st_mtime))
    assert r.headers["ETag"].startswith('"') and r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Cache-Control"] == "no-cache"
    assert r.headers["Server"] == "forkserver"
    assert requests.get(url(srv, "/static/img/logo.svg"), timeout=TIMEOUT).headers["Content-Type"] == "image/svg+xml"
    assert requests.get(url(srv, "/static/link-in.css"), timeout=TIMEOUT).content == CSS


def test_big_file_goes_out_whole(srv):
    r = requests.get(url(srv, "/static/big.bin"), timeout=TIMEOUT)
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(BIG)
    assert hashlib.sha256(r.content).digest() == hashlib.sha256(BIG).digest()


def test_cache_control_per_mapping(srv):
    r = requests.get(url(srv, "/media/photo.jpg"), timeout=TIMEOUT)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    assert r.headers["Cache-Control"] == "public, max-age=3600"


def test_head_has_the_headers_and_no_body(srv):
    status, headers, body = raw(srv, "/static/big.bin", method="HEAD")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(BIG))
    assert "etag" in headers and "last-modified" in headers


def test_app_still_answers_everything_else(srv):
    for path in ("/", "/staticx", "/static.css", "/x/static/css/site.css"):
        assert requests.get(url(srv, path), timeout=TIMEOUT).text == "hello, world\n", path


def test_a_nul_in_an_app_path_is_answered(srv):
    """A decoded %00 once broke the process title update and dropped the request unanswered."""
    status, _, body = raw(srv, "/%00x")
    assert status == 200 and body == b"hello, world\n"
    assert "embedded null" not in srv.log()


def test_missing_file_is_404_and_not_the_app(srv):
    r = requests.get(url(srv, "/static/nope.css"), timeout=TIMEOUT)
    assert r.status_code == 404 and "hello" not in r.text
    assert requests.get(url(srv, "/static/.env"), timeout=TIMEOUT).status_code == 404


def test_other_methods_get_405(srv):
    r = requests.post(url(srv, "/static/app.js"), data=b"x" * 1000, timeout=TIMEOUT)
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"


def test_directory_index_and_redirect(srv):
    assert requests.get(url(srv, "/static/docs/"), timeout=TIMEOUT).text == "<h1>docs</h1>\n"
    r = requests.get(url(srv, "/static/docs?x=1"), allow_redirects=False, timeout=TIMEOUT)
    assert r.status_code == 301 and r.headers["Location"] == "/static/docs/?x=1"
    r = requests.get(url(srv, "/static/docs"), timeout=TIMEOUT)  # requests follows it
    assert r.text == "<h1>docs</h1>\n" and r.url.endswith("/static/docs/")
    assert requests.get(url(srv, "/static"), timeout=TIMEOUT).text == "<h1>home</h1>\n"
    assert requests.get(url(srv, "/static/empty/"), timeout=TIMEOUT).status_code == 404


# -- conditional requests and ranges, with requests ------------------------------------------


def test_etag_and_last_modified_round_trip(srv, site):
    with requests.Session() as s:
        first = s.get(url(srv, "/static/app.js"), headers={"Accept-Encoding": "identity"}, timeout=TIMEOUT)
        etag, modified = first.headers["ETag"], first.headers["Last-Modified"]
        again = s.get(url(srv, "/static/app.js"), headers={"If-None-Match": etag, "Accept-Encoding": "identity"},
                      timeout=TIMEOUT)
        assert again.status_code == 304 and again.content == b""
        assert again.headers["ETag"] == etag and "Content-Length" not in again.headers
        since = s.get(url(srv, "/static/app.js"), headers={"If-Modified-Since": modified,
                                                           "Accept-Encoding": "identity"}, timeout=TIMEOUT)
        assert since.status_code == 304
        other = s.get(url(srv, "/static/app.js"), headers={"If-None-Match": '"nope"',
                                                           "Accept-Encoding": "identity"}, timeout=TIMEOUT)
        assert other.status_code == 200 and other.content == JS
        # Change the file: the old validators no longer match.
        path = site / "docs" / "changing.txt"
        path.write_bytes(b"one\n")
        old = s.get(url(srv, "/static/docs/changing.txt"), timeout=TIMEOUT).headers["ETag"]
        later = time.time() + 5
        path.write_bytes(b"two!\n")
        os.utime(path, (later, later))
        r = s.get(url(srv, "/static/docs/changing.txt"), headers={"If-None-Match": old}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.content == b"two!\n" and r.headers["ETag"] != old


def test_range_requests_round_trip(srv):
    with requests.Session() as s:
        r = s.get(url(srv, "/static/big.bin"), headers={"Range": "bytes=1000-1999"}, timeout=TIMEOUT)
        assert r.status_code == 206 and r.content == BIG[1000:2000]
        assert r.headers["Content-Range"] == f"bytes 1000-1999/{len(BIG)}"
        assert r.headers["Content-Length"] == "1000"
        r = s.get(url(srv, "/static/big.bin"), headers={"Range": "bytes=-100"}, timeout=TIMEOUT)
        assert r.status_code == 206 and r.content == BIG[-100:]
        middle = len(BIG) // 2
        r = s.get(url(srv, "/static/big.bin"), headers={"Range": f"bytes={middle}-"}, timeout=TIMEOUT)
        assert r.status_code == 206 and r.content == BIG[middle:]
        r = s.get(url(srv, "/static/big.bin"), headers={"Range": f"bytes={len(BIG)}-"}, timeout=TIMEOUT)
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(BIG)}"
        r = s.get(url(srv, "/static/big.bin"), headers={"Range": "bytes=0-1,5-6"}, timeout=TIMEOUT)
        assert r.status_code == 200 and len(r.content) == len(BIG)
        etag = r.headers["ETag"]
        r = s.get(url(srv, "/static/big.bin"), headers={"Range": "bytes=0-9", "If-Range": etag}, timeout=TIMEOUT)
        assert r.status_code == 206 and r.content == BIG[:10]
        r = s.get(url(srv, "/static/big.bin"), headers={"Range": "bytes=0-9", "If-Range": '"old"'},
                  timeout=TIMEOUT)
        assert r.status_code == 200 and len(r.content) == len(BIG)
        # The session is still usable after all of that: the framing was right each time.
        assert s.get(url(srv, "/"), timeout=TIMEOUT).text == "hello, world\n"


def test_precompressed_gzip_when_accepted(srv):
    r = requests.get(url(srv, "/static/app.js"), headers={"Accept-Encoding": "gzip"}, timeout=TIMEOUT)
    assert r.headers["Content-Encoding"] == "gzip" and r.headers["Vary"] == "Accept-Encoding"
    assert r.headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert int(r.headers["Content-Length"]) == len(gzip.compress(JS)) != len(JS)
    assert r.content == JS  # requests undid the gzip
    r = requests.get(url(srv, "/static/app.js"), headers={"Accept-Encoding": "br"}, timeout=TIMEOUT)
    assert "Content-Encoding" not in r.headers and r.content == JS  # no .br file exists


def test_keep_alive_and_pipelining_mix_static_and_app(srv):
    requests_ = [b"GET /static/css/site.css HTTP/1.1\r\nHost: t\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
                 b"GET /static/big.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=5-14\r\n\r\n",
                 b"HEAD /static/app.js HTTP/1.1\r\nHost: t\r\n\r\n",
                 b"GET /static/app.js HTTP/1.1\r\nHost: t\r\nIf-None-Match: *\r\n\r\n",
                 b"GET /static/nope HTTP/1.1\r\nHost: t\r\n\r\n",
                 b"GET /static/css/site.css HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"]
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as conn:
        conn.sendall(b"".join(requests_))
        stream = conn.makefile("rb")
        answers = [read_one(stream, head_only=b"HEAD" in r[:4]) for r in requests_]
        assert stream.read() == b""  # closed after the last, nothing extra
    assert [status for status, _, _ in answers] == [200, 200, 206, 200, 304, 404, 200]
    assert answers[0][2] == CSS and answers[1][2] == b"hello, world\n" and answers[2][2] == BIG[5:15]
    assert answers[3][2] == b"" and answers[3][1]["content-length"] == str(len(JS))


def read_one(stream, head_only: bool = False) -> tuple[int, dict, bytes]:
    status = int(stream.readline().split()[1])
    headers = {}
    while (line := stream.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if head_only or status == 304:
        return status, headers, b""
    return status, headers, stream.read(int(headers["content-length"]))


def test_access_log_and_stats_count_static_requests(srv):
    def requests_so_far() -> int:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(srv.stats_sock)
            conn.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return json.loads(read_all(conn).partition(b"\r\n\r\n")[2])["totals"]["requests"]
    before = poll(lambda: requests_so_far() or None, what="a first stats flush")
    marker = f"/static/css/site.css?marker={random.random()}"
    for _ in range(5):
        assert requests.get(url(srv, marker), timeout=TIMEOUT).status_code == 200
    poll(lambda: requests_so_far() >= before + 5, what="5 static requests counted")
    log = Path(srv.access_log)
    line = poll(lambda: next((ln for ln in log.read_text().splitlines() if marker in ln), None),
                what="the access log line")
    assert f'"GET {marker} HTTP/1.1" 200 {len(CSS)}' in line


# -- never outside the root ----------------------------------------------------------------------

# Each is refused before any file is read (404) and logged.  Targets go on the
# wire exactly as written.
HOSTILE = [
    "/static/../secret.txt",
    "/static/css/../../secret.txt",
    "/static/./../secret.txt",
    "/static/%2e%2e/secret.txt",
    "/static/%2E%2E/secret.txt",
    "/static/.%2e/secret.txt",
    "/static/..%2fsecret.txt",
    "/static/..%2Fsecret.txt",
    "/static/%2e%2e%2fsecret.txt",
    "/static/css/..%2f..%2fsecret.txt",
    "/static/css/%2e%2e/%2e%2e/secret.txt",
    "/static/..\\secret.txt",
    "/static/..%5csecret.txt",
    "/static/%2e%2e%5C%2e%2e%5Csecret.txt",
    "/static/%00/../secret.txt",
    "/static/secret.txt%00.css",
    "/static/%2fetc%2fpasswd",
    "/static//etc/passwd",
    "/static/....//secret.txt",
    "/static/link-out",
    "/static/link-out-relative",
    "/static/linkdir-out/secret.txt",
    "/static/link-etc/passwd",
    "http://127.0.0.1/static/../secret.txt",
    "/static/%0d%0aSet-Cookie:%20x=1",
]

# Odd but not an escape: simply not there (404), never the secret.
ODD = [
    "/static/%252e%252e/secret.txt",  # decoded once: a directory literally named %2e%2e
    "/static/%c0%ae%c0%ae/secret.txt",  # overlong UTF-8 dots are just bytes in a name
    "/static/..;/secret.txt",
    "/static/.env",
    "/static/...",
    "/static/secret.txt",
]


def refusals(srv: ServerProcess) -> int:
    return srv.log().count("static path refused")


@pytest.mark.parametrize("target", HOSTILE)
def test_hostile_paths_get_404_and_a_log_line(srv, target):
    before = refusals(srv)
    status, headers, body = raw(srv, target)
    assert status == 404 and SECRET not in body and b"root:" not in body
    assert "set-cookie" not in headers
    poll(lambda: refusals(srv) == before + 1, timeout=5, what="the refusal log line")


@pytest.mark.parametrize("target", ODD)
def test_odd_paths_are_just_missing(srv, target):
    status, _, body = raw(srv, target)
    assert status == 404 and SECRET not in body


def test_symlinks_out_are_served_only_when_asked(tmp_path_factory, site):
    proc = start(tmp_path_factory, site, "--static", "/static=./public", "--static-follow-symlinks")
    try:
        assert requests.get(url(proc, "/static/link-out"), timeout=TIMEOUT).content == SECRET
        assert requests.get(url(proc, "/static/linkdir-out/secret.txt"), timeout=TIMEOUT).content == SECRET
        assert raw(proc, "/static/../secret.txt")[0] == 404  # lexical escapes stay closed
        assert raw(proc, "/static/%2e%2e/secret.txt")[0] == 404
    finally:
        proc.stop()


def test_fallthrough_and_no_index(tmp_path_factory, site):
    proc = start(tmp_path_factory, site, "--static", "/static=./public", "--static-fallthrough",
                 "--no-static-index", "--static-cache-control", "none")
    try:
        assert requests.get(url(proc, "/static/nope.css"), timeout=TIMEOUT).text == "hello, world\n"
        assert requests.post(url(proc, "/static/app.js"), timeout=TIMEOUT).text == "hello, world\n"
        assert requests.get(url(proc, "/static/docs/"), timeout=TIMEOUT).text == "hello, world\n"
        r = requests.get(url(proc, "/static/css/site.css"), timeout=TIMEOUT)
        assert r.content == CSS and "Cache-Control" not in r.headers
        # Escapes are refused, not handed to the app.
        status, _, body = raw(proc, "/static/../secret.txt")
        assert status == 404 and b"hello" not in body
        assert raw(proc, "/static/link-out")[0] == 404
    finally:
        proc.stop()


def test_static_from_a_toml_table(tmp_path_factory, site):
    conf = site.parent / "static.toml"
    conf.write_text('[static]\n"/assets" = "./public"\n"/m" = "./media"\n'
                    '[static_cache_control]\n"/assets" = "public, max-age=60, immutable"\n')
    proc = start(tmp_path_factory, site, "-c", str(conf))
    try:
        r = requests.get(url(proc, "/assets/css/site.css"), timeout=TIMEOUT)
        assert r.content == CSS and r.headers["Cache-Control"] == "public, max-age=60, immutable"
        assert requests.get(url(proc, "/m/photo.jpg"), timeout=TIMEOUT).headers["Cache-Control"] == "no-cache"
    finally:
        proc.stop()


def test_a_missing_static_directory_stops_the_start(server, tmp_path):
    srv = server("basic:hello", "--static", "/static=./does-not-exist", wait=False)
    assert srv.wait_exit() == 78
    lines = srv.log().strip().splitlines()
    assert len(lines) == 1 and "does-not-exist" in lines[0] and "static" in lines[0], lines
