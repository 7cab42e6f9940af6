"""nftelements decodes the table's dumps into what the planner compares: element lists
built here attribute by attribute, in the kernel's layout. The namespace tests compare
its reading of real tables with nft's own listing (test_differential_kernel.py)."""

from __future__ import annotations

import ipaddress
import math
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostwall import nftelements
from hostwall.cidr import Interval
from hostwall.errors import KernelError
from hostwall.kernel import Counter
from hostwall.nftelements import decode_contents
from hostwall.nftnl import Contents, _attribute

KEY, FLAGS, TIMEOUT, EXPIRATION, EXPR, EXPRESSIONS = 1, 3, 4, 5, 7, 11
INTERVAL_END = 1


def address(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


def element(key: bytes, *, end: bool = False, timeout_ms: int | None = None, left_ms: int | None = None,
            packets: int | None = None, listed: bool = False) -> bytes:
    """One NFTA_LIST_ELEM as the kernel dumps it (its attributes in the kernel's order)."""
    body = _attribute(KEY, _attribute(1, key))
    if packets is not None:
        counter = _attribute(1, b"counter\0") + _attribute(2, _attribute(1, struct.pack(">Q", 64 * packets))
                                                           + _attribute(2, struct.pack(">Q", packets)))
        body += _attribute(EXPRESSIONS, _attribute(1, counter)) if listed else _attribute(EXPR, counter)
    if end:
        body += _attribute(FLAGS, struct.pack(">I", INTERVAL_END))
    if timeout_ms is not None:
        body += _attribute(TIMEOUT, struct.pack(">Q", timeout_ms))
    if left_ms is not None:
        body += _attribute(EXPIRATION, struct.pack(">Q", left_ms))
    return _attribute(1, body)


def declared(name: str, key_type: int, *, interval: bool, counter: bool = False) -> dict[int, bytes]:
    attributes = {2: name.encode() + b"\0", 3: struct.pack(">I", 0x4 if interval else 0),
                  4: struct.pack(">I", key_type)}
    if counter:
        attributes[17] = _attribute(1, b"counter\0")
    return attributes


def spans(intervals: Iterable[Interval]) -> list[tuple[str, str]]:
    kind = {4: ipaddress.IPv4Address, 6: ipaddress.IPv6Address}
    return [(str(kind[i.family](i.first)), str(kind[i.family](i.last))) for i in intervals]


def test_hash_and_interval_sets_join_in_address_order() -> None:
    hosts = b"".join(element(address(a)) for a in ("203.0.113.9", "10.0.0.1", "192.0.2.200"))
    # Descending, as the kernel's tree walks: each end (one past the last address) before
    # its start, an open-ended range with no end, and nft's closing element at 0.
    ranges = b"".join([element(address("255.255.255.0")),
                       element(address("192.0.2.128"), end=True), element(address("192.0.2.0")),
                       element(address("10.1.0.0"), end=True), element(address("10.0.0.2")),
                       element(address("0.0.0.0"), end=True)])
    contents = Contents(
        sets=[declared("https_v4_hosts", 7, interval=False), declared("https_v4", 7, interval=True),
              declared("generation", 19, interval=False), declared("https_v6", 8, interval=True)],
        elements={"https_v4_hosts": [hosts[:16], hosts[16:]], "https_v4": [ranges],
                  "generation": [element(struct.pack("=I", 3))], "https_v6": []},
        objects=[{2: b"https_accepted\0", 3: struct.pack(">I", 1),
                  4: _attribute(1, struct.pack(">Q", 640)) + _attribute(2, struct.pack(">Q", 10))},
                 {2: b"a_quota\0", 3: struct.pack(">I", 2), 4: b""}],
    )
    decoded = decode_contents(contents)
    assert spans(decoded.sets["https_v4"]) == [
        ("10.0.0.1", "10.0.0.1"), ("10.0.0.2", "10.0.255.255"), ("192.0.2.0", "192.0.2.127"),
        ("192.0.2.200", "192.0.2.200"), ("203.0.113.9", "203.0.113.9"), ("255.255.255.0", "255.255.255.255")]
    assert decoded.sets["https_v4"].expiries is None
    assert len(decoded.sets["https_v6"]) == 0 and "generation" not in decoded.sets
    assert decoded.counters == {"https_accepted": Counter(10, 640)}
    assert decoded.element_packets == {}


def test_touching_ranges_in_any_order_and_a_start_with_no_end() -> None:
    # 10.0.0.0-10.0.0.255 ends where 10.0.1.0-10.0.1.255 begins; listed out of order; a
    # start followed by another start covers up to it, as the kernel matches.
    elements = b"".join([element(address("10.0.1.0")), element(address("10.0.1.0"), end=True),
                         element(address("10.0.2.0"), end=True), element(address("10.0.0.0")),
                         element(address("10.0.9.0")), element(address("10.0.10.0")),
                         element(address("10.0.11.0"), end=True)])
    contents = Contents([declared("db_v4", 7, interval=True)], {"db_v4": [elements]}, [])
    assert spans(decode_contents(contents).sets["db_v4"]) == [
        ("10.0.0.0", "10.0.0.255"), ("10.0.1.0", "10.0.1.255"), ("10.0.9.0", "10.0.9.255"),
        ("10.0.10.0", "10.0.10.255")]


def test_timeouts_give_the_time_left_and_counters_their_packets() -> None:
    v6 = b"".join([element(address("2001:db8::1"), timeout_ms=60_000, left_ms=41_500, packets=7),
                   element(address("2001:db8::2"), packets=0, listed=True)])
    ranges = b"".join([element(address("2001:db9::"), end=True),
                       element(address("2001:db8:1::"), timeout_ms=30_000, packets=3)])
    contents = Contents(
        [declared("web_v6_hosts", 8, interval=False, counter=True), declared("web_v6", 8, interval=True, counter=True)],
        {"web_v6_hosts": [v6], "web_v6": [ranges]}, [])
    decoded = decode_contents(contents)
    intervals = list(decoded.sets["web_v6"])
    assert [i.expires for i in intervals] == [41.5, math.inf, 30.0]
    first = int(ipaddress.ip_address("2001:db8::1"))
    wide = (int(ipaddress.ip_address("2001:db8:1::")),
            int(ipaddress.ip_address("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff")))
    assert decoded.element_packets == {"web_v6": {(first, first): 7, (first + 1, first + 1): 0, wide: 3}}


def test_a_key_of_the_wrong_width_is_refused_by_name() -> None:
    contents = Contents([declared("https_v4_hosts", 7, interval=False)],
                        {"https_v4_hosts": [element(address("2001:db8::1"))]}, [])
    with pytest.raises(KernelError, match="set https_v4_hosts holds an element whose key is not an IPv4 address"):
        decode_contents(contents)


def test_a_cut_element_list_is_refused() -> None:
    blob = element(address("10.0.0.1"))
    contents = Contents([declared("https_v4_hosts", 7, interval=False)], {"https_v4_hosts": [blob + blob[:6]]}, [])
    with pytest.raises(KernelError, match="cut short"):
        decode_contents(contents)


@given(points=st.sets(st.integers(1, (1 << 32) - 3), max_size=60), closing=st.booleans(), v6=st.booleans())
def test_the_common_shape_reads_as_the_attribute_walk_reads(points: set[int], closing: bool, v6: bool) -> None:
    """Disjoint ranges that do not touch, listed as the kernel's tree lists them, take the
    fast path, and it gives what walking every attribute gives."""
    ordered = sorted(points)
    ranges = [(first, last) for first, last in zip(ordered[0::2], ordered[1::2], strict=False) if first < last]
    ranges = [r for index, r in enumerate(ranges) if index == 0 or r[0] > ranges[index - 1][1] + 1]
    width, shift = (16, 96) if v6 else (4, 0)
    listed = b"".join(element(((last + 1) << shift).to_bytes(width, "big"), end=True)
                      + element((first << shift).to_bytes(width, "big")) for first, last in reversed(ranges))
    if closing:
        listed += element(bytes(width), end=True)
    fast = nftelements._common_records(listed, width, True)
    assert fast is not None
    walked, _ = nftelements._intervals(nftelements._elements(listed, "s", width), 6 if v6 else 4)
    assert fast == walked
    assert [(int.from_bytes(r[:width], "big"), int.from_bytes(r[width:], "big")) for r in fast] == [
        (first << shift, ((last + 1) << shift) - 1) for first, last in ranges]
