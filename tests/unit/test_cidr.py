"""Strict CIDR parsing and the interval arithmetic the compiler relies on."""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections.abc import Callable

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hostwall.cidr import (
    PERMANENT,
    CidrError,
    Interval,
    IntervalSet,
    merge_intervals,
    merge_same_expiry,
    merged_records,
    parse_cidr,
    parse_interval,
    parse_list_lines,
    range_key,
)


def v4(first: str, last: str | None = None, expires: float = PERMANENT) -> Interval:
    start = int(ipaddress.IPv4Address(first))
    end = int(ipaddress.IPv4Address(last)) if last else start
    return Interval(4, start, end, expires)


def net(text: str, expires: float = PERMANENT) -> Interval:
    return Interval.of(ipaddress.ip_network(text), expires)


# --- parse_cidr -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("203.0.113.45/32", "203.0.113.45/32"),
        ("203.0.113.45", "203.0.113.45/32"),
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("0.0.0.0/1", "0.0.0.0/1"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:DB8:0:0::1", "2001:db8::1/128"),
        ("::1", "::1/128"),
        ("::/16", "::/16"),
    ],
)
def test_parse_cidr_accepts(text: str, expected: str) -> None:
    assert parse_cidr(text) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("300.1.2.3", "is not an IPv4 or IPv6 address"),
        ("1.2.3", "is not an IPv4 or IPv6 address"),
        ("010.0.0.1", "without leading zeros"),
        ("10.0.0.0/33", "is not an IPv4 or IPv6 address"),
        ("2001:db8::/129", "is not an IPv4 or IPv6 address"),
        ("example.com", "is not an IPv4 or IPv6 address"),
        ("", "is not an IPv4 or IPv6 address"),
        ("10.0.0.0/8/8", "bad prefix length"),
        ("10.0.0.0/", "bad prefix length"),
        ("10.0.0.0/x", "bad prefix length"),
        ("10.0.0.0/-8", "bad prefix length"),
        ("fe80::1%eth0", "zone id"),
        (" 10.0.0.0/8", "white space"),
        ("10.0.0.0/8\n", "white space"),
        ("10.0.0.0 /8", "white space"),
        ("10.0.0.0/\u20038", "white space"),
        ("203.0.113.5/24", "write 203.0.113.5/32 for the single address or 203.0.113.0/24"),
        ("0.0.0.0/0", "allows every address"),
        ("::/0", "allows every address"),
        ("::ffff:192.0.2.1", "write 192.0.2.1/32 instead"),
        ("::ffff:0:0/96", "IPv4-mapped"),
        ("::192.0.2.1", "IPv4-compatible"),
    ],
)
def test_parse_cidr_rejects(text: str, fragment: str) -> None:
    with pytest.raises(CidrError) as caught:
        parse_cidr(text)
    assert fragment in str(caught.value)


def test_parse_cidr_rejects_non_strings() -> None:
    with pytest.raises(CidrError, match="expected a CIDR string"):
        parse_cidr(167772160)  # type: ignore[arg-type]


# --- Interval rendering -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("interval", "prefix", "text"),
    [
        (net("10.0.0.0/8"), "10.0.0.0/8", "10.0.0.0/8"),
        (v4("192.0.2.7"), "192.0.2.7/32", "192.0.2.7/32"),
        (v4("192.0.2.1", "192.0.2.3"), None, "192.0.2.1-192.0.2.3"),
        (v4("192.0.2.2", "192.0.2.5"), None, "192.0.2.2-192.0.2.5"),
        (v4("192.0.2.0", "192.0.2.2"), None, "192.0.2.0-192.0.2.2"),
        (net("2001:db8:10::/48"), "2001:db8:10::/48", "2001:db8:10::/48"),
        (net("::/16"), "::/16", "::/16"),
        (net("::1/128"), "::1/128", "::1/128"),
        (Interval(6, 1, 2), None, "::1-::2"),
        (Interval(6, 0, (1 << 32) - 1), "::/96", "::/96"),
    ],
)
def test_interval_renders_as_prefix_when_it_is_one(
    interval: Interval, prefix: str | None, text: str
) -> None:
    expected = None if prefix is None else ipaddress.ip_network(prefix)
    assert interval.as_prefix() == expected
    if expected is not None:
        # An IPv6 interval must never come out as an IPv4 network, whatever its integer.
        assert interval.as_prefix().version == interval.family  # type: ignore[union-attr]
    assert str(interval) == text


