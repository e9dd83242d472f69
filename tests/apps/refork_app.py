"""An app for the refork tests: says who serves and who its parent is, and misbehaves on request.

Environment switches, read at import (in the master with preload, else in
each worker): REFORK_APP_THREAD starts a thread, REFORK_APP_SOCKET opens a
socket, the two fork hazards forkserver must report.  The hooks let a test
make workers forked from the mold fail to boot.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

if os.environ.get("REFORK_APP_THREAD"):
    threading.Thread(target=lambda: time.sleep(3600), name="import-time-poller", daemon=True).start()
if os.environ.get("REFORK_APP_SOCKET"):
    IMPORT_TIME_CONNECTION = socket.socketpair()  # stands for a database connection made at import

IMPORTED_IN = os.getpid()  # a worker forked from a mold reports the mold's pid: it never imported us itself
MOLDED = []  # filled in the mold by on_mold; a mold's children inherit it
BALLAST = []  # memory a worker was asked to hold


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/grow":
        BALLAST.append(bytearray(b"\x01") * (int(environ["QUERY_STRING"] or "80") << 20))  # every page touched
    elif path == "/shrink":
        BALLAST.clear()
    body = json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "imported_in": IMPORTED_IN}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def on_mold(context):
    MOLDED.append(context.pid)


def refuse_after_mold(context):
    """post_worker_init: a worker forked from the mold fails to boot; one forked from the master boots."""
    if MOLDED:
        raise RuntimeError("this worker was forked from the mold")
