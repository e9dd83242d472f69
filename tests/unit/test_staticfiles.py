"""forkserver.worker.static without sockets: path rules, conditionals, ranges, variants, and the root's walls.

The decisions are pure functions, tested with plain values.  ``StaticFiles``
is a WSGI callable, so it is driven here directly with an environ over a real
temporary directory (real files, symlinks and FIFOs; nothing is mocked).
"""

from __future__ import annotations

import os
import shutil
import pwd
import tempfile
import time

import pytest

from forkserver.sources import load_config
from forkserver.errors import ConfigError
from forkserver.mounts import Mount, mounts_of
from forkserver.worker.static import (
    Preconditions,
    Refused,
    Representation,
    StaticFiles,
    decide,
    entity_tags,
    http_date,
    parse_http_date,
    parse_range,
    preferred_encodings,
    split_path,
    wrap,
)
from forkserver.worker.wsgi import FileWrapper

MTIME = 1_700_000_000.25  # 2023-11-14T22:13:20.25Z
REP = Representation(size=1000, mtime=MTIME, content_type="text/css; charset=utf-8")

# -- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("rel, segments, wants_dir", [
    (b"", [], False),
    (b"/", [], True),
    (b"/a.css", [b"a.css"], False),
    (b"/img/logo.png", [b"img", b"logo.png"], False),
    (b"/img/", [b"img"], True),
    (b"/%2e%2e", [b"%2e%2e"], False),  # decoded once already: a literal name now
    (b"/..a/b..", [b"..a", b"b.."], False),
    (b"/\xc3\xa9t\xc3\xa9.txt", [b"\xc3\xa9t\xc3\xa9.txt"], False),
])
def test_split_path_accepts(rel, segments, wants_dir):
    assert split_path(rel) == (segments, wants_dir)


@pytest.mark.parametrize("rel", [
    b"/..", b"/../x", b"/a/../b", b"/a/..", b"/.", b"/./a", b"/a/./b", b"//etc/passwd", b"/a//b",
    b"/a\\..\\b", b"/..\\x", b"/a\x00.css", b"/a\x01", b"/a\x7f", b"/a\nb", b"/a/b//",
])
def test_split_path_refuses(rel):
    with pytest.raises(Refused):
        split_path(rel)


# -- content negotiation -----------------------------------------------------------------------


@pytest.mark.parametrize("header, expected", [
    ("", []),
    ("gzip", ["gzip"]),
    ("gzip, deflate, br", ["br", "gzip"]),
    ("br;q=0.5, gzip", ["gzip", "br"]),
    ("gzip;q=0, br;q=0", []),
    ("*", ["br", "gzip"]),
    ("*;q=0.1, gzip;q=0", ["br"]),
    ("identity", []),
    ("GZIP; Q=1.0", ["gzip"]),
    ("gzip;q=nonsense", []),
])
def test_preferred_encodings(header, expected):
    assert preferred_encodings(header) == expected


# -- ranges ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, size, expected", [
    ("bytes=0-99", 1000, (0, 99)),
    ("bytes=100-", 1000, (100, 999)),
    ("bytes=-100", 1000, (900, 999)),
    ("bytes=-5000", 1000, (0, 999)),
    ("bytes=990-5000", 1000, (990, 999)),
    ("bytes= 5-9 ", 1000, (5, 9)),
    ("BYTES=0-0", 1000, (0, 0)),
    ("bytes=1000-", 1000, "unsatisfiable"),
    ("bytes=5000-6000", 1000, "unsatisfiable"),
    ("bytes=-0", 1000, "unsatisfiable"),
    ("bytes=0-", 0, "unsatisfiable"),
    ("bytes=-1", 0, "unsatisfiable"),
    ("bytes=9-5", 1000, None),  # invalid: ignored
    ("bytes=0-1,5-6", 1000, None),  # several: the whole file
    ("bytes=-", 1000, None),
    ("bytes=a-b", 1000, None),
    ("items=0-5", 1000, None),
    ("0-5", 1000, None),
    ("bytes=" + "9" * 30 + "-", 1000, None),
])
def test_parse_range(header, size, expected):
    assert parse_range(header, size) == expected


# -- validators and preconditions ------------------------------------------------------------


