"""TLS termination: the server context built from the settings, and connections that speak through it.

The master builds the context at start, reading the certificate, key and
CA files itself (they are often readable by root alone, and a bad file must
stop the start with one line naming it), and builds it again on HUP so
certificates rotate without a restart; the workers inherit it by fork.

A TLS connection's handshake runs in the worker's event loop like the rest
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
from typing import TYPE_CHECKING, Any

from .connection import Connection
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..config import Config

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
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


def serves_tls(config: Config, address: str) -> bool:
    """Does the listener bound from ``address`` speak TLS: one of ``tls_bind``, or any at all without it?

    (Any at all: sockets systemd hands over are named after its units, not a bind address.)
    """
    return bool(config.certfile) and (not config.tls_bind or address in config.tls_bind)


def listen_addresses(config: Config) -> tuple[str, ...]:
    """Every address to listen on: ``bind`` (unless left at its default beside ``tls_bind``), then ``tls_bind``."""
    plain = () if config.tls_bind and config.source_of("bind") == "default" else config.bind
    return tuple(dict.fromkeys((*plain, *config.tls_bind)))


def _refuse_password(*_: Any) -> bytes:
    """An encrypted key would make OpenSSL prompt on the terminal; answer for the operator, wrongly."""
    return b""


def _read_check(setting: str, path: str) -> None:
    """Fail with one line naming the file if it cannot be read at all."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: cannot read it: {exc.strerror}") from None


def _pem_has(path: str, marker: bytes) -> bool:
    with open(path, "rb") as fh:
        return marker in fh.read()


def build_context(config: Config) -> ssl.SSLContext:
    """The server context the settings describe, every file read and checked now.

    Built in the master, so every worker inherits one context: the key that
    encrypts session tickets with it, so a client resumes its session with
    whichever worker takes its next connection (until the next HUP).

    Raises:
        ConfigError: one line naming the setting and file (or value) at fault.
    """
    certfile, keyfile = config.certfile, config.keyfile or None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MIN_VERSIONS[config.tls_min_version]
    _read_check("certfile", certfile)
    if keyfile:
        _read_check("keyfile", keyfile)
    try:
        context.load_cert_chain(certfile, keyfile, password=_refuse_password)
    except ssl.SSLError as exc:
        raise ConfigError(_chain_problem(certfile, keyfile, exc)) from None
    if config.ca_certs:
        _read_check("ca_certs", config.ca_certs)
        try:
            context.load_verify_locations(cafile=config.ca_certs)
        except ssl.SSLError as exc:
            raise ConfigError(f"ca_certs {config.ca_certs}: not a PEM file of CA certificates "
                              f"({exc.reason or exc})") from None
    context.verify_mode = CERT_REQS[config.cert_reqs]
    if config.ciphers:
        try:
            context.set_ciphers(config.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"ciphers {config.ciphers!r}: OpenSSL knows no cipher of that list") from None
    context.set_alpn_protocols(["http/1.1"])
    # A client must not make a worker redo the costly part of a handshake at will.
    context.options |= ssl.OP_NO_RENEGOTIATION
    return context


def _chain_problem(certfile: str, keyfile: str | None, exc: ssl.SSLError) -> str:
    """Name the file that ``load_cert_chain`` choked on, as well as OpenSSL lets us tell."""
    if exc.reason == "KEY_VALUES_MISMATCH":
        return f"keyfile {keyfile or certfile}: the private key does not match the certificate in certfile {certfile}"
    if not _pem_has(certfile, b"-----BEGIN CERTIFICATE-----"):
        return f"certfile {certfile}: no PEM certificate in it"
    keyholder = keyfile or certfile
    if not _pem_has(keyholder, b"PRIVATE KEY-----"):
        return f"{'keyfile' if keyfile else 'certfile'} {keyholder}: no PEM private key in it"
    if _pem_has(keyholder, b"ENCRYPTED"):
        return f"{'keyfile' if keyfile else 'certfile'} {keyholder}: the private key is encrypted; give it unencrypted"
    return f"certfile {certfile}{f' / keyfile {keyfile}' if keyfile else ''}: OpenSSL refused them ({exc.reason or exc})"


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
