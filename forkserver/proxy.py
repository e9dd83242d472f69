"""What proxies in front of us say about the client: trust lists, forwarding headers, PROXY protocol.

Functions over bytes, header tuples and environs: ``Trust`` decides which
peers are believed, ``read_forwarded`` reads ``Forwarded``/``X-Forwarded-*``
from a trusted peer's request and ``apply_origin`` puts the result into its
environ, ``proxy_queue_time`` reads a proxy's request-start stamp, and
``ProxyHeaderReader`` takes a PROXY protocol v1/v2 header off the front of a
connection.  Nothing here touches a socket: ``worker/connection.py`` feeds the
header reader, ``worker/serving.py`` calls the rest for the requests of trusted
peers.  Hostile input never raises anything but ``MalformedProxyHeader`` (and
the header reader alone raises it).
"""

from __future__ import annotations

import functools
import ipaddress
import re
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .records import Record

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SCHEMES = frozenset({"http", "https"})
FORWARDING_HEADERS = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})
# The same headers as WSGI environ keys: a request whose environ has none of
# them (nearly all) skips the header scan in ``read_forwarded``.
FORWARDING_ENVIRON_KEYS = frozenset("HTTP_" + name.decode().upper().replace("-", "_") for name in FORWARDING_HEADERS)
TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # RFC 9110 §5.6.2
# RFC 7239 §4: forwarded-pair = token "=" value; value = token / quoted-string.
# Optional whitespace around ";" is not in the grammar, but proxies send it.
QDTEXT = r'[^"\\\x00-\x08\x0a-\x1f\x7f]|\\[^\x00-\x08\x0a-\x1f\x7f]'  # RFC 9110 §5.6.4
FORWARDED_PAIR = rf'({TOKEN})=(?:({TOKEN})|"((?:{QDTEXT})*)")[ \t]*'
QUOTED_PAIR = r"\\(.)"
# A Host header value (RFC 9110 §7.2): reg-name or IPv4, or an IP literal, and a port.
HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]+)(?::[0-9]{0,5})?\Z"
PORT = r"[0-9]{1,5}\Z"
# Dotted-quad IPv4 already in canonical form (no leading zeros): the common
# case, checked without the cost of building an ipaddress object.
OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CANONICAL_IPV4 = rf"{OCTET}(?:\.{OCTET}){{3}}\Z"

V1_PREFIX = b"PROXY "
V1_MAX_BYTES = 107  # the spec's bound on a v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_PAYLOAD_BYTES = 2048  # addresses and TLVs; real proxies send well under 536 bytes
V2_LOCAL, V2_PROXY = 0x20, 0x21
V2_INET, V2_INET6 = 0x1, 0x2
V2_TYPE_SSL, V2_CLIENT_SSL = 0x20, 0x01


# Where a proxy says when it received the request (nginx's ``t=${msec}`` in
# seconds, Heroku's milliseconds, New Relic's microseconds), first one first.
REQUEST_START_KEYS = ("HTTP_X_REQUEST_START", "HTTP_X_QUEUE_START")
STAMP = r"[ \t]*(?:t=)?([0-9]{1,20}(?:\.[0-9]{1,9})?)[ \t]*\Z"
# A stamp's unit is told by its size: a time between the years 2001 (1e9 s)
# and 2286 (1e10 s) in seconds, milliseconds or microseconds.  Anything
# between or outside these ranges is no clock reading in any of the three.
STAMP_UNITS = ((1e9, 1e10, 1.0), (1e12, 1e13, 1e-3), (1e15, 1e16, 1e-6))
# No proxy waits an hour for an answer: an older stamp is a wrong clock, or a
# client's own header that a proxy passed on.  Ignored, it cannot swell the
# sums the workers report (which the master refuses past stats.MAX_SECONDS).
MAX_STAMP_AGE = 3600.0


