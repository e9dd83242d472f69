"""The app behind nginx, systemd and the container entry point in the deployment tests.

Every answer says which worker gave it (``pid``) and what the request looked
like once it reached the app: the client address and scheme forkserver
settled on, the Host, any forwarding headers that got through as plain
``HTTP_*`` keys, and the body's length and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

PATTERN = bytes(range(256))


def _reply(start_response, status: str, body: bytes, content_type: str = "application/json"):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return [body]


def big_body(size: int) -> bytes:
    """The deterministic body /big?SIZE answers with."""
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def app(environ, start_response):
    path, query = environ["PATH_INFO"], environ["QUERY_STRING"]
    if path == "/healthz":
        # forkserver's --health-path must answer before the app is ever asked.
        return _reply(start_response, "503 Service Unavailable", b"the app answered /healthz\n", "text/plain")
    if path == "/big":
        return _reply(start_response, "200 OK", big_body(int(query or 1 << 20)), "application/octet-stream")
    if path == "/slow":
        time.sleep(float(query or 1))
    stream, parts = environ["wsgi.input"], []
    while True:
        part = stream.read(65536)
        if not part:
            break
        parts.append(part)
    body = b"".join(parts)
    data = {
        "pid": os.getpid(),
        "method": environ["REQUEST_METHOD"],
        "path": path,
        "query": query,
        "remote_addr": environ.get("REMOTE_ADDR", ""),
        "scheme": environ["wsgi.url_scheme"],
        "host": environ.get("HTTP_HOST", ""),
        "content_type": environ.get("CONTENT_TYPE", ""),
        "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
        "queue_time": environ.get("forkserver.queue_time"),
        "body_length": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "listen_env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    return _reply(start_response, "200 OK", json.dumps(data, sort_keys=True).encode())
