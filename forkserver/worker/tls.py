"""TLS termination in a worker: connections that speak through the context the master built.

The context comes from the settings (``forkserver.tlscontext``), built by
the master and inherited by fork.  A TLS connection's handshake runs in the worker's event loop like the rest
of its life: ``handshake`` advances it as far as the bytes at hand allow and
says what to wait for, so a client that stalls or sends garbage holds a
descriptor until the header timeout, never a worker.  Once it is done, a
``TLSConnection`` moves bytes as a plain ``Connection`` does, through the
SSL socket: ``sendmsg`` and ``sendfile`` do not exist there, and decrypted
bytes the SSL layer holds are taken before the loop waits on epoll.

This module is imported only when TLS is configured: the ``ssl`` import
costs a plain start nothing.
"""

from __future__ import annotations

import os
import select
import ssl
from collections.abc import Sequence
from typing import Any

from .connection import Connection

# Bytes read from a file per send over TLS, where sendfile cannot encrypt:
# large enough that the pread and the encryption, not the calls, dominate.
FILE_CHUNK_BYTES = 256 * 1024
# Deferred responses up to this size are joined and sent as one write (one
# TLS record run, one system call); larger ones go part by part, uncopied.
JOIN_BYTES = 256 * 1024
# What nginx answers a plain HTTP request on a TLS port with, in plain text:
# the client learns what went wrong instead of seeing a reset.
PLAIN_HTTP_REFUSAL = b"The plain HTTP request was sent to an HTTPS port.\n"
PLAIN_HTTP_ANSWER = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                     b"Connection: close\r\n\r\n%s" % (len(PLAIN_HTTP_REFUSAL), PLAIN_HTTP_REFUSAL))
EPOLL_READ = select.EPOLLIN | select.EPOLLRDHUP
EPOLL_WRITE = select.EPOLLOUT | select.EPOLLRDHUP


class HandshakeFailed(Exception):
    """The client's handshake cannot succeed; the message says why, for the log."""


def peer_environ(sock: ssl.SSLSocket) -> dict[str, str]:
    """The environ keys of an established TLS connection, named as Apache's mod_ssl names them.

    The client certificate's keys appear only when the client presented one
    that verified against ``ca_certs``.
    """
    environ = {"HTTPS": "on", "SSL_PROTOCOL": sock.version() or ""}
    cipher = sock.cipher()
    if cipher:
        environ["SSL_CIPHER"] = cipher[0]
    cert = sock.getpeercert()
    if cert:
        subject = cert.get("subject", ())
        environ["SSL_CLIENT_VERIFY"] = "SUCCESS"
        environ["SSL_CLIENT_S_DN"] = distinguished_name(subject)
        environ["SSL_CLIENT_I_DN"] = distinguished_name(cert.get("issuer", ()))
        for rdn in subject:
            for key, value in rdn:
                if key == "commonName":
                    environ["SSL_CLIENT_S_DN_CN"] = value
        if "serialNumber" in cert:
            environ["SSL_CLIENT_M_SERIAL"] = cert["serialNumber"]
        if "notAfter" in cert:
            environ["SSL_CLIENT_V_END"] = cert["notAfter"]
    return environ


SHORT_NAMES = {"commonName": "CN", "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST",
               "organizationName": "O", "organizationalUnitName": "OU", "emailAddress": "emailAddress",
               "domainComponent": "DC", "streetAddress": "STREET", "userId": "UID"}


def distinguished_name(rdns: Sequence[Sequence[tuple[str, str]]]) -> str:
    """A name as RFC 4514 writes it (most specific first, ``CN=client,O=Example``), as nginx and Apache do."""
    parts = []
    for rdn in reversed(rdns):
        parts.append("+".join(f"{SHORT_NAMES.get(key, key)}={_escape_dn(value)}" for key, value in rdn))
    return ",".join(parts)


def _escape_dn(value: str) -> str:
    escaped = "".join("\\" + c if c in ',+"\\<>;=' else c for c in value)
    if escaped.startswith((" ", "#")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped


class TLSConnection(Connection):
    """A connection over TLS: the handshake first, then a plain connection's I/O through the SSL socket.

    ``handshaking`` holds until the handshake is done; ``wants_write`` says
    the handshake waits for the socket to take bytes rather than to bring
    some (the loop then watches for that instead).
    """

    would_block = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)

    def __init__(self, sock: ssl.SSLSocket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        self.handshaking = True
        self.wants_write = False

    def handshake(self) -> bool:
        """Advance the handshake with what has arrived; True once it is done.

        Raises:
            HandshakeFailed: the client is gone, speaks plain HTTP (answered
                as nginx does), or sent something that is not a TLS handshake.
        """
        sock = self.sock
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.wants_write = False
            return False
        except ssl.SSLWantWriteError:
            self.wants_write = True
            return False
        except ssl.SSLError as exc:
            if exc.reason == "HTTP_REQUEST":
                try:
                    os.write(self.fd, PLAIN_HTTP_ANSWER)  # under TLS, in the clear: nothing was encrypted yet
                except OSError:
                    pass
                raise HandshakeFailed("plain HTTP sent to a TLS port: answered 400") from None
            if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                raise HandshakeFailed("client closed during the handshake") from None
            raise HandshakeFailed(exc.reason or exc.strerror or str(exc)) from None
        except OSError as exc:
            raise HandshakeFailed(exc.strerror or str(exc)) from None
        self.handshaking = self.wants_write = False
        self.base_environ = {**self.base_environ, **peer_environ(sock)}
        return True

    def mid_request(self) -> bool:
        return self.handshaking or super().mid_request()

    def receive(self) -> bool:
        """Read what has arrived, and all the SSL layer decrypted with it, into the exchange.

        The loop waits on epoll next, which cannot see bytes already
        decrypted and held by OpenSSL: they are taken now.
        """
        alive = super().receive()
        while alive and self.sock.pending():
            alive = super().receive()
        return alive

    def next_is_request(self) -> bool:
        if self.sock.pending():  # a pipelined request, decrypted while a body was read
            self.receive()
        return self.exchange.next_is_request()

    def _wait_blocked(self, exc: OSError, event: int) -> None:
        """OpenSSL may need to write to go on reading, or to read to go on writing: wait for what it says."""
        if isinstance(exc, ssl.SSLWantWriteError):
            event = select.POLLOUT
        elif isinstance(exc, ssl.SSLWantReadError):
            event = select.POLLIN
        self._wait(event)

    def _send_all(self, parts: Sequence[bytes], size: int) -> None:
        """Send ``parts`` in order; an SSL socket has no sendmsg, so small ones are joined first.

        OpenSSL writes all or nothing here, and a write that would block must
        be retried with the same bytes, which is what ``_send_rest`` does.
        """
        if len(parts) > 1 and size <= JOIN_BYTES:
            parts = (b"".join(parts),)
        self._send_rest(parts, 0)

    def sendfile(self, in_fd: int, offset: int, count: int) -> int:
        """Send up to ``count`` bytes of a file: read and encrypted here, as the kernel cannot."""
        if self.unsent:
            self.flush()
        chunk = os.pread(in_fd, min(count, FILE_CHUNK_BYTES), offset)
        self._send_rest((chunk,), 0)
        return len(chunk)
