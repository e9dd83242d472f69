"""Apps for the connection relay tests (forkserver.relay).

``app``: ``/slow/SECONDS/...`` sleeps that long; every answer names the
worker's pid and the path it answered.

``hostile``: ``/attack`` finds the worker's end of its relay channel (the
one inherited SOCK_SEQPACKET socket) and sends the master what no honest
worker would: bytes that are no offer, an offer whose descriptors are a file,
a pipe and a listening socket, an offer with more descriptors than it counts
or than the master takes, an offer naming a listener that does not exist,
and an oversized record.  It answers how many it sent.
"""

from __future__ import annotations

import array
import json
import os
import socket
import struct
import time

OFFER = struct.Struct("<4sIB")  # as forkserver.relay writes it; spelled out, so a change there shows here


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path.startswith("/slow/"):
        time.sleep(float(path.split("/")[2]))
    body = json.dumps({"pid": os.getpid(), "path": path}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


def _relay_channel() -> socket.socket:
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET:
            return sock
        sock.close()
    raise RuntimeError("no relay channel in this worker")


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], ancillary)


def hostile(environ, start_response):
    sent = 0
    if environ["PATH_INFO"] == "/attack":
        channel = _relay_channel()
        read_end, write_end = os.pipe()
        listener = socket.create_server(("127.0.0.1", 0))
        datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer_a, peer_b = socket.socketpair()
        some_file = os.open("/proc/self/status", os.O_RDONLY)
        attempts = [
            (b"not an offer at all", []),
            (OFFER.pack(b"FSo1", 1, 3) + bytes(3), [some_file, read_end, listener.fileno()]),
            (OFFER.pack(b"FSo1", 2, 1) + bytes(1), [datagram.fileno()]),
            (OFFER.pack(b"FSo1", 3, 1) + bytes(1), [peer_a.fileno(), peer_b.fileno()]),
            (OFFER.pack(b"FSo1", 4, 1) + bytes([200]), [peer_a.fileno()]),
            (OFFER.pack(b"FSo1", 5, 40) + bytes(40), [peer_a.fileno()] * 40),
            (b"\xff" * 100000, []),
        ]
        for data, fds in attempts:
            try:
                _send(channel, data, fds)
                sent += 1
            except OSError:
                pass
        for fd in (some_file, read_end, write_end):
            os.close(fd)
        for sock in (listener, datagram, peer_a, peer_b, channel):
            sock.close()
    body = f"sent {sent}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
