"""Hand-made packets for the bypass battery: what a normal socket will not send.

SYNs split into IP fragments (IPv4, and IPv6 with a tiny first fragment), datagrams
from IPv4-mapped IPv6 sources, and sources that belong to another link. Frames are
written to a client namespace's veth with an AF_PACKET socket, so the client's own
stack never sees them; whatever the server answers is counted by an observer table
in the receiving client namespace (never in the root namespace).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from hostwall import netns

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
PROTO_TCP, PROTO_UDP, NEXT_FRAGMENT = 6, 17, 44
OBSERVER = "observer"


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def _pseudo_header(source: str, destination: str, protocol: int, length: int) -> bytes:
    if ":" in source:
        return _packed(source) + _packed(destination) + struct.pack("!IxxxB", length, protocol)
    return _packed(source) + _packed(destination) + struct.pack("!xBH", protocol, length)


def tcp_syn(source: str, destination: str, source_port: int, destination_port: int, sequence: int = 1) -> bytes:
    """A 32-byte SYN with the options Linux sends (MSS, SACK permitted, window scale),
    checksummed for the given addresses: long enough to split at 8 or 24 bytes with
    something left for the second fragment."""
    header = struct.pack("!HHIIBBHHH", source_port, destination_port, sequence, 0, 8 << 4, 0x02, 64240, 0, 0)
    options = struct.pack("!BBH", 2, 4, 1460) + bytes([1, 1, 4, 2]) + bytes([1, 3, 3, 7])
    segment = header + options
    total = checksum(_pseudo_header(source, destination, PROTO_TCP, len(segment)) + segment)
    return segment[:16] + struct.pack("!H", total) + segment[18:]


def udp(source: str, destination: str, source_port: int, destination_port: int, payload: bytes) -> bytes:
    length = 8 + len(payload)
    datagram = struct.pack("!HHHH", source_port, destination_port, length, 0) + payload
    total = checksum(_pseudo_header(source, destination, PROTO_UDP, length) + datagram) or 0xFFFF
    return datagram[:6] + struct.pack("!H", total) + datagram[8:]


def ipv4(source: str, destination: str, protocol: int, payload: bytes, *, ident: int = 0x4877,
         offset: int = 0, more_fragments: bool = False) -> bytes:
    """offset in bytes (a multiple of 8)."""
    flags_offset = (0x2000 if more_fragments else 0) | (offset // 8)
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, flags_offset, 64, protocol, 0,
                         _packed(source), _packed(destination))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def ipv4_fragments(source: str, destination: str, protocol: int, payload: bytes, first: int) -> list[bytes]:
    """payload split after `first` bytes (a multiple of 8) into two fragments."""
    return [ipv4(source, destination, protocol, payload[:first], more_fragments=True),
            ipv4(source, destination, protocol, payload[first:], offset=first)]


def ipv6(source: str, destination: str, next_header: int, payload: bytes) -> bytes:
    return (struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64)
            + _packed(source) + _packed(destination) + payload)


def ipv6_fragments(source: str, destination: str, protocol: int, payload: bytes, first: int) -> list[bytes]:
    """payload split after `first` bytes (a multiple of 8), each part behind a fragment header."""
    ident = 0x48770001

    def fragment(part: bytes, offset: int, more: bool) -> bytes:
        header = struct.pack("!BBHI", protocol, 0, offset | int(more), ident)
        return ipv6(source, destination, NEXT_FRAGMENT, header + part)

    return [fragment(payload[:first], 0, True), fragment(payload[first:], first, False)]


def _link(namespace: str, device: str) -> dict[str, object]:
    result = subprocess.run(["ip", "-j", "-n", namespace, "link", "show", "dev", device],
                            capture_output=True, text=True, check=True, timeout=10)
    link: dict[str, object] = json.loads(result.stdout)[0]
    return link


@dataclass(frozen=True)
class Wire:
    """The Ethernet link between a client namespace's eth0 and its peer in the server."""

    namespace: str
    device: str
    peer_namespace: str
    peer_device: str

    @contextlib.contextmanager
    def opened(self) -> Iterator[Callable[[bytes], None]]:
        """A function that puts one IP packet on the wire, framed for the peer."""
        source_mac = bytes.fromhex(str(_link(self.namespace, self.device)["address"]).replace(":", ""))
        destination_mac = bytes.fromhex(str(_link(self.peer_namespace, self.peer_device)["address"]).replace(":", ""))
        with netns.entered(self.namespace):
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with sock:
            sock.bind((self.device, 0))

            def send(packet: bytes) -> None:
                ether_type = ETH_P_IPV6 if packet[0] >> 4 == 6 else ETH_P_IP
                sock.send(destination_mac + source_mac + struct.pack("!H", ether_type) + packet)

            yield send

    def send(self, packets: list[bytes]) -> None:
        with self.opened() as send:
            for packet in packets:
                send(packet)


def watch_syn_acks(namespace: str, port: int) -> None:
    """Counts, in a client namespace, every SYN-ACK from port that reaches it."""
    ruleset = (
        f"table inet {OBSERVER} {{\n"
        "  counter syn_acks {}\n"
        "  chain prerouting {\n"
        "    type filter hook prerouting priority -500; policy accept;\n"
        f"    tcp sport {port} tcp flags & (syn | ack) == syn | ack counter name syn_acks\n"
        "  }\n"
        "}\n"
    )
    subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", "-"], input=ruleset, text=True,
                   check=True, capture_output=True, timeout=10)


def syn_acks(namespace: str) -> int:
    result = subprocess.run(["ip", "netns", "exec", namespace, "nft", "-j", "list", "counter", "inet", OBSERVER,
                             "syn_acks"], capture_output=True, text=True, check=True, timeout=10)
    counter = next(item["counter"] for item in json.loads(result.stdout)["nftables"] if "counter" in item)
    return int(counter["packets"])


def source_port() -> int:
    return 20000 + os.getpid() % 20000