@functools.cache
def pattern(source: str) -> re.Pattern[str]:
    """The regular expression ``source`` (one of the patterns above), compiled on its first use.

    Only requests from a trusted proxy, with a forwarding header or a
    request-start stamp, use them: compiled at import, the six cost every
    start about 1 ms, paid by configurations that never match one.
    """
    return re.compile(source)


class MalformedProxyHeader(ValueError):
    """The bytes at the start of the connection are not a PROXY protocol header."""


# -- trust ---------------------------------------------------------------------------------


class Trust:
    """The set of peers whose forwarding headers and PROXY headers are believed.

    Built from addresses, CIDR networks and ``"*"`` (everyone).  Plain
    addresses are kept as strings, so the usual check (the peer of a fresh
    connection against a short list) is one set lookup, without parsing.
    """

    def __init__(self, entries: Iterable[str]) -> None:
        self.everyone = False
        exact: set[str] = set()
        networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            entry = entry.strip()
            if entry == "*":
                self.everyone = True
                continue
            try:
                network = ipaddress.ip_network(entry)
            except ValueError as exc:
                reason = "has host bits set" if "host bits" in str(exc) else "is none of these"
                raise ValueError(f"{entry!r} {reason}") from None
            if network.num_addresses == 1:
                address = network.network_address
                exact.add(str(address))
                if address.version == 4:
                    exact.add(f"::ffff:{address}")  # as a dual-stack listener reports it
            else:
                networks.append(network)
        self.exact = frozenset(exact)
        self.networks = tuple(networks)

    def __contains__(self, address: str) -> bool:
        if self.everyone or address in self.exact:
            return True
        if not self.networks:
            return False
        try:
            ip = _unmapped(ipaddress.ip_address(address))
        except ValueError:
            return False
        return any(ip in network for network in self.networks)

    def __repr__(self) -> str:
        entries = ["*"] if self.everyone else sorted(self.exact) + [str(n) for n in self.networks]
        return f"Trust({entries!r})"


def check_trust_entries(entries: Sequence[str]) -> str | None:
    """Return None if ``entries`` make a valid trust list, else what was expected (for config)."""
    try:
        Trust(entries)
    except ValueError as exc:
        return f"IP addresses, CIDR networks such as 10.0.0.0/8, or '*'; {exc}"
    return None


def _unmapped(ip: IPAddress) -> IPAddress:
    """Return the IPv4 address inside an IPv4-mapped IPv6 one, else ``ip`` itself."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_node(text: str) -> tuple[str, str] | None:
    """Read ``addr``, ``addr:port``, ``[v6]`` or ``[v6]:port``; return (address, port) or None.

    The address comes back in canonical form; the port is ``""`` when absent or
    obfuscated (RFC 7239 §6.3).  ``unknown``, obfuscated names (§6.3) and
    anything else that is not an IP address give None.
    """
    port = ""
    bracketed = text.startswith("[")
    if bracketed:
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and rest[0] != ":"):
            return None
        port = rest[1:]
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host = text  # IPv4, or IPv6 without brackets as X-Forwarded-For often has it
    if port and not pattern(PORT).match(port):
        if not port.startswith("_"):
            return None
        port = ""
    elif port and int(port) > 65535:
        return None
    if pattern(CANONICAL_IPV4).match(host):
        return None if bracketed else (host, port)
    if ":" not in host:
        return None  # IPv4 with leading zeros or too few parts, or a name
    try:
        ip = ipaddress.IPv6Address(host)
    except ValueError:
        return None
    return str(_unmapped(ip)), port


# -- forwarding headers ----------------------------------------------------------------------


class Origin(Record):
    """What trusted proxies say about the client; None wherever they said nothing usable."""

    __slots__ = ("remote", "scheme", "host")

    def __init__(self, remote: tuple[str, str] | None = None, scheme: str | None = None,
                 host: str | None = None) -> None:
        self.remote = remote
        self.scheme = scheme
        self.host = host


def read_forwarded(headers: Sequence[tuple[bytes, bytes]], trust: Trust) -> Origin | None:
    """Read the forwarding headers of a request whose peer is trusted.

    ``Forwarded`` (RFC 7239) wins when present, even if malformed; otherwise
    ``X-Forwarded-For``/``-Proto``/``-Host`` are used.  Returns None when the
    request has none of them.  Malformed parts are ignored, never raised.
    """
    found: dict[bytes, list[str]] = {}
    for name, value in headers:
        key = name.lower()
        if key in FORWARDING_HEADERS:
            found.setdefault(key, []).append(value.decode("latin-1"))
    if not found:
        return None
    if b"forwarded" in found:
        return forwarded_origin(",".join(found[b"forwarded"]), trust)
    return x_forwarded_origin(
        ",".join(found.get(b"x-forwarded-for", ())),
        ",".join(found.get(b"x-forwarded-proto", ())),
        ",".join(found.get(b"x-forwarded-host", ())),
        trust,
    )


def apply_origin(environ: dict[str, Any], origin: Origin | None) -> None:
    """Put what trusted proxies said about the client into a request's environ."""
    if origin is None:
        return
    if origin.remote is not None:
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = origin.remote
    if origin.scheme is not None:
        environ["wsgi.url_scheme"] = origin.scheme
    if origin.host is not None:
        environ["HTTP_HOST"] = origin.host


