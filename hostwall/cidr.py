"""Strict address parsing and interval arithmetic.

nft itself is too forgiving to be handed operator input: it silently clears host bits
(``10.0.3.5/24`` becomes ``10.0.3.0/24``) and resolves a token such as ``300.1.2.3`` as a
host name, sending a DNS query from a firewall reload. Every address reaches the
ruleset only as an integer interval produced here.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_V4_MAX = (1 << 32) - 1
_V6_MAX = (1 << 128) - 1
PERMANENT = math.inf

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class CidrError(ValueError):
    """A CIDR string that must not reach the kernel; the message says what to write."""


def parse_cidr(text: str) -> IPNetwork:
    """Parse one allowlist CIDR, refusing everything ambiguous or dangerous."""
    if not isinstance(text, str):
        raise CidrError(f"expected a CIDR string such as 203.0.113.45/32, got {text!r}")
    raw = text
    if raw != raw.strip() or any(ch.isspace() for ch in raw):
        raise CidrError(f"{raw!r} contains white space; write the CIDR alone, e.g. 203.0.113.45/32")
    if "%" in raw:
        raise CidrError(
            f"{raw!r} has a zone id; zone ids are interface-local and cannot be filtered on, "
            "write the address without %zone"
        )
    _, slash, len_part = raw.partition("/")
    if slash and not len_part.isdigit():
        raise CidrError(f"{raw!r} has a bad prefix length; write e.g. /24 or /32")
    try:
        network = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        host_bits_hint = _host_bits_hint(raw)
        if host_bits_hint:
            raise CidrError(host_bits_hint) from exc
        raise CidrError(
            f"{raw!r} is not an IPv4 or IPv6 address or network "
            "(write e.g. 203.0.113.45/32, 10.0.1.0/24 or 2001:db8::/48; "
            "IPv4 octets without leading zeros)"
        ) from exc
    if network.prefixlen == 0:
        raise CidrError(
            f"{raw!r} allows every address, which turns the allowlist off; "
            "list the networks that need access instead"
        )
    if isinstance(network, ipaddress.IPv6Network):
        if network.subnet_of(_V4_MAPPED):
            assert network.network_address.ipv4_mapped is not None
            v4 = network.network_address.ipv4_mapped
            raise CidrError(
                f"{raw!r} is an IPv4-mapped IPv6 address; IPv4 clients arrive as IPv4, "
                f"write {v4}/{max(network.prefixlen - 96, 0)} instead"
            )
        if network.subnet_of(_V4_COMPATIBLE) and int(network.network_address) > 1:
            raise CidrError(
                f"{raw!r} is a deprecated IPv4-compatible IPv6 address; "
                "write the IPv4 address itself"
            )
    return network


def parse_interval(text: str, expires: float = PERMANENT) -> Interval:
    """parse_cidr's verdict as an Interval, fast for the common case.

    Large ``file:`` lists are parsed line by line, and ipaddress takes microseconds per
    network. glibc's inet_pton is as strict as parse_cidr needs (no leading zeros, four
    octets, no zone ids, no white space), so a string it accepts with a plain prefix
    length and no host bits is decided here; everything else goes through parse_cidr,
    which rejects it with the precise message or accepts the rare odd form.
    """
    address, slash, length = text.partition("/")
    family, packing = (6, socket.AF_INET6) if ":" in address else (4, socket.AF_INET)
    bits = 32 if family == 4 else 128
    try:
        value = int.from_bytes(socket.inet_pton(packing, address), "big")
    except OSError:
        return Interval.of(parse_cidr(text), expires)
    if slash:
        if not (length.isdigit() and length[0] != "0" and int(length) <= bits):
            return Interval.of(parse_cidr(text), expires)
        prefixlen = int(length)
    else:
        prefixlen = bits
    hostmask = (1 << (bits - prefixlen)) - 1
    if value & hostmask or (family == 6 and value >> 32 in (0, 0xFFFF)):
        return Interval.of(parse_cidr(text), expires)
    return Interval(family, value, value | hostmask, expires)


def _host_bits_hint(raw: str) -> str | None:
    try:
        loose = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        return None
    address = raw.partition("/")[0]
    single = 32 if loose.version == 4 else 128
    return (
        f"{raw!r} has host bits set: write {address}/{single} for the single address "
        f"or {loose} for the whole network"
    )


@dataclass(frozen=True, order=True)
class Interval:
    """An inclusive address range of one family, with its expiry (unix time or PERMANENT)."""

    family: int
    first: int
    last: int
    expires: float = PERMANENT

    @classmethod
    def of(cls, network: IPNetwork, expires: float = PERMANENT) -> Interval:
        return cls(
            network.version,
            int(network.network_address),
            int(network.broadcast_address),
            expires,
        )

    def contains(self, address: int) -> bool:
        return self.first <= address <= self.last

    def as_prefix(self) -> IPNetwork | None:
        """The single network this interval is, or None when it is a plain range."""
        size = self.last - self.first + 1
        if size & (size - 1) or self.first % size:
            return None
        bits = 32 if self.family == 4 else 128
        prefixlen = bits - (size.bit_length() - 1)
        # ip_network() guesses the family from the integer and would turn ::/16 into
        # 0.0.0.0/16, so the family is chosen explicitly.
        if self.family == 4:
            return ipaddress.IPv4Network((self.first, prefixlen))
        return ipaddress.IPv6Network((self.first, prefixlen))

    def first_address(self) -> str:
        return format_address(self.family, self.first)

    def last_address(self) -> str:
        return format_address(self.family, self.last)

    def __str__(self) -> str:
        size = self.last - self.first + 1
        if size & (size - 1) == 0 and self.first % size == 0:
            bits = 32 if self.family == 4 else 128
            return f"{self.first_address()}/{bits - size.bit_length() + 1}"
        return f"{self.first_address()}-{self.last_address()}"


def format_address(family: int, value: int) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return str(ipaddress.IPv6Address(value))  # RFC 5952 form, as nft and operators write it


def _merge_same_expiry(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    intervals.sort()
    merged: list[tuple[int, int]] = []
    for first, last in intervals:
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged


def _subtract(pieces: list[tuple[int, int]], covered: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """pieces minus covered; both sorted and non-overlapping."""
    result: list[tuple[int, int]] = []
    index = 0
    for first, last in pieces:
        start = first
        while index < len(covered) and covered[index][1] < start:
            index += 1
        probe = index
        while probe < len(covered) and covered[probe][0] <= last:
            c_first, c_last = covered[probe]
            if c_first > start:
                result.append((start, c_first - 1))
            start = max(start, c_last + 1)
            if start > last:
                break
            probe += 1
        if start <= last:
            result.append((start, last))
    return result


def merge_intervals(intervals: Iterable[Interval]) -> list[Interval]:
    """Canonical, non-overlapping intervals per family, sorted.

    Where entries overlap, the longest-lived one wins for the shared addresses, so an
    expiring entry never shortens a permanent one. Adjacent ranges with the same expiry
    join; ranges with different expiries stay apart, because the kernel keeps one
    timeout per element.
    """
    by_family_expiry: dict[tuple[int, float], list[tuple[int, int]]] = {}
    for interval in intervals:
        by_family_expiry.setdefault((interval.family, interval.expires), []).append(
            (interval.first, interval.last)
        )
    result: list[Interval] = []
    for family in (4, 6):
        covered: list[tuple[int, int]] = []
        expiries = sorted((e for f, e in by_family_expiry if f == family), reverse=True)
        for expires in expiries:
            merged = _merge_same_expiry(by_family_expiry[(family, expires)])
            remaining = _subtract(merged, covered) if covered else merged
            result.extend(Interval(family, first, last, expires) for first, last in remaining)
            covered = _merge_same_expiry(covered + remaining)
    result.sort()
    return result


def family_max(family: int) -> int:
    return _V4_MAX if family == 4 else _V6_MAX
