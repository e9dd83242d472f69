"""A fixture app that reports what its worker process may do, for the privilege-drop tests."""

from __future__ import annotations

import json
import os


def application(environ, start_response):
    """Answer with the worker's ids and groups; 403 when it cannot read the file FS_TEST_SECRET names.

    The status is the app's honest report of what its own open() said, so
    the test sees exactly what app code in the worker is allowed to read.
    """
    report = {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}
    try:
        with open(os.environ["FS_TEST_SECRET"], "rb") as fh:
            report["secret"] = fh.read().decode()
        status = "200 OK"
    except PermissionError as exc:
        report["error"] = exc.strerror
        status = "403 Forbidden"
    body = json.dumps(report).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
