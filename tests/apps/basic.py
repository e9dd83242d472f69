"""Fixture WSGI apps for the integration tests, each small and single-purpose.

With FS_TEST_VALIDATE=1 in the server's environment every
well-behaved app here is wrapped in ``wsgiref.validate.validator``, so the
same tests also prove that forkserver drives apps exactly as PEP 3333 says.
"""

from __future__ import annotations

import json
import os
import time
from wsgiref.validate import validator

VALIDATE = os.environ.get("FS_TEST_VALIDATE") == "1"


def checked(app):
    """Wrap ``app`` in wsgiref's validator when the tests ask for it."""
    return validator(app) if VALIDATE else app


def read_body(environ):
    """Read the whole body in sized reads, as PEP 3333 (and the validator) require."""
    stream, parts = environ["wsgi.input"], []
    while True:
        part = stream.read(65536)
        if not part:
            return b"".join(parts)
        parts.append(part)


def _json(start_response, data, status="200 OK"):
    body = json.dumps(data, sort_keys=True).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


@checked
def echo(environ, start_response):
    """Answer with the environ's plain values and the request body, as JSON."""
    body = read_body(environ)
    shown = {k: v for k, v in environ.items() if isinstance(v, (str, bool, int)) and k != "wsgi.input"}
    shown["wsgi.version"] = list(environ["wsgi.version"])
    shown["body"] = body.decode("latin-1")
    shown["pid"] = os.getpid()
    return _json(start_response, shown)


@checked
def hello(environ, start_response):
    body = b"hello, world\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def forks(environ, start_response):
    """On /fork, fork a child that outlives the request, as multiprocessing's "fork" start does.

    The child holds a copy of every descriptor of the worker, the client's
    socket included, and sleeps for QUERY_STRING seconds (default 5).
    Any other path is answered without a fork.
    """
    if environ["PATH_INFO"] != "/fork":
        return _json(start_response, {"child": 0})
    child = os.fork()
    if child == 0:
        time.sleep(float(environ["QUERY_STRING"] or 5))
        os._exit(0)
    return _json(start_response, {"child": child})


@checked
def lines(environ, start_response):
    """Read the body line by line through readline(), and report what came."""
    stream = environ["wsgi.input"]
    got = []
    while True:
        line = stream.readline()
        if not line:
            break
        got.append(line.decode("latin-1"))
    return _json(start_response, {"lines": got})


@checked
def stream(environ, start_response):
    """A generator without Content-Length: chunked on HTTP/1.1, close-delimited on 1.0."""
    start_response("200 OK", [("Content-Type", "text/plain")])

    def parts():
        for i in range(5):
            yield f"part {i}\n".encode()
    return parts()


def write_callable(environ, start_response):
    """The legacy write() callable, then an iterable."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    return [b"returned\n"]


@checked
def slow(environ, start_response):
    """Sleep for ?seconds, then answer, with the proxy queue time the server saw; for timeouts and concurrency."""
    seconds = float(environ.get("QUERY_STRING") or 1)
    time.sleep(seconds)
    return _json(start_response, {"slept": seconds, "pid": os.getpid(),
                                  "queue_time": environ.get("forkserver.queue_time")})


@checked
def pid(environ, start_response):
    return _json(start_response, {"pid": os.getpid()})


def crash(environ, start_response):
    raise RuntimeError("boom from the crash app")


def crash_after_headers(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def parts():
        yield b"first part\n"
        raise RuntimeError("boom in the middle")
    return parts()


def returns_str(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return ["not bytes"]


def bad_status(environ, start_response):
    start_response("OK", [("Content-Type", "text/plain")])
    return [b"x"]


def two_lengths(environ, start_response):
    start_response("200 OK", [("Content-Length", "1"), ("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"xy"]


def informational(environ, start_response):
    """A 1xx status, which only the server may send (QUERY_STRING picks which)."""
    start_response(environ.get("QUERY_STRING").replace("%20", " ") or "101 Switching Protocols", [])
    return [b""]


def hop_by_hop(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "keep-alive")])
    return [b"x"]


@checked
def file_wrapper(environ, start_response):
    """Serve the file named by ?path through wsgi.file_wrapper (sendfile)."""
    path = environ["QUERY_STRING"]
    fh = open(path, "rb")
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](fh, 8192)


class _Closing:
    """An iterable that records its close() call in a file, to prove it happened."""

    def __init__(self, marker, parts, fail):
        self.marker, self.parts, self.fail = marker, parts, fail

    def __iter__(self):
        for part in self.parts:
            yield part
        if self.fail:
            raise RuntimeError("fails while iterating")

    def close(self):
        with open(self.marker, "a") as fh:
            fh.write("closed\n")


def closing(environ, start_response):
    """?MARKER_PATH[&fail]: stream a big body, then close(); proves close() runs on error/disconnect."""
    query = environ["QUERY_STRING"]
    marker, _, mode = query.partition("&")
    start_response("200 OK", [("Content-Type", "text/plain")])
    parts = [b"x" * 65536] * (200 if mode == "big" else 1)
    return _Closing(marker, parts, fail=mode == "fail")


def exc_info_app(environ, start_response):
    """Start a response, then replace it with an error response via exc_info (PEP 3333)."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise ValueError("changed my mind")
    except ValueError:
        import sys
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")], sys.exc_info())
    return [b"unavailable\n"]


def headers_app(environ, start_response):
    """Duplicate response headers and a short Content-Length body."""
    start_response("201 Created", [("Content-Type", "text/plain"), ("Set-Cookie", "a=1"),
                                   ("Set-Cookie", "b=2"), ("Content-Length", "2")])
    return [b"ok"]


_barriers = {}


def barrier(environ, start_response):
    """?N: wait until N requests are inside this app at once (proves threads overlap)."""
    import threading

    parties = int(environ["QUERY_STRING"] or 2)
    gate = _barriers.setdefault(parties, threading.Barrier(parties))
    try:
        gate.wait(timeout=10)
        met = True
    except threading.BrokenBarrierError:
        met = False
    return _json(start_response, {"met": met, "pid": os.getpid()})


@checked
def status(environ, start_response):
    """Answer with the status code given as the query string (default 200)."""
    code = int(environ["QUERY_STRING"] or 200)
    body = b"status %d\n" % code
    start_response(f"{code} Whatever", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
