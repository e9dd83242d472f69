"""WSGI apps for scripts/bench.py, served identically by forkserver and gunicorn.

One module, one entry point (``bench_apps:app``), routed on PATH_INFO so a
single server process serves every scenario:

``/``       hello world (13 bytes, Content-Length)
``/64k``    a 64 KiB body in one chunk
``/json``   a Flask view returning ``{"message": "Hello, World!"}``
``/echo``   reads the whole request body and sends it back (1 MiB POST scenario)
``/pid``    hello world plus ``X-Worker-Pid``, for counting requests per worker

The routing is one dict lookup, the same for every server, so it does not
tilt the comparison. Flask is imported at module level for every server, so
startup time and memory include it everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, jsonify

HELLO = b"Hello, World!"
HELLO_HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(HELLO)))]
BIG = b"x" * (64 * 1024)
BIG_HEADERS = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(BIG)))]
READ_CHUNK = 256 * 1024

flask_app = Flask("bench_apps")


@flask_app.route("/json")
def json_view() -> Any:
    return jsonify(message="Hello, World!")


StartResponse = Callable[..., Any]


def hello(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", HELLO_HEADERS)
    return [HELLO]


def big(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", BIG_HEADERS)
    return [BIG]


def echo(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    stream = environ["wsgi.input"]
    try:
        remaining = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        remaining = 0
    chunks = []
    while remaining > 0:
        chunk = stream.read(min(remaining, READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    body = b"".join(chunks)
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(len(body)))])
    return [body]


def pid(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    # os.getpid() per call, not a module constant: workers fork after import
    # when a server preloads the app.
    start_response("200 OK", HELLO_HEADERS + [("X-Worker-Pid", str(os.getpid()))])
    return [HELLO]


ROUTES: dict[str, Callable[..., Iterable[bytes]]] = {
    "/": hello,
    "/64k": big,
    "/json": flask_app.wsgi_app,
    "/echo": echo,
    "/pid": pid,
}


def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
    handler = ROUTES.get(environ.get("PATH_INFO", "/"))
    if handler is None:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "0")])
        return [b""]
    return handler(environ, start_response)


application = app
