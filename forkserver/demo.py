"""The demo app served by ``conf/forkserver.toml``: a hello page and an echo page.

``/`` says hello; ``/echo`` answers with the request's environ and body as
JSON, which is handy for checking what a proxy in front of forkserver sends.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

HELLO = b"""<!doctype html>
<title>forkserver</title>
<h1>Hello from forkserver</h1>
<p>This is the demo app. See <a href="/echo">/echo</a> for what your request looked like.</p>
"""


def _echo(environ: dict[str, Any]) -> bytes:
    body = environ["wsgi.input"].read()
    shown = {k: v for k, v in environ.items() if isinstance(v, (str, int, bool))}
    shown["body"] = body.decode("utf-8", "replace")
    return json.dumps(shown, indent=2, sort_keys=True).encode() + b"\n"


def application(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A plain WSGI app: no framework, so it starts in milliseconds."""
    path = environ.get("PATH_INFO", "/")
    if path == "/":
        body, content_type, status = HELLO, "text/html; charset=utf-8", "200 OK"
    elif path == "/echo":
        body, content_type, status = _echo(environ), "application/json", "200 OK"
    else:
        body, content_type, status = b"not found\n", "text/plain; charset=utf-8", "404 Not Found"
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]
