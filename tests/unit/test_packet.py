"""Decoding the first bytes of a logged packet: IPv4 (options, fragments), IPv6 extension
header chains, ports, and every way the bytes can be cut short.

The builders here write real headers (correct lengths, fields in network byte order);
test_streamer.py reuses them for the payloads of logged packets."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.packet import PacketError, PacketSummary, decode

TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTS, AUTH, NO_NEXT = 0, 43, 44, 60, 51, 59
MORE_FRAGMENTS = 0x2000
IPV6_HEADER = 40


# --- builders ---------------------------------------------------------------------------


def tcp(src_port: int, dst_port: int) -> bytes:
    """A 20-byte TCP header (SYN)."""
    return struct.pack("!HHIIBBHHH", src_port, dst_port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)


def udp(src_port: int, dst_port: int, payload: bytes = b"") -> bytes:
    return struct.pack("!HHHH", src_port, dst_port, 8 + len(payload), 0) + payload


def icmp_echo() -> bytes:
    return struct.pack("!BBHHH", 8, 0, 0, 0x77, 1)


def ipv4_header(protocol: int, payload: bytes, src: str = "198.51.100.7", dst: str = "192.0.2.10", *,
         options: bytes = b"", more_fragments: bool = False, fragment_offset: int = 0) -> bytes:
    """fragment_offset in 8-byte units, as on the wire."""
    assert len(options) % 4 == 0 and len(options) <= 40
    ihl = 5 + len(options) // 4
    flags = (MORE_FRAGMENTS if more_fragments else 0) | fragment_offset
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 0x1C46, flags, 64, protocol, 0,
                         socket.inet_pton(socket.AF_INET, src), socket.inet_pton(socket.AF_INET, dst))
    return header + options


def ipv4_packet(protocol: int, payload: bytes, src: str = "198.51.100.7", dst: str = "192.0.2.10", *,
                options: bytes = b"", more_fragments: bool = False, fragment_offset: int = 0) -> bytes:
    return ipv4_header(protocol, payload, src, dst, options=options, more_fragments=more_fragments,
                fragment_offset=fragment_offset) + payload


def ipv6_packet(next_header: int, payload: bytes, src: str = "2001:db8::7", dst: str = "2001:db8::10") -> bytes:
    header = struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 64,
                         socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst))
    assert len(header) == IPV6_HEADER
    return header + payload


def options_header(next_header: int, units: int = 0) -> bytes:
    """Hop-by-hop or destination options: (units + 1) * 8 bytes, filled with one PadN option."""
    area = (units + 1) * 8 - 2
    return bytes([next_header, units, 1, area - 2]) + bytes(area - 2)


def routing_header(next_header: int) -> bytes:
    """Type 2 routing header (one home address): header extension length 2, 24 bytes."""
    return (bytes([next_header, 2, 2, 1]) + bytes(4)
            + socket.inet_pton(socket.AF_INET6, "2001:db8:ffff::1"))


def fragment_header(next_header: int, offset_units: int, more: bool) -> bytes:
    return struct.pack("!BBHI", next_header, 0, (offset_units << 3) | int(more), 0xDEADBEEF)


def auth_header(next_header: int, icv: bytes = bytes(12)) -> bytes:
    """AH counts its length in 4-byte units minus 2 (RFC 4302), unlike the other headers."""
    total = 12 + len(icv)
    assert total % 4 == 0
    return struct.pack("!BBHII", next_header, total // 4 - 2, 0, 0x100, 1) + icv


def summary(family: int, protocol: str, src_port: int | None, dst_port: int | None, *,
            fragment: bool = False, truncated: bool = False) -> PacketSummary:
    src, dst = ("198.51.100.7", "192.0.2.10") if family == 4 else ("2001:db8::7", "2001:db8::10")
    return PacketSummary(family, src, dst, protocol, src_port, dst_port, fragment, truncated)


# --- IPv4 -------------------------------------------------------------------------------


def test_ipv4_tcp() -> None:
    assert decode(ipv4_packet(TCP, tcp(51514, 443))) == summary(4, "tcp", 51514, 443)


def test_ipv4_udp() -> None:
    packet = ipv4_packet(UDP, udp(5353, 53, b"query"), src="203.0.113.200", dst="10.1.2.3")
    assert decode(packet) == PacketSummary(4, "203.0.113.200", "10.1.2.3", "udp", 5353, 53)


def test_ipv4_with_options_finds_the_ports_after_them() -> None:
    # Record route (7 bytes for one address) plus end-of-options padding: IHL 7.
    options = bytes([7, 7, 4]) + bytes(4) + bytes([0])
    packet = ipv4_packet(TCP, tcp(40000, 22), options=options)
    assert packet[0] & 0x0F == 7
    assert decode(packet) == summary(4, "tcp", 40000, 22)


def test_ipv4_with_the_longest_options() -> None:
    packet = ipv4_packet(UDP, udp(1, 2), options=bytes([1]) * 40)
    assert packet[0] & 0x0F == 15
    assert decode(packet) == summary(4, "udp", 1, 2)


def test_ipv4_first_fragment_has_ports() -> None:
    packet = ipv4_packet(UDP, udp(33000, 53, bytes(100)), more_fragments=True)
    assert decode(packet) == summary(4, "udp", 33000, 53, fragment=True)


@pytest.mark.parametrize("more", [True, False], ids=["middle", "last"])
def test_ipv4_later_fragment_has_no_ports(more: bool) -> None:
    # The bytes where the ports would be belong to the middle of the datagram.
    packet = ipv4_packet(UDP, udp(9999, 9999), more_fragments=more, fragment_offset=185)
    assert decode(packet) == summary(4, "udp", None, None, fragment=True)


def test_ipv4_icmp_has_a_name_and_no_ports() -> None:
    assert decode(ipv4_packet(ICMP, icmp_echo())) == summary(4, "icmp", None, None)


def test_ipv4_other_protocol_is_named_by_number() -> None:
    assert decode(ipv4_packet(47, bytes(8))) == summary(4, "47", None, None)


@pytest.mark.parametrize("ihl", [0, 1, 4])
def test_ipv4_header_length_below_minimum_is_an_error(ihl: int) -> None:
    packet = bytearray(ipv4_packet(TCP, tcp(1, 2)))
    packet[0] = 0x40 | ihl
    with pytest.raises(PacketError):
        decode(bytes(packet))


# --- IPv6 -------------------------------------------------------------------------------


def test_ipv6_tcp() -> None:
    assert decode(ipv6_packet(TCP, tcp(51514, 443))) == summary(6, "tcp", 51514, 443)


def test_ipv6_addresses_are_shown_compressed() -> None:
    packet = ipv6_packet(UDP, udp(1, 2), src="2001:0db8:0000:0000:0000:0000:0000:0007", dst="::ffff:192.0.2.1")
    assert decode(packet) == PacketSummary(6, "2001:db8::7", "::ffff:192.0.2.1", "udp", 1, 2)


def test_ipv6_icmp() -> None:
    assert decode(ipv6_packet(ICMPV6, bytes([128, 0, 0, 0, 0, 1, 0, 1]))) == summary(6, "ipv6-icmp", None, None)


def test_ipv6_walks_hop_by_hop_destination_and_routing_headers() -> None:
    chain = options_header(DEST_OPTS, units=1) + options_header(ROUTING) + routing_header(UDP)
    assert len(chain) == 16 + 8 + 24
    assert decode(ipv6_packet(HOP_BY_HOP, chain + udp(546, 547))) == summary(6, "udp", 546, 547)


def test_ipv6_first_fragment_has_ports() -> None:
    packet = ipv6_packet(FRAGMENT, fragment_header(TCP, 0, more=True) + tcp(50000, 5432))
    assert decode(packet) == summary(6, "tcp", 50000, 5432, fragment=True)


@pytest.mark.parametrize("more", [True, False], ids=["middle", "last"])
def test_ipv6_later_fragment_has_no_ports(more: bool) -> None:
    packet = ipv6_packet(FRAGMENT, fragment_header(UDP, 181, more=more) + udp(7, 7))
    assert decode(packet) == summary(6, "udp", None, None, fragment=True)


def test_ipv6_fragment_after_hop_by_hop() -> None:
    packet = ipv6_packet(HOP_BY_HOP, options_header(FRAGMENT) + fragment_header(UDP, 0, more=True) + udp(123, 123))
    assert decode(packet) == summary(6, "udp", 123, 123, fragment=True)


def test_ipv6_auth_header_length_counts_four_byte_units_plus_two() -> None:
    ah = auth_header(TCP)
    assert len(ah) == 24 and ah[1] == 4  # (4 + 2) * 4; the 8-byte rule would give 40
    assert decode(ipv6_packet(AUTH, ah + tcp(60000, 22))) == summary(6, "tcp", 60000, 22)


def test_ipv6_auth_header_with_a_longer_icv() -> None:
    ah = auth_header(UDP, icv=bytes(16))  # e.g. HMAC-SHA-256-128
    assert decode(ipv6_packet(AUTH, ah + udp(500, 4500))) == summary(6, "udp", 500, 4500)


def test_ipv6_no_next_header() -> None:
    assert decode(ipv6_packet(NO_NEXT, b"")) == summary(6, "none", None, None)


def test_ipv6_no_next_header_after_destination_options() -> None:
    assert decode(ipv6_packet(DEST_OPTS, options_header(NO_NEXT))) == summary(6, "none", None, None)


# --- errors and truncation --------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        bytes([0x55]) + bytes(39),  # version 5 (ST)
        bytes([0x05]) + bytes(39),
        bytes([0xF5]) + bytes(59),
    ],
    ids=["empty", "version-5", "version-0", "version-15"],
)
def test_not_an_ip_packet(data: bytes) -> None:
    with pytest.raises(PacketError):
        decode(data)


def _cut_everywhere(packet: bytes, ip_header: int, transport: int) -> None:
    """Every prefix of packet: the IP header cut is an error; a cut before the end of the
    ports is a truncated summary without ports; from there on the ports are known."""
    full = decode(packet)
    assert full.src_port is not None and not full.truncated
    for cut in range(len(packet) + 1):
        data = packet[:cut]
        if cut < ip_header:
            with pytest.raises(PacketError):
                decode(data)
            continue
        result = decode(data)
        assert (result.src, result.dst) == (full.src, full.dst), cut
        if cut < transport + 4:
            assert result.truncated, cut
            assert (result.src_port, result.dst_port) == (None, None), cut
        else:
            assert result == full, cut


def test_ipv4_tcp_cut_at_every_length() -> None:
    _cut_everywhere(ipv4_packet(TCP, tcp(51514, 443)), 20, 20)


def test_ipv4_with_options_cut_at_every_length() -> None:
    _cut_everywhere(ipv4_packet(UDP, udp(5000, 53), options=bytes([1]) * 12), 32, 32)


def test_ipv4_first_fragment_cut_at_every_length() -> None:
    _cut_everywhere(ipv4_packet(TCP, tcp(1, 2), more_fragments=True), 20, 20)


def test_ipv6_tcp_cut_at_every_length() -> None:
    _cut_everywhere(ipv6_packet(TCP, tcp(51514, 443)), IPV6_HEADER, IPV6_HEADER)


def test_ipv6_extension_chain_cut_at_every_length() -> None:
    chain = (options_header(DEST_OPTS, units=1) + options_header(ROUTING) + routing_header(AUTH)
             + auth_header(FRAGMENT) + fragment_header(UDP, 0, more=True))
    _cut_everywhere(ipv6_packet(HOP_BY_HOP, chain + udp(1000, 2000)), IPV6_HEADER, IPV6_HEADER + len(chain))


def test_ipv6_cut_inside_the_fragment_header_is_still_a_fragment() -> None:
    packet = ipv6_packet(FRAGMENT, fragment_header(TCP, 0, more=True) + tcp(1, 2))
    for cut in range(IPV6_HEADER, IPV6_HEADER + 8):
        result = decode(packet[:cut])
        assert result.fragment and result.truncated and result.src_port is None


def test_icmp_cut_after_the_ip_header_is_not_truncated() -> None:
    # No ports are expected, so nothing is missing.
    assert decode(ipv4_packet(ICMP, icmp_echo())[:20]) == summary(4, "icmp", None, None)


# --- any bytes at all -------------------------------------------------------------------

_NEXT_HEADERS = [HOP_BY_HOP, ROUTING, FRAGMENT, DEST_OPTS, AUTH, NO_NEXT, TCP, UDP, ICMPV6, 135, 139, 140, 50]


@st.composite
def ip_like(draw: st.DrawFn) -> bytes:
    """Bytes that get past the version check often and walk extension headers, since
    uniformly random bytes would almost never reach the deeper paths."""
    kind = draw(st.sampled_from(["random", "v4", "v6"]))
    if kind == "random":
        return draw(st.binary(max_size=128))
    if kind == "v4":
        first = 0x40 | draw(st.integers(0, 15))
        return bytes([first]) + draw(st.binary(max_size=127))
    header = bytearray(draw(st.binary(min_size=IPV6_HEADER, max_size=IPV6_HEADER)))
    header[0] = 0x60 | (header[0] & 0x0F)
    header[6] = draw(st.sampled_from(_NEXT_HEADERS))
    body = bytearray()
    for _ in range(draw(st.integers(0, 6))):
        chunk = bytearray(draw(st.binary(min_size=2, max_size=24)))
        chunk[0] = draw(st.sampled_from(_NEXT_HEADERS))
        chunk[1] = draw(st.integers(0, 3))
        body += chunk
    return bytes(header + body)[: draw(st.integers(0, 128))]


@settings(max_examples=300, deadline=None)
@given(ip_like())
def test_any_bytes_give_a_summary_or_a_packet_error(data: bytes) -> None:
    try:
        result = decode(data)
    except PacketError:
        return
    assert isinstance(result, PacketSummary)
    assert result.family in (4, 6)
    assert (result.src_port is None) == (result.dst_port is None)
    if result.src_port is not None:
        assert result.protocol in ("tcp", "udp") and not result.truncated
        assert result.dst_port is not None
        assert 0 <= result.src_port <= 0xFFFF and 0 <= result.dst_port <= 0xFFFF
