"""Strict address parsing and interval arithmetic.

nft itself is too forgiving to be handed operator input: it silently clears host bits
(``10.0.3.5/24`` becomes ``10.0.3.0/24``) and resolves a token such as ``300.1.2.3`` as a
host name, sending a DNS query from a firewall reload. Every address reaches the
ruleset only as an integer interval produced here.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import itertools
import math
import operator
import socket
import struct
from array import array
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

from msgspec import Struct

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
    shown = _shown(raw)
    if raw != raw.strip() or any(ch.isspace() for ch in raw):
        raise CidrError(f"{shown} contains white space; write the CIDR alone, e.g. 203.0.113.45/32")
    if "%" in raw:
        raise CidrError(
            f"{shown} has a zone id; zone ids are interface-local and cannot be filtered on, "
            "write the address without %zone"
        )
    _, slash, len_part = raw.partition("/")
    # isdigit() alone admits other scripts' digits, which int() would read as numbers.
    if slash and not (len_part.isascii() and len_part.isdigit()):
        raise CidrError(f"{shown} has a bad prefix length; write e.g. /24 or /32")
    if slash and len(len_part) > 1 and len_part.startswith("0"):
        # Refused like leading zeros in octets: other parsers read them differently.
        raise CidrError(f"{shown} has a prefix length with a leading zero; write /{int(len_part)}")
    try:
        network = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        host_bits_hint = _host_bits_hint(raw)
        if host_bits_hint:
            raise CidrError(host_bits_hint) from exc
        raise CidrError(
            f"{shown} is not an IPv4 or IPv6 address or network "
            "(write e.g. 203.0.113.45/32, 10.0.1.0/24 or 2001:db8::/48; "
            "IPv4 octets without leading zeros)"
        ) from exc
    if network.prefixlen == 0:
        raise CidrError(
            f"{shown} allows every address, which turns the allowlist off; "
            "list the networks that need access instead"
        )
    if isinstance(network, ipaddress.IPv6Network):
        if network.subnet_of(_V4_MAPPED):
            assert network.network_address.ipv4_mapped is not None
            v4 = network.network_address.ipv4_mapped
            raise CidrError(
                f"{shown} is an IPv4-mapped IPv6 address; IPv4 clients arrive as IPv4, "
                f"write {v4}/{max(network.prefixlen - 96, 0)} instead"
            )
        # :: and ::1 are not IPv4 addresses; any wider part of ::/96 is.
        if network.subnet_of(_V4_COMPATIBLE) and int(network.broadcast_address) > 1:
            raise CidrError(
                f"{shown} is a deprecated IPv4-compatible IPv6 address; "
                "write the IPv4 address itself"
            )
    return network


# "" (no prefix length) or "/N" in its one canonical spelling -> the host bits' mask.
_HOSTMASKS = {
    bits: {"": 0} | {f"/{length}": (1 << (bits - length)) - 1 for length in range(1, bits + 1)}
    for bits in (32, 128)
}


def parse_interval(text: str, expires: float = PERMANENT) -> Interval:
    """parse_cidr's verdict as an Interval, fast for the common case.

    Large ``file:`` lists are parsed line by line, and ipaddress takes microseconds per
    network. glibc's inet_pton is as strict as parse_cidr needs (no leading zeros, four
    octets, no zone ids, no white space), so a string it accepts with a plain prefix
    length and no host bits is decided here; everything else goes through parse_cidr,
    which rejects it with the precise message or accepts the rare odd form.
    """
    address, slash, length = text.partition("/")
    if ":" in address:
        family, packing, hostmasks = 6, socket.AF_INET6, _HOSTMASKS[128]
    else:
        family, packing, hostmasks = 4, socket.AF_INET, _HOSTMASKS[32]
    # A prefix length in any other spelling (leading zeros, signs, other digits, /0) is
    # not in the table and goes to parse_cidr.
    hostmask = hostmasks.get(slash + length)
    try:
        value = int.from_bytes(socket.inet_pton(packing, address), "big")
    except (OSError, ValueError):  # ValueError: an embedded NUL, which C cannot be given
        return Interval.of(parse_cidr(text), expires)
    if hostmask is None or value & hostmask or (family == 6 and value >> 32 in (0, 0xFFFF)):
        return Interval.of(parse_cidr(text), expires)
    return Interval(family, value, value | hostmask, expires)


def parse_list_lines(
    lines: Sequence[str], first_number: int, v4: list[int], v6: list[int]
) -> list[tuple[int, str]]:
    """parse_interval's fast case for the lines of a list file, in one tight loop.

    Appends the range_key of each line that holds a CIDR to v4 or v6 and returns
    (line number, CIDR) of the lines the fast case cannot decide: the caller gives those
    to parse_interval, which accepts a rare odd form or says exactly what is wrong. A
    comment starts at "#"; white space around the CIDR and empty lines are ignored.
    """
    undecided: list[tuple[int, str]] = []
    pton, from_bytes, af_inet, af_inet6 = socket.inet_pton, int.from_bytes, socket.AF_INET, socket.AF_INET6
    masks4, masks6 = _HOSTMASKS[32], _HOSTMASKS[128]
    append4, append6 = v4.append, v6.append
    for number, line in enumerate(lines, first_number):
        content = (line.split("#", 1)[0] if "#" in line else line).strip()
        if not content:
            continue
        address, slash, length = content.partition("/")
        try:
            if ":" in address:
                value, hostmask = from_bytes(pton(af_inet6, address), "big"), masks6[slash + length]
                # ::/96 and ::ffff:0:0/96 hold IPv4 in disguise: parse_cidr says what to write.
                if value & hostmask or value >> 32 in (0, 0xFFFF):
                    raise ValueError(content)
                append6(value << 128 | value | hostmask)
            else:
                value, hostmask = from_bytes(pton(af_inet, address), "big"), masks4[slash + length]
                if value & hostmask:
                    raise ValueError(content)
                append4(value << 32 | value | hostmask)
        except (OSError, ValueError, KeyError):  # ValueError also: an embedded NUL
            undecided.append((number, content))
    return undecided


def _shown(raw: str, limit: int = 60) -> str:
    """repr of raw, cut short so that an error about a megabyte of text stays one line."""
    text = repr(raw)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(raw)} characters)"


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


class Interval(Struct, frozen=True, order=True):
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


def merge_same_expiry(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, with overlapping and adjacent ranges joined (sorts intervals in place)."""
    intervals.sort()
    return _merge_sorted(intervals)


