"""bjoern with two workers, for scripts/bench.py: ``python3 scripts/bjoern_server.py FD WORKERS MODULE:APP``.

bjoern is one process serving one socket; its documented way to use more
cores is to import the app, then fork after the socket is listening. So the
app is imported here, in the master, before the workers are forked (as
uWSGI does by default), and each worker runs bjoern's loop on the inherited
socket.
"""

from __future__ import annotations

import importlib
import sys

import bjoern

import prefork


def main() -> None:
    fd, workers, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    module, _, name = target.partition(":")
    app = getattr(importlib.import_module(module), name or "application")
    prefork.run(lambda listener: bjoern.server_run(listener, app), fd, workers)


if __name__ == "__main__":
    main()
