"""Start real forkserver processes for tests, and always clean them up.

The test binds the listening socket itself (127.0.0.1, port 0) and hands it
to the server as ``--bind fd://N``, so no two tests race for a port number.
Every process is ended by the PID we started, never by name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
READY_TIMEOUT = 15.0
PROBE_READ_TIMEOUT = 4.0  # how long one readiness probe waits for its answer
TERMINAL_DEADLINE = 20.0  # for ``forkserver top`` to draw or quit on a loaded machine
ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def poll(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Return the first truthy value of ``predicate()``, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def listening_socket(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    """Bind a loopback socket on a free port and listen, ready to pass to the server."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def raw_request(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes, return everything it sent."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        conn.sendall(data)
        return read_all(conn)


def read_all(conn: socket.socket) -> bytes:
    """Read until EOF (or a reset, which also ends the answer)."""
    chunks = []
    while True:
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def stop_process_tree(proc: subprocess.Popen, signum: int) -> None:
    """Ask ``proc`` to stop with ``signum``, KILL it after 10 s, then KILL any child left, by PID."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@contextmanager
def serving_in_thread(server: Any, deadline: float = 10.0) -> Iterator[Any]:
    """Run a StatusServer's handle_ready loop in a thread, as the master's poll loop would."""
    stop = threading.Event()

    def loop() -> None:
        poller = select.poll()
        poller.register(server.fileno(), select.POLLIN)
        while not stop.is_set():
            poller.poll(50)
            server.handle_ready()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(deadline)


def kernel_setting(path: Path, absent: str, who: str) -> Iterator[Callable[[str], None]]:
    """Yield ``set(value)`` for a kernel setting file; the value found is written back afterwards.

    For fixtures: skips with ``absent`` when this kernel has no such file,
    and when the file cannot be written here (``who`` may change it).
    """
    if not path.exists():
        pytest.skip(f"{path} is absent: {absent}")
    before = path.read_text().strip()

    def set_value(value: str) -> None:
        try:
            path.write_text(value)
        except OSError as exc:  # not root, or a container's read-only /sys or /proc/sys
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            pytest.skip(f"{path} can be changed only by {who} ({exc.strerror})")

    try:
        yield set_value
    finally:
        if path.read_text().strip() != before:
            path.write_text(before)


class Terminal:
    """``forkserver top`` running in an 80x24 pseudo-terminal that it controls."""

    def __init__(self, address: str, *args: str) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        self.slave = slave
        self.cooked = termios.tcgetattr(slave)
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        env["TERM"] = "xterm"
        argv = [sys.executable, "-m", "forkserver", "top", *args, address]
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - replaced by exec at once
            try:
                os.chdir(ROOT)
                os.login_tty(slave)  # new session, the pty as controlling terminal, fds 0-2
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        self.output = b""

    def read_until(self, predicate: Callable[[bytes], Any], timeout: float = TERMINAL_DEADLINE) -> bytes:
        deadline = time.monotonic() + timeout
        while not predicate(self.output) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    break
        return self.output

    def screen_text(self) -> str:
        return ANSI.sub(b"", self.output).decode("utf-8", "replace")

    def frames(self) -> list[list[str]]:
        """Every screen drawn in full so far, oldest first, as lines of text without escapes."""
        drawn = self.output.split(b"\x1b[H")[1:]
        return [ANSI.sub(b"", frame).decode("utf-8", "replace").split("\r\n")
                for frame in drawn if b"\x1b[0m" in frame]  # the footer's end: the frame is complete

    def wait_exit(self, timeout: float = TERMINAL_DEADLINE) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.read_until(lambda _: False, timeout=0.1)  # keep draining so it never blocks on output
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
        return None

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.master)
        os.close(self.slave)


class ServerProcess:
    """One forkserver master started with ``python -m forkserver``."""

    def __init__(self, args: Sequence[str], workdir: Path, *, sock: socket.socket | None = None,
                 env: dict[str, str] | None = None, ready_path: str = "/", wait: bool = True,
                 cwd: Path | None = None, popen: dict[str, Any] | None = None) -> None:
        self.workdir = workdir
        self.sock = sock if sock is not None else listening_socket()
        self.port = self.sock.getsockname()[1]
        self.ready_path = ready_path
        self.error_log = workdir / f"error-{id(self)}.log"
        self.stdout_path = workdir / f"stdout-{id(self)}.log"
        full_env = dict(os.environ)
        full_env.pop("FORKSERVER_CONFIG", None)
        full_env.update(env or {})
        bind = [] if any(a in ("-b", "--bind") or a.startswith("--bind=") for a in args) \
            else ["-b", f"fd://{self.sock.fileno()}"]
        self.command = [sys.executable, "-m", "forkserver", *bind, "--pythonpath", str(APPS), *args]
        with open(self.stdout_path, "wb") as out, open(self.error_log, "wb") as err:
            self.proc = subprocess.Popen(self.command, stdout=out, stderr=err, env=full_env,
                                         cwd=str(cwd or workdir), pass_fds=(self.sock.fileno(),), **(popen or {}))
        if wait:
            self.wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the server wrote to stderr (its error log by default) so far."""
        return self.error_log.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: {self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(f"GET {self.ready_path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
                # Longer than basic:slow's default second in the app: with a 1 s read
                # timeout the probe raced it and, on a loaded machine, lost every time.
                conn.settimeout(PROBE_READ_TIMEOUT)
                return read_all(conn).startswith(b"HTTP/1.1 ")
        except OSError:
            return False

    def wait_ready(self, workers: int | None = None) -> None:
        """Wait until the server answers and, if given, ``workers`` workers have finished booting."""
        poll(self._answers, READY_TIMEOUT, what="server to answer")
        if workers is not None:
            poll(lambda: len(self.worker_pids()) == workers and not self.booting_pids(), READY_TIMEOUT,
                 what=f"{workers} booted workers")

    def worker_pids(self) -> list[int]:
        """PIDs of the master's direct children."""
        try:
            return sorted(child.pid for child in psutil.Process(self.pid).children())
        except psutil.NoSuchProcess:
            return []

    def booting_pids(self) -> list[int]:
        """PIDs of workers still booting: their title says so until they are ready
        (and, for a moment after the fork, is still the master's).

        Waiting for these matters to any test that changes the app's code
        next: a worker still importing would import the changed code.
        """
        booting = []
        for pid in self.worker_pids():
            try:
                title = " ".join(psutil.Process(pid).cmdline())
            except psutil.NoSuchProcess:
                continue
            # Right after the fork a worker still bears the master's title.
            if " booting" in title or not title.startswith(("forkserver: worker", "forkserver: mold")):
                booting.append(pid)
        return booting

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait_exit(self, timeout: float = 15.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, *, fast: bool = False) -> None:
        """TERM (QUIT if ``fast``), then KILL the master and any worker left, by PID."""
        stop_process_tree(self.proc, signal.SIGQUIT if fast else signal.SIGTERM)
        self.sock.close()


class ParsedResponse:
    """A response read back with llhttp's parser (httptools), as a strict client reads it.

    ``head_request``: the response answers a HEAD, so what follows the head
    is not its body (llhttp cannot know that by itself).
    """

    def __init__(self, data: bytes, head_request: bool = False) -> None:
        import httptools  # the unit tests' need, not the integration tests'

        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = 0
        self.keep_alive = False
        self.parser = httptools.HttpResponseParser(self)
        if head_request:
            head = data.split(b"\r\n\r\n", 1)[0]
            lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(b"content-length")]
            data = b"\r\n".join(lines) + b"\r\nContent-Length: 0\r\n\r\n"
        self.parser.feed_data(data)
        self.status = self.parser.get_status_code()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_message_complete(self) -> None:
        self.complete += 1

    def header(self, name: bytes) -> list[bytes]:
        """The values of every field called ``name``, in any case."""
        return [v for n, v in self.headers if n.lower() == name.lower()]