def test_http_dates_round_trip_at_second_precision():
    text = http_date(MTIME)
    assert text == "Tue, 14 Nov 2023 22:13:20 GMT"
    assert parse_http_date(text) == int(MTIME)
    assert parse_http_date("Tuesday, 14-Nov-23 22:13:20 GMT") == int(MTIME)  # RFC 850 form
    assert parse_http_date("not a date") is None
    assert parse_http_date("") is None


def test_entity_tag_lists():
    assert entity_tags('"a", W/"b" ,"c"') == [(False, '"a"'), (True, '"b"'), (False, '"c"')]
    assert entity_tags("*") is None
    assert entity_tags("garbage") == []


def test_etag_depends_on_size_time_and_coding():
    gz = Representation(1000, MTIME, "text/css", encoding="gzip")
    assert REP.etag.startswith('"') and REP.etag.endswith('"')
    assert len({REP.etag, gz.etag, Representation(1001, MTIME, "x").etag,
                Representation(1000, MTIME + 1, "x").etag}) == 4


def header(answer, name):
    values = [v for k, v in answer.headers if k.lower() == name.lower()]
    return values[0] if values else None


def test_plain_get_is_200_with_every_validator():
    answer = decide("GET", Preconditions(), REP)
    assert answer.status == "200 OK"
    assert (answer.offset, answer.length) == (0, 1000)
    assert header(answer, "Content-Length") == "1000"
    assert header(answer, "Content-Type") == "text/css; charset=utf-8"
    assert header(answer, "ETag") == REP.etag
    assert header(answer, "Last-Modified") == http_date(MTIME)
    assert header(answer, "Accept-Ranges") == "bytes"
    assert header(answer, "Vary") == "Accept-Encoding"
    assert header(answer, "Content-Encoding") is None
    assert header(answer, "Cache-Control") is None
    cached = Representation(1000, MTIME, "text/css", encoding="br", cache_control="max-age=60")
    answer = decide("GET", Preconditions(), cached)
    assert header(answer, "Content-Encoding") == "br" and header(answer, "Cache-Control") == "max-age=60"


@pytest.mark.parametrize("pre, status", [
    (Preconditions(if_none_match=REP.etag), "304 Not Modified"),
    (Preconditions(if_none_match="W/" + REP.etag), "304 Not Modified"),  # weak comparison
    (Preconditions(if_none_match=f'"other", {REP.etag}'), "304 Not Modified"),
    (Preconditions(if_none_match="*"), "304 Not Modified"),
    (Preconditions(if_none_match='"other"'), "200 OK"),
    (Preconditions(if_modified_since=http_date(MTIME)), "304 Not Modified"),
    (Preconditions(if_modified_since=http_date(MTIME + 3600)), "304 Not Modified"),
    (Preconditions(if_modified_since=http_date(MTIME - 1)), "200 OK"),
    (Preconditions(if_modified_since="yesterday"), "200 OK"),
    # If-None-Match wins over If-Modified-Since (RFC 9110 §13.2.2).
    (Preconditions(if_none_match='"other"', if_modified_since=http_date(MTIME)), "200 OK"),
    (Preconditions(if_match=REP.etag), "200 OK"),
    (Preconditions(if_match="*"), "200 OK"),
    (Preconditions(if_match='"other"'), "412 Precondition Failed"),
    (Preconditions(if_match="W/" + REP.etag), "412 Precondition Failed"),  # strong comparison
    (Preconditions(if_unmodified_since=http_date(MTIME - 10)), "412 Precondition Failed"),
    (Preconditions(if_unmodified_since=http_date(MTIME)), "200 OK"),
])
def test_preconditions(pre, status):
    answer = decide("GET", pre, REP)
    assert answer.status == status
    if status.startswith("304"):
        assert header(answer, "ETag") == REP.etag and header(answer, "Content-Length") is None
        assert answer.length == 0 and answer.body == b""
    assert decide("HEAD", pre, REP).status == status