def request_start(value: str) -> float | None:
    """The Unix time a proxy's ``X-Request-Start``/``X-Queue-Start`` value names, or None if it names none.

    Takes ``t=<number>`` or a bare number, in seconds, milliseconds or
    microseconds (``STAMP_UNITS``); of several comma-joined values, the
    first, as the proxy farthest out set it.
    """
    match = pattern(STAMP).match(value.partition(",")[0])
    if match is None:
        return None
    number = float(match.group(1))
    for low, high, unit in STAMP_UNITS:
        if low <= number < high:
            return number * unit
    return None


def proxy_queue_time(environ: dict[str, Any], clock: Callable[[], float] = time.time) -> float | None:
    """Seconds since a trusted proxy stamped this request, also set as ``forkserver.queue_time``; None if unstamped.

    Call it for a trusted peer's request only: anyone else could make the
    figure up.  A stamp in the future (the proxy's clock runs ahead of
    ours) counts as 0; one that is malformed, or older than MAX_STAMP_AGE,
    is ignored.
    """
    for key in REQUEST_START_KEYS:
        value = environ.get(key)
        start = None if value is None else request_start(value)
        if start is not None:
            waited = max(0.0, clock() - start)
            if waited <= MAX_STAMP_AGE:
                environ["forkserver.queue_time"] = waited
                return waited
    return None


def pick_hop(nodes: Sequence[str], trust: Trust) -> tuple[int, tuple[str, str] | None]:
    """Find the hop that is the client: the right-most one we do not trust.

    Each proxy appends the address it received the request from, so walking
    from the right past our own trusted proxies reaches the first address no
    trusted proxy vouches for; everything left of it may be forged by the
    client.  If every hop is trusted, the left-most is the client.  A hop that
    is not an IP address (``unknown``, an obfuscated name, garbage) also stops
    the walk: it is what a trusted proxy said, so nothing further left counts.
    Returns its index and its (address, port), the latter None if not an address.
    """
    if trust.everyone:
        return 0, parse_node(nodes[0])
    node = None
    for index in range(len(nodes) - 1, -1, -1):
        node = parse_node(nodes[index])
        if node is None or node[0] not in trust:
            return index, node
    return 0, node


def x_forwarded_origin(for_value: str, proto_value: str, host_value: str, trust: Trust) -> Origin:
    """Combine X-Forwarded-For/-Proto/-Host (each the comma-joined field lines) into an Origin.

    The address is the hop ``pick_hop`` chooses; for Proto and Host the
    right-most value counts, as the proxy nearest to us set it.
    """
    remote = None
    hops = [hop.strip() for hop in for_value.split(",")] if for_value.strip() else []
    if hops:
        remote = pick_hop(hops, trust)[1]
    scheme = proto_value.rpartition(",")[2].strip().lower() or None
    host = host_value.rpartition(",")[2].strip() or None
    return Origin(
        remote=remote,
        scheme=scheme if scheme in SCHEMES else None,
        host=host if host is not None and pattern(HOST).match(host) else None,
    )


