"""The full-load batch without a kernel: large permanent sets are written column by
column (nftload._host_chunks, _interval_chunks); they must hold exactly the elements
that the element-by-element reference builds, in order, numbered from 1 in each
message, each message small enough for one netlink attribute. The batch itself is
compared with nft's byte for byte in tests/netns/test_netns_fast_load.py."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall import nftload
from hostwall.cidr import Interval, IntervalSet, family_max
from hostwall.nftload import encodable, host_elements, interval_elements
from hostwall.policyspec import PortRange
from hostwall.ruleset import Ruleset, ServiceRules

NOW = 1_800_000_000.0


def items(chunk: bytes) -> list[bytes]:
    """The element bodies of one message's element list; their positions count from 1."""
    bodies, offset, position = [], 0, 1
    while offset < len(chunk):
        length, kind = struct.unpack_from("=HH", chunk, offset)
        assert kind == nftload.NLA_F_NESTED | position
        bodies.append(chunk[offset + 4:offset + length])
        offset += length
        position += 1
    return bodies


def elements_of(chunks: list[bytes]) -> list[bytes]:
    for chunk in chunks:
        assert 4 + len(chunk) <= 0xFFFF  # one netlink attribute
    return [body for chunk in chunks for body in items(chunk)]


@st.composite
def ordered_sets(draw: st.DrawFn, *, singles: bool) -> IntervalSet:
    """Sorted, disjoint intervals, sometimes starting at address zero or reaching the last."""
    family = draw(st.sampled_from([4, 6]))
    top = family_max(family)
    cuts = sorted(set(draw(st.lists(st.integers(0, top), max_size=2600))))
    if draw(st.booleans()):
        cuts = [0, *cuts]
    if draw(st.booleans()):
        cuts.append(top)
    cuts = sorted(set(cuts))
    intervals = []
    index = 0
    while index < len(cuts):
        first = cuts[index]
        last = first if singles or index + 1 == len(cuts) else cuts[index + 1]
        intervals.append(Interval(family, first, last))
        index += 1 if singles else 2
    # Disjoint: drop any that touch the one before (the compiler would have merged them).
    kept = [i for n, i in enumerate(intervals) if n == 0 or intervals[n - 1].last < i.first]
    return IntervalSet.of(family, kept)


@settings(max_examples=60, deadline=None)
@given(ordered_sets(singles=False))
def test_interval_chunks_hold_the_reference_elements(intervals: IntervalSet) -> None:
    assert elements_of(nftload._interval_chunks(intervals, NOW)) == interval_elements(intervals, NOW)


@settings(max_examples=40, deadline=None)
@given(ordered_sets(singles=True))
def test_host_chunks_hold_the_reference_elements(singles: IntervalSet) -> None:
    assert elements_of(nftload._host_chunks(singles, NOW)) == host_elements(singles, NOW)


def test_an_open_ended_range_is_one_start_element_flagged_open() -> None:
    intervals = IntervalSet.of(4, [Interval(4, 10, 20), Interval(4, 0xF0000000, family_max(4))])
    elements = elements_of(nftload._interval_chunks(intervals, NOW))
    # The end at zero, 10's start and end, then the open start without an end.
    assert len(elements) == 4
    assert elements[-1].endswith(nftload._INTERVAL_OPEN)
    assert elements[0].startswith(nftload._INTERVAL_END) and elements[0].endswith(bytes(4))


def test_entry_counters_take_libnftables() -> None:
    plain = ServiceRules("https", (PortRange(443, 443),), ("tcp",), "drop")
    counted = ServiceRules("https", (PortRange(443, 443),), ("tcp",), "drop", entry_counters=True)
    assert encodable(Ruleset((plain,)))
    assert not encodable(Ruleset((counted,)))


def test_large_sets_cross_message_boundaries_intact() -> None:
    for family in (4, 6):
        top = family_max(family)
        step = top // 5000
        wide = [Interval(family, n * step + 7, n * step + 7 + step // 2) for n in range(2100)]
        for intervals in (wide, [*wide, Interval(family, top - 5, top)]):
            ordered = IntervalSet.of(family, intervals)
            elements = elements_of(nftload._interval_chunks(ordered, NOW))
            assert elements == interval_elements(ordered, NOW)
            assert len(elements) > 2 * nftload.ELEMENTS_PER_MESSAGE
        singles = IntervalSet.of(family, [Interval(family, n * step, n * step) for n in range(2100)])
        assert elements_of(nftload._host_chunks(singles, NOW)) == host_elements(singles, NOW)