def test_interval_contains_is_inclusive() -> None:
    interval = v4("192.0.2.1", "192.0.2.3")
    inside = [int(ipaddress.IPv4Address(f"192.0.2.{n}")) for n in (1, 2, 3)]
    outside = [int(ipaddress.IPv4Address(f"192.0.2.{n}")) for n in (0, 4)]
    assert all(interval.contains(a) for a in inside)
    assert not any(interval.contains(a) for a in outside)


# --- merge_intervals --------------------------------------------------------------------


def test_overlapping_intervals_merge() -> None:
    merged = merge_intervals([net("10.0.0.0/24"), net("10.0.0.128/25"), v4("10.0.0.200", "10.0.1.5")])
    assert [str(i) for i in merged] == ["10.0.0.0-10.0.1.5"]


def test_adjacent_intervals_merge_into_a_prefix() -> None:
    merged = merge_intervals([net("198.51.100.128/25"), net("198.51.100.0/25")])
    assert [str(i) for i in merged] == ["198.51.100.0/24"]


def test_disjoint_intervals_stay_apart_and_sorted() -> None:
    merged = merge_intervals([net("192.0.2.8/32"), net("10.0.0.0/8"), net("192.0.2.6/32")])
    assert [str(i) for i in merged] == ["10.0.0.0/8", "192.0.2.6/32", "192.0.2.8/32"]


def test_families_stay_separate() -> None:
    # ::/96 and 0.0.0.0/0 have the same integers; they must not meet.
    merged = merge_intervals([net("2001:db8::/32"), Interval(6, 0, 10), net("0.0.0.0/1"),
                              Interval(4, 11, 20)])
    assert [(i.family, str(i)) for i in merged] == [
        (4, "0.0.0.0/1"),
        (6, "::-::a"),
        (6, "2001:db8::/32"),
    ]


def test_expiring_entry_inside_a_permanent_one_disappears() -> None:
    merged = merge_intervals([net("10.0.0.0/8"), net("10.1.2.0/24", expires=1000.0)])
    assert merged == [net("10.0.0.0/8")]


def test_partially_overlapping_expiring_entry_is_trimmed() -> None:
    merged = merge_intervals([net("10.0.0.0/25"), net("10.0.0.64/26", 500.0),
                              v4("10.0.0.100", "10.0.0.200", 1000.0)])
    assert [(str(i), i.expires) for i in merged] == [
        ("10.0.0.0/25", PERMANENT),
        ("10.0.0.128-10.0.0.200", 1000.0),
    ]


def test_longest_lived_entry_wins_the_shared_addresses() -> None:
    merged = merge_intervals([v4("10.0.0.0", "10.0.0.9", 100.0), v4("10.0.0.5", "10.0.0.19", 200.0)])
    assert [(str(i), i.expires) for i in merged] == [
        ("10.0.0.0-10.0.0.4", 100.0),
        ("10.0.0.5-10.0.0.19", 200.0),
    ]


def test_adjacent_entries_with_different_expiry_stay_apart() -> None:
    merged = merge_intervals([net("10.0.0.0/25"), net("10.0.0.128/25", 100.0)])
    assert [(str(i), i.expires) for i in merged] == [
        ("10.0.0.0/25", PERMANENT),
        ("10.0.0.128/25", 100.0),
    ]


