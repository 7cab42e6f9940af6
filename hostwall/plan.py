"""Desired ruleset vs what the kernel holds -> what apply would do. Pure."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import overload

from msgspec import Struct, field

from hostwall.cidr import Interval, IntervalSet
from hostwall.kernel import KernelTable
from hostwall.ruleset import Ruleset, ServiceRules, table_comment
from hostwall.state import Current


def _key(interval: Interval) -> tuple[int, int, int]:
    return (interval.family, interval.first, interval.last)


class Joined(Sequence[Interval]):
    """Sequences of intervals one after another, read in place (never copied)."""

    def __init__(self, parts: Iterable[Sequence[Interval]]) -> None:
        self._parts = [part for part in parts if len(part)]

    def __len__(self) -> int:
        return sum(len(part) for part in self._parts)

    def __iter__(self) -> Iterator[Interval]:
        return itertools.chain.from_iterable(self._parts)

    def texts(self) -> list[str]:
        """str() of each interval; a first load's whole sets are formatted from their records."""
        return [text for part in self._parts
                for text in (part.texts() if isinstance(part, IntervalSet) else map(str, part))]

    @overload
    def __getitem__(self, index: int) -> Interval: ...
    @overload
    def __getitem__(self, index: slice) -> list[Interval]: ...
    def __getitem__(self, index: int | slice) -> Interval | list[Interval]:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return list(self)[index]
            # Each part sliced on its own: a plan shows the first few entries of a set of
            # 100k, and an IntervalSet's slice decodes only its own records.
            window: list[Interval] = []
            for part in self._parts:
                if start < len(part) and stop > 0:
                    window.extend(part[max(start, 0):stop])
                start, stop = start - len(part), stop - len(part)
            return window
        if index < 0:
            index += len(self)
        for part in self._parts:
            if 0 <= index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError("Joined index out of range")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and len(self) == len(other) and all(
            a == b for a, b in zip(self, other, strict=True))

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"Joined({list(self)!r})"


def _unexpired(intervals: IntervalSet, now: float) -> Sequence[Interval]:
    if intervals.expiries is None:
        return intervals  # every interval is permanent
    return [interval for interval in intervals if interval.expires > now]


class ServiceChange(Struct, frozen=True):
    name: str
    status: str  # "added", "removed", "changed" (ports/protocols/action) or "entries"
    added: Sequence[Interval] = ()
    removed: Sequence[Interval] = ()
    details: tuple[str, ...] = ()


class Drift(Struct, frozen=True):
    """Ways the kernel differs from what hostwall last wrote."""

    reasons: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.reasons)


class Plan(Struct, frozen=True):
    changed: bool
    table_present: bool
    drift: Drift
    services: tuple[ServiceChange, ...] = field(default_factory=tuple)

    @property
    def summary(self) -> str:
        if not self.changed:
            return "no changes"
        added = sum(len(s.added) for s in self.services)
        removed = sum(len(s.removed) for s in self.services)
        parts = [f"{added} entries to add", f"{removed} to remove"]
        structural = [s.name for s in self.services if s.status != "entries"]
        if structural:
            parts.append("services changed: " + ", ".join(structural))
        if not self.table_present:
            parts.insert(0, "table not loaded yet")
        elif self.drift:
            parts.insert(0, "repairs drift")
        return "; ".join(parts)


def detect_drift(
    kernel: KernelTable | None, current: Current | None, recorded: Ruleset | None, now: float
) -> Drift:
    if current is not None and current.disabled:
        if kernel is None:
            return Drift()
        return Drift((f"a hostwall table ({kernel.comment or 'no comment'}) is loaded although generation "
                      f"{current.generation} disabled hostwall",))
    if kernel is None:
        return Drift(("the hostwall table is missing from the kernel",)) if current else Drift()
    reasons = []
    if current is None:
        reasons.append(
            f"the kernel holds a hostwall table ({kernel.comment or 'no comment'}) "
            "that this state directory has no record of"
        )
    else:
        expected_comment = current.comment or table_comment(current.generation, current.digest)
        if kernel.generation != current.generation or kernel.comment != expected_comment:
            reasons.append(
                f"the kernel's table is {kernel.comment or 'unlabelled'} with generation marker "
                f"{kernel.marker}, not generation {current.generation} as recorded"
            )
        if kernel.structure != current.structure:
            reasons.append("the table's chains, rules, sets or counters were modified outside hostwall")
    if recorded is not None and kernel.sets is not None and not reasons:
        for service in recorded.services:
            for family in (4, 6):
                name = service.set_name(family)
                wanted, held = service.intervals(family), kernel.sets.get(name, ())
                if wanted.expiries is None and isinstance(held, IntervalSet) and held.ranges == wanted.ranges:
                    continue  # the same permanent intervals, compared as their records
                expected = {_key(i) for i in wanted if i.expires > now}
                actual = {_key(i) for i in held}
                # An element may expire between our clock and the kernel's listing.
                missing = {k for k in expected - actual if not _expiring_soon(service, k, now)}
                if missing or actual - expected:
                    reasons.append(
                        f"set {name} differs from generation {current.generation if current else '?'}: "
                        f"{len(missing)} missing, {len(actual - expected)} unexpected"
                    )
    return Drift(tuple(reasons))


