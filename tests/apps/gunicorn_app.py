"""A WSGI app as a gunicorn project has it, answering with what the tests check.

The JSON answer shows the worker's pid and thread mode, the GC_* variables of
its environment (set by raw_env / --env), and the client address and scheme
the server worked out.
"""

from __future__ import annotations

import json
import os


def app(environ, start_response):
    data = {
        "pid": os.getpid(),
        "multithread": environ["wsgi.multithread"],
        "env": {key: value for key, value in os.environ.items() if key.startswith("GC_")},
        "remote": environ.get("REMOTE_ADDR"),
        "scheme": environ["wsgi.url_scheme"],
        "path": environ.get("PATH_INFO"),
    }
    body = json.dumps(data).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


application = app
