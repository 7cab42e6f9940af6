"""Ethernet frames for probes: a TCP SYN or a UDP datagram from any source. Pure.

A normal socket cannot send from an address the host does not own, and adding
thousands of addresses to an interface costs more than the probes; a frame written
to an AF_PACKET socket carries whatever source it was built with.
"""

from __future__ import annotations

import socket
import struct
import sys

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
PROTO_TCP, PROTO_UDP = 6, 17
UDP_PAYLOAD = b"hostwall-verify"
_NATIVE_LITTLE = sys.byteorder == "little"


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071). The one's-complement sum does not depend on the
    byte order it is added in, so the words are summed natively and swapped once."""
    if len(data) % 2:
        data += b"\0"
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    result = ~total & 0xFFFF
    return ((result & 0xFF) << 8 | result >> 8) if _NATIVE_LITTLE else result


def _pseudo_header(family: int, source: bytes, destination: bytes, protocol: int, length: int) -> bytes:
    if family == 6:
        return source + destination + struct.pack("!IxxxB", length, protocol)
    return source + destination + struct.pack("!xBH", protocol, length)


def transport(family: int, source: bytes, destination: bytes, protocol: str, source_port: int,
              destination_port: int) -> bytes:
    """A SYN (20 bytes, no options) or a UDP datagram, checksummed for the addresses."""
    if protocol == "tcp":
        segment = struct.pack("!HHIIBBHHH", source_port, destination_port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
        total = checksum(_pseudo_header(family, source, destination, PROTO_TCP, len(segment)) + segment)
        return segment[:16] + struct.pack("!H", total) + segment[18:]
    length = 8 + len(UDP_PAYLOAD)
    datagram = struct.pack("!HHHH", source_port, destination_port, length, 0) + UDP_PAYLOAD
    total = checksum(_pseudo_header(family, source, destination, PROTO_UDP, length) + datagram) or 0xFFFF
    return datagram[:6] + struct.pack("!H", total) + datagram[8:]


def frame(family: int, source: int, destination: bytes, protocol: str, source_port: int, destination_port: int,
          ethernet: bytes) -> bytes:
    """ethernet: destination and source MAC (12 bytes). destination: the packed address."""
    packed = source.to_bytes(4 if family == 4 else 16, "big")
    payload = transport(family, packed, destination, protocol, source_port, destination_port)
    number = PROTO_TCP if protocol == "tcp" else PROTO_UDP
    if family == 4:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, number, 0,
                             packed, destination)
        header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
        return ethernet + struct.pack("!H", ETH_P_IP) + header + payload
    header = struct.pack("!IHBB", 6 << 28, len(payload), number, 64) + packed + destination
    return ethernet + struct.pack("!H", ETH_P_IPV6) + header + payload


def packed_address(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)