def test_permanent_entry_splits_an_expiring_one() -> None:
    merged = merge_intervals([net("10.0.0.0/24", 100.0), net("10.0.0.64/26")])
    assert [(str(i), i.expires) for i in merged] == [
        ("10.0.0.0/26", 100.0),
        ("10.0.0.64/26", PERMANENT),
        ("10.0.0.128/25", 100.0),
    ]


def test_merge_of_nothing_is_nothing() -> None:
    assert merge_intervals([]) == []


# --- merge_intervals, by property ---------------------------------------------------------

EXPIRIES = st.sampled_from([PERMANENT, 100.0, 200.0, 300.0])


@st.composite
def small_intervals(draw: st.DrawFn) -> Interval:
    family = draw(st.sampled_from([4, 6]))
    first = draw(st.integers(0, 60))
    length = draw(st.integers(0, 12))
    return Interval(family, first, first + length, draw(EXPIRIES))


def coverage(intervals: list[Interval]) -> dict[tuple[int, int], float]:
    """Each (family, address) covered, with the longest expiry of the entries covering it."""
    covered: dict[tuple[int, int], float] = {}
    for interval in intervals:
        for address in range(interval.first, interval.last + 1):
            key = (interval.family, address)
            covered[key] = max(covered.get(key, -math.inf), interval.expires)
    return covered


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(small_intervals(), max_size=12))
def test_merge_covers_exactly_the_input_with_the_longest_expiry(intervals: list[Interval]) -> None:
    merged = merge_intervals(intervals)

    assert coverage(merged) == coverage(intervals)
    # Canonical: sorted, disjoint, and nothing left that could have been joined.
    assert merged == sorted(merged)
    for before, after in itertools.pairwise(merged):
        if before.family != after.family:
            continue
        assert before.last < after.first, (before, after)
        if before.expires == after.expires:
            assert before.last + 1 < after.first, (before, after)


def _verdict(decide: Callable[[], Interval]) -> Interval | str:
    try:
        return decide()
    except CidrError as exc:
        return str(exc)


@settings(max_examples=500, deadline=None, database=None)
@given(st.one_of(
    st.builds(lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}", st.integers(0, 2**32 - 1), st.integers(0, 33)),
    st.builds(lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}", st.integers(0, 2**128 - 1), st.integers(0, 129)),
    st.builds(lambda a, n: f"{ipaddress.IPv4Address(a & ~((1 << 32 - n) - 1))}/{n}", st.integers(0, 2**32 - 1),
              st.integers(0, 32)),
    st.builds(lambda a, n: f"{ipaddress.IPv6Address(a & ~((1 << 128 - n) - 1))}/{n}", st.integers(0, 2**128 - 1),
              st.integers(0, 128)),
    st.builds(lambda a, n: f"::{'ffff:' if n else ''}{ipaddress.IPv4Address(a)}", st.integers(0, 2**32 - 1),
              st.booleans()),
    st.sampled_from(["10.0.0.0/08", "10.0.0.0/", "10.0.0.0/+8", "10.0.0.0/ 8", "10.0.0.0/8/8", "10.0.0.0/\u0668",
                     "10.0.0.1\x00", "::/0", "0.0.0.0/0", "::1", "::", "::/128", "2001:db8::/032", "fe80::1%eth0/64"]),
    st.text(alphabet="0123456789abcdef:./ %", max_size=24),
))
def test_parse_interval_decides_as_parse_cidr_does(text: str) -> None:
    assert _verdict(lambda: parse_interval(text, 5.0)) == _verdict(lambda: Interval.of(parse_cidr(text), 5.0))


def _one_at_a_time(line: str) -> Interval | str | None:
    content = line.split("#", 1)[0].strip()
    if not content:
        return None
    try:
        return parse_interval(content)
    except CidrError as exc:
        return str(exc)