def range_key(family: int, first: int, last: int) -> int:
    """A range as one integer, first address then last: keys sort as the ranges do, and a
    key's bytes are the range's record (see IntervalSet)."""
    return first << (32 if family == 4 else 128) | last


def merged_records(family: int, keys: list[int]) -> tuple[bytes, bytes | None]:
    """The records of the ranges (range_key) sorted with overlapping and adjacent ones
    joined, as merge_same_expiry joins them, and the records of every range sorted when
    joining changed any (else None). Sorts keys in place.

    Most lists join few ranges or none, so the places where a range reaches its
    predecessor are found at C speed (map over the sorted columns) and only those are
    joined in Python: with the records made from the keys' bytes, twice as fast as
    joining range by range and encoding the result (150k IPv4: 57 ms against 120 ms)."""
    keys.sort()
    every_range = _records_of_keys(family, keys)
    firsts: Sequence[int]
    lasts: Sequence[int]
    if family == 4:
        flat = struct.unpack(f">{2 * len(keys)}I", every_range)
        firsts, lasts = flat[0::2], flat[1::2]
    else:
        firsts = list(map(operator.rshift, keys, itertools.repeat(128)))
        lasts = list(map(operator.and_, keys, itertools.repeat((1 << 128) - 1)))
    # apart[i]: range i + 1 starts more than one address after range i ends. Where each
    # range is apart from the one before, no range can reach any later one either.
    apart = list(map(operator.gt, firsts[1:], map(operator.add, lasts, itertools.repeat(1))))
    if all(apart):
        return every_range, None
    joined: list[int] = []
    start, count = 0, len(keys)
    while True:
        try:
            reaching = apart.index(False, start)  # range reaching + 1 joins range reaching
        except ValueError:
            joined.extend(keys[start:])
            break
        joined.extend(keys[start:reaching])
        first, end = firsts[reaching], lasts[reaching]
        index = reaching + 1
        while index < count and firsts[index] <= end + 1:
            end = max(end, lasts[index])
            index += 1
        joined.append(range_key(family, first, end))
        # Range index starts a group of its own, so apart[index] (against its own end)
        # is again the truth for the ranges after it.
        start = index
    return _records_of_keys(family, joined), every_range


