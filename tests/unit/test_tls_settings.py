"""TLS helpers that need no socket: names as the app sees them, and which addresses speak TLS."""

from __future__ import annotations

from forkserver.sources import load_config
from forkserver.tlscontext import listen_addresses, serves_tls
from forkserver.worker.tls import distinguished_name


def config(*argv: str):
    return load_config(["app:app", *argv], {}, "/").config


def test_a_subject_is_written_most_specific_first_with_rfc4514_escapes():
    subject = ((("countryName", "DE"),), (("organizationName", "Example, Inc."),),
               (("commonName", "#1 client"), ("userId", "u=7")))
    assert distinguished_name(subject) == "CN=\\#1 client+UID=u\\=7,O=Example\\, Inc.,C=DE"
    assert distinguished_name(((("commonName", "trailing "),),)) == "CN=trailing\\ "


def test_certfile_alone_makes_every_bind_tls():
    settings = config("--certfile", "/c.pem", "-b", "127.0.0.1:8443", "-b", "unix:/run/a.sock")
    assert serves_tls(settings, "127.0.0.1:8443") and serves_tls(settings, "unix:/run/a.sock")
    assert listen_addresses(settings) == ("127.0.0.1:8443", "unix:/run/a.sock")


def test_tls_bind_beside_a_plain_bind():
    settings = config("--certfile", "/c.pem", "-b", "unix:/run/plain.sock", "--tls-bind", "0.0.0.0:8443")
    assert serves_tls(settings, "0.0.0.0:8443") and not serves_tls(settings, "unix:/run/plain.sock")
    assert listen_addresses(settings) == ("unix:/run/plain.sock", "0.0.0.0:8443")


def test_tls_bind_alone_does_not_also_listen_on_the_default_bind():
    settings = config("--certfile", "/c.pem", "--tls-bind", "tcp://0.0.0.0:8443")
    assert listen_addresses(settings) == ("0.0.0.0:8443",)


def test_no_certfile_no_tls():
    assert not serves_tls(config("-b", "127.0.0.1:8000"), "127.0.0.1:8000")
