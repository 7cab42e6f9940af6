"""The hostwall table's address-set elements and counter values, decoded from the
nf_tables netlink dumps that NetlinkTable.contents() reads.

An apply that finds nothing to change reads every element to say so (an element added
or deleted by hand leaves every label as it was), as do a dry run and an apply whose
state directory has no record of the loaded table. Through libnftables that read of a
100k-entry table took 2.5-3 s and 170 MB (its cache, its JSON text, json.loads, then an
ipaddress object per element): three times a full load. The dumps themselves take a
tenth of that; here the elements of the common shapes are taken apart by one regular
expression, the rest attribute by attribute, and each key stays the big-endian bytes it
arrives in, which are already IntervalSet's records.

What it gives is what libnftables' listing gives (the namespace tests compare them):
per logical set (a hash set of single addresses joins its interval set), the intervals
in address order; an element's expiry is the time it has left, in seconds, as the
kernel reports it; the packets of each element of a set declared with a counter.
"""

from __future__ import annotations

import math
import operator
import re
import struct

from msgspec import Struct

from hostwall.cidr import IntervalSet
from hostwall.errors import KernelError
from hostwall.kernel import Counter
from hostwall.nftload import (
    NFT_OBJECT_COUNTER,
    NFT_SET_ELEM_INTERVAL_END,
    NFT_SET_INTERVAL,
    NFTA_COUNTER_BYTES,
    NFTA_COUNTER_PACKETS,
    NFTA_DATA_VALUE,
    NFTA_EXPR_DATA,
    NFTA_EXPR_NAME,
    NFTA_LIST_ELEM,
    NFTA_OBJ_DATA,
    NFTA_OBJ_NAME,
    NFTA_OBJ_TYPE,
    NFTA_SET_ELEM_FLAGS,
    NFTA_SET_ELEM_KEY,
    NFTA_SET_ELEM_TIMEOUT,
    NFTA_SET_FLAGS,
    NFTA_SET_KEY_TYPE,
    NFTA_SET_NAME,
    TYPE_IP6ADDR,
    TYPE_IPADDR,
)
from hostwall.nftnl import Contents, attribute_list, attribute_text, attributes, repeated
from hostwall.ruleset import logical_set_name

# The attributes only a read meets, from linux/netfilter/nf_tables.h.
NFTA_SET_EXPR, NFTA_SET_EXPRESSIONS = 17, 18
NFTA_SET_ELEM_EXPIRATION, NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_EXPRESSIONS = 5, 7, 11
_FAMILY_OF_KEY_TYPE = {TYPE_IPADDR: 4, TYPE_IP6ADDR: 6}
_WIDTH = {4: 4, 6: 16}
_COUNTER_NAME = b"counter\0"
_EXPIRY = struct.Struct(">d")
_NLA_HEADER = struct.Struct("=HH")
_FIRST, _SECOND = operator.itemgetter(0), operator.itemgetter(1)


class TableContents(Struct, frozen=True):
    counters: dict[str, Counter]
    sets: dict[str, IntervalSet]
    element_packets: dict[str, dict[tuple[int, int], int]]


class _Element(Struct, array_like=True):
    """One element as dumped: its key, whether it ends an interval, the seconds it has
    left (inf without a timeout) and the packets of its counter (None without one)."""

    key: bytes
    end: bool
    left: float
    packets: int | None


def decode_counters(contents: Contents) -> dict[str, Counter]:
    """The values of the table's named counters."""
    counters = {}
    for item in contents.objects:
        if _u32(item.get(NFTA_OBJ_TYPE)) == NFT_OBJECT_COUNTER:
            data = attributes(item.get(NFTA_OBJ_DATA, b""))
            counters[attribute_text(item, NFTA_OBJ_NAME)] = Counter(_u64(data.get(NFTA_COUNTER_PACKETS)),
                                                                    _u64(data.get(NFTA_COUNTER_BYTES)))
    return counters


