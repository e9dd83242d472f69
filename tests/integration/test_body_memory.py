"""A worker gives back the memory a burst of large request bodies took, once the burst is over.

The loop holds many bodies in memory at once while they arrive (up to
``body_buffer_total``), and glibc keeps the blocks they are freed into in
the middle of its heap: without handing those pages back, a worker stayed
6-12 MiB larger after a burst of uploads, for good.
"""

from __future__ import annotations

import re
import socket
import threading
import time

import psutil

from harness import poll

BODY_BYTES = 1 << 20
CLIENTS = 24  # their bodies all in memory at once: under the default body_buffer_total (32 MiB)
# What a worker may still hold after the burst, over what it held before any
# body: given back, it held under 1 MiB more here; without that, 21-26 MiB.
KEPT_BYTES = 3 << 20
ROUNDS = 2  # requests per client, one after the other


def post(port: int, body: bytes, together: threading.Barrier, echoed: list[bool]) -> None:
    """POST ``body`` ``ROUNDS`` times on one connection; note for each whether it came back whole.

    Each time all but the last KiB is sent, then every client waits for
    the others: the worker holds all their bodies at once, as it does under
    a real burst from many fast clients.
    """
    head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
    shown = b'"body": "%s"' % body  # as basic:echo shows it, in JSON
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        received = b""
        for _ in range(ROUNDS):
            conn.sendall(head + body[:-1024])
            together.wait(30)
            conn.sendall(body[-1024:])
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            answer, _, received = received.partition(b"\r\n\r\n")
            length = int(re.search(rb"\r\nContent-Length: (\d+)", answer).group(1))
            while len(received) < length:
                received += conn.recv(1 << 20)
            echoed.append(answer.startswith(b"HTTP/1.1 200 OK\r\n") and shown in received[:length])
            received = received[length:]


def resident(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def idle(pid: int) -> bool:
    """True once the worker's title says a wait found nothing to do (see Worker._show_idle)."""
    return " idle, " in " ".join(psutil.Process(pid).cmdline())


def test_memory_taken_by_a_burst_of_uploads_is_given_back_once_idle(server):
    srv = server("basic:echo", "-w", "1", workers=1)
    worker = srv.worker_pids()[0]
    body = b"u" * BODY_BYTES
    echoed: list[bool] = []
    poll(lambda: idle(worker), what="the worker to wait idle")  # (after the readiness probe)
    before = resident(worker)
    peak = before
    together = threading.Barrier(CLIENTS)
    clients = [threading.Thread(target=post, args=(srv.port, body, together, echoed), daemon=True)
               for _ in range(CLIENTS)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 60
    while any(client.is_alive() for client in clients) and time.monotonic() < deadline:
        peak = max(peak, resident(worker))
        time.sleep(0.02)
    assert echoed == [True] * (CLIENTS * ROUNDS)
    grown = peak - before
    assert grown > KEPT_BYTES, f"the burst grew the worker by {grown >> 20} MiB only: it does not test the release"
    try:
        poll(lambda: resident(worker) - before < KEPT_BYTES, timeout=15, what="the memory to be given back")
    except AssertionError:
        held = resident(worker) - before
        raise AssertionError(f"after the burst the worker still holds {held >> 20} MiB more than before it") from None