@pytest.mark.parametrize("pre, status, span", [
    (Preconditions(range="bytes=10-19"), "206 Partial Content", (10, 10, "bytes 10-19/1000")),
    (Preconditions(range="bytes=-10"), "206 Partial Content", (990, 10, "bytes 990-999/1000")),
    (Preconditions(range="bytes=995-"), "206 Partial Content", (995, 5, "bytes 995-999/1000")),
    (Preconditions(range="bytes=1000-"), "416 Range Not Satisfiable", None),
    (Preconditions(range="bytes=0-1,3-4"), "200 OK", (0, 1000, None)),
    (Preconditions(range="bytes=10-19", if_range=REP.etag), "206 Partial Content", (10, 10, "bytes 10-19/1000")),
    (Preconditions(range="bytes=10-19", if_range='"stale"'), "200 OK", (0, 1000, None)),
    (Preconditions(range="bytes=10-19", if_range="W/" + REP.etag), "200 OK", (0, 1000, None)),
    (Preconditions(range="bytes=10-19", if_range=http_date(MTIME)), "206 Partial Content",
     (10, 10, "bytes 10-19/1000")),
    (Preconditions(range="bytes=10-19", if_range=http_date(MTIME - 60)), "200 OK", (0, 1000, None)),
    (Preconditions(range="bytes=10-19", if_none_match=REP.etag), "304 Not Modified", None),
])
def test_ranges(pre, status, span):
    answer = decide("GET", pre, REP)
    assert answer.status == status
    if status.startswith("416"):
        assert header(answer, "Content-Range") == "bytes */1000"
    if span is not None:
        offset, length, content_range = span
        assert (answer.offset, answer.length) == (offset, length)
        assert header(answer, "Content-Length") == str(length)
        assert header(answer, "Content-Range") == content_range


def test_head_ignores_range():
    answer = decide("HEAD", Preconditions(range="bytes=0-9"), REP)
    assert answer.status == "200 OK" and header(answer, "Content-Length") == "1000"


# -- configuration ------------------------------------------------------------------------------------