def _records_of_keys(family: int, keys: list[int]) -> bytes:
    """The records (see IntervalSet) of ranges given as range_key: each key's own bytes."""
    if family == 4:
        return struct.pack(f">{len(keys)}Q", *keys)
    return b"".join([key.to_bytes(32, "big") for key in keys])


def _merge_sorted(intervals: list[tuple[int, int]]) -> list[tuple[int, int]]:
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
            merged = merge_same_expiry(by_family_expiry[(family, expires)])
            remaining = _subtract(merged, covered) if covered else merged
            result.extend(Interval(family, first, last, expires) for first, last in remaining)
            covered = merge_same_expiry(covered + remaining)
    result.sort()
    return result


def family_max(family: int) -> int:
    return _V4_MAX if family == 4 else _V6_MAX


_ADDRESS_BYTES = {4: 4, 6: 16}
# Byte maps for IntervalSet._wider_flags: any non-zero byte to 1; 0 and 1 swapped.
_NONZERO = bytes([0] + [1] * 255)
_FLIPPED = bytes([1, 0] + [0] * 254)
_EXPIRY = struct.Struct(">d")
# Big-endian IEEE doubles of positive numbers sort like the numbers, +inf last.
PERMANENT_BYTES = _EXPIRY.pack(PERMANENT)
_SET_MAGIC = b"HWSET1\n"
_SET_HEADER = struct.Struct(">BBBQ")  # family, ordered, has expiries, count


# The size of a prefix's block -> its length, per address width.
_PREFIX_LENGTHS = {bits: {1 << (bits - length): length for length in range(bits + 1)} for bits in (32, 128)}
LOW_IPV6 = 1 << 48  # IPv6 addresses below this start with 80 zero bits


