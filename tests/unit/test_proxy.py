"""forkserver.proxy on its own: trust lists, forwarding headers and PROXY headers, as bytes and strings."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from forkserver.proxy import (
    V2_SIGNATURE,
    MalformedProxyHeader,
    Origin,
    ProxyHeader,
    ProxyHeaderReader,
    Trust,
    check_trust_entries,
    forwarded_origin,
    parse_forwarded,
    parse_node,
    parse_proxy_header,
    read_forwarded,
    x_forwarded_origin,
)

DEFAULT = Trust(["127.0.0.1", "::1"])
PROXIES = Trust(["10.0.0.0/8", "192.0.2.1", "2001:db8:1::/48"])


# -- trust lists ----------------------------------------------------------------------------


@pytest.mark.parametrize("address, trusted", [
    ("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("127.0.0.2", False), ("10.0.0.1", False), ("::2", False), ("", False), ("garbage", False),
])
def test_default_trust_is_loopback_only(address, trusted):
    assert (address in DEFAULT) is trusted


@pytest.mark.parametrize("address, trusted", [
    ("10.0.0.1", True), ("10.255.255.255", True), ("::ffff:10.1.2.3", True), ("192.0.2.1", True),
    ("2001:db8:1:ffff::1", True), ("11.0.0.1", False), ("192.0.2.2", False), ("2001:db8:2::1", False),
    ("127.0.0.1", False), ("not an ip", False),
])
def test_cidr_networks_and_addresses(address, trusted):
    assert (address in PROXIES) is trusted


def test_star_trusts_everyone_and_empty_trusts_no_one():
    assert "203.0.113.9" in Trust(["*"]) and "::5" in Trust(["10.0.0.1", "*"])
    assert "127.0.0.1" not in Trust([])


def test_addresses_are_compared_in_canonical_form():
    assert "::1" in Trust(["0:0:0:0:0:0:0:1"])
    assert "2001:db8::1" in Trust(["2001:DB8:0::1"])


@pytest.mark.parametrize("entries, fragment", [
    (["bogus"], "'bogus' is none of these"),
    (["10.0.0.1/8"], "'10.0.0.1/8' has host bits set"),
    (["127.0.0.1", "10.0.0.0/33"], "'10.0.0.0/33' is none of these"),
    ([""], "'' is none of these"),
    (["localhost"], "'localhost' is none of these"),
])
def test_bad_trust_entries_are_named(entries, fragment):
    message = check_trust_entries(entries)
    assert message is not None and fragment in message and "CIDR" in message
    with pytest.raises(ValueError):
        Trust(entries)


@pytest.mark.parametrize("entries", [[], ["*"], ["127.0.0.1", "::1"], ["10.0.0.0/8", "fd00::/8", " 192.0.2.1 "]])
def test_good_trust_entries(entries):
    assert check_trust_entries(entries) is None


# -- one hop --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, node", [
    ("192.0.2.43", ("192.0.2.43", "")),
    ("192.0.2.43:47011", ("192.0.2.43", "47011")),
    ("[2001:db8:cafe::17]", ("2001:db8:cafe::17", "")),
    ("[2001:db8:cafe::17]:4711", ("2001:db8:cafe::17", "4711")),
    ("2001:DB8::1", ("2001:db8::1", "")),
    ("192.0.2.43:_obf", ("192.0.2.43", "")),
    ("::ffff:192.0.2.5", ("192.0.2.5", "")),
    ("unknown", None), ("_hidden", None), ("", None), ("example.com", None),
    ("192.0.2.43:99999", None), ("192.0.2.43:x", None), ("[192.0.2.43]", None),
    ("[::1", None), ("[::1]x", None), ("1.2.3.4.5", None), ("192.0.2.010", None), ("[192.0.2.1]:80", None),
])
def test_parse_node(text, node):
    assert parse_node(text) == node


# -- X-Forwarded-* ----------------------------------------------------------------------------


@pytest.mark.parametrize("chain, client", [
    ("203.0.113.7", "203.0.113.7"),
    ("203.0.113.7, 10.0.0.2", "203.0.113.7"),                 # our own proxy is skipped
    ("198.51.100.1, 203.0.113.7, 10.0.0.2, 192.0.2.1", "203.0.113.7"),  # the forged left part is ignored
    ("10.0.0.3, 10.0.0.2", "10.0.0.3"),                       # all trusted: the left-most
    ("203.0.113.7,10.0.0.2", "203.0.113.7"),                  # no space after the comma
    ("2001:db8:9::1, 2001:db8:1::5", "2001:db8:9::1"),
    ("[2001:db8:9::1]:1234, 10.0.0.2", "2001:db8:9::1"),
])
def test_x_forwarded_for_takes_the_right_most_untrusted_hop(chain, client):
    origin = x_forwarded_origin(chain, "", "", PROXIES)
    assert origin.remote is not None and origin.remote[0] == client


def test_x_forwarded_for_keeps_a_port_it_is_given():
    assert x_forwarded_origin("203.0.113.7:5555", "", "", PROXIES).remote == ("203.0.113.7", "5555")


@pytest.mark.parametrize("chain", ["garbage, 10.0.0.2", "unknown", "", " , ", "203.0.113.7, , 10.0.0.2"])
def test_x_forwarded_for_without_a_usable_client_changes_nothing(chain):
    assert x_forwarded_origin(chain, "", "", PROXIES).remote is None


def test_x_forwarded_for_stops_at_garbage_before_reaching_forged_hops():
    # The walk never gets past what our trusted proxy vouched for.
    assert x_forwarded_origin("198.51.100.1, garbage, 10.0.0.2", "", "", PROXIES).remote is None


def test_star_trust_takes_the_left_most_hop():
    assert x_forwarded_origin("203.0.113.7, 198.51.100.1", "", "", Trust(["*"])).remote == ("203.0.113.7", "")


@pytest.mark.parametrize("proto, scheme", [
    ("https", "https"), ("HTTPS", "https"), ("http", "http"), (" https ", "https"),
    ("http, https", "https"), ("https, http", "http"),  # the proxy nearest to us set the right-most
    ("ftp", None), ("", None), ("https;x", None), ("wss", None),
])
def test_x_forwarded_proto(proto, scheme):
    assert x_forwarded_origin("", proto, "", PROXIES).scheme == scheme


@pytest.mark.parametrize("value, host", [
    ("example.com", "example.com"), ("example.com:8443", "example.com:8443"), ("[2001:db8::1]:80", "[2001:db8::1]:80"),
    ("evil.example, example.com", "example.com"), ("exa mple.com", None), ("a/b", None), ("x@y", None), ("", None),
])
def test_x_forwarded_host(value, host):
    assert x_forwarded_origin("", "", value, PROXIES).host == host


# -- Forwarded (RFC 7239) ------------------------------------------------------------------


def test_parse_forwarded_rfc_examples():
    assert parse_forwarded('for="_gazonk"') == [{"for": "_gazonk"}]
    assert parse_forwarded('For="[2001:db8:cafe::17]:4711"') == [{"for": "[2001:db8:cafe::17]:4711"}]
    assert parse_forwarded("for=192.0.2.60;proto=http;by=203.0.113.43") == [
        {"for": "192.0.2.60", "proto": "http", "by": "203.0.113.43"}]
    assert parse_forwarded("for=192.0.2.43, for=198.51.100.17") == [{"for": "192.0.2.43"}, {"for": "198.51.100.17"}]


def test_parse_forwarded_quoted_strings():
    assert parse_forwarded(r'for="a\"b\\c";host="x,y;z"') == [{"for": 'a"b\\c', "host": "x,y;z"}]
    assert parse_forwarded('for=""') == [{"for": ""}]


def test_parse_forwarded_is_lenient_about_whitespace_and_empty_elements():
    assert parse_forwarded("for=192.0.2.1 ; proto=https ,, for=10.0.0.1;") == [
        {"for": "192.0.2.1", "proto": "https"}, {"for": "10.0.0.1"}]


@pytest.mark.parametrize("value", [
    "for=[2001:db8::1]",           # IPv6 must be quoted: ":" and "[" are not token characters
    'for="unterminated',
    "for=1.2.3.4;for=5.6.7.8",     # a parameter twice in one element (RFC 7239 §4)
    "for",
    "for=",
    "=1.2.3.4",
    'for="a"b',
    "for=1.2.3.4 proto=https",
])
def test_parse_forwarded_malformed(value):
    assert parse_forwarded(value) is None


def test_forwarded_takes_proto_and_host_from_the_element_naming_the_client():
    value = ("for=198.51.100.1;proto=http;host=forged.example, "
             'for="[2001:db8:9::1]:4711";proto=https;host=shop.example, for=10.0.0.2;proto=http;host=inner')
    assert forwarded_origin(value, PROXIES) == Origin(("2001:db8:9::1", "4711"), "https", "shop.example")


def test_forwarded_without_for_still_gives_proto_and_host():
    assert forwarded_origin("proto=https;host=example.com", DEFAULT) == Origin(None, "https", "example.com")


@pytest.mark.parametrize("value", ['for=unknown;proto=https', 'for="_hidden";proto=https'])
def test_forwarded_unknown_or_obfuscated_client_keeps_the_peer(value):
    assert forwarded_origin(value, DEFAULT) == Origin(None, "https", None)


def test_forwarded_ignores_bad_proto_and_host():
    assert forwarded_origin('for=192.0.2.9;proto=gopher;host="a b"', DEFAULT) == Origin(("192.0.2.9", ""))


def test_malformed_forwarded_changes_nothing():
    assert forwarded_origin("for=[::1]", DEFAULT) == Origin()


def _headers(*pairs: tuple[str, str]) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((name.encode(), value.encode()) for name, value in pairs)


def test_read_forwarded_returns_none_without_forwarding_headers():
    assert read_forwarded(_headers(("Host", "x"), ("Accept", "*/*")), DEFAULT) is None


def test_read_forwarded_combines_x_forwarded_field_lines_in_order():
    headers = _headers(("X-Forwarded-For", "203.0.113.7"), ("Host", "x"), ("x-forwarded-for", "127.0.0.1"),
                       ("X-FORWARDED-PROTO", "https"), ("X-Forwarded-Host", "shop.example"))
    assert read_forwarded(headers, DEFAULT) == Origin(("203.0.113.7", ""), "https", "shop.example")


def test_read_forwarded_prefers_forwarded_over_x_forwarded():
    headers = _headers(("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-Proto", "http"),
                       ("Forwarded", "for=203.0.113.7;proto=https"))
    assert read_forwarded(headers, DEFAULT) == Origin(("203.0.113.7", ""), "https", None)


def test_read_forwarded_malformed_forwarded_wins_and_changes_nothing():
    headers = _headers(("Forwarded", "for=[::1]"), ("X-Forwarded-For", "198.51.100.1"))
    assert read_forwarded(headers, DEFAULT) == Origin()


def test_read_forwarded_ignores_underscore_spellings():
    assert read_forwarded(_headers(("X_Forwarded_For", "198.51.100.1")), DEFAULT) is None


def test_read_forwarded_joins_forwarded_field_lines():
    headers = _headers(("Forwarded", "for=203.0.113.7;proto=https"), ("Forwarded", "for=127.0.0.1;proto=http"))
    assert read_forwarded(headers, DEFAULT) == Origin(("203.0.113.7", ""), "https", None)


# -- PROXY protocol v1 -------------------------------------------------------------------------


@pytest.mark.parametrize("line, source", [
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n", ("192.0.2.1", "56324")),
    (b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n", ("2001:db8::1", "1")),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", ("255.255.255.255", "65535")),
    (b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n", ("0.0.0.0", "0")),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n", None),
])
def test_v1_valid(line, source):
    assert parse_proxy_header(line + b"GET / HTTP/1.1\r\n") == (ProxyHeader(source), len(line))


def test_v1_longest_line_fits_the_limit():
    line = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(line) == 104
    assert parse_proxy_header(line) is not None


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\n",          # bare LF
    b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\rX",
    b"PROXY TCP4 192.0.2.1  192.0.2.2 56324 443\r\n",       # two spaces
    b"PROXY TCP4 192.0.2.1 192.0.2.2 56324\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443 7\r\n",
    b"PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n",            # family mismatch
    b"PROXY TCP6 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 443\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 0443 443\r\n",         # leading zero
    b"PROXY TCP4 192.0.2.1 192.0.2.2 -1 443\r\n",
    b"PROXY TCP4 192.0.2.01 192.0.2.2 1 443\r\n",
    b"PROXY TCP4 host.example 192.0.2.2 1 443\r\n",
    b"PROXY TCP5 192.0.2.1 192.0.2.2 1 443\r\n",
    b"PROXY UDP4 192.0.2.1 192.0.2.2 1 443\r\n",
    b"PROXY \xff\xfe 192.0.2.1 192.0.2.2 1 443\r\n",
    b"PROXY\r\n",
    b"proxy TCP4 192.0.2.1 192.0.2.2 1 443\r\n",
    b"PROXY TCP4 " + b"1" * 200,                           # no CRLF within 107 bytes
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PUT / HTTP/1.1\r\n",
    b"\x16\x03\x01\x02\x00",                                # a TLS ClientHello
])
def test_v1_malformed(data):
    with pytest.raises(MalformedProxyHeader):
        parse_proxy_header(data)


@pytest.mark.parametrize("data", [b"P", b"PROXY", b"PROXY TCP4 192.0.2.1 192.0", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"])
def test_v1_incomplete(data):
    assert parse_proxy_header(data) is None


# -- PROXY protocol v2 -------------------------------------------------------------------------


def v2(command: int = 0x21, family: int = 0x11, addresses: bytes = b"", tlvs: bytes = b"",
       length: int | None = None) -> bytes:
    payload = addresses + tlvs
    size = len(payload) if length is None else length
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", size) + payload


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))


def inet6(src: str, dst: str, sport: int, dport: int) -> bytes:
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def test_v2_inet():
    header = v2(addresses=inet("192.0.2.1", "192.0.2.2", 56324, 443))
    assert parse_proxy_header(header + b"GET") == (ProxyHeader(("192.0.2.1", "56324")), len(header))


def test_v2_inet6_and_mapped_v4():
    header = v2(family=0x21, addresses=inet6("2001:db8::1", "2001:db8::2", 1, 2))
    assert parse_proxy_header(header) == (ProxyHeader(("2001:db8::1", "1")), 52)
    mapped = v2(family=0x21, addresses=inet6("::ffff:192.0.2.7", "::1", 9, 2))
    assert parse_proxy_header(mapped)[0].source == ("192.0.2.7", "9")


def test_v2_tlvs_are_skipped_and_ssl_tlv_means_tls():
    noise = tlv(0x04, b"\x00" * 30) + tlv(0x05, b"unique-id")
    header = v2(addresses=inet("192.0.2.1", "192.0.2.2", 5, 6), tlvs=noise)
    assert parse_proxy_header(header) == (ProxyHeader(("192.0.2.1", "5")), len(header))
    ssl = tlv(0x20, b"\x01" + b"\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3"))
    header = v2(addresses=inet("192.0.2.1", "192.0.2.2", 5, 6), tlvs=noise + ssl)
    assert parse_proxy_header(header) == (ProxyHeader(("192.0.2.1", "5"), tls=True), len(header))
    no_client_ssl = tlv(0x20, b"\x00" + b"\x00\x00\x00\x00")
    assert not parse_proxy_header(v2(addresses=inet("192.0.2.1", "192.0.2.2", 5, 6), tlvs=no_client_ssl))[0].tls


def test_v2_truncated_tlv_is_ignored():
    header = v2(addresses=inet("192.0.2.1", "192.0.2.2", 5, 6), tlvs=b"\x20\x00\x09\x01")
    assert parse_proxy_header(header) == (ProxyHeader(("192.0.2.1", "5")), len(header))


def test_v2_local_unspec_and_unix_keep_the_peer():
    assert parse_proxy_header(v2(command=0x20, family=0x00)) == (ProxyHeader(None), 16)
    local_with_addresses = v2(command=0x20, addresses=inet("192.0.2.1", "192.0.2.2", 5, 6))
    assert parse_proxy_header(local_with_addresses) == (ProxyHeader(None), 28)
    assert parse_proxy_header(v2(family=0x00)) == (ProxyHeader(None), 16)
    assert parse_proxy_header(v2(family=0x31, addresses=b"\x00" * 216)) == (ProxyHeader(None), 232)


@pytest.mark.parametrize("data", [
    v2(command=0x11),                                            # version 1 in a v2 header
    v2(command=0x22),                                            # unknown command
    v2(family=0x11, addresses=b"\x00" * 11),                     # INET needs 12 address bytes
    v2(family=0x21, addresses=inet("192.0.2.1", "192.0.2.2", 5, 6)),  # INET6 needs 36
    v2(length=4000),                                             # more than we buffer
    V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c",
    b"\r\n\r\nGET / HTTP/1.1\r\n",
])
def test_v2_malformed(data):
    with pytest.raises(MalformedProxyHeader):
        parse_proxy_header(data)


@pytest.mark.parametrize("data", [b"\r", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11\x00",
                                  v2(addresses=inet("192.0.2.1", "192.0.2.2", 5, 6))[:-1]])
def test_v2_incomplete(data):
    assert parse_proxy_header(data) is None


# -- split input ---------------------------------------------------------------------------------


SPLIT_CASES = [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 56324 443\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(addresses=inet("192.0.2.1", "192.0.2.2", 56324, 443), tlvs=tlv(0x20, b"\x01\x00\x00\x00\x00")),
    v2(family=0x21, addresses=inet6("2001:db8::1", "2001:db8::2", 1, 2)),
]
REST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def feed_in_pieces(reader: ProxyHeaderReader, pieces: list[bytes]) -> tuple[ProxyHeader, bytes]:
    """Feed until the header completes, as the connection does; return it and all bytes after it."""
    for index, piece in enumerate(pieces):
        done = reader.feed(piece)
        if done is not None:
            header, rest = done
            return header, rest + b"".join(pieces[index + 1:])
    raise AssertionError("header never completed")


@pytest.mark.parametrize("header", SPLIT_CASES, ids=["v1", "v1-unknown", "v2-inet-ssl", "v2-inet6"])
def test_reader_handles_every_split(header):
    data = header + REST
    expected = parse_proxy_header(data)[0]
    assert feed_in_pieces(ProxyHeaderReader(), [data]) == (expected, REST)
    assert feed_in_pieces(ProxyHeaderReader(), [bytes([b]) for b in data]) == (expected, REST)
    for cut in range(1, len(data)):
        assert feed_in_pieces(ProxyHeaderReader(), [data[:cut], data[cut:]]) == (expected, REST), cut
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(data)), 4))
        pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
        assert feed_in_pieces(ProxyHeaderReader(), pieces) == (expected, REST)


def test_reader_reports_garbage_as_soon_as_it_is_certain():
    reader = ProxyHeaderReader()
    assert reader.feed(b"PRO") is None and reader.buffer == b"PRO"
    with pytest.raises(MalformedProxyHeader):
        reader.feed(b"PFIND / HTTP/1.1\r\n")


def test_reader_gives_up_on_a_v1_line_without_end():
    reader = ProxyHeaderReader()
    assert reader.feed(b"PROXY TCP4 " + b"9" * 90) is None
    with pytest.raises(MalformedProxyHeader):
        reader.feed(b"9" * 20)


def test_random_bytes_raise_only_malformed():
    rng = random.Random(1234)
    prefixes = [b"", b"PROXY ", b"PROXY TCP4 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21"]
    for _ in range(3000):
        data = rng.choice(prefixes) + bytes(rng.randrange(256) for _ in range(rng.randrange(0, 60)))
        try:
            parse_proxy_header(data)
        except MalformedProxyHeader:
            pass