def test_mounts_from_toml_tables(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('app = "x:y"\n[static]\n"/static/" = "./public"\n"/static/img" = "./img"\n"/" = "./site"\n'
                    '[static_cache_control]\n"/static" = "public, max-age=60"\n"*" = "no-store"\n')
    config = load_config(["-c", str(path)], {}).config
    assert config.static == ("/static/=./public", "/static/img=./img", "/=./site")
    assert mounts_of(config) == [
        Mount("/static/img", "./img", "no-store"),
        Mount("/static", "./public", "public, max-age=60"),
        Mount("", "./site", "no-store"),
    ]


def test_cache_control_entries_keep_their_commas_on_the_command_line_and_in_env():
    config = load_config(["a:b", "--static", "/s=p", "--static", "/t=q", "--static-cache-control",
                          "/s=public, max-age=60", "--static-cache-control", "no-cache, private"], {}).config
    assert [m.cache_control for m in mounts_of(config)] == ["public, max-age=60", "no-cache, private"]
    config = load_config(["a:b"], {"FORKSERVER_STATIC": "/s=p,/t=q",
                                    "FORKSERVER_STATIC_CACHE_CONTROL": "/t=max-age=5, immutable;no-store"}).config
    assert {m.prefix: m.cache_control for m in mounts_of(config)} == {"/s": "no-store",
                                                                      "/t": "max-age=5, immutable"}
    config = load_config(["a:b", "--static", "/s=p", "--static", "/t=q", "--static-cache-control", "/s=none"], {}).config
    assert {m.prefix: m.cache_control for m in mounts_of(config)} == {"/s": None, "/t": "no-cache"}
    config = load_config(["a:b", "--static", "/s=p", "--static-cache-control", "None"], {}).config
    assert mounts_of(config)[0].cache_control is None
    assert mounts_of(load_config(["a:b", "--static", "/s=p"], {}).config)[0].cache_control == "no-cache"


@pytest.mark.parametrize("argv, fragments", [
    (["--static", "static=./p"], ["--static", "'static=./p'", "start with '/'"]),
    (["--static", "/s"], ["'/s'", "PREFIX=DIRECTORY"]),
    (["--static", "/s="], ["'/s='", "name a directory"]),
    (["--static", "/s=a", "--static", "/s/=b"], ["'/s/=b'", "repeat the prefix /s"]),
    (["--static", "/a/../b=x"], ["'/a/../b=x'", "dot segments"]),
    (["--static", "/a b=x"], ["'/a b=x'"]),
    (["--static", "/s=p", "--static-cache-control", "/t=no-cache"], ["'/t=no-cache'", "not a static prefix"]),
    (["--static", "/s=p", "--static-cache-control", "/s=\x01"], ["'/s=\\x01'", "control characters"]),
    (["--reload", "--preload"], ["--reload", "--preload", "cannot be combined"]),
])
def test_bad_static_and_reload_settings_name_the_entry(argv, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(["a:b", *argv], {})
    message = str(info.value)
    assert info.value.exit_code == 78 and "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_toml_table_values_must_be_strings(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('static = {"/s" = 3}\n')
    with pytest.raises(ConfigError, match=r"static entry '/s' must be a string"):
        load_config(["-c", str(path)], {})


def test_wrap_is_the_app_itself_without_mappings():
    def app(environ, start_response):
        return []
    assert wrap(app, load_config(["a:b"], {}).config) is app


# -- StaticFiles over a real directory ------------------------------------------------------------

SECRET = b"TOP-SECRET-outside-the-root\n"


@pytest.fixture
def site(tmp_path):
    """public/ (the root) with files, variants, links in and out; secret.txt beside it."""
    root = tmp_path / "public"
    (root / "css").mkdir(parents=True)
    (root / "docs").mkdir()
    (root / "empty-dir").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "secret.txt").write_bytes(SECRET)
    (tmp_path / "outside" / "secret.txt").write_bytes(SECRET)
    (root / "css" / "site.css").write_bytes(b"body { color: red }\n" * 50)
    (root / "docs" / "index.html").write_bytes(b"<h1>docs</h1>\n")
    (root / "index.html").write_bytes(b"<h1>home</h1>\n")
    (root / "app.js").write_bytes(b"console.log(1)\n")
    (root / "app.js.gz").write_bytes(b"GZ-BYTES")
    (root / "app.js.br").write_bytes(b"BR-BYTES")
    (root / "data.bin").write_bytes(bytes(range(256)) * 4)
    (root / ".env").write_bytes(b"PASSWORD=x\n")
    (root / "empty.txt").write_bytes(b"")
    (root / "link-in.css").symlink_to("css/site.css")
    (root / "linkdir-in").symlink_to("css")
    (root / "link-out").symlink_to(tmp_path / "secret.txt")
    (root / "link-out-relative").symlink_to("../secret.txt")
    (root / "linkdir-out").symlink_to(tmp_path / "outside")
    (root / "link-dangling").symlink_to("nowhere")
    (root / "link-chain").symlink_to("link-out")
    (root / "link-etc").symlink_to("/etc")
    os.mkfifo(root / "fifo")
    return root


def fallback(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"from the app"]


def call(app, path, method="GET", query="", **headers):
    """Run the WSGI callable; return (status code, headers dict, body as a client would get it)."""
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "RAW_URI": path,
               "REMOTE_ADDR": "127.0.0.1", "SERVER_PROTOCOL": "HTTP/1.1"}
    for name, value in headers.items():
        environ["HTTP_" + name.upper()] = value
    seen = {}

    def start_response(status, response_headers, exc_info=None):
        seen["status"], seen["headers"] = status, dict(response_headers)
    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        if hasattr(result, "close"):
            result.close()
    length = seen["headers"].get("Content-Length")
    if isinstance(result, FileWrapper) and length is not None:
        body = body[:int(length)]  # Response.send_file stops at Content-Length
    return int(seen["status"][:3]), seen["headers"], body


def static(root, prefix="/static", **options):
    return StaticFiles(fallback, [Mount(prefix, str(root), "no-cache")], **options)


def test_serves_a_file_with_its_type_length_and_validators(site):
    status, headers, body = call(static(site), "/static/css/site.css")
    assert status == 200 and body == (site / "css" / "site.css").read_bytes()
    assert headers["Content-Type"] == "text/css; charset=utf-8"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Cache-Control"] == "no-cache"
    assert headers["Last-Modified"] == http_date((site / "css" / "site.css").stat().st_mtime)
    assert call(static(site), "/static/data.bin")[1]["Content-Type"] == "application/octet-stream"
    assert call(static(site), "/static/app.js")[1]["Content-Type"] == "text/javascript; charset=utf-8"
    assert call(static(site), "/static/empty.txt")[:3:2] == (200, b"")


def test_other_paths_go_to_the_app(site):
    app = static(site)
    for path in ("/", "/staticfile", "/static.css", "/other/static/x", "//static/css/site.css"):
        assert call(app, path) == (200, {"Content-Type": "text/plain"}, b"from the app"), path


