"""Which allow entries carried packets: the kernel's per-element counters (services with
``entry_counters: true``), and since when each element has been counting.

A counter starts at zero when its element is created: by the full load that created the
table, or later by an element delta (which also re-creates an element whose range or
expiry changed). The state directory knows both: the time of the last full load, and
the generations loaded as deltas since, whose sets say when each element appeared.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

from msgspec import Struct

from hostwall.cidr import Interval
from hostwall.clock import now as wall_now
from hostwall.engine import Engine
from hostwall.errors import HostwallError
from hostwall.plan import detect_drift
from hostwall.ruleset import Ruleset
from hostwall.state import Current, StateDir

Key = tuple[int, int]


class _CountedSet(Struct, frozen=True):
    firsts: list[int]
    elements: list[tuple[int, int, int, float]]  # first, last, packets, counting since


class KernelUsage:
    def __init__(self, sets: dict[str, _CountedSet]) -> None:
        self._sets = sets

    def packets(self, service: str, interval: Interval) -> tuple[int, float] | None:
        counted = self._sets.get(f"{service}_v{interval.family}")
        if counted is None:
            return None
        index = bisect.bisect_right(counted.firsts, interval.first) - 1
        if index < 0:
            return None
        first, last, packets, since = counted.elements[index]
        if not first <= interval.first <= interval.last <= last:
            return None  # not in the kernel (expired, or drift)
        return packets, since


def kernel_usage(engine: Engine, state: StateDir, clock: Callable[[], float] = wall_now
                 ) -> tuple[KernelUsage | None, str | None]:
    """Evidence from the kernel, or None and why there is none."""
    kernel = engine.kernel_table()
    if kernel is None:
        return None, "no hostwall table is loaded"
    packets = kernel.element_packets or {}
    if not packets:
        return None, "no service has entry_counters: true"
    current = state.current()
    if current is None or current.counting_since is None:
        return None, "the state directory does not say when the counters started; the next full load will"
    recorded = state.generation(current.generation).ruleset()
    if detect_drift(kernel, current, recorded, clock()):
        return None, "the kernel does not hold the recorded generation (drift; see hostwall status)"
    since = _element_since(state, current, kernel.base_generation, recorded, set(packets))
    sets = {}
    for name, counts in packets.items():
        ordered = sorted(counts.items())
        sets[name] = _CountedSet([first for (first, _), _ in ordered],
                                 [(first, last, n, since.get(name, {}).get((first, last), current.counting_since))
                                  for (first, last), n in ordered])
    return KernelUsage(sets), None


def _element_since(state: StateDir, current: Current, base: int | None, recorded: Ruleset,
                   names: set[str]) -> dict[str, dict[Key, float]]:
    """For elements that deltas created after the last full load, when they were created.

    Walking back from the loaded generation through the deltas since the full load, an
    element first missing from generation i (by range or expiry) was created by the
    delta that loaded generation i+1.
    """
    assert current.counting_since is not None
    chain: list[tuple[Ruleset, float]] = []
    try:
        for generation in state.generations():
            number, created = generation.meta.number, generation.meta.created
            if number == base or (created > current.counting_since and number < current.generation):
                chain.append((generation.ruleset(), created))
    except HostwallError:
        return {}  # a pruned or unreadable generation: every element counts from the full load
    loaded_at = current.applied
    result: dict[str, dict[Key, float]] = {}
    for name in names:
        remaining = {(i.first, i.last, i.expires) for i in recorded.sets().get(name, ())}
        found: dict[Key, float] = {}
        later = loaded_at
        for ruleset, created in reversed(chain):
            present = {(i.first, i.last, i.expires) for i in ruleset.sets().get(name, ())}
            for element in remaining - present:
                found[element[:2]] = later
            remaining &= present
            later = created
        result[name] = found
    return result