def parse_forwarded(value: str) -> list[dict[str, str]] | None:
    """Split a Forwarded field value into elements of lower-cased parameters; None if malformed.

    RFC 7239 §4: elements are separated by commas, pairs by semicolons, and a
    value is a token or a quoted-string (with backslash escapes).  A parameter
    given twice in one element makes the whole field malformed.
    """
    elements: list[dict[str, str]] = [{}]
    pos, end = 0, len(value)
    while pos < end:
        char = value[pos]
        if char in " \t;":
            pos += 1
            continue
        if char == ",":
            elements.append({})
            pos += 1
            continue
        match = pattern(FORWARDED_PAIR).match(value, pos)
        if match is None:
            return None
        key = match.group(1).lower()
        if key in elements[-1]:
            return None
        token, quoted = match.group(2), match.group(3)
        elements[-1][key] = token if token is not None else pattern(QUOTED_PAIR).sub(r"\1", quoted)
        pos = match.end()
        if pos < end and value[pos] not in ";,":
            return None
    return [element for element in elements if element]


def forwarded_origin(value: str, trust: Trust) -> Origin:
    """Read a Forwarded field value (all field lines comma-joined) into an Origin.

    The element chosen is the one whose ``for`` is the client by ``pick_hop``'s
    rule; elements without ``for`` count as an unknown hop.  Its ``proto`` and
    ``host`` are what the client used, as the proxy that appended it saw.
    A malformed field gives an empty Origin: nothing changes.
    """
    elements = parse_forwarded(value)
    if not elements:
        return Origin()
    index, remote = pick_hop([element.get("for", "unknown") for element in elements], trust)
    element = elements[index]
    scheme = element.get("proto", "").lower()
    host = element.get("host", "")
    return Origin(
        remote=remote,
        scheme=scheme if scheme in SCHEMES else None,
        host=host if pattern(HOST).match(host) else None,
    )


# -- PROXY protocol ------------------------------------------------------------------------


class ProxyHeader(Record):
    """A PROXY protocol header: the client as the proxy saw it.

    ``source`` is None for LOCAL (the proxy's own health check), UNKNOWN and
    address families other than IPv4/IPv6: the socket's peer stays the remote.
    ``tls`` is set when a v2 SSL TLV says the client connected over TLS.
    """

    __slots__ = ("source", "tls")

    def __init__(self, source: tuple[str, str] | None, tls: bool = False) -> None:
        self.source = source
        self.tls = tls


