"""The app each instance of scripts/fleet_sim.py serves: a little work, and the request's queue time.

It answers ``X-Queue-Time`` with ``environ["forkserver.queue_time"]`` (the
seconds since the proxy stamped the request, which forkserver sets for a
trusted peer's ``X-Request-Start``), or ``-`` when the request carried no
usable stamp, so the load client can keep per-request queue times and split
them by phase.  A query of ``ms=N`` makes the request take N milliseconds
(a sleep, standing in for a database call) so that the pool can fill and
queue time can show it.
"""

from __future__ import annotations

import time
from urllib.parse import parse_qs


def app(environ, start_response):
    work = parse_qs(environ.get("QUERY_STRING", "")).get("ms")
    if work:
        time.sleep(float(work[0]) / 1000)
    queued = environ.get("forkserver.queue_time")
    body = environ["wsgi.input"].read()
    reply = b"ok %d\n" % len(body)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(reply))),
                              ("X-Queue-Time", "-" if queued is None else f"{queued:.6f}")])
    return [reply]
