"""TLS settings: which listeners speak TLS, and the server context the settings describe.

The master builds the context at start, reading the certificate, key and
CA files itself (they are often readable by root alone, and a bad file must
stop the start with one line naming it), and builds it again on HUP so
certificates rotate without a restart; the workers inherit it by fork and
speak through it (``forkserver.worker.tls``).  ``--check-config`` builds it
too, to name a bad file before a start does.

Imported only when TLS is configured: the ``ssl`` import costs a plain
start nothing.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config

CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


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