def test_missing_is_404_or_falls_through(site):
    assert call(static(site), "/static/nope.css")[0] == 404
    assert call(static(site, fallthrough=True), "/static/nope.css")[2] == b"from the app"
    assert call(static(site), "/static/css/site.css/")[0] == 404  # a file is no directory
    assert call(static(site), "/static/link-dangling")[0] == 404
    assert call(static(site), "/static/fifo")[0] == 404  # only regular files, and a FIFO never blocks us


def test_methods(site):
    status, headers, _ = call(static(site), "/static/app.js", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    assert call(static(site, fallthrough=True), "/static/app.js", method="DELETE")[2] == b"from the app"
    status, headers, body = call(static(site), "/static/app.js", method="HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == str((site / "app.js").stat().st_size)


def test_directories_index_and_redirect(site):
    assert call(static(site), "/static/docs/")[2] == b"<h1>docs</h1>\n"
    assert call(static(site), "/static/")[2] == b"<h1>home</h1>\n"
    status, headers, _ = call(static(site), "/static/docs", query="a=1")
    assert status == 301 and headers["Location"] == "/static/docs/?a=1"
    status, headers, _ = call(static(site), "/static")
    assert status == 301 and headers["Location"] == "/static/"
    assert call(static(site), "/static/empty-dir/")[0] == 404
    assert call(static(site, index=False), "/static/docs/")[0] == 404
    assert call(static(site, index=False), "/static/docs")[0] == 404
    # A root mount: "/" is the root directory's index.
    assert call(static(site, prefix=""), "/")[2] == b"<h1>home</h1>\n"


def test_an_unreadable_file_is_404():
    """A file the worker may not read is missing to it, not a 500.

    Root reads every file, so when the suite runs as root the check runs in
    a forked child that has dropped to ``nobody`` (as ``--user`` workers do).
    """
    root = tempfile.mkdtemp()
    try:
        os.chmod(root, 0o755)
        locked = os.path.join(root, "locked.txt")
        with open(locked, "wb") as fh:
            fh.write(b"x")
        os.chmod(locked, 0)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                if os.geteuid() == 0:
                    nobody = pwd.getpwnam("nobody")
                    os.setgid(nobody.pw_gid)
                    os.setuid(nobody.pw_uid)
                code = 0 if call(static(root), "/static/locked.txt")[0] == 404 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "an unreadable file was not answered 404"
    finally:
        shutil.rmtree(root)


def test_dotfiles_are_never_served(site):
    assert call(static(site), "/static/.env")[0] == 404
    assert call(static(site, fallthrough=True), "/static/.env")[2] == b"from the app"


def test_precompressed_variants(site):
    app = static(site)
    assert call(app, "/static/app.js", accept_encoding="gzip, br")[2] == b"BR-BYTES"
    status, headers, body = call(app, "/static/app.js", accept_encoding="gzip")
    assert body == b"GZ-BYTES" and headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == "text/javascript; charset=utf-8" and headers["Vary"] == "Accept-Encoding"
    assert headers["Content-Length"] == "8"
    status, headers, body = call(app, "/static/app.js", accept_encoding="identity")
    assert body == b"console.log(1)\n" and "Content-Encoding" not in headers
    assert headers["Vary"] == "Accept-Encoding"
    assert call(app, "/static/css/site.css", accept_encoding="gzip")[1].get("Content-Encoding") is None
    # The .gz itself, asked for by name, is a gzip file, not an encoded script.
    status, headers, body = call(app, "/static/app.js.gz", accept_encoding="gzip")
    assert status == 200 and body == b"GZ-BYTES" and headers["Content-Type"] == "application/gzip"
    assert "Content-Encoding" not in headers
    # A variant older than the file it compresses is stale and ignored.
    old = time.time() - 3600
    os.utime(site / "app.js.br", (old, old))
    os.utime(site / "app.js.gz", (old, old))
    assert call(app, "/static/app.js", accept_encoding="gzip, br")[2] == b"console.log(1)\n"


def test_conditional_and_range_through_the_wsgi_side(site):
    app = static(site)
    status, headers, body = call(app, "/static/data.bin")
    etag, modified = headers["ETag"], headers["Last-Modified"]
    assert call(app, "/static/data.bin", if_none_match=etag)[:3:2] == (304, b"")
    assert call(app, "/static/data.bin", if_modified_since=modified)[0] == 304
    status, headers, part = call(app, "/static/data.bin", range="bytes=256-511")
    assert status == 206 and part == body[256:512] and headers["Content-Range"] == "bytes 256-511/1024"
    status, headers, part = call(app, "/static/data.bin", range="bytes=-3")
    assert part == body[-3:]
    status, headers, _ = call(app, "/static/data.bin", range="bytes=5000-")
    assert status == 416 and headers["Content-Range"] == "bytes */1024"


def test_symlinks_inside_the_root_are_followed(site):
    app = static(site)
    assert call(app, "/static/link-in.css")[0] == 200
    assert call(app, "/static/linkdir-in/site.css")[0] == 200


HOSTILE = [
    "/static/../secret.txt",
    "/static/css/../../secret.txt",
    "/static/./../secret.txt",
    "/static/..",
    "/static/..\\secret.txt",
    "/static/css\\..\\..\\secret.txt",
    "/static/\x00../secret.txt",
    "/static/secret.txt\x00.css",
    "/static//secret.txt",
    "/static/link-out",
    "/static/link-out-relative",
    "/static/link-chain",
    "/static/linkdir-out/secret.txt",
    "/static/link-etc/passwd",
    "/static/link-etc/hostname",
]


@pytest.mark.parametrize("path", HOSTILE)
def test_nothing_outside_the_root(site, path, caplog):
    for app in (static(site), static(site, fallthrough=True)):
        status, _, body = call(app, path)
        assert status == 404 and SECRET not in body and b"root:" not in body
    assert "static path refused" in caplog.text


@pytest.mark.parametrize("path", ["/static/link-out", "/static/linkdir-out/secret.txt"])
def test_follow_symlinks_lets_links_out(site, path):
    assert call(static(site, follow_symlinks=True), path)[2] == SECRET
    # Lexical escapes stay refused even then.
    assert call(static(site, follow_symlinks=True), "/static/../secret.txt")[0] == 404


def test_a_root_that_is_itself_a_symlink_works(site, tmp_path):
    (tmp_path / "alias").symlink_to(site)
    assert call(static(tmp_path / "alias"), "/static/css/site.css")[0] == 200
    assert call(static(tmp_path / "alias"), "/static/link-out")[0] == 404


def test_a_rebuilt_root_is_picked_up(site, tmp_path):
    app = static(site)
    site.rename(tmp_path / "old-public")
    site.mkdir()
    (site / "fresh.txt").write_bytes(b"fresh\n")
    assert call(app, "/static/fresh.txt")[2] == b"fresh\n"
    assert call(app, "/static/app.js")[0] == 404


def test_missing_root_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="static directory"):
        StaticFiles(fallback, [Mount("/s", str(tmp_path / "nope"))])


def test_swapping_a_directory_for_a_symlink_after_a_check_cannot_leak(site, tmp_path):
    """The file is opened and checked as one descriptor, so a swapped path component serves nothing outside."""
    app = static(site)
    for _ in range(20):
        (site / "css").rename(site / "css-real")
        (site / "css").symlink_to(tmp_path / "outside")
        status, _, body = call(app, "/static/css/secret.txt")
        assert status == 404 and SECRET not in body
        (site / "css").unlink()
        (site / "css-real").rename(site / "css")
        assert call(app, "/static/css/site.css")[0] == 200


def test_a_path_that_is_not_latin1_safe_still_resolves(site):
    (site / "\u00e9t\u00e9.txt").write_bytes(b"summer\n")
    path = "/static/" + "\u00e9t\u00e9".encode().decode("latin-1") + ".txt"  # how PATH_INFO carries it
    assert call(static(site), path)[2] == b"summer\n"


def test_content_type_table(site):
    app = static(site)
    for name, kind in [("a.html", "text/html; charset=utf-8"), ("a.svg", "image/svg+xml"),
                       ("a.woff2", "font/woff2"), ("a.wasm", "application/wasm"), ("a.PNG", "image/png"),
                       ("a.json", "application/json"), ("noext", "application/octet-stream"),
                       (".hidden.css", "text/css; charset=utf-8")]:
        assert app.content_type(name.encode()) == kind, name


def test_longest_prefix_wins(site, tmp_path):
    other = tmp_path / "img"
    other.mkdir()
    (other / "site.css").write_bytes(b"from img\n")
    app = StaticFiles(fallback, [Mount("/static", str(site)), Mount("/static/css", str(other))])
    assert call(app, "/static/css/site.css")[2] == b"from img\n"
    assert call(app, "/static/app.js")[0] == 200