_LIST_LINE = st.one_of(
    st.builds(lambda a, n: f"{ipaddress.IPv4Address(a)}/{n}", st.integers(0, 2**32 - 1), st.integers(0, 33)),
    st.builds(lambda a, n: f"{ipaddress.IPv6Address(a)}/{n}", st.integers(0, 2**128 - 1), st.integers(0, 129)),
    st.builds(str, st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))),
    st.sampled_from(["", "  # comment", "10.0.0.0/8 # office", " 192.0.2.1 ", "::ffff:1.2.3.4", "::1", "::/96",
                     "010.0.0.1", "10.0.0.0/08", "10.0.0.0/", "/24", "1.2.3", "fe80::1%eth0", "10.0.0.1\x00",
                     "2001:db8::/32", "2001:DB8::/48", "10.0.0.0/+8", "10.0.0.0/ 8", "١٢.0.0.0/8"]),
    st.text(alphabet="0123456789abcdef:./# %", max_size=24),
)


@given(st.lists(_LIST_LINE, max_size=40))
def test_parse_list_lines_decides_as_parse_interval_does(lines: list[str]) -> None:
    """The fast loop either decides a line exactly as parse_interval would, or leaves it
    to parse_interval: each line ends up with parse_interval's interval or error."""
    v4: list[int] = []
    v6: list[int] = []
    undecided = dict(parse_list_lines(lines, 1, v4, v6))
    decided = {4: iter(v4), 6: iter(v6)}
    for number, line in enumerate(lines, 1):
        expected = _one_at_a_time(line)
        if number in undecided:
            assert isinstance(expected, Interval | str)
            assert undecided[number] == line.split("#", 1)[0].strip()
        elif expected is not None:
            assert isinstance(expected, Interval), (line, expected)
            assert next(decided[expected.family]) == range_key(expected.family, expected.first, expected.last)
    assert next(decided[4], None) is None and next(decided[6], None) is None


@settings(max_examples=300, deadline=None, database=None)
@given(st.sampled_from([4, 6]), st.lists(small_intervals(), max_size=16), st.booleans())
def test_a_merged_set_is_the_set_of_merge_intervals(family: int, drawn: list[Interval], permanent: bool) -> None:
    intervals = [Interval(family, i.first, i.last, PERMANENT if permanent else i.expires) for i in drawn]
    merged = IntervalSet.merged(family, intervals)
    expected = IntervalSet.of(family, merge_intervals(intervals))
    assert (merged.ranges, merged.expiries, merged.ordered) == (expected.ranges, expected.expiries, expected.ordered)


def _reference_records(family: int, pairs: list[tuple[int, int]]) -> bytes:
    width = 4 if family == 4 else 16
    return b"".join(first.to_bytes(width, "big") + last.to_bytes(width, "big") for first, last in pairs)


# Ranges drawn near each other (a small space, or a few hundred addresses from one of a
# few bases at the top of the family's space) so that overlaps, containment chains,
# adjacency and duplicates are common, and far apart so that long separate stretches are.
@given(st.sampled_from([4, 6]), st.sampled_from([300, 2**32 - 1]),
       st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 300)), max_size=80))
@example(4, 300, [(0, 5), (6, 4), (20, 0)])  # adjacent: joined; then one apart
@example(6, 300, [(0, 100), (5, 0), (50, 10), (102, 3), (200, 0), (200, 0)])  # contained, adjacent, twice
@example(4, 2**32 - 1, [(2**32 - 2, 300), (2**32 - 1, 0)])  # at the top of the space
def test_merged_records_are_merge_same_expiry(family: int, space: int, starts: list[tuple[int, int]]) -> None:
    top = 2**32 - 1 if family == 4 else 2**128 - 1
    base = top - space
    pairs = [(base + first % (space + 1), min(base + first % (space + 1) + size, top)) for first, size in starts]
    merged, every_pair = merged_records(family, [range_key(family, first, last) for first, last in pairs])
    expected = merge_same_expiry(list(pairs))
    assert merged == _reference_records(family, expected)
    assert every_pair == (None if len(expected) == len(pairs) else _reference_records(family, sorted(pairs)))
