"""An app whose requests move their own deadlines, for the master's timeout check.

``?allow=S`` calls ``environ["forkserver.deadline"].allow(S)``; ``?sleep=S``
then waits S seconds in ``wait_in_app`` (named so an abort's stack shows
where the request was).  The answer says what was granted and what is left.
"""

from __future__ import annotations

import json
import os
import time
from urllib.parse import parse_qs


def wait_in_app(seconds: float) -> None:
    time.sleep(seconds)


def app(environ, start_response):
    query = {key: values[0] for key, values in parse_qs(environ["QUERY_STRING"]).items()}
    deadline = environ["forkserver.deadline"]
    granted = deadline.allow(float(query["allow"])) if "allow" in query else None
    wait_in_app(float(query.get("sleep", 0)))
    body = json.dumps({"pid": os.getpid(), "granted": granted, "remaining": deadline.remaining}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def record_abort(context) -> None:
    """A native worker_abort hook: append the stuck requests to the file ABORT_RECORD names, as JSON lines."""
    with open(os.environ["ABORT_RECORD"], "a") as record:
        for request in context.requests:
            stuck = {"pid": context.pid, "path": request.environ["PATH_INFO"], "elapsed": request.elapsed,
                     "stack": request.stack}
            record.write(json.dumps(stuck) + "\n")
