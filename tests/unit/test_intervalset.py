"""IntervalSet, the byte form of large sets: checked against plain tuples of Interval."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.cidr import Interval, IntervalSet, common_bytes, family_max, merge_intervals
from hostwall.plan import Joined
from hostwall.ruleset import element_texts, host_texts, render_element, render_host

EXPIRIES = st.sampled_from([math.inf, math.inf, 1000.0, 2000.0, 1500.5])


@st.composite
def intervals(draw: st.DrawFn, family: int, span: int = 64) -> Interval:
    # A small window at the bottom, the middle or the top of the family's space, so that
    # overlaps, adjacency and the last address (where nft has no end element) all occur.
    base = draw(st.sampled_from([0, family_max(family) // 2, family_max(family) - span]))
    first = base + draw(st.integers(0, span))
    last = min(family_max(family), first + draw(st.integers(0, 8)))
    return Interval(family, first, last, draw(EXPIRIES))


def merged(family: int, permanent: bool = False) -> st.SearchStrategy[list[Interval]]:
    items = st.lists(intervals(family), max_size=24)
    if permanent:
        items = items.map(lambda xs: [Interval(i.family, i.first, i.last) for i in xs])
    return items.map(merge_intervals)


FAMILIES = st.sampled_from([4, 6])
BOUNDED = settings(max_examples=100, deadline=None)


def test_an_interval_set_is_a_sequence_equal_to_its_tuple() -> None:
    items = (Interval(4, 10, 20), Interval(4, 30, 30, 1000.0), Interval(4, 40, 50))
    intervals_ = IntervalSet.of(4, items)

    assert len(intervals_) == 3 and intervals_.ordered and intervals_.has_timeouts
    assert intervals_ == items and items == intervals_ and tuple(intervals_) == items
    assert hash(intervals_) == hash(items)
    assert intervals_[1] == items[1] and intervals_[-1] == items[-1]
    assert intervals_[1:] == items[1:] and isinstance(intervals_[1:], IntervalSet)
    assert items[0] in intervals_ and Interval(4, 10, 20, 5.0) not in intervals_
    tail = (Interval(4, 60, 60),)
    assert intervals_ + tail == items + tail and tail + intervals_ == tail + items
    with pytest.raises(IndexError):
        intervals_[3]


def test_permanent_sets_carry_no_expiries_so_equal_sets_have_equal_bytes() -> None:
    explicit = IntervalSet(4, IntervalSet.of(4, [Interval(4, 1, 2)]).ranges, b"\x7f\xf0" + bytes(6))
    assert explicit.expiries is None and not explicit.has_timeouts
    assert explicit == IntervalSet.of(4, [Interval(4, 1, 2)])
    assert explicit.digest == IntervalSet.of(4, [Interval(4, 1, 2)]).digest


def test_order_is_kept_and_checked() -> None:
    backwards = IntervalSet.of(6, [Interval(6, 50, 60), Interval(6, 1, 2)])
    overlapping = IntervalSet.of(4, [Interval(4, 1, 5), Interval(4, 5, 9)])
    assert [i.first for i in backwards] == [50, 1]
    assert not backwards.ordered and not overlapping.ordered


@pytest.mark.parametrize(
    "bad",
    [
        [Interval(6, 1, 1)],  # another family
        [Interval(4, 5, 4)],  # reversed
        [Interval(4, 0, 1 << 32)],  # beyond the family's space
    ],
)
def test_of_refuses_what_is_not_a_range_of_the_family(bad: list[Interval]) -> None:
    with pytest.raises(ValueError):
        IntervalSet.of(4, bad)


def test_sets_are_immutable() -> None:
    intervals_ = IntervalSet.of(4, [Interval(4, 1, 1)])
    with pytest.raises(AttributeError):
        intervals_.ranges = b""  # type: ignore[misc]


@given(FAMILIES.flatmap(lambda f: st.tuples(st.just(f), st.lists(intervals(f), max_size=12))))
@BOUNDED
def test_bytes_round_trip(case: tuple[int, list[Interval]]) -> None:
    family, items = case
    original = IntervalSet.of(family, items)
    restored = IntervalSet.from_bytes(original.to_bytes())
    assert restored == original and restored.ordered == original.ordered
    assert list(restored) == items


@pytest.mark.parametrize("damage", ["truncate", "extend", "magic", "family"])
def test_from_bytes_refuses_damaged_data(damage: str) -> None:
    data = bytearray(IntervalSet.of(4, [Interval(4, 1, 2), Interval(4, 7, 9)]).to_bytes())
    if damage == "truncate":
        del data[-1]
    elif damage == "extend":
        data += b"\0"
    elif damage == "magic":
        data[0] ^= 1
    else:
        data[7] = 5
    with pytest.raises(ValueError):
        IntervalSet.from_bytes(bytes(data))


@given(FAMILIES.flatmap(lambda f: st.tuples(merged(f), merged(f))))
@BOUNDED
def test_diff_of_ordered_sets_is_the_set_difference(case: tuple[list[Interval], list[Interval]]) -> None:
    old, new = case
    family = (old or new or [Interval(4, 0, 0)])[0].family
    removed, added = IntervalSet.of(family, old).diff(IntervalSet.of(family, new))
    assert removed == tuple(sorted(set(old) - set(new)))
    assert added == tuple(sorted(set(new) - set(old)))


@given(merged(4), st.data())
@BOUNDED
def test_diff_of_a_small_change_to_a_large_set(base: list[Interval], data: st.DataObject) -> None:
    # The common case the window is for: many shared elements around one change.
    shared = [Interval(4, 10_000 + 4 * n, 10_000 + 4 * n + 1) for n in range(300)]
    old = merge_intervals(shared + base)
    change = data.draw(st.lists(intervals(4), max_size=3))
    new = merge_intervals(shared + base + change)
    removed, added = IntervalSet.of(4, old).diff(IntervalSet.of(4, new))
    assert removed == tuple(sorted(set(old) - set(new)))
    assert added == tuple(sorted(set(new) - set(old)))


def test_diff_of_unordered_sets_falls_back_to_whole_sets() -> None:
    old = IntervalSet.of(4, [Interval(4, 9, 9), Interval(4, 1, 1)])
    new = IntervalSet.of(4, [Interval(4, 1, 1), Interval(4, 5, 5)])
    assert old.diff(new) == ((Interval(4, 9, 9),), (Interval(4, 5, 5),))


@given(FAMILIES.flatmap(lambda f: st.tuples(merged(f, permanent=True), st.lists(intervals(f), max_size=10))))
@BOUNDED
def test_merged_with_is_merge_intervals_of_everything(case: tuple[list[Interval], list[Interval]]) -> None:
    base, extra = case
    family = (base or extra or [Interval(6, 0, 0)])[0].family
    result = IntervalSet.of(family, base).merged_with(extra)
    expected = merge_intervals(base + extra)
    assert list(result) == expected
    assert result == IntervalSet.of(family, expected)  # the same bytes, hence the same digest
    assert result.ordered


@given(merged(6), st.lists(intervals(6), max_size=10))
@BOUNDED
def test_merged_with_an_expiring_base(base: list[Interval], extra: list[Interval]) -> None:
    # A list file whose entry expires: one expiry for the whole base.
    timed = [Interval(6, i.first, i.last, 1200.0) for i in merge_intervals(
        [Interval(6, i.first, i.last) for i in base])]
    result = IntervalSet.of(6, timed).merged_with(extra)
    assert list(result) == merge_intervals(timed + extra)


def test_merged_with_refuses_another_family() -> None:
    with pytest.raises(ValueError):
        IntervalSet.of(4, [Interval(4, 1, 1)]).merged_with([Interval(6, 1, 1)])


@given(st.lists(intervals(4), max_size=16), st.booleans())
@BOUNDED
def test_element_texts_are_render_element(items: list[Interval], permanent: bool) -> None:
    if permanent:
        items = [Interval(4, i.first, i.last) for i in items]
    items = merge_intervals(items)
    assert list(element_texts(IntervalSet.of(4, items), 500.0)) == [render_element(i, 500.0) for i in items]


# Both families, at the bottom of the space too (IPv6 below ::1:0:0:0, which inet_ntop
# would write as ::a.b.c.d), prefixes and plain ranges, with and without expiries.
@given(FAMILIES.flatmap(lambda f: st.tuples(merged(f), merged(f))))
@BOUNDED
def test_texts_are_str_of_each_interval(case: tuple[list[Interval], list[Interval]]) -> None:
    first, second = case
    sets = [IntervalSet.of(first[0].family if first else 4, first), IntervalSet.of(6, merge_intervals(
        [Interval(6, i.first, i.last, i.expires) for i in second]))]
    assert sets[0].texts() == [str(i) for i in first]
    assert Joined([*sets, second[:3]]).texts() == [str(i) for part in (*sets, second[:3]) for i in part]


@given(st.binary(max_size=300), st.binary(max_size=300), st.binary(max_size=300), st.booleans())
@settings(max_examples=200, deadline=None)
def testcommon_bytes_matches_a_naive_scan(shared: bytes, a: bytes, b: bytes, from_end: bool) -> None:
    a, b = (a + shared, b + shared) if from_end else (shared + a, shared + b)
    pairs = zip(reversed(a), reversed(b), strict=False) if from_end else zip(a, b, strict=False)
    naive = 0
    for x, y in pairs:
        if x != y:
            break
        naive += 1
    assert common_bytes(a, b, from_end=from_end) == naive


@given(st.data())
@BOUNDED
def test_diff_of_scattered_changes_to_a_large_set(data: st.DataObject) -> None:
    """Removals, additions and changed expiries far apart, so that windows are split."""
    family = data.draw(FAMILIES)
    base = [Interval(family, 1000 + 10 * n, 1000 + 10 * n + 3) for n in range(600)]
    old, new = list(base), list(base)
    for _ in range(data.draw(st.integers(1, 6))):
        index = data.draw(st.integers(0, len(new) - 1))
        action = data.draw(st.sampled_from(["remove", "add", "expiry", "add_old"]))
        if action == "remove":
            del new[index]
        elif action == "add":
            new.append(Interval(family, new[index].last + 2, new[index].last + 2))
        elif action == "add_old":
            old.append(Interval(family, old[min(index, len(old) - 1)].last + 3, old[min(index, len(old) - 1)].last + 3))
        else:
            new[index] = Interval(family, new[index].first, new[index].last, 4000.0)
    old, new = merge_intervals(old), merge_intervals(new)
    removed, added = IntervalSet.of(family, old).diff(IntervalSet.of(family, new))
    assert removed == tuple(sorted(set(old) - set(new)))
    assert added == tuple(sorted(set(new) - set(old)))


def test_a_replacement_far_away_decodes_only_the_changed_records(monkeypatch: pytest.MonkeyPatch) -> None:
    base = [Interval(4, 10 * n, 10 * n + 1) for n in range(20_000)]
    old = IntervalSet.of(4, base)
    new = IntervalSet.of(4, [*base[1:], Interval(4, 10**6, 10**6)])  # the first one out, one at the end in
    decoded = []
    original = IntervalSet.__iter__

    def counting(self: IntervalSet) -> object:
        decoded.append(len(self))
        return original(self)

    monkeypatch.setattr(IntervalSet, "__iter__", counting)
    assert old.diff(new) == ((base[0],), (Interval(4, 10**6, 10**6),))
    assert sum(decoded) < 200


@given(st.sampled_from([4, 6]).flatmap(lambda family: st.tuples(st.just(family), merged(family))), st.booleans())
@BOUNDED
def test_partition_singles_splits_in_order_and_hosts_render_as_addresses(
    case: tuple[int, list[Interval]], permanent: bool
) -> None:
    family, items = case
    if permanent:
        items = [Interval(i.family, i.first, i.last) for i in items]
    singles, wider = IntervalSet.of(family, items).partition_singles()
    assert list(singles) == [i for i in items if i.first == i.last]
    assert list(wider) == [i for i in items if i.first != i.last]
    assert host_texts(singles, 500.0) == [render_host(i, 500.0) for i in singles]
    assert all("/" not in text for text in host_texts(singles, 500.0))


@pytest.mark.parametrize("family", [4, 6])
def test_a_range_is_wider_whichever_byte_of_its_addresses_differs(family: int) -> None:
    width = 4 if family == 4 else 16
    base = 0x20010DB8 << (8 * width - 32)
    items = []
    for position in range(width):  # from the last byte to the first
        first = base + (position << 8 * (width - 1) if position else 0) + 2 * position * 256
        items += [Interval(family, first, first), Interval(family, first + 1, first + 1 + (1 << 8 * position))]
    items.sort()
    singles, wider = IntervalSet.of(family, items).partition_singles()
    assert list(singles) == [i for i in items if i.first == i.last] and len(singles) == width
    assert list(wider) == [i for i in items if i.first != i.last] and len(wider) == width
