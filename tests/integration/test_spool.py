"""A chunked request body is spooled before the app runs: its limits, and a temporary directory that fills up."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from harness import poll

CHUNK = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def post_chunked(port: int, chunks: int) -> bytes:
    """Send a chunked POST of ``chunks`` 64 KiB chunks while reading the answer; return the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        def send() -> None:
            try:
                conn.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(chunks):
                    conn.sendall(CHUNK)
                conn.sendall(b"0\r\n\r\n")
            except OSError:
                pass  # the server answered and closed before taking it all

        sender = threading.Thread(target=send)
        sender.start()
        answer = b""
        try:
            while piece := conn.recv(65536):
                answer += piece
        except ConnectionResetError:
            answer += b"<reset>"
        sender.join(10)
        return answer


def test_a_full_temporary_directory_is_a_503_not_a_reset(server, small_tmpfs):
    srv = server("basic:echo", "-w", "1", env={"TMPDIR": str(small_tmpfs)})
    answer = post_chunked(srv.port, 48)  # 3 MiB: past the 1 MiB kept in memory, and past the tmpfs
    assert answer.startswith(b"HTTP/1.1 503 "), answer[:200]
    assert b"Connection: close\r\n" in answer and not answer.endswith(b"<reset>")
    poll(lambda: "spooling a request body failed" in srv.log(), what="the log line")
    assert "No space left on device" in srv.log() and "Traceback" not in srv.log()
    assert requests.get(srv.url).status_code == 200  # the worker goes on
    assert list(small_tmpfs.iterdir()) == []  # and the spool file is gone


def test_a_chunked_body_over_limit_request_body_is_a_413(server):
    srv = server("basic:echo", "-w", "1", "--limit-request-body", str(128 * 1024))
    answer = post_chunked(srv.port, 4)
    assert answer.startswith(b"HTTP/1.1 413 ") and not answer.endswith(b"<reset>"), answer[:200]
    assert requests.get(srv.url).status_code == 200
