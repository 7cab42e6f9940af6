"""Decoding the start of a logged packet: IP header (walking IPv6 extension headers)
and the TCP/UDP ports. Pure; the kernel hands over at most the first 128 bytes."""

from __future__ import annotations

import socket
import struct

from msgspec import Struct

PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "ipv6-icmp"}
# Extension headers that may precede the transport header (RFC 8200 section 4).
_HOP_BY_HOP, _ROUTING, _FRAGMENT, _DEST_OPTS, _AUTH, _NO_NEXT = 0, 43, 44, 60, 51, 59
_MOBILITY, _HIP, _SHIM6 = 135, 139, 140
_GENERIC_EXTENSIONS = {_HOP_BY_HOP, _ROUTING, _DEST_OPTS, _MOBILITY, _HIP, _SHIM6}


class PacketSummary(Struct, frozen=True):
    family: int
    src: str
    dst: str
    protocol: str
    src_port: int | None
    dst_port: int | None
    fragment: bool = False
    truncated: bool = False


class PacketError(ValueError):
    """The bytes are not an IP packet hostwall can summarise."""


def decode(data: bytes) -> PacketSummary:
    if not data:
        raise PacketError("empty packet")
    version = data[0] >> 4
    if version == 4:
        return _decode_ipv4(data)
    if version == 6:
        return _decode_ipv6(data)
    raise PacketError(f"IP version {version}")


def _ports(protocol: int, data: bytes, offset: int) -> tuple[int | None, int | None, bool]:
    if protocol not in (6, 17):
        return None, None, False
    if len(data) < offset + 4:
        return None, None, True
    source, destination = struct.unpack_from("!HH", data, offset)
    return source, destination, False


def _decode_ipv4(data: bytes) -> PacketSummary:
    if len(data) < 20:
        raise PacketError("truncated IPv4 header")
    header_length = (data[0] & 0x0F) * 4
    if header_length < 20:
        raise PacketError("bad IPv4 header length")
    if len(data) < header_length:
        # ip_rcv() drops such packets before netfilter sees them: these bytes are not a packet.
        raise PacketError("truncated IPv4 options")
    fragment_field = struct.unpack_from("!H", data, 6)[0]
    offset_in_units = fragment_field & 0x1FFF
    protocol = data[9]
    src = socket.inet_ntop(socket.AF_INET, data[12:16])
    dst = socket.inet_ntop(socket.AF_INET, data[16:20])
    if offset_in_units:
        # A later fragment: the ports live in the first one.
        return PacketSummary(4, src, dst, _name(protocol), None, None, fragment=True)
    source_port, dest_port, truncated = _ports(protocol, data, header_length)
    more_fragments = bool(fragment_field & 0x2000)
    return PacketSummary(4, src, dst, _name(protocol), source_port, dest_port,
                         fragment=more_fragments, truncated=truncated)


def _decode_ipv6(data: bytes) -> PacketSummary:
    if len(data) < 40:
        raise PacketError("truncated IPv6 header")
    next_header = data[6]
    src = socket.inet_ntop(socket.AF_INET6, data[8:24])
    dst = socket.inet_ntop(socket.AF_INET6, data[24:40])
    offset = 40
    fragment = False
    for _ in range(16):  # bounded: a packet cannot chain more headers than fit in 128 bytes
        if next_header in _GENERIC_EXTENSIONS:
            if len(data) < offset + 2:
                return PacketSummary(6, src, dst, "unknown", None, None, fragment, truncated=True)
            next_header, length = data[offset], (data[offset + 1] + 1) * 8
            offset += length
        elif next_header == _AUTH:
            if len(data) < offset + 2:
                return PacketSummary(6, src, dst, "unknown", None, None, fragment, truncated=True)
            next_header, length = data[offset], (data[offset + 1] + 2) * 4
            offset += length
        elif next_header == _FRAGMENT:
            if len(data) < offset + 8:
                return PacketSummary(6, src, dst, "unknown", None, None, True, truncated=True)
            fragment = True
            fragment_offset = struct.unpack_from("!H", data, offset + 2)[0] >> 3
            next_header = data[offset]
            offset += 8
            if fragment_offset:
                return PacketSummary(6, src, dst, _name(next_header), None, None, fragment=True)
        else:
            break
    if next_header == _NO_NEXT:
        return PacketSummary(6, src, dst, "none", None, None, fragment)
    source_port, dest_port, truncated = _ports(next_header, data, offset)
    return PacketSummary(6, src, dst, _name(next_header), source_port, dest_port, fragment, truncated)


def _name(protocol: int) -> str:
    return PROTOCOL_NAMES.get(protocol, str(protocol))
