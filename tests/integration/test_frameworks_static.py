"""The apps people bring, with static files served beside them by forkserver itself.

A bottle app written the way tutorials write one (module-level ``@route``
decorators, ``default_app()``), and the Flask app and Django project of
``test_frameworks.py``, each served unchanged by ``-w 2 --threads 2
--static /static=./public``, and driven through keep-alive sessions that
mix static and app requests, uploads (chunked too), streaming, conditional
and range requests.  One server per app for the module; nothing mocked.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import socket
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from harness import ServerProcess, read_all
from test_frameworks import (
    PAYLOAD,
    dechunk,
    parse_raw,
    write_django_project,
    write_flask_app,
)
from urllib3 import encode_multipart_formdata

ARGS = ("-w", "2", "--threads", "2", "--static", "/static=./public")
TIMEOUT = 10
CSS = b"/* site styles */\nbody { margin: 0 }\n" * 20
LOGO = bytes(range(256)) * 64  # 16 KiB of "image"
ALARMS = ("app broke PEP 3333", "app raised on", "unexpected error serving", "Traceback")

BOTTLE_APP = '''
"""A bottle app as the tutorials write it."""

import hashlib
import os

from bottle import abort, default_app, get, post, request, response, route, template


@route("/")
def index():
    return "hello from bottle\\n"


@route("/hello/<name>")
def hello(name):
    return template("<b>Hello {{name}}</b>!", name=name)


@get("/api/items/<item_id:int>")
def item(item_id):
    return {"id": item_id, "q": request.query.get("q"), "pid": os.getpid()}


@get("/whoami")
def whoami():
    return {"remote_port": request.environ.get("REMOTE_PORT"), "pid": os.getpid()}


@post("/form")
def form():
    return {"name": request.forms.getunicode("name"), "tags": request.forms.getall("tag")}


@post("/upload")
def upload():
    sent = request.files.get("upload")
    data = sent.file.read()
    return {"filename": sent.raw_filename, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "note": request.forms.get("note")}


@post("/echo")
def echo():
    data = request.body.read()
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@route("/stream")
def stream():
    response.content_type = "text/plain"
    for i in range(int(request.query.n or 5)):
        yield f"bottle line {i}\\n"


@route("/teapot")
def teapot():
    abort(418, "I am a teapot")


app = default_app()
'''


def add_public(directory: Path) -> None:
    public = directory / "public"
    (public / "css").mkdir(parents=True)
    (public / "img").mkdir()
    (public / "css" / "site.css").write_bytes(CSS)
    (public / "css" / "site.css.gz").write_bytes(gzip.compress(CSS))
    (public / "img" / "logo.png").write_bytes(LOGO)
    (public / "index.html").write_bytes(b"<!doctype html><title>static home</title>\n")


def start(args: list[str], workdir: Path, **kwargs) -> ServerProcess:
    srv = ServerProcess(args, workdir, wait=False, **kwargs)
    try:
        srv.wait_ready(workers=2)
    except BaseException:
        srv.stop()
        raise
    return srv


@pytest.fixture(scope="module")
def bottle_server(tmp_path_factory) -> Iterator[ServerProcess]:
    appdir = tmp_path_factory.mktemp("bottle")
    (appdir / "tutorial_app.py").write_text(textwrap.dedent(BOTTLE_APP))
    add_public(appdir)
    srv = start(["tutorial_app:app", *ARGS, "--pythonpath", str(appdir)], appdir, cwd=appdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def flask_server(tmp_path_factory) -> Iterator[ServerProcess]:
    appdir = tmp_path_factory.mktemp("flask-static")
    write_flask_app(appdir)
    add_public(appdir)
    srv = start(["fsflask:app", *ARGS, "--pythonpath", str(appdir)], appdir, cwd=appdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def django_server(tmp_path_factory) -> Iterator[ServerProcess]:
    """The Django project; ./public is found relative to --chdir, as the app is."""
    project = tmp_path_factory.mktemp("django-static")
    write_django_project(project)
    add_public(project)
    workdir = tmp_path_factory.mktemp("django-static-run")
    srv = start(["fsdjango.wsgi:application", *ARGS, "--chdir", str(project)], workdir,
                env={"DJANGO_SETTINGS_MODULE": "fsdjango.settings"})
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def no_server_alarms(request):
    """After each test, fail if its server logged an app error or a traceback meanwhile."""
    servers = [request.getfixturevalue(name) for name in ("bottle_server", "flask_server", "django_server")
               if name in request.fixturenames]
    marks = [(srv, len(srv.log())) for srv in servers]
    yield
    for srv, start_at in marks:
        new = srv.log()[start_at:]
        found = [alarm for alarm in ALARMS if alarm in new]
        assert not found, f"server logged {found} during the test:\n{new[-4000:]}"


def check_static(session: requests.Session, srv: ServerProcess) -> None:
    """The static rules that matter most to a browser, on the session's connection."""
    r = session.get(srv.url + "/static/css/site.css", headers={"Accept-Encoding": "identity"}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.content == CSS
    assert r.headers["Content-Type"] == "text/css; charset=utf-8" and r.headers["Cache-Control"] == "no-cache"
    again = session.get(srv.url + "/static/css/site.css", headers={"If-None-Match": r.headers["ETag"],
                                                                   "Accept-Encoding": "identity"}, timeout=TIMEOUT)
    assert again.status_code == 304 and again.content == b""
    zipped = session.get(srv.url + "/static/css/site.css", headers={"Accept-Encoding": "gzip"}, timeout=TIMEOUT)
    assert zipped.headers["Content-Encoding"] == "gzip" and zipped.content == CSS
    part = session.get(srv.url + "/static/img/logo.png", headers={"Range": "bytes=100-199"}, timeout=TIMEOUT)
    assert part.status_code == 206 and part.content == LOGO[100:200]
    assert part.headers["Content-Type"] == "image/png"
    assert session.get(srv.url + "/static/", timeout=TIMEOUT).text.startswith("<!doctype html>")
    assert session.get(srv.url + "/static/nope.js", timeout=TIMEOUT).status_code == 404


def one_connection(session: requests.Session, srv: ServerProcess, whoami: str) -> None:
    """Static and app requests alternate on one keep-alive connection."""
    ports = set()
    for _ in range(3):
        check_static(session, srv)
        r = session.get(srv.url + whoami, timeout=TIMEOUT)
        assert r.status_code == 200
        ports.add(r.json()["remote_port"])
    assert len(ports) == 1, f"keep-alive connection was not reused: {ports}"


def mixed_load(srv: ServerProcess, app_path: str, app_text: str) -> None:
    """Forty requests at once over several connections, half static, half app."""
    def fetch(i: int) -> bool:
        if i % 2:
            return requests.get(srv.url + "/static/img/logo.png", timeout=TIMEOUT).content == LOGO
        return app_text in requests.get(srv.url + app_path, timeout=TIMEOUT).text
    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(fetch, range(40)))