def decode_contents(contents: Contents) -> TableContents:
    """The table's counters, address sets and element packets; KernelError when a dump
    holds what no nf_tables set of hostwall's kind can hold."""
    found: dict[str, tuple[int, list[bytes], list[float]]] = {}
    packets: dict[str, dict[tuple[int, int], int]] = {}
    for item in contents.sets:
        family = _FAMILY_OF_KEY_TYPE.get(_u32(item.get(NFTA_SET_KEY_TYPE)))
        if family is None:
            continue  # the generation marker
        name = attribute_text(item, NFTA_SET_NAME)
        width = _WIDTH[family]
        _, keys, left = found.setdefault(logical_set_name(name), (family, [], []))
        # Element lists are whole elements one after another, so the replies join into one.
        listed = b"".join(contents.elements.get(name, []))
        interval = bool(_u32(item.get(NFTA_SET_FLAGS)) & NFT_SET_INTERVAL)
        common = _common_records(listed, width, interval)
        if common is not None:
            keys += common
            left += [math.inf] * len(common)
            counted = {}
        else:
            elements = _elements(listed, name, width)
            if interval:
                records, starts = _intervals(elements, family)
            else:
                records, starts = [element.key + element.key for element in elements], elements
            keys += records
            left += [element.left for element in starts]
            counted = {(int.from_bytes(record[:width], "big"), int.from_bytes(record[width:], "big")): element.packets
                       for record, element in zip(records, starts, strict=True) if element.packets is not None}
        if counted or _declares_counter(item):
            packets.setdefault(logical_set_name(name), {}).update(counted)
    sets = {name: _interval_set(family, keys, left) for name, (family, keys, left) in found.items()}
    return TableContents(decode_counters(contents), sets, packets)


def _interval_set(family: int, records: list[bytes], left: list[float]) -> IntervalSet:
    """The records in address order (byte order, at one width). Not promised to be
    disjoint: a set edited by hand may overlap its hash set, and what reads these sets
    compares them (or looks an address up) rather than diffing them in order."""
    if all(map(math.isinf, left)):
        return IntervalSet(family, b"".join(sorted(records)))
    order = sorted(range(len(records)), key=records.__getitem__)
    return IntervalSet(family, b"".join([records[i] for i in order]),
                       b"".join([_EXPIRY.pack(left[i]) for i in order]))


def _intervals(elements: list[_Element], family: int) -> tuple[list[bytes], list[_Element]]:
    """The first and last address (one record) and the start element of each interval
    of an interval set, as the kernel matches them: a start element covers the
    addresses up to the next end element (its last address plus one), or up to the next
    start or the family's last address when none follows; an end element with no start
    before it covers nothing (nft closes the range below the first interval so)."""
    width = _WIDTH[family]
    keys = [element.key for element in elements]
    if all(map(operator.gt, keys, keys[1:])):
        elements = elements[::-1]  # the kernel's tree lists them in descending order
    else:
        # Ends before starts at one key: an interval may begin where the one before it ends.
        elements = sorted(elements, key=lambda e: (e.key, not e.end))
    records: list[bytes] = []
    starts: list[_Element] = []
    start: _Element | None = None
    for element in elements:
        if start is not None:
            last = int.from_bytes(element.key, "big") - 1
            records.append(start.key + last.to_bytes(width, "big"))
            starts.append(start)
        start = None if element.end else element
    if start is not None:
        records.append(start.key + b"\xff" * width)
        starts.append(start)
    return records, starts


def _common_pattern(width: int) -> re.Pattern[bytes]:
    """One element of the two shapes nearly every element has: a plain key (group 1), or
    an interval's end, a key and its flags (group 2). Each begins with its own length."""
    key_headers = _NLA_HEADER.pack(8 + width, NFTA_SET_ELEM_KEY) + _NLA_HEADER.pack(4 + width, NFTA_DATA_VALUE)
    plain = re.escape(_NLA_HEADER.pack(12 + width, NFTA_LIST_ELEM) + key_headers) + b"(.{%d})" % width
    end = (re.escape(_NLA_HEADER.pack(20 + width, NFTA_LIST_ELEM) + key_headers) + b"(.{%d})" % width
           + re.escape(_NLA_HEADER.pack(8, NFTA_SET_ELEM_FLAGS) + NFT_SET_ELEM_INTERVAL_END.to_bytes(4, "big")))
    return re.compile(plain + b"|" + end, re.DOTALL)


_COMMON = {width: _common_pattern(width) for width in _WIDTH.values()}


