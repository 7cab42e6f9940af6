"""An in-memory kernel with NftBackend's interface, for unit tests.

It understands the full-load transactions hostwall renders, applies each to a copy
and keeps the copy only when the whole transaction succeeded, like nf_tables does.
Tests assert the state it ends in, never the calls made to it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import re
from collections.abc import Callable

from msgspec import Struct, field

from hostwall.cidr import Interval
from hostwall.errors import KernelRejected
from hostwall.kernel import Counter, KernelTable
from hostwall.ruleset import (
    GENERATION_SET,
    Delta,
    Ruleset,
    logical_set_name,
    render_full_load,
    render_removal,
    timeout_seconds,
)

_SET_OPEN = re.compile(r"^\tset (\w+) \{$")
_ELEMENTS = re.compile(r"^\t\telements = \{ (.*) \}$")
_COMMENT = re.compile(r'^\t\tcomment "(.*)"$')
_COUNTER = re.compile(r"^\tcounter (\w+) \{\}$")


class _Table(Struct):
    comment: str | None
    structure_lines: list[str]
    counters: dict[str, Counter]
    sets: dict[str, tuple[Interval, ...]]
    marker: int | None = None
    counted: set[str] = field(default_factory=set)  # sets declared with a counter
    packets: dict[str, dict[tuple[int, int], int]] = field(default_factory=dict)


class FakeBackend(Struct):
    table: _Table | None = None
    reject_next: str | None = None
    submitted: int = field(default=0)

    def close(self) -> None:
        pass  # holds nothing of the kernel

    def submit(self, transaction: str) -> None:
        if self.reject_next is not None:
            reason, self.reject_next = self.reject_next, None
            raise KernelRejected(f"the kernel rejected the transaction: {reason}")
        self.table = None if transaction == render_removal() else _parse_full_load(transaction)
        self.submitted += 1

    def load(self, ruleset: Ruleset, generation: int, now: float,
             before_commit: Callable[[], None] = lambda: None) -> None:
        transaction = render_full_load(ruleset, generation, now)
        before_commit()
        self.submit(transaction)

    def read_table(self, *, elements: bool) -> KernelTable | None:
        if self.table is None:
            return None
        structure = hashlib.sha256("\n".join(self.table.structure_lines).encode()).hexdigest()
        return KernelTable(
            self.table.comment, structure, dict(self.table.counters),
            dict(self.table.sets) if elements else None, marker=self.table.marker,
            element_packets={name: {(i.first, i.last): self.table.packets.get(name, {}).get((i.first, i.last), 0)
                                    for i in self.table.sets[name]}
                             for name in self.table.counted} if elements else None,
        )

    def apply_delta(self, delta: Delta, now: float) -> None:
        if self.reject_next is not None:
            reason, self.reject_next = self.reject_next, None
            raise KernelRejected(f"the kernel rejected the element batch: {reason}")
        if self.table is None or self.table.marker != delta.from_generation:
            raise KernelRejected("the kernel rejected the element batch: No such file or directory")
        sets = dict(self.table.sets)
        for change in delta.sets:
            # Like the kernel: elements are keyed by their addresses, a timeout is an attribute.
            elements = {(i.family, i.first, i.last): i for i in sets[change.set_name]}
            for interval in change.remove:
                if elements.pop((interval.family, interval.first, interval.last), None) is None:
                    raise KernelRejected("the kernel rejected the element batch: No such file or directory")
                self.table.packets.get(change.set_name, {}).pop((interval.first, interval.last), None)
            for interval in change.add:
                key = (interval.family, interval.first, interval.last)
                if key in elements:
                    raise KernelRejected("the kernel rejected the element batch: File exists")
                expires = interval.expires if interval.expires == math.inf else float(timeout_seconds(interval, now))
                elements[key] = Interval(interval.family, interval.first, interval.last, expires)
            sets[change.set_name] = tuple(sorted(elements.values()))
        self.table.sets = sets
        self.table.marker = delta.to_generation
        self.submitted += 1

    def hit(self, set_name: str, address: int, packets: int = 1) -> None:
        """What traffic does to the counter of the element of set_name holding address."""
        assert self.table is not None and set_name in self.table.counted
        element = next(i for i in self.table.sets[set_name] if i.contains(address))
        counts = self.table.packets.setdefault(set_name, {})
        counts[(element.first, element.last)] = counts.get((element.first, element.last), 0) + packets

    def count(self, counter: str, packets: int, size: int) -> None:
        """What traffic would do to a counter."""
        assert self.table is not None
        old = self.table.counters[counter]
        self.table.counters[counter] = Counter(old.packets + packets, old.bytes + size)


def _parse_full_load(text: str) -> _Table:
    lines = text.splitlines()
    if lines[:1] != ["table inet hostwall {"] or lines[-1] != "}":
        raise KernelRejected("the kernel rejected the transaction: not a hostwall full load")
    table = _Table(None, [], {}, {})
    current_set: str | None = None
    for line in lines[1:-1]:
        if current_set == GENERATION_SET and (match := _COMMENT.match(line)):
            table.comment = match[1]
            continue
        if match := _COUNTER.match(line):
            table.counters[match[1]] = Counter(0, 0)
        elif match := _SET_OPEN.match(line):
            # Like NftBackend's listing: a hash set of single addresses joins its set.
            current_set = logical_set_name(match[1])
            table.sets.setdefault(current_set, ())
        elif current_set == GENERATION_SET and (match := _ELEMENTS.match(line)):
            table.marker = int(match[1])
            continue
        elif current_set and (match := _ELEMENTS.match(line)):
            family = 4 if current_set.endswith("_v4") else 6
            table.sets[current_set] = tuple(
                sorted((*table.sets[current_set], *(_element(family, item) for item in match[1].split(", "))))
            )
            continue
        elif line == "\t}":
            current_set = None
        elif current_set and line == "\t\tcounter":
            table.counted.add(current_set)
        table.structure_lines.append(line)
    return table


def _seconds(duration: str) -> int:
    """nft's duration syntax (e.g. 1157d9h46m40s) in seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(number) * units[unit] for number, unit in re.findall(r"(\d+)([dhms])", duration))


def _element(family: int, text: str) -> Interval:
    value, _, timeout = text.partition(" timeout ")
    expires = float(_seconds(timeout)) if timeout else math.inf
    if "-" in value:
        first, last = value.split("-")
        return Interval(family, int(ipaddress.ip_address(first)), int(ipaddress.ip_address(last)), expires)
    return Interval.of(ipaddress.ip_network(value), expires)