class IntervalSet(Sequence[Interval]):
    """An immutable sequence of intervals of one family, held as bytes.

    ``ranges`` has one record per interval: first and last address, big-endian at the
    family's width, so that byte order is address order. ``expiries`` has one
    big-endian double per interval, or is None when every interval is permanent (always
    None then, so that equal sets have equal bytes). A 100k-element allowlist is then
    two byte strings instead of 100k objects: equality, hashing and digests run at C
    speed, and two ordered sets are diffed through their common prefix and suffix,
    decoding only the window between them.

    ``ordered`` promises that the intervals are sorted and pairwise disjoint (each ends
    before the next starts), as merged sets are; constructors that cannot know it check
    it (``of``) or leave it False.
    """

    __slots__ = ("_diff", "_digest", "_hash", "expiries", "family", "ordered", "ranges")

    family: int
    ranges: bytes
    expiries: bytes | None
    ordered: bool
    _digest: str | None
    _hash: int | None
    _diff: tuple[IntervalSet, tuple[tuple[Interval, ...], tuple[Interval, ...]]] | None

    def __init__(self, family: int, ranges: bytes = b"", expiries: bytes | None = None, *,
                 ordered: bool = False) -> None:
        if family not in _ADDRESS_BYTES:
            raise ValueError(f"address family must be 4 or 6, not {family!r}")
        width = 2 * _ADDRESS_BYTES[family]
        if len(ranges) % width:
            raise ValueError(f"{len(ranges)} bytes are not a whole number of IPv{family} records")
        count = len(ranges) // width
        if expiries is not None:
            if len(expiries) != _EXPIRY.size * count:
                raise ValueError(f"{len(expiries)} bytes of expiries for {count} intervals")
            if expiries == PERMANENT_BYTES * count:
                expiries = None
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "ranges", bytes(ranges))
        object.__setattr__(self, "expiries", None if expiries is None else bytes(expiries))
        object.__setattr__(self, "ordered", ordered or count <= 1)
        object.__setattr__(self, "_digest", None)
        object.__setattr__(self, "_hash", None)
        object.__setattr__(self, "_diff", None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"IntervalSet is immutable; cannot set {name}")

    @classmethod
    def of(cls, family: int, intervals: Iterable[Interval]) -> IntervalSet:
        """The given intervals, in the given order (checked for being ordered)."""
        items = list(intervals)
        for interval in items:
            if interval.family != family:
                raise ValueError(f"{interval} is not an IPv{family} interval")
            if not 0 <= interval.first <= interval.last <= family_max(family):
                raise ValueError(f"interval {interval.first}-{interval.last} is not an IPv{family} range")
        ordered = all(a.last < b.first for a, b in itertools.pairwise(items))
        ranges = _records_of_keys(family, [range_key(family, i.first, i.last) for i in items])
        expiries = None
        if any(i.expires != PERMANENT for i in items):
            expiries = struct.pack(f">{len(items)}d", *(i.expires for i in items))
        return cls(family, ranges, expiries, ordered=ordered)

    @classmethod
    def merged(cls, family: int, intervals: Sequence[Interval]) -> IntervalSet:
        """IntervalSet.of(family, merge_intervals(intervals)) for intervals of this family.
        When none of them expires (most inline entries), they are merged as records, at C
        speed (merged_records), instead of as Interval objects."""
        if all(interval.family == family and interval.expires == PERMANENT for interval in intervals):
            keys = [range_key(family, interval.first, interval.last) for interval in intervals]
            return cls(family, merged_records(family, keys)[0], ordered=True)
        return cls.of(family, merge_intervals(intervals))

    # -- the sequence --------------------------------------------------------------

    @property
    def record_size(self) -> int:
        return 2 * _ADDRESS_BYTES[self.family]

    def __len__(self) -> int:
        return len(self.ranges) // self.record_size

    def partition_singles(self) -> tuple[IntervalSet, IntervalSet]:
        """(the intervals that are single addresses, the wider ones), each in this order.

        Found on the whole records as one integer and picked as 64-bit words at C speed
        (itertools.compress), not decoded: a full load of a 100k set partitions it, and
        decoding cost 0.1 s, comparing address by address 10 ms."""
        wider = self._wider_flags()
        count = wider.count(0)
        if count in (0, len(self)):
            empty = IntervalSet(self.family, ordered=True)
            return (self, empty) if count else (empty, self)
        return self._pick(wider.translate(_FLIPPED)), self._pick(wider)

    def _wider_flags(self) -> bytes:
        """One byte a record: 1 where its first and last address differ, else 0."""
        width, size = _ADDRESS_BYTES[self.family], self.record_size
        # Little-endian, so that byte k of the records is byte k of the integer: shifted
        # by an address, each record's first address meets its last in one XOR.
        whole = int.from_bytes(self.ranges, "little")
        differing = int.from_bytes((whole ^ whole >> 8 * width).to_bytes(len(self.ranges), "little")
                                   .translate(_NONZERO), "little")
        span = 1
        while span < width:  # byte k becomes the OR of bytes k .. k + width - 1
            differing |= differing >> 8 * span
            span *= 2
        return differing.to_bytes(len(self.ranges), "little")[::size]

    def _pick(self, mask: bytes) -> IntervalSet:
        """The records whose mask byte is not zero."""
        per_record = self.record_size // 8
        columns = memoryview(self.ranges).cast("Q")
        picked = bytearray(8 * per_record * (len(mask) - mask.count(0)))
        view = memoryview(picked).cast("Q")
        for word in range(per_record):
            view[word::per_record] = array("Q", itertools.compress(columns[word::per_record], mask))
        times = None
        if self.expiries is not None:
            times = array("Q", itertools.compress(memoryview(self.expiries).cast("Q"), mask)).tobytes()
        return IntervalSet(self.family, bytes(picked), times, ordered=self.ordered)

    def bounds(self) -> tuple[list[int], list[int]]:
        """The first and the last address of every interval."""
        return _decode_ranges(self.family, self.ranges)

    def texts(self) -> list[str]:
        """str() of each interval, formatted from the records in one loop: half the time
        of str() of each (62.5k entries: 50 ms against 107 ms). inet_ntop writes IPv6 in
        the same RFC 5952 form as ipaddress, except below ::1:0:0:0 (it writes ::a.b.c.d
        forms there), where str(Interval) formats."""
        family, ranges = self.family, self.ranges
        width = _ADDRESS_BYTES[family]
        ntop, address_family = socket.inet_ntop, socket.AF_INET if family == 4 else socket.AF_INET6
        lengths = _PREFIX_LENGTHS[8 * width]
        low = LOW_IPV6 if family == 6 else 0
        texts: list[str] = []
        append = texts.append
        firsts, lasts = self.bounds()
        for offset, first, last in zip(range(0, len(ranges), 2 * width), firsts, lasts, strict=True):
            length = lengths.get(last - first + 1)
            if first < low:
                append(str(Interval(family, first, last)))
            elif length is not None and not first & (last - first):  # as Interval.__str__ decides
                append(f"{ntop(address_family, ranges[offset:offset + width])}/{length}")
            else:
                append(f"{ntop(address_family, ranges[offset:offset + width])}-"
                       f"{ntop(address_family, ranges[offset + width:offset + 2 * width])}")
        return texts

    def expiry_values(self) -> Iterable[float]:
        if self.expiries is None:
            return itertools.repeat(PERMANENT, len(self))
        return struct.unpack(f">{len(self)}d", self.expiries)

    def __iter__(self) -> Iterator[Interval]:
        firsts, lasts = self.bounds()
        return map(Interval, itertools.repeat(self.family), firsts, lasts, self.expiry_values())

    @overload
    def __getitem__(self, index: int) -> Interval: ...
    @overload
    def __getitem__(self, index: slice) -> IntervalSet: ...
    def __getitem__(self, index: int | slice) -> Interval | IntervalSet:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return IntervalSet.of(self.family, [self[i] for i in range(start, stop, step)])
            stop = max(start, stop)
            size = self.record_size
            expiries = None if self.expiries is None else self.expiries[start * 8:stop * 8]
            return IntervalSet(self.family, self.ranges[start * size:stop * size], expiries,
                               ordered=self.ordered)
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError("IntervalSet index out of range")
        width = _ADDRESS_BYTES[self.family]
        offset = index * 2 * width
        first = int.from_bytes(self.ranges[offset:offset + width], "big")
        last = int.from_bytes(self.ranges[offset + width:offset + 2 * width], "big")
        expires = PERMANENT if self.expiries is None else _EXPIRY.unpack_from(self.expiries, index * 8)[0]
        return Interval(self.family, first, last, expires)

    def __contains__(self, item: object) -> bool:
        if not isinstance(item, Interval) or item.family != self.family:
            return False
        if not self.ordered:
            return any(i == item for i in self)
        index = bisect.bisect_right(_Column(self, 0), item.first) - 1
        return index >= 0 and self[index] == item

    def __eq__(self, other: object) -> bool:
        if isinstance(other, IntervalSet):
            return (self.ranges == other.ranges and self.expiries == other.expiries
                    and (self.family == other.family or not self.ranges))
        if isinstance(other, tuple):
            return len(self) == len(other) and tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        # Equal to the tuple of its intervals, so hashed like it (computed once).
        if self._hash is None:
            object.__setattr__(self, "_hash", hash(tuple(self)))
        assert self._hash is not None
        return self._hash

    def __add__(self, other: Iterable[Interval]) -> tuple[Interval, ...]:
        return (*self, *other)

    def __radd__(self, other: Iterable[Interval]) -> tuple[Interval, ...]:
        return (*other, *self)

    def __repr__(self) -> str:
        shown = ", ".join(str(i) for i in itertools.islice(self, 4))
        more = f", ... ({len(self)} in all)" if len(self) > 4 else ""
        return f"IntervalSet(v{self.family}: {shown}{more})"

    # -- what the rest of hostwall asks of a set -----------------------------------

    @property
    def has_timeouts(self) -> bool:
        return self.expiries is not None

    @property
    def digest(self) -> str:
        """sha256 over the family, the count and the records."""
        if self._digest is None:
            digest = hashlib.sha256(f"IPv{self.family} {len(self)}\n".encode())
            digest.update(self.ranges)
            if self.expiries is not None:
                digest.update(self.expiries)
            object.__setattr__(self, "_digest", digest.hexdigest())
        assert self._digest is not None
        return self._digest

    def to_bytes(self) -> bytes:
        header = _SET_HEADER.pack(self.family, self.ordered, self.expiries is not None, len(self))
        return b"".join((_SET_MAGIC, header, self.ranges, self.expiries or b""))

    @classmethod
    def from_bytes(cls, data: bytes) -> IntervalSet:
        """The set to_bytes wrote; ValueError for anything else."""
        if not data.startswith(_SET_MAGIC) or len(data) < len(_SET_MAGIC) + _SET_HEADER.size:
            raise ValueError("not an encoded interval set")
        family, ordered, timed, count = _SET_HEADER.unpack_from(data, len(_SET_MAGIC))
        if family not in _ADDRESS_BYTES or ordered > 1 or timed > 1:
            raise ValueError("bad interval set header")
        start = len(_SET_MAGIC) + _SET_HEADER.size
        middle = start + count * 2 * _ADDRESS_BYTES[family]
        end = middle + (count * 8 if timed else 0)
        if len(data) != end:
            raise ValueError("interval set length does not match its header")
        return cls(family, data[start:middle], data[middle:end] if timed else None, ordered=bool(ordered))

    def diff(self, new: IntervalSet) -> tuple[tuple[Interval, ...], tuple[Interval, ...]]:
        """(removed, added): the intervals only in self and only in new, each sorted.

        Between two ordered sets of the same family only the windows that differ are
        decoded. A window loses its common head and tail (compared as bytes, at C
        speed); what is left is split at its middle record, found in the other set by
        bisection: everything before it can only pair with what is before it. So a
        change of a few elements anywhere in a 100k set decodes a few records.
        """
        if self == new:
            return (), ()
        if not (self.ordered and new.ordered and self.family == new.family):
            before, after = set(self), set(new)
            return tuple(sorted(before - after)), tuple(sorted(after - before))
        memo = self._diff
        if memo is not None and memo[0] is new:
            return memo[1]
        timed = self.expiries is not None or new.expiries is not None
        old_expiries = (self.expiries or PERMANENT_BYTES * len(self)) if timed else None
        new_expiries = (new.expiries or PERMANENT_BYTES * len(new)) if timed else None
        size, keys = self.record_size, Records(new.ranges, self.record_size)
        removed: set[Interval] = set()
        added: set[Interval] = set()
        windows = [(0, len(self), 0, len(new))]
        # Each round either settles a window or takes one record out of the old side.
        for _ in range(len(self) + len(new) + 1):
            if not windows:
                break
            a0, a1, b0, b1 = _strip(self.ranges, old_expiries, new.ranges, new_expiries, size, *windows.pop())
            if a1 - a0 + b1 - b0 <= _SMALL_WINDOW or a0 == a1 or b0 == b1:
                before, after = set(self[a0:a1]), set(new[b0:b1])
                removed |= before - after
                added |= after - before
                continue
            middle = (a0 + a1) // 2
            key = self.ranges[middle * size:(middle + 1) * size]
            found = bisect.bisect_left(keys, key, b0, b1)
            resume = found
            if found < b1 and keys[found] == key:
                resume = found + 1
                if self[middle].expires != new[found].expires:
                    removed.add(self[middle])
                    added.add(new[found])
            else:
                removed.add(self[middle])
            windows += [(a0, middle, b0, found), (middle + 1, a1, resume, b1)]
        assert not windows, "diff did not settle"
        result = tuple(sorted(removed)), tuple(sorted(added))
        object.__setattr__(self, "_diff", (new, result))  # apply asks twice: plan, then delta
        return result

    def merged_with(self, extra: Iterable[Interval]) -> IntervalSet:
        """merge_intervals(self + extra), for a self that is already merged.

        Only the records of self that touch an extra interval (overlap it or are
        adjacent to it) can change: the others neither join nor shadow anything. So
        those few are merged with the extra intervals in Python and the rest of the
        records are copied as bytes around them.
        """
        extras = sorted(extra)
        if not extras:
            return self
        for interval in extras:
            if interval.family != self.family:
                raise ValueError(f"{interval} is not an IPv{self.family} interval")
        if not self.ordered:
            return IntervalSet.of(self.family, [i for i in merge_intervals([*self, *extras])])
        firsts, lasts = _Column(self, 0), _Column(self, 1)
        touched: list[list[int]] = []
        for interval in extras:
            low = bisect.bisect_left(lasts, interval.first - 1)
            high = bisect.bisect_right(firsts, interval.last + 1)
            if low < high:
                touched.append([low, high])
        pieces = merge_intervals([*(self[i] for low, high in touched for i in range(low, high)), *extras])
        regions = sorted([*touched, *([bisect.bisect_left(firsts, p.first)] * 2 for p in pieces)])
        merged_regions: list[list[int]] = []
        for low, high in regions:
            if merged_regions and low <= merged_regions[-1][1]:
                merged_regions[-1][1] = max(merged_regions[-1][1], high)
            else:
                merged_regions.append([low, high])
        size = self.record_size
        own_expiries = self.expiries
        timed = own_expiries is not None or any(p.expires != PERMANENT for p in pieces)
        if timed and own_expiries is None:
            own_expiries = PERMANENT_BYTES * len(self)
        ranges: list[bytes] = []
        expiries: list[bytes] = []
        cursor = 0
        remaining = iter(pieces)
        piece = next(remaining, None)
        for low, high in merged_regions:
            ranges.append(self.ranges[cursor * size:low * size])
            if own_expiries is not None:
                expiries.append(own_expiries[cursor * 8:low * 8])
            inside: list[Interval] = []
            while piece is not None and bisect.bisect_left(firsts, piece.first) <= high:
                inside.append(piece)
                piece = next(remaining, None)
            ranges.append(_records_of_keys(self.family, [range_key(self.family, p.first, p.last) for p in inside]))
            if timed:
                expiries.append(struct.pack(f">{len(inside)}d", *(p.expires for p in inside)))
            cursor = high
        assert piece is None, "a merged piece fell outside every region"
        ranges.append(self.ranges[cursor * size:])
        if own_expiries is not None:
            expiries.append(own_expiries[cursor * 8:])
        return IntervalSet(self.family, b"".join(ranges), b"".join(expiries) if timed else None,
                           ordered=True)