def _expiring_soon(service: ServiceRules, key: tuple[int, int, int], now: float) -> bool:
    return any(_key(i) == key and i.expires - now < 2 for i in service.intervals(key[0]))


def make_plan(
    desired: Ruleset, kernel: KernelTable | None, previous: Ruleset | None, drift: Drift, now: float
) -> Plan:
    """previous is the recorded ruleset the kernel's table was built from, when known."""
    if kernel is not None and not drift and previous is not None and previous.digest == desired.digest:
        return Plan(changed=False, table_present=True, drift=drift)
    changes = []
    old_names = {s.name for s in previous.services} if previous else set()
    for service in desired.services:
        before = previous.service(service.name) if previous else None
        kernel_sets = kernel.sets if kernel is not None and kernel.sets is not None else {}
        added: list[Sequence[Interval]] = []
        removed: list[Interval] = []
        for family in (4, 6):
            in_kernel = kernel_sets.get(service.set_name(family), ())
            if not in_kernel:
                # A first load, or an empty set: everything wanted is added, already in
                # address order. A 100k set is neither copied nor turned into objects.
                added.append(_unexpired(service.intervals(family), now))
                continue
            have = {_key(i): i for i in in_kernel}
            want = {_key(i): i for i in service.intervals(family) if i.expires > now}
            added.append([want[k] for k in sorted(want.keys() - have.keys())])
            removed.extend(have[k] for k in sorted(have.keys() - want.keys()))
            if before is not None:
                old = {_key(i): i.expires for i in before.intervals(family)}
                added.append([
                    want[k] for k in sorted(want.keys() & have.keys())
                    if old.get(k, want[k].expires) != want[k].expires
                ])
        if before is None and (previous is not None or kernel is None):
            status = "added"
        elif before is not None and before.structure() != service.structure():
            status = "changed"
        else:
            status = "entries"
        details = _structure_details(before, service) if status == "changed" else ()
        joined = Joined(added)
        if status != "entries" or joined or removed:
            changes.append(ServiceChange(service.name, status, joined, tuple(removed), details))
    for name in sorted(old_names - {s.name for s in desired.services}):
        changes.append(ServiceChange(name, "removed"))
    return Plan(changed=True, table_present=kernel is not None, drift=drift, services=tuple(changes))


def _structure_details(before: ServiceRules | None, after: ServiceRules) -> tuple[str, ...]:
    if before is None:
        return ()
    details = []
    if before.ports != after.ports:
        details.append(f"ports {_ports(before)} -> {_ports(after)}")
    if before.protocols != after.protocols:
        details.append(f"protocols {','.join(before.protocols)} -> {','.join(after.protocols)}")
    if before.action != after.action:
        details.append(f"action {before.action} -> {after.action}")
    for family in (4, 6):
        if before.has_timeouts(family) != after.has_timeouts(family):
            details.append(f"IPv{family} set {'gains' if after.has_timeouts(family) else 'loses'} timeouts")
    return tuple(details)


def _ports(service: ServiceRules) -> str:
    return ",".join(str(p) for p in service.ports)


def is_permanent(interval: Interval) -> bool:
    return interval.expires == math.inf


def diff_rulesets(old: Ruleset, new: Ruleset) -> tuple[ServiceChange, ...]:
    """What changed from one recorded ruleset to another (for `hostwall diff`)."""
    changes = []
    for service in new.services:
        before = old.service(service.name)
        if before is None:
            changes.append(ServiceChange(service.name, "added", (*service.v4, *service.v6)))
            continue
        added: tuple[Interval, ...] = ()
        removed: tuple[Interval, ...] = ()
        for family in (4, 6):
            gone, new_ones = before.intervals(family).diff(service.intervals(family))
            added += new_ones
            removed += gone
        structural = before.structure() != service.structure()
        if structural or added or removed:
            changes.append(ServiceChange(
                service.name, "changed" if structural else "entries", added, removed,
                _structure_details(before, service) if structural else (),
            ))
    for before in old.services:
        if new.service(before.name) is None:
            changes.append(ServiceChange(before.name, "removed", (), (*before.v4, *before.v6)))
    return tuple(changes)
