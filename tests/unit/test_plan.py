"""plan.Joined: a plan's added entries, read in place from the compiled sets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hostwall.cidr import Interval, IntervalSet
from hostwall.plan import Joined

PARTS = st.lists(st.lists(st.integers(0, 1000).map(lambda n: Interval(4, n, n)), max_size=5), max_size=4)


@given(PARTS, st.integers(-25, 25), st.integers(-25, 25), st.sampled_from([None, 1, 2, -1]))
def test_joined_reads_like_the_concatenated_list(parts: list[list[Interval]], index: int, stop: int,
                                                   step: int | None) -> None:
    joined = Joined([IntervalSet.of(4, sorted(set(p))) if i % 2 else p for i, p in enumerate(parts)])
    whole = [interval for i, part in enumerate(parts) for interval in (sorted(set(part)) if i % 2 else part)]
    assert len(joined) == len(whole) and list(joined) == whole and joined == whole
    assert bool(joined) == bool(whole)
    assert joined[index:stop:step] == whole[index:stop:step]
    if -len(whole) <= index < len(whole):
        assert joined[index] == whole[index]
    else:
        try:
            joined[index]
        except IndexError:
            pass
        else:
            raise AssertionError(f"index {index} of {len(whole)} did not raise")


def test_a_slice_decodes_only_the_records_it_holds() -> None:
    decoded: list[int] = []

    class Watched(IntervalSet):
        __slots__ = ()

        def bounds(self) -> tuple[list[int], list[int]]:
            decoded.append(len(self))
            return super().bounds()

    many = Watched(4, IntervalSet.of(4, [Interval(4, 2 * n, 2 * n) for n in range(1000)]).ranges, ordered=True)
    joined = Joined([[Interval(4, 5000, 5000)], many, many])
    assert joined[:20] == [Interval(4, 5000, 5000), *(Interval(4, 2 * n, 2 * n) for n in range(19))]
    assert joined[999:1003] == [Interval(4, 1996, 1996), Interval(4, 1998, 1998), Interval(4, 0, 0),
                                Interval(4, 2, 2)]
    assert decoded == []  # no part was decoded whole