_SMALL_WINDOW = 32


def _strip(
    old: bytes, old_expiries: bytes | None, new: bytes, new_expiries: bytes | None, size: int,
    a0: int, a1: int, b0: int, b1: int,
) -> tuple[int, int, int, int]:
    """The windows old[a0:a1] and new[b0:b1] (in records) without their common head and
    tail; expiries None: both sets are permanent."""

    def common(a0: int, a1: int, b0: int, b1: int, *, from_end: bool) -> int:
        ranges = common_bytes(old[a0 * size:a1 * size], new[b0 * size:b1 * size], from_end=from_end) // size
        if old_expiries is None or new_expiries is None:
            return ranges
        expiries = common_bytes(old_expiries[a0 * 8:a1 * 8], new_expiries[b0 * 8:b1 * 8], from_end=from_end) // 8
        return min(ranges, expiries)

    head = common(a0, a1, b0, b1, from_end=False)
    a0, b0 = a0 + head, b0 + head
    tail = min(common(a0, a1, b0, b1, from_end=True), a1 - a0, b1 - b0)
    return a0, a1 - tail, b0, b1 - tail


class Records(Sequence[bytes]):
    """Fixed-width records as a sequence of bytes, for bisect: big-endian first|last
    compares like (first, last)."""

    def __init__(self, data: bytes, size: int) -> None:
        self.data, self.size = data, size

    def __len__(self) -> int:
        return len(self.data) // self.size

    @overload
    def __getitem__(self, index: int) -> bytes: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...
    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.data[index * self.size:(index + 1) * self.size]

    def pair(self, index: int) -> tuple[int, int]:
        """The record at index as (first, last)."""
        record, width = self[index], self.size // 2
        return int.from_bytes(record[:width], "big"), int.from_bytes(record[width:], "big")


