"""One small WSGI app for the lifecycle tests and the soak script, routed by path.

Every answer is JSON with the serving worker's ``pid``.  The routes:

* ``/`` or anything else: just the pid (plus ``cwd``, ``uid``/``gid``, ``umask``,
  ``listen_env``, ``systemd_env``: the process facts some tests check).
* ``/slow?SECONDS``: sleep, then answer.
* ``/hang?SECONDS``: the same, under a name that shows in the master's
  "in flight" line when a test hangs a worker on purpose.
* ``/grow?MARKER``: allocate 80 MiB, keep it in a module global (so the
  worker's unique memory stays up), then wait until the file MARKER exists
  (at most 30 s) and answer.
"""

from __future__ import annotations

import json
import os
import time

KEPT: list[bytes] = []
GROW_MIB = 80


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = environ.get("QUERY_STRING", "")
    data = {"pid": os.getpid(), "path": path}
    if path in ("/slow", "/hang"):
        seconds = float(query or 1)
        time.sleep(seconds)
        data["slept"] = seconds
    elif path == "/grow":
        # Non-zero bytes, so every page is really touched and counts in USS.
        KEPT.append(b"\x01" * (GROW_MIB * 1024 * 1024))
        deadline = time.monotonic() + 30
        while query and not os.path.exists(query) and time.monotonic() < deadline:
            time.sleep(0.05)
        data["kept_mib"] = GROW_MIB * len(KEPT)
    else:
        data.update(cwd=os.getcwd(), uid=os.getuid(), gid=os.getgid(), euid=os.geteuid(), egid=os.getegid(),
                    umask=_umask(), listen_env=sorted(k for k in os.environ if k.startswith("LISTEN_")),
                    systemd_env=sorted(k for k in os.environ if k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")))
    body = json.dumps(data).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


application = app
