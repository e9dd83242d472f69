"""Server hooks for the lifecycle tests: each call appends one JSON line to a file.

The file is named by ``$LIFECYCLE_HOOK_LOG``.  Each line records the hook's
name, the process it ran in (and that process's parent), and what the
HookContext said.  ``$LIFECYCLE_HOOK_RAISE`` names a hook that raises instead.
"""

from __future__ import annotations

import json
import os
import sys


def _record(name: str, context) -> None:
    line = {
        "hook": name,
        "os_pid": os.getpid(),
        "os_ppid": os.getppid(),
        "context_type": type(context).__name__,
        "pid": getattr(context, "pid", None),
        "slot": getattr(context, "slot", None),
        "generation": getattr(context, "generation", None),
        "workers": getattr(getattr(context, "config", None), "workers", None),
        # Whether this process has the worker's code (and HTTP's) loaded: the
        # master must, before it forks, for the workers to share it.
        "worker_code_loaded": all(name in sys.modules for name in ("forkserver.worker", "forkserver.http.exchange")),
        "static_code_loaded": "forkserver.worker.static" in sys.modules,
    }
    path = os.environ.get("LIFECYCLE_HOOK_LOG")
    if path:
        # One write on an O_APPEND descriptor: lines from many processes never mix.
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)
    if os.environ.get("LIFECYCLE_HOOK_RAISE") == name:
        raise RuntimeError(f"{name} refuses on purpose")


def on_starting(context):
    _record("on_starting", context)


def when_ready(context):
    _record("when_ready", context)


def pre_fork(context):
    _record("pre_fork", context)


def post_fork(context):
    _record("post_fork", context)


def post_worker_init(context):
    _record("post_worker_init", context)


def worker_int(context):
    _record("worker_int", context)


def worker_exit(context):
    _record("worker_exit", context)


def on_reload(context):
    _record("on_reload", context)


def on_exit(context):
    _record("on_exit", context)