class _Column(Sequence[int]):
    """One address column of an IntervalSet as integers, for bisect (decodes on demand)."""

    def __init__(self, intervals: IntervalSet, column: int) -> None:
        self._ranges = intervals.ranges
        self._width = _ADDRESS_BYTES[intervals.family]
        self._offset = column * self._width
        self._count = len(intervals)

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[int]: ...
    def __getitem__(self, index: int | slice) -> int | Sequence[int]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._count))]
        if not 0 <= index < self._count:
            raise IndexError(index)
        start = index * 2 * self._width + self._offset
        return int.from_bytes(self._ranges[start:start + self._width], "big")


def _decode_ranges(family: int, ranges: bytes) -> tuple[list[int], list[int]]:
    if family == 4:
        flat = struct.unpack(f">{len(ranges) // 4}I", ranges)
        return list(flat[0::2]), list(flat[1::2])
    halves = struct.unpack(f">{len(ranges) // 8}Q", ranges)
    firsts = [high << 64 | low for high, low in zip(halves[0::4], halves[1::4], strict=True)]
    lasts = [high << 64 | low for high, low in zip(halves[2::4], halves[3::4], strict=True)]
    return firsts, lasts


def common_bytes(a: bytes, b: bytes, *, from_end: bool) -> int:
    """The length of the common prefix (or suffix) of a and b.

    Halving the window compares each byte about once, as memcmp of slices.
    """
    length = min(len(a), len(b))
    if from_end:
        a, b = a[len(a) - length:], b[len(b) - length:]
        if a == b:
            return length
        # Mismatch somewhere in the last `high` bytes but not in the last `low`.
        low, high = 0, length
        while high - low > 64:
            middle = (low + high) // 2
            if a[length - middle:length - low] == b[length - middle:length - low]:
                low = middle
            else:
                high = middle
        while low < high and a[length - low - 1] == b[length - low - 1]:
            low += 1
        return low
    if a[:length] == b[:length]:
        return length
    low, high = 0, length  # the first mismatch is in [low, high)
    while high - low > 64:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    while low < high and a[low] == b[low]:
        low += 1
    return low