# -- bottle ---------------------------------------------------------------------------------


def test_bottle_routes_and_static_on_one_connection(bottle_server):
    srv = bottle_server
    with requests.Session() as s:
        assert s.get(srv.url + "/", timeout=TIMEOUT).text == "hello from bottle\n"
        r = s.get(srv.url + "/hello/<script>", timeout=TIMEOUT)
        assert r.text == "<b>Hello &lt;script&gt;</b>!"
        assert s.get(srv.url + "/api/items/7", params={"q": "x y"}, timeout=TIMEOUT).json()["q"] == "x y"
        assert s.get(srv.url + "/api/items/nope", timeout=TIMEOUT).status_code == 404
        assert s.get(srv.url + "/teapot", timeout=TIMEOUT).status_code == 418
        head = s.head(srv.url + "/", timeout=TIMEOUT)
        assert head.status_code == 200 and head.content == b""
        one_connection(s, srv, "/whoami")


def test_bottle_form_and_upload(bottle_server):
    srv = bottle_server
    r = requests.post(srv.url + "/form", data={"name": "Zoë", "tag": ["a", "b&c"]}, timeout=TIMEOUT)
    assert r.json() == {"name": "Zoë", "tags": ["a", "b&c"]}
    r = requests.post(srv.url + "/upload", files={"upload": ("blob.bin", PAYLOAD)}, data={"note": "hi"},
                      timeout=TIMEOUT)
    assert r.json() == {"filename": "blob.bin", "size": len(PAYLOAD),
                        "sha256": hashlib.sha256(PAYLOAD).hexdigest(), "note": "hi"}
    r = requests.post(srv.url + "/echo", data=PAYLOAD, timeout=TIMEOUT)
    assert r.json()["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


def test_bottle_chunked_upload(bottle_server):
    srv = bottle_server
    pieces = (PAYLOAD[i:i + 10000] for i in range(0, len(PAYLOAD), 10000))
    r = requests.post(srv.url + "/echo", data=pieces, timeout=TIMEOUT)
    assert r.status_code == 200, r.text[:300]
    assert r.json() == {"size": len(PAYLOAD), "sha256": hashlib.sha256(PAYLOAD).hexdigest()}


def test_bottle_streaming_response(bottle_server):
    srv = bottle_server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=TIMEOUT) as conn:
        conn.sendall(b"GET /stream?n=4 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, headers, body = parse_raw(read_all(conn))
    assert status == "HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    assert dechunk(body)[0] == b"".join(f"bottle line {i}\n".encode() for i in range(4))


def test_bottle_under_mixed_load(bottle_server):
    mixed_load(bottle_server, "/", "hello from bottle")


# -- Flask ------------------------------------------------------------------------------------


def test_flask_with_static_beside_it(flask_server):
    srv = flask_server
    with requests.Session() as s:
        assert s.get(srv.url + "/", timeout=TIMEOUT).text == "hello from flask\n"
        one_connection(s, srv, "/whoami")
        # Flask's own /static route never sees these: forkserver answered them.
        assert s.get(srv.url + "/json", timeout=TIMEOUT).json()["greeting"] == "hello"


def test_flask_chunked_upload_with_static_configured(flask_server):
    srv = flask_server
    body, content_type = encode_multipart_formdata(
        {"note": "chunked", "file": ("chunked.bin", PAYLOAD, "application/octet-stream")})
    pieces = (body[i:i + 10000] for i in range(0, len(body), 10000))
    with requests.Session() as s:
        check_static(s, srv)
        r = s.post(srv.url + "/upload", data=pieces, headers={"Content-Type": content_type}, timeout=TIMEOUT)
        assert r.status_code == 200
        # Sent chunked; forkserver de-chunks it, so the app sees a Content-Length instead.
        assert r.json()["sha256"] == hashlib.sha256(PAYLOAD).hexdigest() and r.json()["chunked"] is False
        check_static(s, srv)


def test_flask_under_mixed_load(flask_server):
    mixed_load(flask_server, "/", "hello from flask")


# -- Django ---------------------------------------------------------------------------------------


def test_django_csrf_form_upload_and_stream_with_static(django_server):
    srv = django_server
    with requests.Session() as s:
        check_static(s, srv)
        page = s.get(srv.url + "/form/", timeout=TIMEOUT)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
        r = s.post(srv.url + "/form/", data={"csrfmiddlewaretoken": token, "name": "Ada"}, timeout=TIMEOUT)
        assert r.status_code == 200 and r.json() == {"fields": {"name": ["Ada"]}}
        check_static(s, srv)
        r = s.post(srv.url + "/upload/", files={"file": ("data.bin", PAYLOAD, "application/x-test")},
                   data={"note": "beside static"}, headers={"X-CSRFToken": s.cookies["csrftoken"]},
                   timeout=TIMEOUT)
        assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()
        r = s.get(srv.url + "/stream/", params={"n": 20}, timeout=TIMEOUT)
        assert r.headers["Transfer-Encoding"] == "chunked"
        assert r.text == "".join(f"django line {i}\n" for i in range(20))
        assert s.post(srv.url + "/form/", data={"name": "Mallory"}, timeout=TIMEOUT).status_code == 403
        assert s.get(srv.url + "/nope/", timeout=TIMEOUT).status_code == 404
        check_static(s, srv)


def test_django_chunked_upload(django_server):
    srv = django_server
    body, content_type = encode_multipart_formdata({"file": ("chunked.bin", PAYLOAD, "application/x-test")})
    with requests.Session() as s:
        s.get(srv.url + "/form/", timeout=TIMEOUT)
        r = s.post(srv.url + "/upload/", data=(body[i:i + 10000] for i in range(0, len(body), 10000)),
                   headers={"Content-Type": content_type, "X-CSRFToken": s.cookies["csrftoken"]},
                   timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["sha256"] == hashlib.sha256(PAYLOAD).hexdigest()


def test_django_under_mixed_load(django_server):
    mixed_load(django_server, "/", "hello from django")
