"""An app that attacks the master from inside a worker: the trust-boundary tests run it as ``nobody``.

``GET /attack?MARKER`` writes, into every pipe the worker inherited for
writing to the master (its stats channel and the shared notice pipe), a
pickle whose ``__reduce__`` would create the file MARKER if anything
unpickled it, then frames of garbage, a frame that claims to be huge, and
notice lines that are torn, overlong or not ASCII.  The worker itself cannot
create MARKER (its directory belongs to root), so the file existing means
code ran in the master.  ``GET /impersonate?PID,PID`` writes notices in other
workers' names.  Any other path answers ``ok`` and the worker's pid.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import signal
import stat
import struct
from urllib.parse import unquote


class CreatesMarker:
    """Unpickled, this calls ``open(marker, "w")``: a file created by whoever unpickles it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _frame(payload: bytes) -> bytes:
    """The framing multiprocessing's ``send_bytes`` (and SimpleQueue.put) uses: a 4-byte length, then the bytes."""
    return struct.pack("!i", len(payload)) + payload


def _pipes_to_the_master() -> list[int]:
    """Inherited write-only pipes, except the worker's own signal wakeup pipe."""
    wakeup = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup)
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if fd == wakeup or not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
                found.append(fd)
        except OSError:
            continue
    return found


def _message_size() -> int:
    """The length of a real stats message, so that garbage of exactly that length reaches validation."""
    try:
        from forkserver.stats import WIRE
    except ImportError:
        return 100
    return WIRE.size


def _attack(marker: str) -> list[str]:
    size = _message_size()
    # Unpickling ignores bytes after the pickle, so padded to a real message's
    # length it reaches whatever decodes messages of that length.
    evil = pickle.dumps(CreatesMarker(marker)).ljust(size, b"\0")
    chunks = [
        _frame(evil),                          # code, if anyone unpickles it
        _frame(b"\xff" * size),                # the right length, nonsense inside
        _frame(b"\x01\x00\x01\x00" + b"\xff" * (size - 4)),  # a valid-looking tag, negative counts
        struct.pack("!i", 1 << 30) + b"xx",    # a frame that claims a GiB
        b"ready \xd9\xa1\xd9\xa2\n",          # digits, but not ASCII ones
        b"\n" + evil + b"\n",
        b"failed 1 2" + b"x" * 20000,          # a notice longer than any real one, torn
    ]
    written = []
    for fd in _pipes_to_the_master():
        for chunk in chunks:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                written.append(f"{fd}: {exc.strerror}")
                break
        else:
            written.append(f"{fd}: written")
    return written


def _impersonate(pids: str) -> list[str]:
    """Tell the master, in other workers' names, that they are recycling."""
    lines = "".join(f"recycle {pid} max_requests=1\n" for pid in pids.split(",")).encode()
    written = []
    for fd in _pipes_to_the_master():
        try:
            os.write(fd, lines)
            written.append(f"{fd}: written")
        except OSError as exc:
            written.append(f"{fd}: {exc.strerror}")
    return written


def app(environ, start_response):
    body = f"ok {os.getpid()}\n".encode()
    if environ["PATH_INFO"] == "/attack":
        body = ("\n".join(_attack(unquote(environ["QUERY_STRING"]))) + "\n").encode()
    elif environ["PATH_INFO"] == "/impersonate":
        body = ("\n".join(_impersonate(environ["QUERY_STRING"])) + "\n").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