def _common_records(data: bytes, width: int, interval: bool) -> list[bytes] | None:
    """The records of a set whose elements all have a common shape, in the order the
    kernel lists them, None for any other set. A 100k set is that many elements, and
    walking their attributes in Python took longer than the dump itself: one expression
    takes them all at C speed.

    A hash set's elements are its addresses. An interval set is read this way only as
    the kernel lists a set of disjoint closed ranges, in descending order: an end (the
    last address plus one) before each start, and perhaps nft's closing element at the
    lowest key; anything else (a range that reaches the family's last address, ranges
    that touch) is left to _intervals."""
    # Each match is (a start's key, b"") or (b"", an end's key); the counting and checks
    # below run as chains of map, in C.
    found = _COMMON[width].findall(data)
    ends = sum(map(len, map(_SECOND, found))) // width
    # The matches do not overlap, so when their lengths add up to the whole they are the
    # elements themselves, each found where the one before it ends.
    if len(found) * (12 + width) + ends * 8 != len(data):
        return None
    if not interval:
        return [start + start for start, _ in found] if not ends else None
    ascending = found[::-1]
    first = next((index for index, (start, _) in enumerate(ascending) if start), len(ascending))
    starts, stops = ascending[first::2], ascending[first + 1::2]
    keys = list(map(max, ascending[first:]))  # the key each element has; b"" sorts first
    if (len(starts) != len(stops) or not all(map(_FIRST, starts)) or not all(map(_SECOND, stops))
            or not all(map(operator.lt, keys, keys[1:]))):
        return None
    return [start + (int.from_bytes(end, "big") - 1).to_bytes(width, "big")
            for (start, _), (_, end) in zip(starts, stops, strict=True)]


def _elements(data: bytes, name: str, width: int) -> list[_Element]:
    """Each element of an element list of any shape, attribute by attribute."""
    elements = []
    offset, size = 0, len(data)
    while offset + 4 <= size:
        length = data[offset] | data[offset + 1] << 8
        if length < 4 or offset + length > size:
            raise KernelError(f"set {name}: an element list the kernel sent is cut short")
        elements.append(_element(data, offset + 4, offset + length, name, width))
        offset = (offset + length + 3) & ~3
    return elements


def _element(blob: bytes, offset: int, end: int, name: str, width: int) -> _Element:
    """An element of any other shape (a timeout, a counter, user data), from the
    attributes in blob[offset:end]."""
    key = None
    flags, left, packets = 0, math.inf, None
    for kind, value in attribute_list(blob, offset, end):
        if kind == NFTA_SET_ELEM_KEY:
            key = attributes(value).get(NFTA_DATA_VALUE)
        elif kind == NFTA_SET_ELEM_FLAGS:
            flags = _u32(value)
        elif kind == NFTA_SET_ELEM_EXPIRATION or (kind == NFTA_SET_ELEM_TIMEOUT and math.isinf(left)):
            left = _u64(value) / 1000  # the time left when the kernel gives it, else the timeout
        elif kind in (NFTA_SET_ELEM_EXPR, NFTA_SET_ELEM_EXPRESSIONS):
            packets = _counter_packets(value, kind == NFTA_SET_ELEM_EXPR)
    if key is None or len(key) != width:
        raise KernelError(f"set {name} holds an element whose key is not an IPv{4 if width == 4 else 6} "
                          "address; reload the policy with hostwall apply")
    return _Element(key, bool(flags & NFT_SET_ELEM_INTERVAL_END), left, packets)


def _counter_packets(data: bytes, single: bool) -> int | None:
    """The packets of the counter among an element's expressions (one expression, or a
    list of them), None without one."""
    expressions = [data] if single else list(repeated(data, NFTA_LIST_ELEM))
    for expression in expressions:
        found = attributes(expression)
        if found.get(NFTA_EXPR_NAME) == _COUNTER_NAME:
            return _u64(attributes(found.get(NFTA_EXPR_DATA, b"")).get(NFTA_COUNTER_PACKETS))
    return None


def _declares_counter(item: dict[int, bytes]) -> bool:
    """Whether a set's declaration gives its elements a counter (`counter` in nft)."""
    if NFTA_SET_EXPR in item:
        return attributes(item[NFTA_SET_EXPR]).get(NFTA_EXPR_NAME) == _COUNTER_NAME
    return any(attributes(value).get(NFTA_EXPR_NAME) == _COUNTER_NAME
               for value in repeated(item.get(NFTA_SET_EXPRESSIONS, b""), NFTA_LIST_ELEM))


def _u32(value: bytes | None) -> int:
    return int.from_bytes(value, "big") if value is not None and len(value) == 4 else 0


def _u64(value: bytes | None) -> int:
    return int.from_bytes(value, "big") if value is not None and len(value) == 8 else 0
