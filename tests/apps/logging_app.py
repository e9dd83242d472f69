"""An app for the log rotation tests: it answers with its worker's pid, sleeps on request, and fails on request.

``/`` answers the pid; ``/slow?SECONDS`` sleeps first (a request in flight
across a USR1); ``/boom`` raises, so the worker writes a traceback to the
error log.
"""

from __future__ import annotations

import os
import time


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/boom":
        raise RuntimeError(f"boom from worker {os.getpid()}")
    if path == "/slow":
        time.sleep(float(environ["QUERY_STRING"] or "1"))
    body = f"{os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
