"""An app that writes to stdout and stderr the ways apps do, for capture_output."""

from __future__ import annotations

import os
import sys

print("printing: imported", flush=True)


def app(environ, start_response):
    """Print the query string (and our PID), write it to descriptor 1 and to sys.stderr, then answer."""
    tag = environ["QUERY_STRING"]
    print(f"printed {tag} pid={os.getpid()}")
    os.write(1, f"raw fd1 {tag}\n".encode())
    sys.stderr.write(f"stderr {tag}\n")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
