"""A body on its way over TCP waits in the kernel until it is all in; the app then reads it from the socket.

The loop is not woken for every piece of it (the socket's receive
low-water mark), and copies none of it into pieces of its own.  What the
kernel holds for a socket is in /proc/net/tcp (``rx_queue``), so the tests
watch the server's side of the connection there.  A body that does not
come in whole soon is read as it arrives again, so the body rules still
see its progress (the trickler tests in test_slow_bodies.py), and a stall
still ends the connection.
"""

from __future__ import annotations

import json
import socket
import time

from harness import poll

BODY_BYTES = 1 << 20
SENT_FIRST = 600 * 1024  # of the body, before the client pauses
HEAD = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % BODY_BYTES
# The loop reads the head with up to 64 KiB of what follows it, and leaves
# the rest in the kernel: far more than this, unless it read on.
LEFT_IN_KERNEL = 400 * 1024


def unread(server_port: int, client_port: int) -> int:
    """Bytes the kernel holds unread for the server's side of this loopback connection (-1: not found)."""
    local, remote = f":{server_port:04X}", f":{client_port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(local) and fields[2].endswith(remote):
                return int(fields[4].split(":")[1], 16)
    return -1


def answer_of(conn: socket.socket) -> dict:
    """Read one response with a Content-Length and return its JSON body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += conn.recv(length - len(body))
    return json.loads(body)


def test_a_body_waits_in_the_kernel_until_it_is_all_in_then_reaches_the_app_whole(server):
    srv = server("basic:echo", "-w", "1", "--keepalive", "30")
    body = bytes(range(256)) * (BODY_BYTES // 256)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as conn:
        client_port = conn.getsockname()[1]
        conn.sendall(HEAD + body[:SENT_FIRST])
        sent = len(HEAD) + SENT_FIRST
        # Once the loop has read the head, the rest stays where it is.
        poll(lambda: LEFT_IN_KERNEL < unread(srv.port, client_port) < sent, what="the head read, the body left")
        time.sleep(0.3)  # (well within the second a body may wait so)
        assert unread(srv.port, client_port) > LEFT_IN_KERNEL, "the loop read the body as it came"
        conn.sendall(body[SENT_FIRST:])
        echoed = answer_of(conn)
        assert echoed["body"].encode("latin-1") == body
        # The next request on the connection is not held back by the mark.
        conn.sendall(b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        conn.settimeout(5)
        assert answer_of(conn)["PATH_INFO"] == "/next"


def test_a_body_that_stalls_while_it_waits_in_the_kernel_still_times_out(server):
    srv = server("basic:echo", "-w", "1", "--body-timeout", "1", "--body-min-rate", "0")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=15) as conn:
        conn.sendall(HEAD + b"x" * SENT_FIRST)
        # Closed without an answer, as a stall the loop reads piece by piece
        # is (seen late by at most the second the body may wait in the kernel).
        assert conn.recv(65536) == b""
    poll(lambda: "body timeout: no progress for 1s" in srv.log(), what="the log line")
