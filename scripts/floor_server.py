"""The Python floor for scripts/bench.py: an epoll loop that answers every read with a canned reply.

    python3 scripts/floor_server.py FD [WORKERS]

It parses nothing, builds no environ, calls no app and logs nothing: each
read on a connection is answered with the same bytes. A connection is
closed when the client closes it, or after the reply when the bytes read
contain ``Connection: close`` (a substring test, so that the Connection:
close scenario opens a new connection per request here too). What it
costs per request is what any pure-Python server pays at least (accept,
recv, send, close, epoll), so it is the peer that forkserver's
per-connection overhead is measured against.
FD is an inherited listening socket; WORKERS processes (default 2) are
forked by scripts/prefork.py and share it.
"""

import select, socket, sys  # noqa: E401 - kept short on purpose

import prefork

REPLY = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\nHello, World!"
CLOSE_REPLY = REPLY.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")


def serve(listener: socket.socket) -> None:
    poller, conns = select.epoll(), {}
    poller.register(listener.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:  # another worker took it
                    continue
                conn.setblocking(False)
                conns[conn.fileno()] = conn
                poller.register(conn.fileno(), select.EPOLLIN)
                continue
            conn = conns[fd]
            try:
                data = conn.recv(65536)
                if data and b"Connection: close" not in data:  # a substring test, not a parse
                    conn.send(REPLY)
                    continue
                if data:
                    conn.send(CLOSE_REPLY)
            except BlockingIOError:
                continue
            except OSError:  # reset by the client: closed like an EOF
                pass
            poller.unregister(fd)
            del conns[fd]
            conn.close()


if __name__ == "__main__":
    prefork.run(serve, int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2)
