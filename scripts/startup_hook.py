"""``python -m forkserver`` with an audit hook that logs imports, forks and socket calls; for startup_profile.py.

    python3 scripts/startup_hook.py LOG_FILE [forkserver arguments]

Kept apart from scripts/startup_profile.py, and importing nothing that
``python -m forkserver`` would not have imported by then (``runpy`` runs
``-m`` itself), so that every module forkserver imports is logged as its.
Each line: monotonic time, PID, event, module (or ``-``).
"""

import os
import runpy
import sys
import time


def main() -> None:
    log_fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    monotonic, getpid, write = time.monotonic, os.getpid, os.write

    def hook(event: str, args: tuple) -> None:
        if event == "import":
            write(log_fd, f"{monotonic():.6f} {getpid()} import {args[0]}\n".encode())
        elif event == "os.fork" or event.startswith("socket."):
            write(log_fd, f"{monotonic():.6f} {getpid()} {event} -\n".encode())

    write(log_fd, f"{monotonic():.6f} {getpid()} start -\n".encode())
    sys.addaudithook(hook)
    sys.argv = ["forkserver", *sys.argv[2:]]
    runpy.run_module("forkserver", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