def parse_proxy_header(data: bytes) -> tuple[ProxyHeader, int] | None:
    """Parse a PROXY v1 or v2 header at the start of ``data``.

    Returns the header and the number of bytes it took, or None if ``data``
    is a valid beginning that needs more bytes.

    Raises:
        MalformedProxyHeader: ``data`` cannot begin a PROXY header.
    """
    if data[:1] == b"P":
        if not V1_PREFIX.startswith(data[:len(V1_PREFIX)]):
            raise MalformedProxyHeader("neither a v1 nor a v2 PROXY header")
        return _parse_v1(data)
    if not V2_SIGNATURE.startswith(data[:len(V2_SIGNATURE)]):
        raise MalformedProxyHeader("neither a v1 nor a v2 PROXY header")
    return _parse_v2(data)


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    """``PROXY TCP4|TCP6 src dst sport dport\\r\\n`` or ``PROXY UNKNOWN ...\\r\\n``."""
    end = data.find(b"\r\n", 0, V1_MAX_BYTES)
    if end < 0:
        if len(data) >= V1_MAX_BYTES or b"\n" in data or b"\r" in data[:-1]:
            raise MalformedProxyHeader("v1 header has no CRLF within 107 bytes")
        return None
    line = data[:end]
    fields = line.split(b" ")
    if fields[:2] == [b"PROXY", b"UNKNOWN"]:
        return ProxyHeader(None), end + 2
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise MalformedProxyHeader(f"v1 header {line[:60]!r} is not PROXY TCP4|TCP6 src dst sport dport")
    version = 4 if fields[1] == b"TCP4" else 6
    try:
        source = ipaddress.ip_address(fields[2].decode("ascii"))
        destination = ipaddress.ip_address(fields[3].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise MalformedProxyHeader(f"v1 header {line[:60]!r} has a bad address") from None
    if source.version != version or destination.version != version:
        raise MalformedProxyHeader(f"v1 header {line[:60]!r} has addresses of the wrong family")
    for port in fields[4:]:
        # Decimal without leading zeros, 0..65535.
        if not (port.isdigit() and len(port) <= 5 and int(port) <= 65535 and (port == b"0" or port[:1] != b"0")):
            raise MalformedProxyHeader(f"v1 header {line[:60]!r} has a bad port")
    return ProxyHeader((str(source), fields[4].decode("ascii"))), end + 2


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    """The binary header: signature, version/command, family, length, addresses, TLVs."""
    if len(data) < 16:
        return None
    command, family, length = data[12], data[13] >> 4, int.from_bytes(data[14:16], "big")
    if command not in (V2_LOCAL, V2_PROXY):
        raise MalformedProxyHeader(f"v2 header has version/command byte {command:#04x}")
    if length > V2_MAX_PAYLOAD_BYTES:
        raise MalformedProxyHeader(f"v2 header claims {length} bytes, more than {V2_MAX_PAYLOAD_BYTES}")
    if len(data) < 16 + length:
        return None
    payload = data[16:16 + length]
    if command == V2_LOCAL:
        return ProxyHeader(None), 16 + length
    source: tuple[str, str] | None = None
    address_bytes = 0
    if family == V2_INET:
        address_bytes = 12
        if length < address_bytes:
            raise MalformedProxyHeader(f"v2 INET header has {length} address bytes, needs 12")
        source = (str(ipaddress.IPv4Address(payload[0:4])), str(int.from_bytes(payload[8:10], "big")))
    elif family == V2_INET6:
        address_bytes = 36
        if length < address_bytes:
            raise MalformedProxyHeader(f"v2 INET6 header has {length} address bytes, needs 36")
        ip = _unmapped(ipaddress.IPv6Address(payload[0:16]))
        source = (str(ip), str(int.from_bytes(payload[32:34], "big")))
    # UNSPEC and UNIX carry no address we could use: the peer stays the proxy.
    return ProxyHeader(source, tls=_client_used_tls(payload[address_bytes:])), 16 + length


def _client_used_tls(tlvs: bytes) -> bool:
    """True if the TLVs hold PP2_TYPE_SSL with the PP2_CLIENT_SSL bit; other TLVs are skipped."""
    pos = 0
    while pos + 3 <= len(tlvs):
        kind, size = tlvs[pos], int.from_bytes(tlvs[pos + 1:pos + 3], "big")
        value = tlvs[pos + 3:pos + 3 + size]
        if len(value) < size:
            return False  # a truncated TLV: trust none of it
        if kind == V2_TYPE_SSL and value:
            return bool(value[0] & V2_CLIENT_SSL)
        pos += 3 + size
    return False


class ProxyHeaderReader:
    """Collects the PROXY header of one connection, however it is split across reads."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, data: bytes) -> tuple[ProxyHeader, bytes] | None:
        """Add ``data``; return the header and the bytes after it once complete, else None.

        Raises:
            MalformedProxyHeader: the connection did not start with a PROXY header.
        """
        self.buffer += data
        parsed = parse_proxy_header(self.buffer)
        if parsed is None:
            return None
        header, size = parsed
        rest, self.buffer = self.buffer[size:], b""
        return header, rest
